"""The benchmark networks: the MLP and the CNN, for each method."""

METHODS = ("backprop", "dni", "cdni")
ARCHS = ("mlp", "cnn")


def _check_method(method):
    if method not in METHODS:
        raise ValueError(
            f"Received an invalid value for `method`, expected one of "
            f"{list(METHODS)}. Received: method={method!r}"
        )


def build_mlp(
    method,
    input_dim,
    output_dim,
    output_activation,
    width=256,
    depth=3,
    dni_layers=None,
    activation="relu",
    dni_kwargs=None,
    kernel_initializer=None,
):
    """The benchmark MLP for one method (`backprop`, `dni` or `cdni`).

    `dni_layers`: indices of the hidden layers (0 = bottom) that are
    `DNIDense` for `dni`/`cdni`; the others are plain `Dense`. `None`
    (default) makes every hidden layer a DNI layer. `activation`: that of
    every hidden layer. `dni_kwargs`: more arguments for the `DNIDense`
    layers (e.g. `sg_solver`). `kernel_initializer`: that of every hidden
    layer; `None` (default) leaves each layer's own default (`Dense`:
    `"glorot_uniform"`; `DNIDense`: `"auto"`, He normal for ReLU).
    """
    import keras

    import keras_dni

    _check_method(method)
    if dni_layers is None:
        dni_layers = range(depth)
    bad = [i for i in dni_layers if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"Received an invalid value for `dni_layers`, expected indices of "
            f"hidden layers in [0, {depth - 1}]. Received: dni_layers="
            f"{list(dni_layers)!r}"
        )
    init = (
        {} if kernel_initializer is None else {"kernel_initializer": kernel_initializer}
    )
    hidden = []
    for i in range(depth):
        if method == "backprop" or i not in dni_layers:
            hidden.append(
                keras.layers.Dense(
                    width,
                    activation=activation,
                    name=f"hidden_{i}",
                    **init,
                )
            )
        else:
            hidden.append(
                keras_dni.DNIDense(
                    width,
                    activation=activation,
                    conditional=method == "cdni",
                    name=f"hidden_{i}",
                    **init,
                    **(dni_kwargs or {}),
                )
            )
    layers = [keras.Input((input_dim,))] + hidden
    layers.append(
        keras.layers.Dense(output_dim, activation=output_activation, name="output")
    )
    if method == "backprop":
        return keras.Sequential(layers)
    return keras_dni.DNISequential(layers)


def build_cnn(method, image_size, output_dim, dni_kwargs=None):
    """The benchmark CNN for one method, on `image_size` square images.

    `dni_kwargs`: more arguments for the `DNIConv2D` layers.
    """
    import keras

    import keras_dni

    _check_method(method)
    if method == "backprop":
        conv, kwargs, cls = keras.layers.Conv2D, {}, keras.Sequential
    else:
        conv, cls = keras_dni.DNIConv2D, keras_dni.DNISequential
        kwargs = {"conditional": method == "cdni", **(dni_kwargs or {})}
    return cls(
        [
            keras.Input((image_size, image_size, 1)),
            conv(32, 3, padding="same", activation="relu", name="conv_0", **kwargs),
            keras.layers.MaxPooling2D(),
            conv(64, 3, padding="same", activation="relu", name="conv_1", **kwargs),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(output_dim, activation="softmax", name="output"),
        ]
    )
