"""`apply_dni` and `strip_dni`: turn DNI on for a model, and off for serving.

`apply_dni` rebuilds a `keras.Sequential` or functional `keras.Model` with
chosen `Dense`/`Conv2D` layers replaced by `DNIDense`/`DNIConv2D` (same
configuration, same weights); `strip_dni` rebuilds a model without any DNI
machinery, for deployment. Both only use the models' public structure
(`layers`, `get_config`, `keras.models.clone_model`), so they work on
Sequential and functional models but not on subclassed ones.
"""

import keras

from keras_dni.conv import DNIConv2D
from keras_dni.dense import DNIDense
from keras_dni.models import DNIModel
from keras_dni.models import DNISequential
from keras_dni.models import synthetic_gradient_layers
from keras_dni.synthetic_gradient import SyntheticGradient

# Plain layer class -> its DNI version, and the DNI-only constructor args.
_TO_DNI = {keras.layers.Dense: DNIDense, keras.layers.Conv2D: DNIConv2D}
_FROM_DNI = {dni: plain for plain, dni in _TO_DNI.items()}
_DNI_ARGS = {
    "sg_hidden_units",
    "sg_batch_norm",
    "conditional",
    "label_dim",
    "bp_lambda",
    "sg_input_normalization",
    "sg_solver",
    "sg_solver_decay",
    "sg_solver_ridge",
    "sg_prediction_clip",
    "sg_calibration",
}
_CONV_ONLY_ARGS = {"sg_kernel_size"}

# What `_rebuild`'s `transform` returns for a layer.
_KEEP = "keep"  # a copy of the same class, same weights
_DROP = "drop"  # removed (identity at inference)


def apply_dni(model, layers=None, every=None, **dni_kwargs):
    """Returns a copy of `model` whose chosen layers learn with DNI.

    Every chosen `keras.layers.Dense` becomes a `keras_dni.DNIDense` and
    every chosen `keras.layers.Conv2D` a `keras_dni.DNIConv2D`, with the
    same configuration, name and weights; all other layers are copied with
    their weights. The copy makes exactly the same predictions as `model`;
    only training differs. `model` itself is not changed. The weights and
    the initialiser are the layer's own: a `DNIDense` built directly picks
    `"he_normal"` for ReLU layers (`kernel_initializer="auto"`), which
    deep cDNI networks need (`docs/depth.md`); to train a deep ReLU model
    from scratch with `apply_dni`, build its `Dense` layers with
    `kernel_initializer="he_normal"`.

    Args:
        model: a built `keras.Sequential` or functional `keras.Model`.
            Subclassed models cannot be converted (their connections are
            not visible); use the DNI layers in their definition instead.
        layers: `None` (default) or a list of layer names (or layers of
            `model`). `None` converts every hidden `Dense`/`Conv2D` layer at
            the top level of `model`: all but the layers that compute the
            model's outputs (an output layer followed only by weight-free
            layers, such as `Activation` or `Softmax`, counts as an output
            layer). Layers inside nested models are left as they are.
        every: `None` (default) or a positive int `k`: of the layers that
            `layers` chooses, convert only every `k`-th one, counted from
            the bottom (the `k`-th, `2k`-th, ...). The network is then
            decoupled between blocks of `k` layers instead of after every
            layer: fewer decoupling points (with plain DNI, one after the
            first hidden layer only was level with backprop on the MNIST
            subset, `docs/results.md`).
        **dni_kwargs: arguments for the DNI layers: `sg_hidden_units`,
            `sg_batch_norm`, `conditional`, `label_dim`, `bp_lambda`,
            `sg_input_normalization`, `sg_solver`, `sg_solver_decay`,
            `sg_solver_ridge`, `sg_prediction_clip`, `sg_calibration`, and
            `sg_kernel_size` (used by `DNIConv2D` only).

    Returns:
        A `keras_dni.DNISequential` for a Sequential `model`, a
        `keras_dni.DNIModel` for a functional one, not compiled.

    Raises:
        TypeError: `model` is not a Sequential or functional model, a chosen
            layer is not a `Dense`/`Conv2D` (or is already a DNI layer), or
            an unknown keyword argument was passed.
        ValueError: `model` is not built, a name in `layers` is not a layer
            of `model`, `every` is not a positive integer, or there is no
            layer to convert.

    Example:

    >>> import keras, keras_dni
    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras.layers.Dense(16, activation="relu"),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> dni = keras_dni.apply_dni(model, conditional=True)
    >>> [type(layer).__name__ for layer in dni.layers]
    ['DNIDense', 'Dense']
    >>> dni.compile("adam", "sparse_categorical_crossentropy")
    """
    _check_model(model, "apply_dni")
    unknown = sorted(set(dni_kwargs) - _DNI_ARGS - _CONV_ONLY_ARGS)
    if unknown:
        raise TypeError(
            f"`apply_dni` received unexpected keyword argument(s) {unknown}; "
            "it passes on only the DNI layers' arguments: "
            f"{sorted(_DNI_ARGS | _CONV_ONLY_ARGS)}."
        )
    # Fail early, with the layers' own messages, on invalid values.
    DNIConv2D(1, 1, **dni_kwargs)
    DNIDense(1, **_dense_kwargs(dni_kwargs))
    targets = _chosen_layers(model, layers)
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(
                "Received an invalid value for `every`, expected a positive "
                f"integer or None. Received: every={every!r}"
            )
        targets = targets[every - 1 :: every]
    if not targets:
        raise ValueError(
            f"`apply_dni` found no hidden `Dense` or `Conv2D` layer to "
            f"convert in model '{model.name}' (the layers that compute its "
            "outputs are not converted by default). Name the layers to "
            "convert with `layers=[...]`."
        )
    target_ids = {id(layer) for layer in targets}

    def transform(layer):
        if id(layer) not in target_ids:
            return _KEEP
        dni_cls = _TO_DNI[type(layer)]
        if dni_cls is DNIDense:
            kwargs = _dense_kwargs(dni_kwargs)
        else:
            kwargs = dni_kwargs
        return dni_cls.from_config({**layer.get_config(), **kwargs})

    return _rebuild(model, transform, DNISequential, DNIModel)


def strip_dni(model):
    """Returns a copy of `model` without any DNI machinery, for serving.

    `DNIDense`/`DNIConv2D` layers become `keras.layers.Dense`/
    `keras.layers.Conv2D` with the same configuration, name and weights
    (their gradient models are dropped), standalone `SyntheticGradient`
    layers are removed (they are the identity at inference), and
    `DNISequential`/`DNIModel` become `keras.Sequential`/`keras.Model`,
    nested models included. The copy makes exactly the same predictions as
    `model` and holds no `keras_dni` class, so it loads and serves without
    `keras_dni` installed.

    Args:
        model: a built `keras.Sequential`/`keras_dni.DNISequential` or
            functional `keras.Model`/`keras_dni.DNIModel`.

    Returns:
        A `keras.Sequential` or functional `keras.Model`, not compiled.

    Raises:
        TypeError: `model` is not a Sequential or functional model, or a
            layer that is not a `keras_dni` layer holds a
            `SyntheticGradient` (a custom layer `strip_dni` cannot rebuild).
        ValueError: `model` is not built.

    Example:

    >>> import keras, keras_dni
    >>> model = keras_dni.DNISequential([
    ...     keras.Input((8,)),
    ...     keras_dni.DNIDense(16, activation="relu"),
    ...     keras_dni.SyntheticGradient(),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> plain = keras_dni.strip_dni(model)
    >>> [type(layer).__name__ for layer in plain.layers]
    ['Dense', 'Dense']
    """
    _check_model(model, "strip_dni")

    def transform(layer):
        if isinstance(layer, SyntheticGradient):
            return _DROP
        plain_cls = _FROM_DNI.get(type(layer))
        if plain_cls is None:
            return _KEEP
        config = layer.get_config()
        for name in _DNI_ARGS | _CONV_ONLY_ARGS:
            config.pop(name, None)
        return plain_cls.from_config(config)

    stripped = _rebuild(model, transform, keras.Sequential, keras.Model)
    left = synthetic_gradient_layers(stripped)
    if left:
        raise TypeError(
            "`strip_dni` cannot remove the synthetic gradients held inside "
            f"custom layers of model '{model.name}': "
            f"{sorted({sg.metric_prefix_name for sg in left})}. It rebuilds "
            "`DNIDense`, `DNIConv2D` and `SyntheticGradient` layers only."
        )
    return stripped


# ---------------------------------------------------------------- helpers
def _dense_kwargs(dni_kwargs):
    return {k: v for k, v in dni_kwargs.items() if k not in _CONV_ONLY_ARGS}


def _is_functional(model):
    # The functional model class is not exported by Keras; its instances
    # are what `keras.Model(inputs, outputs)` returns.
    return isinstance(model, keras.Model) and any(
        cls.__name__ == "Functional" for cls in type(model).__mro__
    )


def _check_model(model, function):
    if isinstance(model, keras.Sequential) or _is_functional(model):
        if not model.built:
            raise ValueError(
                f"`{function}` needs a built model, and model '{model.name}' "
                "is not built: start it with `keras.Input(shape)` or call it "
                "on a batch of data first."
            )
        return
    if isinstance(model, keras.Model):
        raise TypeError(
            f"`{function}` converts `keras.Sequential` and functional "
            "`keras.Model` models only; received a subclassed model of type "
            f"`{type(model).__name__}`, whose layer connections are not "
            "visible. Use `keras_dni.DNIDense`/`DNIConv2D`/"
            "`SyntheticGradient` in its definition instead."
        )
    raise TypeError(
        f"`{function}` expects a `keras.Sequential` or functional "
        f"`keras.Model`. Received: model of type `{type(model).__name__}`"
    )


def _chosen_layers(model, layers):
    """The layers `apply_dni` converts: checked, in model order."""
    if layers is None:
        outputs = {id(layer) for layer in _output_layers(model)}
        return [
            layer
            for layer in model.layers
            if type(layer) in _TO_DNI and id(layer) not in outputs
        ]
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            "Received an invalid value for `layers`, expected `None` or a "
            f"list of layer names. Received: layers={layers!r}"
        )
    by_name = {layer.name: layer for layer in model.layers}
    chosen = []
    for item in layers:
        name = item.name if isinstance(item, keras.layers.Layer) else item
        layer = by_name.get(name) if isinstance(name, str) else None
        if layer is None or (
            isinstance(item, keras.layers.Layer) and layer is not item
        ):
            raise ValueError(
                f"Received an invalid value for `layers`: model "
                f"'{model.name}' has no layer {item!r} at its top level. Its "
                f"layers are {list(by_name)}."
            )
        if type(layer) in _FROM_DNI:
            raise TypeError(
                f"Layer '{name}' is already a DNI layer "
                f"(`{type(layer).__name__}`); `apply_dni` converts "
                "`Dense` and `Conv2D` layers."
            )
        if type(layer) not in _TO_DNI:
            raise TypeError(
                f"`apply_dni` converts `keras.layers.Dense` and "
                f"`keras.layers.Conv2D` layers; layer '{name}' is a "
                f"`{type(layer).__name__}`."
            )
        chosen.append(layer)
    return chosen


def _output_layers(model):
    """The layers that compute `model`'s outputs.

    From each output, walks back through weight-free layers (and
    `SyntheticGradient`s, the identity at inference) to the first layers
    with weights.
    """

    def passes_through(layer):
        return isinstance(layer, SyntheticGradient) or not layer.weights

    if isinstance(model, keras.Sequential):
        for layer in reversed(model.layers):
            if not passes_through(layer):
                return [layer]
        return []
    # Functional: read the graph from the model's (public) config.
    config = model.get_config()
    parents = {
        entry["name"]: _history_names(entry.get("inbound_nodes", []))
        for entry in config["layers"]
    }
    found, seen = [], set()
    stack = _history_names(config["output_layers"], key=None)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        layer = model.get_layer(name)
        if passes_through(layer):
            stack.extend(parents.get(name, []))
        else:
            found.append(layer)
    return found


def _history_names(structure, key="keras_history"):
    """Layer names in a config's `[name, node_index, tensor_index]` triples.

    With `key`, only triples stored under that key (inbound nodes); without,
    every triple (`output_layers`).
    """
    names = []

    def is_triple(value):
        return (
            isinstance(value, (list, tuple))
            and len(value) == 3
            and isinstance(value[0], str)
            and all(isinstance(v, int) for v in value[1:])
        )

    def visit(value):
        if isinstance(value, dict):
            for k, v in value.items():
                if key is not None and k == key and is_triple(v):
                    names.append(v[0])
                else:
                    visit(v)
        elif key is None and is_triple(value):
            names.append(value[0])
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(structure)
    return names


def _rebuild(model, transform, sequential_cls, functional_cls):
    """Copies `model` layer by layer, with weights, through `transform`.

    `transform(layer)` returns `_KEEP` (copy the layer), `_DROP` (leave it
    out: identity layers only) or a new layer to use instead, which gets the
    weights `layer` has outside of its synthetic gradient. Nested
    Sequential/functional models are rebuilt the same way, as
    `keras.Sequential`/`keras.Model`.
    """
    copies = []  # (old layer, new layer) pairs whose weights to copy
    dropped = set()  # ids of the layers left out

    def clone(layer):
        if isinstance(layer, keras.Sequential) or _is_functional(layer):
            return _rebuild(layer, transform, keras.Sequential, keras.Model)
        action = transform(layer)
        if action == _DROP:
            dropped.add(id(layer))
            return layer  # never called: see `call_function`
        if action == _KEEP:
            try:
                new = layer.__class__.from_config(layer.get_config())
            except Exception as e:
                raise TypeError(
                    f"Cannot copy layer '{layer.name}' of type "
                    f"`{type(layer).__name__}` from its config: {e}"
                ) from e
        else:
            new = action
        copies.append((layer, new))
        return new

    if isinstance(model, keras.Sequential):
        new_layers = [clone(layer) for layer in model.layers]
        new_layers = [layer for layer in new_layers if id(layer) not in dropped]
        source = model.inputs[0]
        inputs = keras.Input(
            batch_shape=source.shape, dtype=source.dtype, name=source.name
        )
        new_model = sequential_cls([inputs] + new_layers, name=model.name)
    else:

        def call_function(layer, *args, **kwargs):
            if id(layer) in dropped:
                return args[0]
            return layer(*args, **kwargs)

        # A fresh, uncompiled view of the graph: `clone_model` would also
        # compile the copy the way `model` is compiled.
        view = keras.Model(model.input, model.output, name=model.name)
        cloned = keras.models.clone_model(
            view, clone_function=clone, call_function=call_function
        )
        new_model = functional_cls(cloned.input, cloned.output, name=model.name)
    if not model.trainable:
        new_model.trainable = False

    for old, new in copies:
        _copy_weights(old, new)
    return new_model


def _own_weights(layer):
    """`layer`'s weights, less those of the synthetic gradient it owns."""
    sg = getattr(layer, "synthetic_gradient", None)
    skip = {id(v) for v in sg.weights} if isinstance(sg, SyntheticGradient) else set()
    return [v for v in layer.weights if id(v) not in skip]


def _copy_weights(old, new):
    src, dst = _own_weights(old), _own_weights(new)
    if type(old) is type(new):
        src, dst = old.weights, new.weights
    if len(src) != len(dst) or any(
        tuple(a.shape) != tuple(b.shape) for a, b in zip(src, dst)
    ):
        raise ValueError(
            f"Cannot copy the weights of layer '{old.name}' "
            f"(`{type(old).__name__}`) to its `{type(new).__name__}` "
            f"version: {[tuple(v.shape) for v in src]} vs "
            f"{[tuple(v.shape) for v in dst]}."
        )
    for a, b in zip(src, dst):
        b.assign(a)
