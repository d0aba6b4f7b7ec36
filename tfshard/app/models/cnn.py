"""A small ResNet-style image classifier (Mesh-TensorFlow's CNN splits).

``split="channels"``: convolutions split their channels over the tensor axis
(Megatron-style pairs: output-split then input-split).
``split="spatial"``: images are split by height over the tensor axis and
convolutions exchange halos with their neighbours.
"""

from __future__ import annotations

import keras


def _conv(split, filters, name, role):
    """A 3x3 convolution for the split: channel split alternates output-split
    and input-split (Megatron pairs, one all-reduce per pair); spatial split
    exchanges halos; the stem of the channel variant stays whole."""
    from tfshard import layers

    # No biases: every convolution feeds a BatchNormalization (the ResNet way).
    common = dict(kernel_size=3, padding="same", use_bias=False, name=name)
    if split == "spatial":
        return layers.SpatialParallelConv2D(filters, **common)
    if role == "stem":
        return keras.layers.Conv2D(filters, **common)
    return layers.ChannelParallelConv2D(filters, split=role, **common)


def build_cnn(cfg, input_shape=(8, 8, 1)):
    """Returns ``(model, loss, metrics)``."""
    split, width = cfg["split"], cfg["width"]
    inputs = keras.Input(input_shape, name="image")
    h = _conv(split, width, "stem", "stem")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(h)
    h = keras.layers.ReLU()(h)
    for i in range(cfg["blocks"]):
        skip = h
        h = _conv(split, width, f"block{i}_conv1", "output")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn1")(h)
        h = keras.layers.ReLU()(h)
        h = _conv(split, width, f"block{i}_conv2", "input")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn2")(h)
        h = keras.layers.ReLU()(keras.layers.Add()([h, skip]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    logits = keras.layers.Dense(cfg["classes"], name="classifier")(h)
    model = keras.Model(inputs, logits, name=f"resnet_{cfg['split']}")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, loss, ["accuracy"]
