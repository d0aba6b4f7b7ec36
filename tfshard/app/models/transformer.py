"""A decoder-only transformer language model in the Mesh-TensorFlow style.

Every weight carries logical dimension names (``d_model``, ``heads``,
``d_ff``, ``vocab``), so the layout is chosen by the strategy's rules, e.g.
``"batch:batch,d_ff:model,heads:model,vocab:model"`` (Megatron) or
``"batch:batch"`` (pure data parallel). Per block, Megatron's split costs
two tensor-axis all-reduces forward (attention output, FFN output) and two
backward. With ``moe_experts`` set, every ``moe_every``-th block's FFN is an
``ExpertParallelMoE`` (experts over the axis the ``experts`` rule names).
"""

from __future__ import annotations

import keras

from tfshard import layers
from tfshard.losses import VocabParallelSparseCategoricalCrossentropy


@keras.saving.register_keras_serializable(package="tfshard")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm block: x + Attn(LN(x)), then x + FFN(LN(x)).

    With ``moe_experts > 0`` the FFN is a GShard mixture of that many experts
    (:class:`tfshard.layers.ExpertParallelMoE`, each expert a ``d_ff`` gelu
    FFN), configured by ``moe_options`` (``top_k``, ``capacity_factor``,
    ``group_size``).
    """

    def __init__(self, d_model, heads, d_ff, dropout=0.0, moe_experts=0, moe_options=None, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.heads, self.d_ff, self.dropout = d_model, heads, d_ff, dropout
        self.moe_experts, self.moe_options = int(moe_experts), dict(moe_options or {})
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="attention_norm")
        self.attention = layers.HeadParallelAttention(
            heads, d_model // heads, dropout=dropout, name="attention"
        )
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="ffn_norm")
        if self.moe_experts:
            self.moe = layers.ExpertParallelMoE(
                self.moe_experts, d_ff, activation="gelu", name="moe", **self.moe_options
            )
        else:
            self.ffn_in = layers.ColumnParallelDense(d_ff, activation="gelu", name="ffn_in")
            self.ffn_out = layers.RowParallelDense(d_model, name="ffn_out")
        self.residual_dropout = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ffn_norm.build(input_shape)
        if self.moe_experts:
            self.moe.build(input_shape)
            return
        self.ffn_in.build(input_shape)
        self.ffn_out.build(tuple(input_shape[:-1]) + (self.d_ff,))

    def call(self, x, training=None):
        h = self.attention_norm(x)
        h = self.attention(h, h, use_causal_mask=True, training=training)
        x = x + self.residual_dropout(h, training=training)
        h = self.ffn_norm(x)
        h = self.moe(h) if self.moe_experts else self.ffn_out(self.ffn_in(h))
        return x + self.residual_dropout(h, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(d_model=self.d_model, heads=self.heads, d_ff=self.d_ff, dropout=self.dropout,
                      moe_experts=self.moe_experts, moe_options=self.moe_options)
        return config


@keras.saving.register_keras_serializable(package="tfshard")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position vector to each token: ``x + table[:seq_len]``."""

    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, input_shape):
        self.table = self.add_weight(
            name="embeddings",
            shape=(self.max_length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, x):
        return x + self.table[: keras.ops.shape(x)[1]]

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


@keras.saving.register_keras_serializable(package="tfshard")
class TiedEmbedding(layers.VocabParallelEmbedding):
    """A vocab-parallel embedding whose table also makes the output logits:
    ``embedding(ids)`` embeds, ``embedding(hidden, logits=True)`` is
    ``hidden @ table.T`` (``attend``), vocab-sharded.

    Why a layer call and not ``embedding.attend(h)`` on the symbolic ``h``:
    in a functional model, an op applied to a variable outside a layer's
    ``call`` runs once, eagerly, when the model is built, and its value is
    baked into the graph as a constant, so the logits would come from the
    *initial* table forever (never trained, never checkpointed). Called as
    a shared layer, the table is read live on every step.
    """

    def call(self, inputs, logits=False):
        return self.attend(inputs) if logits else super().call(inputs)

    def compute_output_spec(self, inputs, logits=False):
        if logits:
            return keras.KerasTensor(tuple(inputs.shape[:-1]) + (self.input_dim,), dtype=self.compute_dtype)
        return super().compute_output_spec(inputs)

    def compute_mask(self, inputs, mask=None):
        if keras.backend.is_float_dtype(keras.backend.standardize_dtype(inputs.dtype)):
            return None  # logits have no padding mask
        return super().compute_mask(inputs, mask)


def build_transformer(cfg):
    """Returns ``(model, loss, metrics)`` for a ``config["model"]`` section."""
    tokens = keras.Input((cfg["seq_len"],), dtype="int32", name="tokens")
    embedding_class = TiedEmbedding if cfg["tie_embeddings"] else layers.VocabParallelEmbedding
    embedding = embedding_class(cfg["vocab"], cfg["d_model"], name="token_embedding")
    h = PositionEmbedding(cfg["seq_len"], name="position_embedding")(embedding(tokens))
    # GShard: every moe_every-th block (the last of each run) has experts.
    every = cfg.get("moe_every", 2)
    moe_options = dict(
        top_k=cfg.get("moe_top_k", 2),
        capacity_factor=cfg.get("moe_capacity_factor", 1.25),
        group_size=cfg.get("moe_group_size") or None,
    )
    for i in range(cfg["layers"]):
        experts = cfg.get("moe_experts", 0) if (i + 1) % every == 0 else 0
        h = TransformerBlock(
            cfg["d_model"], cfg["heads"], cfg["d_ff"], cfg["dropout"],
            moe_experts=experts, moe_options=moe_options if experts else None, name=f"block_{i}",
        )(h)
    h = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(h)
    if cfg["tie_embeddings"]:
        logits = embedding(h, logits=True)  # vocab-sharded logits from the same (live) table
    else:
        logits = layers.ColumnParallelDense(cfg["vocab"], logical_dim="vocab", name="lm_head")(h)
    model = keras.Model(tokens, logits, name="transformer_lm")
    loss = VocabParallelSparseCategoricalCrossentropy()
    return model, loss, []
