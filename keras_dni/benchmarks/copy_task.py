"""The copy task of Graves et al. (2014), as used for recurrent DNI.

Jaderberg et al. (2017), section 3.2: an RNN reads `N` random 8-bit vectors
and a delimiter, then must write the `N` vectors back. The error is the
cross-entropy in bits per output time step; a curriculum raises `N` by one
each time the error falls below 0.15 bits per time step, and the figure
reported is the largest `N` solved within a fixed number of training steps.

A sequence for length `N` has `2 * N + 1` time steps:

- steps `0 .. N-1`: the input vectors (bits in channels `0 .. 7`);
- step `N`: the delimiter (channel 8 is 1, the bits are 0);
- steps `N+1 .. 2N`: zero input; the targets are the `N` vectors, in order.

Only the last `N` steps are scored (`weights` is 1 there and 0 elsewhere).
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_dni import validation
from keras_dni.models import default_sg_optimizer
from keras_dni.recurrent import DNIRNN
from keras_dni.recurrent import RECURRENT_PREDICTION_CLIP

DEFAULT_BITS = 8
DEFAULT_THRESHOLD = 0.15


def copy_task_batch(length, batch_size, rng, bits=DEFAULT_BITS):
    """One batch of the copy task.

    Args:
        length: positive int, the number `N` of vectors to copy.
        batch_size: positive int.
        rng: a `numpy.random.Generator` (or an int seed).
        bits: positive int, the width of each vector (8 in the paper).

    Returns:
        `(x, y, weights)`: float32 arrays of shapes
        `(batch_size, 2N+1, bits+1)`, `(batch_size, 2N+1, bits)` and
        `(batch_size, 2N+1)`. `y` is zero and `weights` is 0 outside the
        last `N` steps.
    """
    length = _positive_int("length", length)
    batch_size = _positive_int("batch_size", batch_size)
    bits = _positive_int("bits", bits)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    steps = 2 * length + 1
    pattern = rng.integers(0, 2, size=(batch_size, length, bits)).astype("float32")
    x = np.zeros((batch_size, steps, bits + 1), dtype="float32")
    x[:, :length, :bits] = pattern
    x[:, length, bits] = 1.0
    y = np.zeros((batch_size, steps, bits), dtype="float32")
    y[:, length + 1 :, :] = pattern
    weights = np.zeros((batch_size, steps), dtype="float32")
    weights[:, length + 1 :] = 1.0
    return x, y, weights


def bits_per_step(y, logits, weights):
    """Cross-entropy in bits per scored time step (summed over the bits).

    Args:
        y: targets in {0, 1}, `(batch, steps, bits)`.
        logits: the model's logits, same shape.
        weights: `(batch, steps)`, 1 on the scored steps.

    Returns:
        A scalar: total cross-entropy (in bits) over the scored steps,
        divided by the number of scored steps.
    """
    y = tf.convert_to_tensor(y, tf.float32)
    logits = tf.cast(logits, tf.float32)
    weights = tf.convert_to_tensor(weights, tf.float32)
    nats = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
    per_step = tf.reduce_sum(nats, axis=-1) / np.log(2.0)
    return tf.reduce_sum(per_step * weights) / tf.reduce_sum(weights)


def first_truncated_length(truncation):
    """The smallest `N` whose copy sequence does not fit in one chunk.

    A sequence for `N` has `2N + 1` time steps; while `2N + 1 <= truncation`
    it lies in a single chunk, so truncated BPTT is full backprop there and
    `DNIRNN` has no border to put a synthetic gradient on. The first `N`
    that truncation affects is `ceil(truncation / 2)`.

    Args:
        truncation: positive int, the truncation length `T`.

    Returns:
        An int, `(truncation + 1) // 2`.

    Example:

    >>> from keras_dni.benchmarks.copy_task import first_truncated_length
    >>> [first_truncated_length(t) for t in (2, 3, 5, 8)]
    [1, 2, 3, 4]
    """
    return (_positive_int("truncation", truncation) + 1) // 2


def build_copy_model(
    truncation,
    synthetic_gradient,
    units=128,
    bits=DEFAULT_BITS,
    sg_input_normalization=None,
    sg_hidden_units=(),
    aux=False,
    sg_prediction_clip=RECURRENT_PREDICTION_CLIP,
):
    """An LSTM (`DNIRNN`) with a linear read-out of `bits` logits per step."""
    return keras.Sequential(
        [
            keras.Input((None, bits + 1)),
            DNIRNN(
                keras.layers.LSTMCell(units),
                truncation=truncation,
                synthetic_gradient=synthetic_gradient,
                return_sequences=True,
                sg_input_normalization=sg_input_normalization,
                sg_hidden_units=sg_hidden_units,
                aux=aux,
                sg_prediction_clip=sg_prediction_clip,
                name="rnn",
            ),
            keras.layers.Dense(bits, name="readout"),
        ]
    )


def run_copy_task(
    truncation,
    synthetic_gradient,
    steps,
    seed,
    units=128,
    batch_size=32,
    learning_rate=3e-3,
    sg_learning_rate=1e-3,
    threshold=DEFAULT_THRESHOLD,
    window=50,
    max_length=64,
    start_length=1,
    sg_input_normalization=None,
    sg_hidden_units=(),
    aux=False,
    sg_prediction_clip=RECURRENT_PREDICTION_CLIP,
    verbose=False,
):
    """Trains an LSTM on the copy task with a curriculum on `N`.

    A plain training loop (not `fit`) with one `tf.function` per `N`, since
    `DNIRNN` unrolls a static number of time steps and the length changes
    with `N`. The network's weights get Adam(`learning_rate`), `M`'s get
    Adam(`sg_learning_rate`), as `DNISequential` would do. Every training
    step draws a fresh batch. The curriculum starts at `N = start_length`.
    After every `window` steps at the same `N`, the mean training error of
    those steps (bits per output time step, measured before each update) is
    compared with `threshold`: if it is lower, `N` counts as solved and the
    next steps use `N + 1`.

    Args:
        truncation: the truncation length `T` of truncated BPTT.
        synthetic_gradient: bool, DNI (`True`) or plain truncated BPTT.
        steps: the budget of training steps (batches).
        seed: int, seeds the weights and the data.
        units: LSTM width.
        batch_size: sequences per step.
        learning_rate: Adam learning rate of the network.
        sg_learning_rate: Adam learning rate of the gradient model `M`;
            `None` uses the package default (`keras_dni.DNISequential`'s).
        threshold: error (bits per time step) below which `N` is solved.
        window: steps averaged for the curriculum decision.
        max_length: the curriculum stops at this `N`.
        start_length: the first `N` of the curriculum, or `"auto"`:
            `first_truncated_length(truncation)`, the first `N` whose
            sequence spans more than one chunk. A smaller `N` fits in one
            chunk, so that stage trains both methods with full backprop; at
            `truncation=3`, starting at `N = 1` left DNI unable to learn
            `N = 3` (see the README, whose recurrent table uses `"auto"`).
        sg_input_normalization, sg_hidden_units, aux, sg_prediction_clip:
            passed to `DNIRNN` (`aux=True`: DNI + Aux; needs
            `synthetic_gradient=True`).
        verbose: print each curriculum step.

    Returns:
        A dict: `max_length` (largest `N` solved; 0 if none, also when the
        curriculum never solved its first `N`), `start_length` (that first
        `N`), `steps`, `seconds`, and `history`, a list of `(step, N)` at
        which each `N` was solved.
    """
    truncation = _positive_int("truncation", truncation)
    steps = _positive_int("steps", steps)
    window = _positive_int("window", window)
    max_length = _positive_int("max_length", max_length)
    if isinstance(start_length, str):
        if start_length != "auto":
            raise ValueError(
                "Received an invalid value for `start_length`, expected a "
                "positive integer or 'auto'. "
                f"Received: start_length={start_length!r}"
            )
        start_length = first_truncated_length(truncation)
        received = f"'auto' (N={start_length} for truncation={truncation})"
    else:
        start_length = _positive_int("start_length", start_length)
        received = str(start_length)
    if start_length > max_length:
        raise ValueError(
            "Received an invalid value for `start_length`, expected at most "
            f"`max_length` ({max_length}). Received: start_length={received}"
        )
    synthetic_gradient = validation.check_bool("synthetic_gradient", synthetic_gradient)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_copy_model(
        truncation,
        synthetic_gradient,
        units=units,
        sg_input_normalization=sg_input_normalization,
        sg_hidden_units=sg_hidden_units,
        aux=aux,
        sg_prediction_clip=sg_prediction_clip,
    )
    rnn = model.get_layer("rnn")
    sg_vars = rnn.synthetic_gradient.trainable_variables if synthetic_gradient else []
    sg_ids = {id(v) for v in sg_vars}
    main_vars = [v for v in model.trainable_variables if id(v) not in sg_ids]
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(main_vars)
    sg_optimizer = None
    if synthetic_gradient:
        sg_optimizer = (
            default_sg_optimizer()
            if sg_learning_rate is None
            else keras.optimizers.Adam(sg_learning_rate)
        )
        sg_optimizer.build(sg_vars)

    def train_step(x, y, weights):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            nats = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
            per_step = tf.reduce_sum(nats, axis=-1)
            # Mean over the batch of the mean over the scored steps.
            loss = tf.reduce_sum(per_step * weights) / tf.reduce_sum(weights)
        grads = tape.gradient(loss, main_vars + sg_vars)
        optimizer.apply(grads[: len(main_vars)], main_vars)
        # A sequence no longer than `truncation` has no border: M gets no
        # gradient.
        sg_pairs = [
            (g, v) for g, v in zip(grads[len(main_vars) :], sg_vars) if g is not None
        ]
        if sg_pairs:
            sg_optimizer.apply(*zip(*sg_pairs))
        return loss / np.log(2.0)  # = bits_per_step(y, logits, weights)

    functions = {}
    length = start_length
    errors = []
    history = []
    best = 0
    start = time.time()
    for step in range(steps):
        if length not in functions:
            functions[length] = tf.function(train_step)
        x, y, weights = copy_task_batch(length, batch_size, rng)
        errors.append(float(functions[length](x, y, weights)))
        if len(errors) == window:
            error = float(np.mean(errors))
            errors = []
            if error < threshold:
                best = length
                history.append((step + 1, length))
                if verbose:
                    print(f"step {step + 1}: N={length} solved ({error:.3f} bits)")
                if length >= max_length:
                    break
                length += 1
    return {
        "max_length": best,
        "start_length": start_length,
        "steps": steps,
        "seconds": time.time() - start,
        "history": history,
    }


def _positive_int(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value <= 0
    ):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer. Received: {name}={value!r}"
        )
    return int(value)
