"""The mechanism behind the changes ``import tfshard`` makes to Keras,
independent of what is changed: the hook registry the wrappers call
(:data:`hooks`, filled in by higher layers), the :class:`Patch` row (owner,
attribute, wrapper factory, purpose), and :func:`install`,
:func:`uninstall`, :func:`installed_patches` and :func:`describe_patches`,
which apply a table of rows, restore the originals exactly and list them.
The Keras-specific wrappers and tables are in ``tfshard._keras``, which
re-exports these names.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib


# ---------------------------------------------------------------- the hooks
class _Hooks:
    """Callbacks supplied by higher layers (tfshard.strategy)."""

    make_variable = None  # (keras_variable, value_or_callable) -> tf.Variable | None
    to_numpy = None  # (tf_variable) -> np.ndarray | None
    layer_created = None  # (layer) -> None
    entry_call = None  # (layer, call, args, kwargs) -> outputs | NotImplemented
    pin_gradients = None  # (grads, variables) -> grads laid out like their variables
    make_step_function = None  # (model, kind, original, force) -> fn | NotImplemented
    read_variable = None  # (keras_variable, tensor) -> the tensor laid out for the op reading it
    layer_inputs = None  # (layer, args, kwargs) -> (args, kwargs), laid out as the layer's style says
    layer_output = None  # (layer, outputs) -> outputs, laid out by its style and "<path>/output" entries
    run_trainer_method = None  # (model, name, original, args, kwargs) -> result | NotImplemented
    call_scope = None  # (layer) -> context manager around the layer's call, or None

    def __init__(self):
        # (backend module, function) -> replacement(original, *args, **kwargs)
        self.backend_ops = {}


hooks = _Hooks()


def chained(outer, inner):
    """A backend-op replacement that runs ``outer`` around ``inner`` (another
    replacement, or None: the Keras original): ``outer``'s ``original`` is
    ``inner`` applied to the Keras original. Two replacements of one op
    (matmul: context parallelism's and the contraction one) both apply."""
    if inner is None:
        return outer

    def replacement(original, *args, **kwargs):
        return outer(functools.partial(inner, original), *args, **kwargs)

    return replacement


# ------------------------------------------------------------ the patches
# Every change ``import tfshard`` makes to Keras is one row of a table:
# (owner, attribute, wrapper factory, what it does). ``install`` applies a
# table, ``uninstall`` restores every original object exactly, and
# ``describe_patches`` documents them. Each wrapper is inert (calls the
# original) unless a hook says otherwise, so plain Keras code behaves as
# before.
@dataclasses.dataclass(frozen=True)
class Patch:
    owner: str  # "module" or "module:Class"
    attribute: str
    make: object  # original -> replacement
    purpose: str

    def resolve_owner(self):
        module_name, _, class_name = self.owner.partition(":")
        owner = importlib.import_module(module_name)
        return getattr(owner, class_name) if class_name else owner


_installed = {}  # (owner object, attribute) -> (patch, original or None if inherited)


def install(patches):
    """Apply ``patches`` (once each)."""
    for patch in patches:
        owner = patch.resolve_owner()
        key = (owner, patch.attribute)
        if key in _installed:
            continue
        raw = owner.__dict__.get(patch.attribute)
        _installed[key] = (patch, raw)
        if raw is None:  # inherited or absent: wrap what lookup finds, delete to restore
            setattr(owner, patch.attribute, patch.make(getattr(owner, patch.attribute, None)))
        elif isinstance(raw, staticmethod):
            setattr(owner, patch.attribute, staticmethod(patch.make(raw.__func__)))
        else:
            setattr(owner, patch.attribute, patch.make(raw))


def uninstall(patches=None):
    """Restore the originals of ``patches`` (all installed ones by default)."""
    keys = list(_installed) if patches is None else [
        (p.resolve_owner(), p.attribute) for p in patches
    ]
    for key in keys:
        entry = _installed.pop(key, None)
        if entry is None:
            continue
        owner, attribute = key
        if entry[1] is None:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, entry[1])


def installed_patches():
    """The patches in place now, in the order they were installed."""
    return [patch for patch, _ in _installed.values()]


def describe_patches(patches=None):
    """One line per patch: ``owner.attribute: purpose``."""
    patches = installed_patches() if patches is None else patches
    return "\n".join(f"{p.owner.replace(':', '.')}.{p.attribute}: {p.purpose}" for p in patches)
