"""Real training data that is present offline on every machine.

* Text: the Python standard library's own ``.py`` sources, read as bytes
  (a byte-level language-modelling corpus of a few MB, no download).
* Images: scikit-learn's bundled 8x8 handwritten digits (optional extra
  ``tfshard[cnn]``; 1797 images, 10 classes).
"""

from __future__ import annotations

import os
import sysconfig

import numpy as np

from tfshard.errors import TfshardError


def stdlib_bytes(max_bytes=4_000_000):
    """Up to ``max_bytes`` of Python standard-library source, as uint8.

    Files are read in sorted path order, so the corpus is the same on every
    machine with the same Python version.
    """
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
    if not chunks:
        raise TfshardError(f"no Python sources found under {root!r}")
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def lm_examples(tokens, seq_len, count, seed):
    """``count`` random windows: inputs ``tokens[i:i+seq_len]`` and targets
    shifted by one, as int32 arrays of shape (count, seq_len)."""
    rng = np.random.RandomState(seed)
    starts = rng.randint(0, len(tokens) - seq_len - 1, size=count)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    windows = tokens[idx].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def split_tokens(tokens, holdout=0.05):
    """Train/held-out split of a token stream (the tail is held out)."""
    cut = int(len(tokens) * (1 - holdout))
    return tokens[:cut], tokens[cut:]


def digits():
    """scikit-learn's digits: images (1797, 8, 8, 1) in [0, 1], labels int32."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TfshardError(
            "the CNN example trains on scikit-learn's bundled digits; install it "
            "with: pip install 'tfshard[cnn]' (or pip install scikit-learn)"
        ) from None
    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    return images, bunch.target.astype(np.int32)
