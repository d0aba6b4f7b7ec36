"""Version of tfshard and the dependency ranges it is tested against."""

__version__ = "0.1.0"

# tfshard reaches into keras.src internals (see tfshard/_keras.py), so it
# supports only the Keras minor versions it is tested with.
KERAS_MIN = (3, 15, 0)
KERAS_MAX_EXCLUSIVE = (3, 16, 0)
TF_MIN = (2, 21, 0)
TF_MAX_EXCLUSIVE = (2, 22, 0)


def _parse_version(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_versions():
    """Fail clearly outside the Keras range tfshard is tested against
    (``tfshard._keras`` calls it once, after setting the backend)."""
    import keras

    version = _parse_version(keras.version())
    if not (KERAS_MIN <= version < KERAS_MAX_EXCLUSIVE):
        lo = ".".join(map(str, KERAS_MIN))
        hi = ".".join(map(str, KERAS_MAX_EXCLUSIVE))
        raise ImportError(
            f"tfshard supports keras>={lo},<{hi} (it uses Keras internals); "
            f"found keras {keras.version()}. Install a supported version: "
            f"pip install 'keras>={lo},<{hi}'."
        )
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            f"tfshard needs the Keras TensorFlow backend, but Keras is using "
            f"{backend!r}. Set KERAS_BACKEND=tensorflow before importing keras "
            "(or import tfshard before keras)."
        )
