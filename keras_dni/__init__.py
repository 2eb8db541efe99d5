"""keras_dni: Decoupled Neural Interfaces (synthetic gradients) for Keras 3.

Reference: Jaderberg et al., "Decoupled Neural Interfaces using Synthetic
Gradients", ICML 2017 (arXiv:1608.05343).
"""

import keras as _keras

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_dni needs the TensorFlow backend of Keras 3, but the active "
        f"backend is '{_keras.backend.backend()}'. Set the environment "
        "variable KERAS_BACKEND=tensorflow before importing keras."
    )

from keras_dni import callbacks  # noqa: E402
from keras_dni.conv import DNIConv2D  # noqa: E402
from keras_dni.conversion import apply_dni  # noqa: E402
from keras_dni.conversion import strip_dni  # noqa: E402
from keras_dni.dense import DNIDense  # noqa: E402
from keras_dni.models import DNIModel  # noqa: E402
from keras_dni.models import DNISequential  # noqa: E402
from keras_dni.models import synthetic_gradient_layers  # noqa: E402
from keras_dni.recurrent import DNIRNN  # noqa: E402
from keras_dni.synthetic_gradient import SyntheticGradient  # noqa: E402
from keras_dni.version import __version__  # noqa: E402

__all__ = [
    "DNIConv2D",
    "DNIDense",
    "DNIRNN",
    "DNIModel",
    "DNISequential",
    "SyntheticGradient",
    "apply_dni",
    "callbacks",
    "strip_dni",
    "synthetic_gradient_layers",
    "__version__",
]
