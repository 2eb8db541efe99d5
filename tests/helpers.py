"""Independent reference computations for the tests (numpy / GradientTape)."""

import numpy as np
import tensorflow as tf


def layer_norm(h):
    """The parameter-free layer norm of the gradient model's input (numpy)."""
    h = np.asarray(h, dtype=np.float64)
    mean = h.mean(-1, keepdims=True)
    var = h.var(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-6)


def set_random_gradient_model(sg_layer, seed=0, scale=0.5):
    """Gives a linear gradient model random weights; returns (kernel, bias)."""
    rng = np.random.default_rng(seed)
    dense = sg_layer._input_dense
    kernel = rng.normal(size=dense.kernel.shape).astype("float32") * scale
    bias = rng.normal(size=dense.bias.shape).astype("float32") * scale
    dense.kernel.assign(kernel)
    dense.bias.assign(bias)
    return kernel, bias


def linear_prediction(h, kernel, bias, labels=None, label_kernel=None):
    """Linear gradient model by hand: layer_norm(h) @ kernel + bias."""
    out = layer_norm(h) @ kernel + bias
    if label_kernel is not None:
        out = out + labels @ label_kernel
    return out.astype("float32")


def mse_loss(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_pred - y_true))
