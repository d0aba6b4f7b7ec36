"""The only package that touches ``tf.experimental.dtensor``.

Everything above this package speaks in tfshard terms: a mesh is a
``tfshard.Mesh`` and a spec is a plain tuple of mesh-axis names or ``None``.
This package turns those into DTensor meshes and layouts and moves values
between host numpy arrays and sharded DTensors (:mod:`.layouts`), holds the
DVariable tfshard creates (:mod:`.variables`), starts and coordinates the
multi-client runtime (:mod:`.runtime`) and recovers from failed ops
(:mod:`.recovery`). The rest of tfshard imports this package, never its
submodules: every name is re-exported here.
"""

from tfshard._dtensor.layouts import (  # noqa: F401
    GATHER_AS_COLLECTIVE_GATHER,
    UNSHARDED,
    _shard_index,
    conform,
    copy_to_mesh,
    default_mesh,
    distribute,
    expand_replicated,
    is_dtensor,
    layout_of,
    local_shape,
    logical_devices,
    make_mesh,
    on_host,
    pack,
    relayout,
    relayout_like,
    spec_of_layout,
    to_layout,
    to_numpy,
    to_plain,
    unpack,
)
from tfshard._dtensor.recovery import complete_collective_groups, settle  # noqa: F401
from tfshard._dtensor.runtime import (  # noqa: F401
    accelerator_system_initialized,
    client_id,
    device_names,
    distribute_local,
    fetch,
    job_name,
    num_clients,
    physical_device_count,
    preferred_device_type,
    publish,
    runtime_started,
    start_runtime,
    task_name,
    use_first_gpus,
    wait_at_barrier,
)
from tfshard._dtensor.variables import LaidOutVariable, fresh_variable_reads, make_variable  # noqa: F401
