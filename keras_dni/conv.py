"""`DNIConv2D`: a `keras.layers.Conv2D` followed by a synthetic gradient."""

import keras

from keras_dni import validation
from keras_dni.owned import owned_config
from keras_dni.owned import owned_synthetic_gradient
from keras_dni.synthetic_gradient import DEFAULT_SOLVER_DECAY
from keras_dni.synthetic_gradient import PREDICTION_CLIP
from keras_dni.synthetic_gradient import SOLVER_RIDGE


@keras.saving.register_keras_serializable(package="keras_dni")
class DNIConv2D(keras.layers.Conv2D):
    """A `Conv2D` layer that learns from a synthetic gradient (DNI).

    The forward pass is exactly `keras.layers.Conv2D`'s, and so is inference
    cost. In training, the gradient of the loss with respect to the layer's
    output feature map is replaced by the prediction of a small
    convolutional gradient model `M` (see `keras_dni.SyntheticGradient`):
    the layer's kernel and bias, and every layer below, are updated from
    `M`'s prediction, and the gradient arriving from above is only `M`'s
    regression target.

    By default `M` is a linear, zero-initialised 1x1 convolution on the
    layer's output (the gradient at each position predicted from the
    channels at that position). `sg_hidden_units` turns it into a stack of
    same-padded `sg_kernel_size x sg_kernel_size` convolutions with ReLU
    (and batch normalisation with `sg_batch_norm=True`), the last one
    zero-initialised.

    Reference:
    - [Jaderberg et al., 2017](https://arxiv.org/abs/1608.05343)

    Args:
        filters, kernel_size, strides, padding, data_format, dilation_rate,
        groups, activation, use_bias, kernel_initializer, bias_initializer,
        kernel_regularizer, bias_regularizer, activity_regularizer,
        kernel_constraint, bias_constraint: as for `keras.layers.Conv2D`.
        sg_hidden_units: tuple of ints, numbers of filters of the gradient
            model's hidden convolutions; `()` (default) gives a linear,
            zero-initialised 1x1 convolution.
        sg_batch_norm: bool, batch normalisation in the gradient model's
            hidden layers.
        sg_kernel_size: int or `None`, kernel size of the gradient model's
            convolutions; `None` (default) gives 1 for a linear gradient
            model and 3 with hidden layers.
        conditional: bool, conditional DNI: the gradient model also sees the
            labels, at every position (needs `DNISequential`/`DNIModel`).
        label_dim: int or `None`, width of the label features of a
            conditional layer; set automatically by `DNISequential`/`DNIModel`.
        bp_lambda: float in [0, 1], BP(lambda) mix of the incoming gradient
            into the gradient sent below (0: pure DNI, 1: backprop).
        sg_input_normalization: `"auto"` (default), `"layer"` or `None`:
            whether the gradient model sees the feature map standardised
            over the channels, at each position (`"auto"`: not for a
            conditional least-squares model; see `SyntheticGradient`).
        sg_solver: `"auto"` (default), `"least_squares"` or `"gradient"`:
            how the gradient model is fitted (see `SyntheticGradient`'s
            `solver`).
        sg_solver_decay: float in [0, 1), the least-squares solver's decay
            of past batches (see `SyntheticGradient`'s `solver_decay`).
        sg_solver_ridge: positive float, the least-squares solver's ridge
            (see `SyntheticGradient`'s `solver_ridge`).
        sg_prediction_clip: positive float or `None`, the bound on the
            synthetic gradient's norm relative to the recent targets' (see
            `SyntheticGradient`'s `prediction_clip`).
        sg_calibration: bool (default `False`), whether the synthetic
            gradient is scaled by how well the gradient model has predicted
            its recent targets (see `SyntheticGradient`'s `calibration`:
            for plain DNI in networks of up to 3 hidden layers of up to 256
            units).
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: input tensor of rank 4.
        training: bool, whether the call is part of a training step.

    Input shape:
        `(batch_size, height, width, channels)` for
        `data_format="channels_last"`, `(batch_size, channels, height,
        width)` for `"channels_first"`.

    Output shape:
        As for `keras.layers.Conv2D`.

    Example:

    >>> import keras, keras_dni
    >>> model = keras_dni.DNISequential([
    ...     keras.Input((12, 12, 1)),
    ...     keras_dni.DNIConv2D(8, 3, activation="relu"),
    ...     keras.layers.MaxPooling2D(),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> model.compile("adam", "sparse_categorical_crossentropy")
    >>> _ = model.fit(keras.random.uniform((32, 12, 12, 1)),
    ...               keras.random.randint((32,), 0, 3), verbose=0)
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        sg_hidden_units=(),
        sg_batch_norm=False,
        sg_kernel_size=None,
        conditional=False,
        label_dim=None,
        bp_lambda=0.0,
        sg_input_normalization="auto",
        sg_solver="auto",
        sg_solver_decay=DEFAULT_SOLVER_DECAY,
        sg_solver_ridge=SOLVER_RIDGE,
        sg_prediction_clip=PREDICTION_CLIP,
        sg_calibration=False,
        **kwargs,
    ):
        super().__init__(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
            groups=groups,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self.synthetic_gradient = owned_synthetic_gradient(
            self,
            sg_hidden_units,
            sg_batch_norm,
            conditional,
            label_dim,
            bp_lambda,
            sg_input_normalization,
            sg_solver,
            sg_solver_decay,
            sg_solver_ridge,
            sg_prediction_clip,
            sg_calibration,
            kernel_size=validation.check_optional_positive_int(
                "sg_kernel_size", sg_kernel_size
            ),
            data_format=self.data_format,
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.synthetic_gradient.build(self.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        outputs = super().call(inputs)
        return self.synthetic_gradient(outputs, training=training)

    def get_config(self):
        config = owned_config(self.synthetic_gradient)
        config["sg_kernel_size"] = self.synthetic_gradient.kernel_size
        return {**super().get_config(), **config}
