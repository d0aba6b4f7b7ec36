"""keras-hub backbones, sharded by their own ``get_layout_map(mesh)``, on TensorFlow.

Randomly initialized tiny configs (no presets are downloaded). Each family is
run on a 2x4 mesh and compared with the same model unsharded: the backbone's
forward pass, then ``model.fit`` of its CausalLM task (losses, accuracy and
every weight after training). The layout maps split weights over both axes
(FSDP-style ``("model", "batch")``), split the token embedding over the
vocabulary, and exercise rotary embeddings, grouped-query attention and the
(tied) ``ReversibleEmbedding``. Layout maps that cannot fit a model (keras-hub
issue #1613: key/value heads the mesh does not divide) are reported, naming
the variable and the fix, before any weight is created.

keras-hub is an optional test dependency (see the README): these tests skip
without it.
"""

import keras
import numpy as np
import pytest
import tfshard

keras_hub = pytest.importorskip("keras_hub")

from test_fit_common import assert_history_close, assert_weights_close  # noqa: E402

VOCAB, SEQ, N, BATCH = 64, 8, 16, 8
FIT = dict(batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

FAMILIES = {
    # GQA (4 query heads, 2 key/value heads), rotary embedding, untied
    # ReversibleEmbedding; sharded through StrategyBuilder.from_keras.
    "llama": (
        keras_hub.models.LlamaBackbone,
        keras_hub.models.LlamaCausalLM,
        dict(num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32),
    ),
    # Tied ReversibleEmbedding (vocab-split logits), head_dim != hidden/heads;
    # sharded through keras.distribution.ModelParallel(...).scope().
    "gemma": (
        keras_hub.models.GemmaBackbone,
        keras_hub.models.GemmaCausalLM,
        dict(num_layers=2, num_query_heads=4, num_key_value_heads=4, hidden_dim=16,
             intermediate_dim=64, head_dim=8),
    ),
}


def keras_mesh(shape=(2, 4)):
    return keras.distribution.DeviceMesh(shape, ["batch", "model"], keras.distribution.list_devices())


def causal_lm(family, **overrides):
    backbone_cls, task_cls, config = FAMILIES[family]
    keras.utils.set_random_seed(0)
    backbone = backbone_cls(vocabulary_size=VOCAB, **{**config, **overrides})
    model = task_cls(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    return model


def data():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCAB, size=(N, SEQ + 1)).astype("int32")  # ids repeat
    padding = np.ones((N, SEQ), "int32")
    padding[1, 5:] = 0  # one padded sequence
    x = {"token_ids": tokens[:, :-1], "padding_mask": padding}
    return x, tokens[:, 1:], padding.astype("float32")


def sharding_scope(family, layouts):
    if family == "llama":
        return tfshard.StrategyBuilder.from_keras(layouts).build().scope()
    return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch").scope()


def assert_laid_out_as_the_map_says(model, layouts, dp, tp):
    sizes = {"batch": dp, "model": tp, None: 1}
    split = 0
    for variable in model.weights:
        layout = layouts[variable.path]
        spec = tuple(layout.axes) if layout is not None else (None,) * len(variable.shape)
        assert tfshard.layout_of(variable) == spec, variable.path
        shard = tuple(d // sizes[a] for d, a in zip(variable.shape, spec))
        assert tuple(tfshard._dtensor.unpack(variable)[0].shape) == shard, variable.path
        split += any(spec)
    assert split >= 10
    embedding = "token_embedding_embeddings"
    slots = [v for v in model.optimizer.variables if embedding in v.path]
    assert len(slots) == 2  # Adam's moments of the (vocab x data)-split table
    for slot in slots:
        assert tfshard.layout_of(slot) == ("model", "batch")
        assert tuple(tfshard._dtensor.unpack(slot)[0].shape) == (VOCAB // tp, 16 // dp)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backbone_forward_and_fit_match_unsharded(family):
    x, y, sample_weight = data()
    plain = causal_lm(family)
    plain_hidden = plain.backbone(x).numpy()
    plain_history = plain.fit(x, y, sample_weight=sample_weight, **FIT).history

    layouts = FAMILIES[family][0].get_layout_map(keras_mesh())
    with sharding_scope(family, layouts):
        model = causal_lm(family)
    hidden = model.backbone(x)  # plain numpy in, plain tensor out
    assert tfshard.layout_of(hidden) is None
    np.testing.assert_allclose(np.asarray(hidden), plain_hidden, rtol=1e-5, atol=1e-5)

    history = model.fit(x, y, sample_weight=sample_weight, **FIT).history
    assert_history_close(history, plain_history, tol=dict(rtol=1e-5, atol=1e-5))
    assert history["loss"][-1] < history["loss"][0]
    assert_weights_close(model, plain)
    assert_laid_out_as_the_map_says(model, layouts, dp=2, tp=4)


def test_qwen_backbone_forward_matches_unsharded():
    """Qwen: Llama-like with biased query/key/value projections, on 4x2
    (its map splits key/value heads over the 4-way data axis at rest)."""
    config = dict(vocabulary_size=VOCAB, num_layers=1, num_query_heads=4,
                  num_key_value_heads=4, hidden_dim=16, intermediate_dim=32)
    x, _, _ = data()
    keras.utils.set_random_seed(0)
    plain = keras_hub.models.QwenBackbone(**config)
    layouts = keras_hub.models.QwenBackbone.get_layout_map(keras_mesh((4, 2)))
    with keras.distribution.ModelParallel(layout_map=layouts).scope():
        keras.utils.set_random_seed(0)
        sharded = keras_hub.models.QwenBackbone(**config)
    assert tfshard.layout_of(sharded.get_layer("token_embedding").embeddings) == ("model", "batch")
    np.testing.assert_allclose(
        np.asarray(sharded(x)), plain(x).numpy(), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------- validation
GEMMA_MQA = dict(num_layers=1, num_query_heads=4, num_key_value_heads=1, hidden_dim=16,
                 intermediate_dim=64, head_dim=8)


def test_kv_heads_the_mesh_cannot_divide_are_reported_before_any_work():
    """keras-hub #1613: Gemma's layout map splits key/value heads over the
    model axis; one key/value head cannot be split over 4 devices."""
    layouts = keras_hub.models.GemmaBackbone.get_layout_map(keras_mesh())
    with keras.StatelessScope(initialize_variables=False):
        abstract = keras_hub.models.GemmaBackbone(vocabulary_size=VOCAB, **GEMMA_MQA)
    with pytest.raises(tfshard.ShardingError) as err:
        tfshard.interop.check_layout(layouts, abstract)
    text = str(err.value)
    assert "2 variable(s)" in text
    for name in ("key", "value"):
        assert f"'decoder_block_0/attention/{name}/kernel'" in text
        assert f"add layout_map['decoder_block_0/attention/{name}/kernel'] = (None, 'batch', None)" in text
    assert "dimension 0 has size 1, which mesh axis 'model' (size 4)" in text

    # The same map used directly fails while the first such weight is
    # created, with the same diagnosis (never DTensor's MLIR error).
    with keras.distribution.ModelParallel(layout_map=layouts).scope():
        with pytest.raises(tfshard.ShardingError, match=r"'decoder_block_0/attention/key/kernel'.*size 1"):
            keras_hub.models.GemmaBackbone(vocabulary_size=VOCAB, **GEMMA_MQA)

    # The fix the error names works.
    layouts["decoder_block_0/attention/key/kernel"] = (None, "batch", None)
    layouts["decoder_block_0/attention/value/kernel"] = (None, "batch", None)
    tfshard.interop.check_layout(layouts, abstract)


def test_swapped_mesh_axes_are_reported_with_the_spec_that_fits():
    """The model and data axis names swapped: 2 key/value heads cannot be
    split over a 4-way axis; the fix swaps them back."""
    _, _, config = FAMILIES["llama"]
    layouts = keras_hub.models.LlamaBackbone.get_layout_map(
        keras_mesh(), model_parallel_dim_name="batch", data_parallel_dim_name="model"
    )
    with keras.StatelessScope(initialize_variables=False):
        abstract = keras_hub.models.LlamaBackbone(vocabulary_size=VOCAB, **config)
    with pytest.raises(tfshard.ShardingError) as err:
        tfshard.interop.check_layout(layouts, abstract)
    text = str(err.value)
    assert "'transformer_layer_0/self_attention/key/kernel'" in text
    assert "dimension 1 has size 2, which mesh axis 'model' (size 4)" in text
    assert "= ('model', 'batch', None)" in text  # the axes swapped back
