"""The sweep's op list, derived from code: a static (``ast``) scan of the
Keras and keras-hub sources for the ``keras.ops`` and ``keras.random``
functions they call.

Every module is parsed, its imports are resolved to dotted names
(``from keras.src import ops``, ``from keras import ops as kops``,
``import keras``, ``from keras.src.ops.nn import softmax``, ...), and every
attribute chain or name whose resolved path is ``keras.ops[.sub].<name>``
(or ``keras.random.<name>``) is a hit. Keras's preprocessing layers call the
same functions through ``backend.<sub>.<name>`` / ``self.backend.<sub>.<name>``;
those count too, under their own source tag. A hit is kept only if the name
is a function of ``keras.ops`` (submodules nn, numpy, math, image, linalg,
core) or ``keras.random``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import pathlib

# (source tag, package, sub-directories scanned)
SOURCES = (
    ("keras.layers", "keras", "src/layers"),
    ("keras.losses", "keras", "src/losses"),
    ("keras.metrics", "keras", "src/metrics"),
    ("keras.optimizers", "keras", "src/optimizers"),
    # The activations every layer's ``activation=`` argument reaches.
    ("keras.activations", "keras", "src/activations"),
    ("keras_hub.models", "keras_hub", "src/models"),
    ("keras_hub.layers", "keras_hub", "src/layers"),
)
OP_SUBMODULES = ("nn", "numpy", "math", "image", "linalg", "core")
BACKEND_TAG = " (backend.*)"


@dataclasses.dataclass
class SourceScan:
    tag: str
    root: str
    files: int = 0
    hits: int = 0


@dataclasses.dataclass
class OpList:
    """The derived list. ``ops``/``random_ops`` map each canonical name
    (``"image.resize"`` for image ops, else the plain name) to the sorted
    source tags that use it."""

    ops: dict
    random_ops: dict
    scans: list
    unresolved: dict  # names found under keras.ops/random that are not functions there

    def only_in(self, tag_prefix):
        """Ops used by sources starting with ``tag_prefix`` and no other."""
        return sorted(
            name for name, tags in self.ops.items()
            if all(t.startswith(tag_prefix) for t in tags)
        )


def _package_dir(package):
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"op sweep: package {package!r} is not installed")
    return pathlib.Path(spec.origin).parent


def _normalize(path):
    """keras.src.X -> keras.X; keras_hub.src... stays (not an op path)."""
    if path == "keras.src" or path.startswith("keras.src."):
        return "keras" + path[len("keras.src"):]
    return path


def _aliases(tree):
    """Local name -> dotted module/function path, from every import in the
    module (function-level imports included: Keras imports lazily)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = _normalize(alias.name)
                else:
                    top = alias.name.split(".")[0]
                    names[top] = _normalize(top)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = _normalize(f"{node.module}.{alias.name}")
    return names


def _chain(node):
    """``a.b.c`` -> ["a", "b", "c"] (``self.backend.x`` -> ["self", "backend", "x"])."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _resolved_paths(tree):
    """Yield (dotted path, via_backend) for every maximal attribute chain or
    bare name in the module that resolves through its imports."""
    aliases = _aliases(tree)
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            inner.add(id(node.value))
    for node in ast.walk(tree):
        if id(node) in inner or not isinstance(node, (ast.Attribute, ast.Name)):
            continue
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            continue
        parts = _chain(node)
        if not parts:
            continue
        if parts[:2] == ["self", "backend"]:  # preprocessing layers' DynamicBackend
            yield "keras.backend." + ".".join(parts[2:]), True
            continue
        base = aliases.get(parts[0])
        if base is None:
            continue
        path = ".".join([base] + parts[1:])
        yield path, path.startswith("keras.backend.")


def _op_functions(keras):
    """canonical name -> function, for keras.ops and its submodules."""
    table = {}
    for sub in (None,) + OP_SUBMODULES:
        module = keras.ops if sub is None else getattr(keras.ops, sub, None)
        if module is None:
            continue
        for name in dir(module):
            fn = getattr(module, name)
            if name.startswith("_") or not inspect.isfunction(fn):
                continue
            origin = fn.__module__.rsplit(".", 1)[-1]
            if origin not in OP_SUBMODULES:
                continue
            canonical = f"image.{name}" if origin == "image" else name
            table.setdefault(canonical, fn)
    return table


def op_function(name):
    """The keras.ops function for a canonical op name."""
    import keras

    if name.startswith("image."):
        return getattr(keras.ops.image, name.split(".", 1)[1])
    return getattr(keras.ops, name)


def random_function(name):
    import keras

    return getattr(keras.random, name)


def _classify(path, op_table, random_names):
    """A resolved dotted path -> ("op"|"random", canonical name) or None."""
    parts = path.split(".")
    if parts[:2] == ["keras", "ops"] and len(parts) >= 3 or parts[:2] == ["keras", "backend"] and len(parts) == 4 and parts[2] in OP_SUBMODULES:
        rest = parts[2:]
    elif parts[:2] == ["keras", "random"] and len(parts) == 3:
        return ("random", parts[2])
    elif parts[:3] == ["keras", "backend", "random"] and len(parts) == 4:
        return ("random", parts[3])
    else:
        return None
    if rest[0] in OP_SUBMODULES:
        if len(rest) != 2:
            return None
        sub, name = rest
    elif len(rest) == 1:
        sub, name = None, rest[0]
    else:
        return None
    candidates = [f"image.{name}"] if sub == "image" else [name, f"image.{name}"]
    for canonical in candidates:
        if canonical in op_table:
            return ("op", canonical)
    return ("unknown", path)


def derive_op_list():
    """Scan the installed Keras and keras-hub sources (see module docstring)."""
    import keras

    op_table = _op_functions(keras)
    random_names = {n for n in dir(keras.random) if inspect.isfunction(getattr(keras.random, n))}
    ops, random_ops, unresolved, scans = {}, {}, {}, []
    for tag, package, sub in SOURCES:
        root = _package_dir(package) / sub
        scan = SourceScan(tag, str(root))
        for path in sorted(root.rglob("*.py")):
            if path.name.endswith("_test.py"):  # their own unit tests, not the layers
                continue
            scan.files += 1
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for dotted, via_backend in _resolved_paths(tree):
                found = _classify(dotted, op_table, random_names)
                if found is None:
                    continue
                kind, name = found
                source = tag + (BACKEND_TAG if via_backend else "")
                if kind == "random":
                    if name not in random_names:
                        unresolved.setdefault(dotted, set()).add(source)
                        continue
                    random_ops.setdefault(name, set()).add(source)
                elif kind == "op":
                    ops.setdefault(name, set()).add(source)
                else:
                    unresolved.setdefault(name, set()).add(source)
                    continue
                scan.hits += 1
        scans.append(scan)
    return OpList(
        ops={k: sorted(v) for k, v in sorted(ops.items())},
        random_ops={k: sorted(v) for k, v in sorted(random_ops.items())},
        scans=scans,
        unresolved={k: sorted(v) for k, v in sorted(unresolved.items())},
    )


def describe(op_list):
    """The ``--list`` text: how the list was made, then every op and its users."""
    lines = [
        "Op list derived by a static ast scan (tfshard/app/opsweep/oplist.py):",
        "imports resolved to dotted names; hits are references to keras.ops[.sub].<name>",
        "or keras.random.<name> (and backend.<sub>.<name> in Keras's preprocessing layers),",
        "kept when <name> is a function of keras.ops (nn, numpy, math, image, linalg, core).",
        "",
        f"{'source':<20} {'files':>6} {'hits':>7}  root",
    ]
    for scan in op_list.scans:
        lines.append(f"{scan.tag:<20} {scan.files:>6} {scan.hits:>7}  {scan.root}")
    lines += ["", f"{len(op_list.ops)} keras.ops functions:"]
    for name, tags in op_list.ops.items():
        lines.append(f"  {name:<28} {', '.join(tags)}")
    lines += ["", f"{len(op_list.random_ops)} keras.random functions:"]
    for name, tags in op_list.random_ops.items():
        lines.append(f"  {name:<28} {', '.join(tags)}")
    if op_list.unresolved:
        lines += ["", "Names under keras.ops/keras.random that are not functions there (dropped):"]
        for name, tags in op_list.unresolved.items():
            lines.append(f"  {name:<28} {', '.join(tags)}")
    return "\n".join(lines)
