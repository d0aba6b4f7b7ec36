"""Per-process input: which rows of every global batch this process feeds
(:class:`InputContext`), and marking data as holding only those rows
(:func:`process_local`). :func:`tfshard.multi_client.input_context` gives a
strategy's context; ``model.fit`` packs process-local batches as this
process's part of the global batch.
"""

from __future__ import annotations

import dataclasses
import weakref

from tfshard.errors import MultiClientError


@dataclasses.dataclass(frozen=True)
class InputContext:
    """Which rows of every global batch this process feeds.

    The data axis of a mesh is split among the processes: with 2 processes
    of 4 devices on a ``{"batch": 2, "model": 4}`` mesh, process 0 holds the
    devices of batch row 0 and process 1 those of row 1. So each process
    needs only half of each global batch: ``num_input_shards == 2`` and
    ``input_shard_index`` is 0 or 1. Processes that hold the same data-axis
    positions (a model axis that spans processes) share an input shard and
    must feed the same rows.
    """

    num_input_shards: int
    input_shard_index: int
    local_data_parallel: int  # data-axis positions on this process

    def local_batch_size(self, global_batch_size):
        """The rows of each global batch this process feeds."""
        global_batch_size = int(global_batch_size)
        unit = self.num_input_shards * self.local_data_parallel
        if global_batch_size <= 0 or global_batch_size % unit:
            raise MultiClientError(
                f"global_batch_size={global_batch_size} cannot be split into "
                f"{self.num_input_shards} process shards of "
                f"{self.local_data_parallel} data-parallel device(s) each; use "
                f"a multiple of {unit}."
            )
        return global_batch_size // self.num_input_shards

    def shard_dataset(self, dataset, global_batch_size):
        """This process's part of ``dataset`` (a ``tf.data.Dataset`` of
        single examples), batched: each local batch is this process's share
        of one global batch, and every process yields the same number of
        batches (a final partial global batch is dropped).

        The union of the processes' i-th batches is the same set of examples
        as the i-th batch of ``dataset.batch(global_batch_size)``, so the
        mean loss and the gradients equal a single-process run. The result
        is marked :func:`process_local` for ``model.fit``.
        """
        import tensorflow as tf

        local = self.local_batch_size(global_batch_size)
        cardinality = int(dataset.cardinality())
        if cardinality >= 0:
            # Whole global batches only, so every shard has as many batches.
            dataset = dataset.take(cardinality // global_batch_size * global_batch_size)
            dataset = dataset.shard(self.num_input_shards, self.input_shard_index)
            dataset = dataset.batch(local, drop_remainder=True)
        else:
            # Unknown length: batch globally, keep this process's rows.
            begin = self.input_shard_index * local

            def rows(*batch):
                mine = tf.nest.map_structure(lambda t: t[begin : begin + local], batch)
                return mine if len(mine) > 1 else mine[0]

            dataset = dataset.batch(global_batch_size, drop_remainder=True).map(rows)
        return process_local(dataset)


def data_positions(strategy):
    """Per process: the sorted data-axis positions of its mesh devices."""
    import tensorflow as tf

    mesh = strategy.mesh
    axis = strategy.data_axis
    positions = {}
    for flat, device in enumerate(mesh.devices):
        task = tf.DeviceSpec.from_string(device).task or 0
        coords = _unravel(flat, mesh.shape)
        value = coords[mesh.axis_names.index(axis)] if axis is not None else 0
        positions.setdefault(task, set()).add(value)
    return {task: sorted(values) for task, values in positions.items()}


def _unravel(flat, shape):
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat //= size
    return tuple(reversed(coords))


_PROCESS_LOCAL = weakref.WeakSet()


def process_local(data):
    """Mark ``data`` (a ``tf.data.Dataset``, ``keras.utils.PyDataset`` or
    other iterable passed to ``fit``/``evaluate``/``predict``) as yielding
    this process's rows of each global batch rather than the global batch.

    Its batches are then packed as this process's part of the global batch
    (see :class:`InputContext`); every process must yield equally many
    batches of equal size. Returns ``data``.
    """
    try:
        _PROCESS_LOCAL.add(data)
    except TypeError:
        raise MultiClientError(
            f"process_local: cannot mark a {type(data).__name__}; pass a "
            "tf.data.Dataset, a keras.utils.PyDataset or a generator object."
        ) from None
    return data


def is_process_local(data) -> bool:
    try:
        return data in _PROCESS_LOCAL
    except TypeError:
        return False
