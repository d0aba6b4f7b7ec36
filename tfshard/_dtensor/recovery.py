"""Recovering from failed DTensor ops: completing every collective group of
a mesh up front (:func:`complete_collective_groups`) and clearing the error
state a failed op leaves behind (:func:`settle`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor
from tensorflow.python.eager import context as _tf_context

from tfshard._dtensor.layouts import distribute, to_numpy

# A failed op (a checkpoint write on a full disk, a read of a corrupt file)
# leaves state behind that fails the next ops: DTensor's device keeps a
# cancelled cancellation manager and rendezvous until it is waited on (which
# copying a replicated value off the mesh does); and a collective group
# cancelled while still forming stays cancelled for good ("group is
# cancelled"). A save ends with a reduction over every device of the mesh,
# so that group is formed before the first save.
_COMPLETE_GROUPS = set()


def complete_collective_groups(dmesh):
    """Once per mesh, run one all-reduce over every set of its axes, so that
    every collective group DTensor forms on the mesh is complete.

    DTensor gives all collectives over the same mesh axes one group key
    (``DTENSOR_ENABLE_REUSE_GROUP_KEY``, on by default), and TensorFlow marks
    a group that is cancelled before all its devices joined it as cancelled
    for good ("group is cancelled"). A step or a save failing on some devices
    while the others wait in a group's first collective would make every
    later collective over those axes fail, in every program. A complete
    group is never cancelled.
    """
    key = dmesh.to_string()
    axes = [name for name in dmesh.dim_names if dmesh.dim_size(name) > 1]
    if key in _COMPLETE_GROUPS or not axes:
        return
    ones = distribute(
        np.ones([dmesh.dim_size(name) for name in axes], np.float32), dtensor.Layout(axes, dmesh)
    )
    subsets = [
        [dim for dim in range(len(axes)) if mask >> dim & 1] for mask in range(1, 2 ** len(axes))
    ]

    @tf.function(autograph=False)
    def reduce_over_each_set_of_axes(x):
        return [tf.reduce_sum(x, axis=dims) for dims in subsets]

    for total in reduce_over_each_set_of_axes(ones):
        to_numpy(total)
    _COMPLETE_GROUPS.add(key)


def settle(dmesh):
    """Wait for every pending DTensor op on ``dmesh`` and clear the error
    state a failed one left behind; returns the root error (the first that
    is not a cancellation, if any) or None.

    DTensor runs asynchronously: a function that fails on one device cancels
    the others, the caller often sees only a ``CancelledError``, and the root
    error stays queued, to surface at some later op. Copying a replicated
    value off the mesh is the one public path into DTensor's ``AsyncWait``,
    which waits on every mesh, reports the root error, clears the per-device
    executors and renews the cancellation manager
    (``context.async_clear_error`` alone does not: every later DTensor op is
    then cancelled).
    """
    root = None
    for _ in range(3):
        try:
            _tf_context.async_wait()
            distribute(np.zeros((), np.float32), dtensor.Layout.replicated(dmesh, 0)).numpy()
            break
        except tf.errors.OpError as err:
            if root is None or (
                isinstance(root, tf.errors.CancelledError)
                and not isinstance(err, tf.errors.CancelledError)
            ):
                root = err
    _tf_context.context().clear_executor_errors()
    return root
