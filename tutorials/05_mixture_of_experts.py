# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Mixture of experts: GShard expert parallelism on a mesh
#
# A mixture-of-experts (MoE) feed-forward layer holds many FFNs, the
# *experts*, and a learned *router* that sends each token to its best `k` of
# them. Parameters grow with the number of experts while the compute per
# token stays that of `k` FFNs. tfshard's `ExpertParallelMoE` is the GShard
# layer (Lepikhin et al., 2020): top-1 or top-2 routing within routing
# groups, a fixed *capacity* per expert (tokens beyond it are dropped), an
# auxiliary load-balancing loss, and the experts split over a mesh axis, with
# tokens sent to their experts and back by **all-to-all** collectives.
#
# This notebook looks at one layer (routing, capacity, where the experts
# live, what moves between devices) and then trains a small MoE transformer
# on a 2×4 mesh against plain Keras on one device.
#
# Virtual devices must exist before TensorFlow starts, so that comes first.

# %%
import os

import tfshard

tfshard.use_virtual_devices(8)
SMALL = bool(os.environ.get("TFSHARD_TUTORIAL_SMALL"))  # the test suite sets this

# %%
import contextlib

import keras
import numpy as np

from tfshard import comm, report
from tfshard.app import config as config_lib
from tfshard.app import data, models
from tfshard.layers import ExpertParallelMoE
from tfshard.layers.moe import top_k_gating

# %% [markdown]
# ## One layer: routing, capacity and the load-balancing loss
#
# Outside a strategy the layer is plain Keras (`tfshard.layers.reference_moe`
# is its math). Tokens `(batch, seq, d_model)` are cut into routing groups of
# `group_size` consecutive tokens of one sequence. In each group an expert
# takes at most `capacity = ceil(top_k × capacity_factor × group_size /
# num_experts)` tokens: first choices (in token order) before second
# choices, the rest overflow and are dropped for that expert.

# %%
EXPERTS, D_MODEL, D_FF = 8, 16, 32
rng = np.random.RandomState(0)
x = rng.randn(4, 64, D_MODEL).astype("float32")

keras.utils.set_random_seed(0)
plain_layer = ExpertParallelMoE(EXPERTS, D_FF, top_k=2, capacity_factor=1.0, group_size=16)
y = plain_layer(x)
print("output", tuple(y.shape), "capacity per expert and group:", plain_layer.capacity)

# The same gating the layer runs, to look at the routing it chose.
groups = x.reshape(-1, 16, D_MODEL)
_, dispatch, aux = top_k_gating(groups @ plain_layer.router_kernel.numpy(), 2, plain_layer.capacity)
routes = dispatch.numpy().sum(axis=(2, 3))  # per token: 0, 1 or 2 experts
print("tokens per expert:", dispatch.numpy().sum(axis=(0, 1, 3)).astype(int))
print(f"tokens with both routes {np.mean(routes == 2):.0%}, one {np.mean(routes == 1):.0%}, "
      f"dropped entirely {np.mean(routes == 0):.0%}")
print(f"load-balancing loss {float(aux):.3f} (1.0 = perfectly balanced); "
      f"added to the model loss: {float(plain_layer.losses[0]):.5f} = 0.01 x it")

# %% [markdown]
# ## Where the experts live
#
# The expert weights are `(experts, d_model, d_ff)` and `(experts, d_ff,
# d_model)`, with logical dimensions `experts` and `d_ff`. The strategy's
# rules pick the mesh axes. Two layouts on a 2×4 mesh:
#
# * **experts on `model`** (what `tensor_parallel("model")` does by default):
#   each of the 4 model columns holds 2 whole experts; the 2 data-parallel
#   rows hold the same experts.
# * **experts on `batch`, `d_ff` on `model`** (rule `experts:batch`, GShard's
#   expert parallelism over the data axis, with Megatron inside each expert):
#   each data row holds 4 experts, and each expert's hidden units are split
#   over the 4 model columns, so every device holds 1/8 of the expert weights.

# %%
LAYOUTS = {"experts on model": {}, "experts on batch, d_ff on model": {"experts": "batch"}}


def moe_strategy(rules, shape=(2, 4)):
    mesh = tfshard.Mesh({"batch": shape[0], "model": shape[1]})
    builder = tfshard.StrategyBuilder(mesh).data_parallel("batch").tensor_parallel("model")
    return builder.rules(rules).build()


for name, rules in LAYOUTS.items():
    strategy = moe_strategy(rules)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        layer = ExpertParallelMoE(EXPERTS, D_FF, top_k=2, capacity_factor=1.0, group_size=16)
        layer.build(x.shape)
    kernel = layer.expert_in_kernel
    print(f"\n{name}: expert_in_kernel spec {tfshard.spec_of(kernel)}, "
          f"global {tuple(kernel.shape)}, per device {tfshard.local_shape(kernel)}")
    tiles = report.device_tiles(tfshard.spec_of(kernel), kernel.shape, strategy.mesh)
    shards = report.device_shards(kernel)
    for tile, shard in zip(tiles, shards):
        experts, hidden = tile["slices"][0], tile["slices"][2]
        # The device really holds exactly that piece of the global weight.
        assert np.array_equal(shard, kernel.numpy()[tile["slices"]])
        print(f"  device {tile['device']} {tile['coords']}: experts {experts.start}-{experts.stop - 1}, "
              f"d_ff units {hidden.start}-{hidden.stop - 1}")
    gap = np.abs(layer(x).numpy() - y.numpy()).max()
    print(f"  same output as the plain layer: max |difference| = {gap:.1e}")
    assert gap < 1e-5

# %% [markdown]
# ## What moves between devices
#
# In DTensor's global view the layer is GShard's: per group, the dispatch
# tensor `(groups, S, E, C)` gathers each expert's tokens with an einsum into
# `(E, groups, C, d_model)`; that einsum runs locally on each device's own
# groups, and a relayout then moves the split from the groups to the experts,
# which DTensor lowers to an **all-to-all**. After the experts' FFN, the
# inverse relayout (a second all-to-all) brings each token's expert outputs
# back, and the weighted sum over its experts is local.
#
# `tfshard.comm.count_collectives` reads the collectives from DTensor's own
# compilation dump (in a fresh process, where the dump can be switched on):

# %%
COUNT = """
import numpy as np, tfshard
from tfshard import comm
from tfshard.layers import ExpertParallelMoE

def main():
    x = np.random.RandomState(0).randn(4, 64, 16).astype("float32")
    counts = {}
    for name, rules in {"experts on model": {}, "experts on batch": {"experts": "batch"}}.items():
        mesh = tfshard.Mesh({"batch": 2, "model": 4})
        strategy = (tfshard.StrategyBuilder(mesh).data_parallel("batch")
                    .tensor_parallel("model").rules(rules).build())
        with strategy.scope():
            layer = ExpertParallelMoE(8, 32, group_size=16)
        layer(x)
        counts[name] = comm.count_collectives(layer, strategy.place(x, ("batch", None, None)))
    return counts
"""
for name, counts in comm.run_in_subprocess(COUNT).items():
    print(f"{name}: {dict(counts)}")

# %% [markdown]
# * **Experts on `batch`**: one all-to-all over `batch` to dispatch, one to
#   combine, and one all-reduce over `model` inside the experts (their split
#   `d_ff`, as in a Megatron FFN). Nothing is gathered: the output comes back
#   split by batch, like the input.
# * **Experts on `model`**: the tokens arrive whole on `model` (the attention
#   before them is tensor parallel), so each model column first takes its
#   share of the groups (`all_scatter`: a local slice, no traffic). The
#   all-to-alls run over `model`, and at the end the outputs are all-gathered
#   over `model` so the next layer gets them whole again. The tokens are never
#   gathered on their way to the experts.
#
# The backward pass mirrors the forward: two more all-to-alls.
#
# ## A small MoE transformer
#
# The reference transformer takes `moe_experts` (experts per MoE block) and
# `moe_every` (every N-th block's FFN is an MoE; here every block), as
# `configs/transformer_moe_2x4.yaml` does. The aux loss is part of the
# training loss Keras reports. The same model also trains on a 1×1 mesh (one
# device) for comparison. (Not against plain Keras here: given the sparse
# gradient of a stock `Embedding` lookup, Keras's Adam adds the squares of a
# repeated token's gradient pieces instead of squaring their sum, while
# tfshard's vocab-parallel embedding gives Adam the dense gradient.)

# %%
MODEL = config_lib.defaults()["model"]
MODEL.update(moe_experts=8, moe_every=1, moe_top_k=2, moe_capacity_factor=1.25)
if SMALL:
    MODEL.update(d_model=32, heads=4, d_ff=32, layers=1, seq_len=16)
    STEPS, BATCH = 6, 8
else:
    MODEL.update(d_model=64, heads=8, d_ff=128, layers=2, seq_len=64)
    STEPS, BATCH = 60, 32
RULES = "batch:batch,experts:batch,d_ff:model,heads:model,vocab:model"

tokens = data.stdlib_bytes(200_000 if SMALL else 2_000_000)
train_tokens, held_out_tokens = data.split_tokens(tokens)
x_train, y_train = data.lm_examples(train_tokens, MODEL["seq_len"], STEPS * BATCH, seed=0)
x_eval, y_eval = data.lm_examples(held_out_tokens, MODEL["seq_len"], 2 * BATCH, seed=1)


def build(strategy=None):
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = models.build(MODEL, learning_rate=3e-3, seed=0)
        model.optimizer.build(model.trainable_variables)
    return model


def train(model):
    losses = []
    for step in range(STEPS):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        losses.append(model.train_on_batch(x_train[batch], y_train[batch], return_dict=True)["loss"])
    return np.array(losses)


sharded = build(moe_strategy(RULES))
one_device = build(moe_strategy(RULES, shape=(1, 1)))
sharded_losses, one_device_losses = train(sharded), train(one_device)
for step in range(0, STEPS, max(1, STEPS // 6)):
    print(f"step {step:3d}: mesh 2x4 {sharded_losses[step]:.4f}   one device {one_device_losses[step]:.4f}")
print("held-out loss:", round(sharded.evaluate(x_eval, y_eval, batch_size=BATCH, verbose=0), 4),
      "(one device", round(one_device.evaluate(x_eval, y_eval, batch_size=BATCH, verbose=0), 4), ")")
assert np.allclose(sharded_losses, one_device_losses, rtol=1e-4, atol=1e-4)

# %% [markdown]
# Both runs are the same computation (float32 sums in another order). The
# experts' weights and their Adam slots are split 8 ways:

# %%
moe_rows = [row for row in report.variable_rows(list(sharded.weights) + list(sharded.optimizer.variables))
            if "moe" in row["path"]]
for row in moe_rows:
    print(f"{row['path']:<52} {str(row['shape']):<14} {str(row['spec']):<26} per device {row['per_device_shape']}")

# %% [markdown]
# ## Which layouts work
#
# | experts on | d_ff on | tokens between devices (forward) | notes |
# |---|---|---|---|
# | data axis (`experts:batch`) | tensor axis | 2 all-to-alls over the data axis + 1 all-reduce over the tensor axis | GShard's layout; expert weights split over both axes |
# | tensor axis (default) | — (same axis: each expert whole) | 2 all-to-alls + 1 output all-gather over the tensor axis | groups per sequence must divide by the tensor axis size |
# | none (`experts:` unset / None) | tensor axis | 1 all-reduce (Megatron FFN per expert) | no expert parallelism |
#
# `num_experts` must divide by the size of the experts' axis; with the
# experts off the data axis, `seq_len / group_size` must too. Both are
# checked before DTensor runs, with errors that name the value and the fix.
