"""tfshard's applications, built on the library (which never imports them;
``tests/test_boundaries.py`` checks it).

* ``cli``: the ``tfshard`` command (train, inspect, bench, launch);
  ``jobs``: what train and inspect do; ``config``: the YAML config schema;
* ``bench``: step time, memory and collectives across meshes
  (``_jax_reference``: the same model on Keras's JAX backend);
  ``estimate``: a config's communication by the cost model;
* ``launch``: N local processes of one multi-client job;
* ``models``: the reference transformer and CNN; ``data``: their data;
  ``plots``: pictures for the tutorials; ``examples``: runnable scripts;
* ``opsweep``: the op-coverage sweep (``python -m tfshard.app.opsweep``).
"""
