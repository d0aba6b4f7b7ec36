"""The one parity harness: a plain Keras layer or model against its sharded
twin on the same weights (after PyTorch's ``_check_module`` /
``_validate_fwd`` / ``_validate_bwd`` / ``_validate_optim_step``).

    check_parity(lambda: keras.layers.Dense(8), (2, 4), x,
                 plan={".*dense": ColumnParallel()},
                 expect_specs={"kernel": (None, "model")})

``build`` makes a fresh layer or model; it is called twice after the same
seed, once plainly and once under a ``(data, model)`` strategy, so both
start from the same weights. Forward, gradients of every trainable weight
(with their layouts) and the weights after optimizer steps are compared
inside a ``tf.function``, as ``fit`` runs them. Collective counts are
measured by :func:`collective_counts` in a fresh process (DTensor dumps its
passes only when TensorFlow starts with its logging flag).
"""

import keras
import numpy as np
import tensorflow as tf
import tfshard
from tfshard import comm

TOL = dict(rtol=1e-5, atol=1e-5)


def strategy_for(shape, *, rules=None, plan=None, shards=(), sequence_parallel=False):
    mesh = tfshard.Mesh({"batch": shape[0], "model": shape[1]})
    builder = tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")
    builder.sequence_parallel(sequence_parallel)
    if rules:
        builder.rules(rules)
    if plan:
        builder.plan(plan)
    for pattern, spec in shards:
        builder.shard(pattern, spec)
    return builder.build()


def twins(build, shape, *, seed=0, **strategy_kwargs):
    """``(plain, sharded, strategy)``: ``build()`` plainly and under a
    strategy, after the same seed."""
    keras.utils.set_random_seed(seed)
    plain = build()
    strategy = strategy_for(shape, **strategy_kwargs)
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        sharded = build()
    return plain, sharded, strategy


def _loss(out):
    y = out[0] if isinstance(out, (tuple, list)) else out
    return tf.reduce_mean(tf.square(y)) + tf.reduce_mean(y)


def _step_fn(obj, optimizer, call, strategy=None):
    """A traced step: forward, gradients, one optimizer update."""

    @tf.function
    def step(*inputs):
        scope = strategy.scope() if strategy is not None else _nothing()
        with scope:
            with tf.GradientTape() as tape:
                out = call(obj, *inputs)
                loss = _loss(out)
            grads = tape.gradient(loss, obj.trainable_variables)
            optimizer.apply(grads, obj.trainable_variables)
        return out, grads

    return step


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_parity(build, shape, *inputs, call=None, steps=2, optimizer=None, input_specs=None,
                 expect_specs=None, tol=TOL, seed=0, **strategy_kwargs):
    """Build ``build()`` plainly and sharded; assert equal weights, forward,
    gradients (laid out like their variables) and weights after ``steps``
    optimizer steps. ``input_specs`` lays the inputs out (default: the batch
    split over the data axis). ``expect_specs`` maps a weight-path suffix to
    the spec it must have, and its per-device shard shape is checked.
    Returns ``(plain, sharded, strategy)``."""
    call = call or (lambda obj, *xs: obj(*xs))
    # SGD with momentum by default: it has slots, and unlike Adam it does not
    # blow a gradient that is zero up to rounding (an attention key bias's)
    # into a full-size step of either sign.
    make_optimizer = optimizer or (lambda: keras.optimizers.SGD(0.1, momentum=0.9))
    plain, sharded, strategy = twins(build, shape, seed=seed, **strategy_kwargs)
    for obj in (plain, sharded):
        if not obj.built:
            if isinstance(obj, keras.Model):
                obj(*inputs)
            else:
                obj.build(*[np.shape(x) for x in inputs])
    sharded.set_weights(plain.get_weights())
    assert [w.path for w in sharded.weights] == [w.path for w in plain.weights]

    specs = input_specs or [strategy.batch_spec(np.shape(x)) for x in inputs]
    placed = [strategy.place(x, spec) for x, spec in zip(inputs, specs)]
    plain_opt = make_optimizer()
    with strategy.scope():  # its iteration count and slots on the mesh
        sharded_opt = make_optimizer()
        sharded_opt.build(sharded.trainable_variables)
    plain_opt.build(plain.trainable_variables)
    plain_step = _step_fn(plain, plain_opt, call)
    sharded_step = _step_fn(sharded, sharded_opt, call, strategy)
    for n in range(steps):
        out_p, grads_p = plain_step(*inputs)
        out_s, grads_s = sharded_step(*placed)
        if n == 0:
            outs_p = out_p if isinstance(out_p, (tuple, list)) else (out_p,)
            outs_s = out_s if isinstance(out_s, (tuple, list)) else (out_s,)
            for p, s in zip(outs_p, outs_s):
                np.testing.assert_allclose(tfshard.to_numpy(s), p.numpy(), err_msg="forward", **tol)
            for gp, gs, v in zip(grads_p, grads_s, sharded.trainable_variables):
                if isinstance(gs, tf.IndexedSlices):  # a table's sparse gradient
                    gs, gp = _dense(gs, v.shape), _dense(gp, v.shape)
                else:
                    assert tfshard.layout_of(gs) == tfshard.layout_of(v), v.path
                np.testing.assert_allclose(tfshard.to_numpy(gs), np.asarray(gp), err_msg=v.path, **tol)
    for p, s in zip(plain.weights, sharded.weights):
        np.testing.assert_allclose(s.numpy(), p.numpy(), err_msg=f"{s.path} after {steps} steps", **tol)
    for suffix, spec in (expect_specs or {}).items():
        assert_spec(sharded, suffix, spec, strategy)
    return plain, sharded, strategy


def _dense(slices, shape):
    """The dense value of IndexedSlices (rows of one id summed), as numpy."""
    values = tfshard.to_numpy(slices.values) if tfshard.layout_of(slices.values) else slices.values.numpy()
    ids = tfshard.to_numpy(slices.indices) if tfshard.layout_of(slices.indices) else slices.indices.numpy()
    out = np.zeros(tuple(shape), values.dtype)
    np.add.at(out, ids, values)
    return out


def assert_spec(model, suffix, spec, strategy):
    """The weight whose path ends in ``suffix`` is laid out as ``spec`` and
    each device holds only its shard."""
    found = [w for w in model.weights if w.path.endswith(suffix)]
    assert found, f"no weight ends with {suffix!r}: {[w.path for w in model.weights]}"
    sizes = {axis: strategy.mesh.axis_size(axis) for axis in strategy.mesh.axis_names}
    for weight in found:
        assert tfshard.layout_of(weight) == tuple(spec), weight.path
        shard = tuple(d // (sizes[a] if a else 1) for d, a in zip(weight.shape, spec))
        assert tuple(tfshard._dtensor.unpack(weight)[0].shape) == shard, weight.path


def collective_counts(script, **kwargs):
    """Run ``script`` (source defining ``main()`` that returns counts) in a
    fresh process with DTensor's pass dumps on."""
    return comm.run_in_subprocess(script, **kwargs)
