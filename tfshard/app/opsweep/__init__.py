"""The op-coverage sweep: every ``keras.ops`` / ``keras.random`` function
that Keras's layers and keras-hub's models call, run on DTensor inputs under
several layouts and compared with the plain op (modelled on PyTorch's
``test/distributed/tensor/test_dtensor_ops.py``).

``python -m tfshard.app.opsweep --help``; the table is docs/op_coverage.md.
"""
