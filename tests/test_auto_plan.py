"""``tfshard.auto_plan``: Megatron plans recognised from a model's layers and
connections, chosen by a cost model, explained, and checked.

* tfshard's reference transformer: the automatic plan is today's
  hand-written layout (the same spec for every weight) and its training step
  launches exactly Megatron's 4 all-reduces per block;
* the cost model's estimate is what DTensor launches (its SPMD dump) on the
  reference transformer and on keras-hub Llama;
* stock Keras models nobody here wrote (keras-io's "Text classification with
  Transformer", keras-io's MNIST convnet) sharded by ``auto_plan`` alone
  train like one device; the convnet, with nothing to split, replicates
  everything and says so, and under a memory budget is stored split over
  the data axis;
* projections whose kernels another layer contracts itself (keras-hub
  Gemma4's feed-forward) are recognised by their connections;
* a keras-hub task model (it compiles in its constructor) is planned
  without materialising a weight;
* bad input: a budget no plan fits, plan entries that match nothing, two
  styles on one layer.

keras-hub's families are in ``test_keras_hub_families.py``.
"""

import keras
import numpy as np
import pytest
from keras import layers, ops
from test_fit_common import assert_history_close, assert_weights_close

import tfshard
from tfshard import comm
from tfshard.auto_plan import AutoPlan, auto_plan, check_plan
from tfshard.plans import Plan
from tfshard.report import per_device_bytes
from tfshard.styles import ColumnParallel, HeadParallel, Replicate, RowParallel

TOL = dict(rtol=1e-5, atol=1e-5)
REFERENCE = dict(d_model=32, heads=8, d_ff=64, layers=2, seq_len=16)


def mesh(data=2, model=4):
    return tfshard.Mesh({"batch": data, "model": model})


# ----------------------------------------------------- reference transformer
def reference_config(**overrides):
    from tfshard.app import config as config_lib

    return {**config_lib.defaults()["model"], **REFERENCE, **overrides}


def build_reference(config=None):
    from tfshard.app import models

    return models.build(config or reference_config())


def reference_tokens(n=8):
    return np.random.RandomState(0).randint(0, 64, size=(n, REFERENCE["seq_len"])).astype("int32")


def test_reference_transformer_plan_is_the_hand_written_layout():
    plan = auto_plan(build_reference, mesh(), inputs=reference_tokens())
    styles = {key: value for key, value in plan if isinstance(value, tfshard.styles.Style)}
    assert styles == {
        r"block_\d+/attention": HeadParallel(),
        r"block_\d+/ffn_in": ColumnParallel(),
        r"block_\d+/ffn_out": RowParallel(),
    }, str(plan)
    keras.backend.clear_session()
    with tfshard.StrategyBuilder(mesh()).data_parallel("batch").tensor_parallel("model").build().scope():
        hand_written = build_reference()
    keras.backend.clear_session()
    with plan.builder(mesh()).build().scope():
        planned = build_reference()
    specs = [(w.path, tfshard.spec_of(w)) for w in planned.weights]
    assert specs == [(w.path, tfshard.spec_of(w)) for w in hand_written.weights]
    assert sum(1 for _, spec in specs if any(spec)) >= 13  # table + 6 kernels/biases per block
    text = plan.explain()
    assert "tfshard TiedEmbedding: keeps its own split" in text
    assert "1-D weights (norm scales, biases): replicated" in text
    assert "table 16x32 read by position" in text


def _step_counts(model, x, y, batch=8):
    from tfshard.app.bench import TRAIN_STEP_PROGRAM

    with comm.dump_dir() as directory:
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
        counts, programs = comm.parse_dump_dir(directory, "optimized", program=TRAIN_STEP_PROGRAM)
    assert programs == 1
    return comm.CollectiveCounts({k: n for k, n in counts.items() if n and k[0] != "all_scatter"})


def measure_estimates():
    """Runs in a child process: the estimate and the launched collectives of
    the reference transformer (1 and 2 blocks) and keras-hub Llama."""
    from tfshard.app.estimate import estimate_collectives

    out = {}
    x = reference_tokens()
    for blocks in (1, 2):
        config = reference_config(layers=blocks)
        keras.backend.clear_session()
        plan = auto_plan(lambda: build_reference(config), mesh(), inputs=x)
        keras.backend.clear_session()
        with plan.builder(mesh()).build().scope():
            model = build_reference(config)
        app_config = {"model": config, "mesh": {"batch": 2, "model": 4}, "train": {"batch_size": 8},
                      "layout": {}}
        out[f"reference{blocks}"] = [plan.estimate_collectives(), _step_counts(model, x, x),
                                     estimate_collectives(app_config)]
    import test_keras_hub_families as hub

    tokens, labels = hub.data("llama")
    tokens = {k: v[:8] for k, v in tokens.items()}
    keras.backend.clear_session()
    plan = auto_plan(lambda: hub.build("llama"), mesh(), inputs=tokens)
    keras.backend.clear_session()
    with plan.builder(mesh()).build().scope():
        model = hub.build("llama")
    out["llama"] = [plan.estimate_collectives(), _step_counts(model, tokens, labels[:8]), str(plan)]
    return out


@pytest.fixture(scope="module")
def estimates():
    return comm.run_in_subprocess(measure_estimates, timeout=900)


def test_reference_transformer_costs_megatrons_four_all_reduces_per_block(estimates):
    one, two = estimates["reference1"][1], estimates["reference2"][1]
    block = two.copy()
    block.subtract(one)
    assert {k: n for k, n in block.items() if n} == {("all_reduce", "model"): 4}, (one, two)
    assert two == {("all_reduce", "model"): 12, ("all_reduce", "batch"): 1}, two


def test_cost_model_estimate_is_what_dtensor_launches(estimates):
    for name in ("reference1", "reference2"):
        estimate, launched, inspect_estimate = estimates[name]
        assert estimate == launched, (name, estimate, launched)
        assert estimate == inspect_estimate, (name, estimate, inspect_estimate)  # tfshard inspect's model
    estimate, launched, text = estimates["llama"]
    # Llama (2 key/value heads on 4 devices: key/value whole; untied
    # vocabulary-parallel logits): lookup, attention, feed-forward, logits
    # gathered for its accuracy metric and the stock loss's vocab-parallel
    # sums forward; logits, feed-forward and attention backward (the
    # key/value gradient gathers launch with the attention's).
    assert launched == {("all_reduce", "model"): 8, ("all_reduce", "batch"): 1}, launched
    assert estimate == launched, (estimate, launched, text)


# --------------------------------------------------------- stock Keras models
class TransformerBlock(layers.Layer):
    """keras-io examples/nlp/text_classification_with_transformer.py, as written."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions


def text_classifier(vocab_size=64, maxlen=8, embed_dim=16, num_heads=4, ff_dim=32):
    """The keras-io model (smaller sizes), compiled as keras-io does."""
    keras.utils.set_random_seed(0)
    inputs = layers.Input(shape=(maxlen,))
    x = TokenAndPositionEmbedding(maxlen, vocab_size, embed_dim)(inputs)
    x = TransformerBlock(embed_dim, num_heads, ff_dim)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def convnet():
    """keras-io examples/vision/mnist_convnet.py (smaller sizes)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input(shape=(12, 12, 1)),
        layers.Conv2D(8, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(16, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])


def _fit_like_one_device(build, compile_args, plan, x, y):
    """Plain and planned twins (each built in a fresh session: the same
    generated layer names) fit alike; returns the planned model."""
    keras.backend.clear_session()
    plain = build()
    plain.compile(**compile_args)
    expected = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    keras.backend.clear_session()
    with plan.builder(mesh()).build().scope():
        model = build()
        model.compile(**compile_args)
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    assert_history_close(history, expected, tol=TOL)
    assert_weights_close(model, plain)
    assert history["loss"][0] != history["loss"][1]
    held = per_device_bytes(list(model.weights) + list(model.optimizer.variables))
    assert held == plan.per_device_bytes, (held, plan.per_device_bytes)
    return model


def test_keras_io_text_classifier_sharded_by_auto_plan_alone():
    rng = np.random.RandomState(0)
    x = rng.randint(0, 64, size=(16, 8)).astype("float32")  # keras-io feeds float ids
    y = rng.randint(0, 2, size=(16,))
    keras.backend.clear_session()
    plan = auto_plan(text_classifier, mesh(), inputs=x[:8])
    kinds = {u.kind for u in plan.units}
    assert {"attention", "ffn", "embedding"} <= kinds, plan.explain()
    model = _fit_like_one_device(
        text_classifier, dict(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]),
        plan, x, y,
    )
    by_path = {w.path: tfshard.spec_of(w) for w in model.weights}
    block = "transformer_block"
    assert by_path[f"{block}/multi_head_attention/query/kernel"] == (None, "model", None)
    assert by_path[f"{block}/multi_head_attention/attention_output/kernel"] == ("model", None, None)
    assert by_path[f"{block}/sequential/dense/kernel"] == (None, "model")
    assert by_path[f"{block}/sequential/dense_1/kernel"] == ("model", None)
    assert by_path["dense_3/kernel"] == (None, None)  # the classifier head stays whole
    text = plan.explain()
    assert "stand-alone projection 20->2 (a classifier head" in text
    assert "lookup-only table" in text


def test_convnet_with_nothing_to_split_replicates_everything_and_says_so():
    rng = np.random.RandomState(0)
    x = rng.rand(16, 12, 12, 1).astype("float32")
    y = keras.utils.to_categorical(rng.randint(0, 10, size=(16,)), 10)
    keras.backend.clear_session()
    plan = auto_plan(convnet, mesh(), inputs=x[:8])
    assert isinstance(plan, AutoPlan) and len(plan) == 0
    assert "nothing to split: every weight replicated" in str(plan)
    assert "stock Conv2D: DTensor convolves only whole filters" in plan.explain()
    assert plan.estimate_collectives() == {("all_reduce", "batch"): 1}
    compile_args = dict(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    model = _fit_like_one_device(convnet, compile_args, plan, x, y)
    assert all(not any(tfshard.spec_of(w)) for w in model.weights)

    # Under a memory budget, the weights are stored split over the data axis
    # (gathered where a layer reads them) and still train like one device.
    budget = plan.per_device_bytes * 3 // 4
    keras.backend.clear_session()
    tight = auto_plan(convnet, mesh(), inputs=x[:8], memory_budget=budget)
    assert tight.per_device_bytes <= budget and tight.assessment.choice.fsdp, tight.explain()
    model = _fit_like_one_device(convnet, compile_args, tight, x, y)
    assert any("batch" in tfshard.spec_of(w) for w in model.weights)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.attention = layers.MultiHeadAttention(4, 4, name="attention")
        self.head = layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.attention(x, x))


def test_a_model_it_cannot_trace_is_planned_from_its_layers_never_a_crash():
    model = Subclassed()
    model(np.zeros((2, 8, 16), "float32"))  # built, but it has no symbolic inputs
    plan = auto_plan(model, mesh())
    assert "could not trace a call of the model" in str(plan) and "pass inputs=" in str(plan)
    assert _styles(plan) == {"attention": HeadParallel()}, str(plan)
    assert "head: projection (model not traced" in plan.explain()
    traced = auto_plan(model, mesh(), inputs=(8, 8, 16))
    assert _styles(traced) == {"attention": HeadParallel()}, str(traced)
    assert "stand-alone projection 16->2" in traced.explain()


def _styles(plan):
    """``{last path segment: style}`` of a plan's style entries."""
    return {key.split("/")[-1]: value for key, value in plan if isinstance(value, tfshard.styles.Style)}


class DirectKernels(keras.layers.Layer):
    """A gated feed-forward that contracts its projections' kernels itself
    (as keras-hub's Gemma4 decoder does) instead of calling them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gate = layers.Dense(32, use_bias=False, name="gate")
        self.up = layers.EinsumDense("btd,df->btf", output_shape=(None, 32), name="up")
        self.down = layers.Dense(16, use_bias=False, name="down")

    def build(self, shape):
        for layer, width in ((self.gate, shape[-1]), (self.up, shape[-1]), (self.down, 32)):
            layer.build(tuple(shape[:-1]) + (width,))

    def call(self, x):
        h = ops.gelu(ops.matmul(x, self.gate.kernel)) * ops.einsum("btd,df->btf", x, self.up.kernel)
        return x + ops.tensordot(h, self.down.kernel, axes=1)


def test_kernels_contracted_by_another_layer_are_recognised_by_their_connections():
    inputs = keras.Input((8, 16))
    model = keras.Model(inputs, DirectKernels(name="block")(inputs))
    plan = auto_plan(model, mesh())
    assert _styles(plan) == {"gate": ColumnParallel(), "up": ColumnParallel(), "down": RowParallel()}, str(plan)
    assert "gated feed-forward 16 -> 32 -> 16" in str(plan)


# ---------------------------------------------------------------- bad input
LLAMA = dict(vocabulary_size=64, num_layers=1, hidden_dim=16, intermediate_dim=32, num_query_heads=4,
             num_key_value_heads=2)


def llama_backbone():
    keras_hub = pytest.importorskip("keras_hub")
    return keras_hub.models.LlamaBackbone(**LLAMA)


def test_a_task_model_is_planned_without_materialising_a_weight():
    """A keras-hub task compiles in its constructor (its optimizer makes
    variables from values, which a stateless scope refuses): it is built
    abstractly all the same, and what the plan reads from the compiled loss
    and metrics is kept."""
    keras_hub = pytest.importorskip("keras_hub")
    import tensorflow as tf

    def build():
        model = keras_hub.models.LlamaCausalLM(backbone=llama_backbone(), preprocessor=None)
        model.compile(optimizer=keras.optimizers.Adam(0.01),  # the user's own compile too
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()])
        return model

    created = []

    def creator(next_creator, **kwargs):
        created.append(kwargs.get("name"))
        return next_creator(**kwargs)

    x = {"token_ids": np.zeros((8, 8), "int32"), "padding_mask": np.ones((8, 8), "int32")}
    with tf.variable_creator_scope(creator):
        plan = auto_plan(build, mesh(), inputs=x)
    assert created == [], created  # no tf.Variable: no weight has a value
    assert "built with its weights" not in str(plan), str(plan)
    setting = plan.assessment.setting
    assert setting.loss_splits_logits and setting.metrics_read_logits and setting.slots == 2
    assert _styles(plan)["feedforward_gate_dense"] == ColumnParallel(), str(plan)


def test_a_budget_no_plan_fits_names_the_smallest_bytes_and_a_mesh_that_fits():
    pytest.importorskip("keras_hub")
    x = {"token_ids": np.zeros((8, 8), "int32"), "padding_mask": np.ones((8, 8), "int32")}
    plan = auto_plan(llama_backbone, mesh(), inputs=x)
    smallest = min(a.bytes_per_device for a in plan.alternatives)
    with pytest.raises(tfshard.ShardingError) as err:
        auto_plan(llama_backbone, mesh(), inputs=x, memory_budget=smallest - 1)
    text = str(err.value)
    assert f"the smallest reachable is {smallest} bytes" in text
    assert "tfshard.Mesh({'batch': " in text and "fits" in text
    # The mesh it names does fit.
    suggested = eval(text.split("a mesh that fits: tfshard.Mesh(")[1].split(")")[0])  # noqa: S307
    fitted = auto_plan(llama_backbone, suggested, inputs=x, memory_budget=smallest - 1)
    assert fitted.per_device_bytes <= smallest - 1


def test_explanations_name_what_the_mesh_cannot_divide():
    pytest.importorskip("keras_hub")
    x = {"token_ids": np.zeros((8, 8), "int32"), "padding_mask": np.ones((8, 8), "int32")}
    plan = auto_plan(llama_backbone, mesh(), inputs=x)
    text = str(plan)
    assert "HeadParallel(kv_heads=None)" in text
    assert "kv heads 2 do not divide model=4: key/value replicated" in text
    odd = auto_plan(llama_backbone, mesh(1, 8), inputs=x)  # 4 query heads on 8 devices
    assert "4 heads do not divide model=8: replicated" in odd.explain()
    assert "d_ff 32" not in odd.explain()  # 32 divides 8: the feed-forward is split


def test_plan_entries_that_match_nothing_name_the_nearest_paths():
    pytest.importorskip("keras_hub")
    typo = Plan({
        "transformer_layer_0/self_atention": HeadParallel(),
        "transformer_layer_0/feedforward_output_dense/kernal": ("model", None),
        "transformer_layer_0/feedforward_gate_dense": ColumnParallel(),  # matches
    })
    with pytest.raises(tfshard.ShardingError) as err:
        check_plan(typo, llama_backbone)
    text = str(err.value)
    assert "plan['transformer_layer_0/self_atention'] matches no layer path" in text
    assert "'transformer_layer_0/self_attention'" in text
    assert "'transformer_layer_0/feedforward_output_dense/kernel'" in text
    assert "feedforward_gate_dense'] matches" not in text
    # An automatic plan matches its model.
    check_plan(auto_plan(llama_backbone, mesh()), llama_backbone)


def test_two_styles_on_one_layer_is_an_error_naming_both():
    pytest.importorskip("keras_hub")
    plan = auto_plan(llama_backbone, mesh())
    both = Plan(plan)
    both.add(keras.layers.Dense, Replicate())  # clashes with the feed-forward's path entries
    with pytest.raises(tfshard.ShardingError) as err:
        check_plan(both, llama_backbone)
    text = str(err.value)
    assert "'transformer_layer_0/feedforward_gate_dense' -> ColumnParallel()" in text, text
    assert "Dense -> Replicate()" in text, text
    # Applied anyway, the strategy raises the same at the layer's first call.
    builder = tfshard.StrategyBuilder(mesh()).data_parallel("batch").tensor_parallel("model").plan(both)
    keras.backend.clear_session()
    x = {"token_ids": np.zeros((8, 8), "int32"), "padding_mask": np.ones((8, 8), "int32")}
    with builder.build().scope():
        model = llama_backbone()
        with pytest.raises(tfshard.ShardingError) as err:
            model(x)
    assert "feedforward_gate_dense" in str(err.value) and "Replicate()" in str(err.value)
