"""Reference models used by the configs, the CLI and the tutorials."""

__all__ = ["build"]


def build(model_config, *, learning_rate=3e-3, optimizer="adam", seed=0):
    """A compiled Keras model for a validated ``config["model"]`` section.

    Call inside ``strategy.scope()`` for a sharded model; outside any scope
    the same code builds the plain Keras model (the single-device twin).
    """
    import keras

    keras.utils.set_random_seed(seed)
    kind = model_config["kind"]
    if kind == "transformer":
        from tfshard.app.models.transformer import build_transformer as builder
    else:
        from tfshard.app.models.cnn import build_cnn as builder
    model, loss, metrics = builder(model_config)
    opt = {
        "adam": lambda: keras.optimizers.Adam(learning_rate),
        "adamw": lambda: keras.optimizers.AdamW(learning_rate),
        "sgd": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9),
    }[optimizer]()
    model.compile(optimizer=opt, loss=loss, metrics=metrics)
    return model
