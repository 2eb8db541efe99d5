"""Copy tasks as one continuous stream, trained with a stateful `DNIRNN`.

The protocol of Jaderberg et al. (2017), section 3.2: each of the
`batch_size` rows of a batch is an endless stream of episodes, one after the
other; the network's state is carried from one training step to the next
and never reset. Each training step reads the next `chunks * truncation`
time steps of every row (`chunks` truncated-BPTT chunks of `truncation`
steps), so both methods see the same data at the same `T`. The border at
the end of a step's window is where `DNIRNN(stateful=True)` puts `M(state)`
(discounted by `stream_discount`) and where `M` is trained on the gradient
that arrives one step later.

Episodes: `copy_episode` (Graves et al. 2014's copy task, as in
`copy_task`) and `repeat_copy_episode` (the repeat-copy task). A curriculum
raises the episode's difficulty each time the mean error over `window`
training steps falls below `threshold` bits per scored time step; the task's
score (`max_length`) is the largest output length solved.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_dni.benchmarks.copy_task import DEFAULT_BITS
from keras_dni.benchmarks.copy_task import DEFAULT_THRESHOLD
from keras_dni.models import default_sg_optimizer
from keras_dni.recurrent import DNIRNN
from keras_dni.recurrent import RECURRENT_PREDICTION_CLIP

# The methods of the recurrent tasks, and what each means for `DNIRNN`:
# (synthetic_gradient, aux).
RECURRENT_METHODS = {
    "bptt": (False, False),
    "dni": (True, False),
    "dni-aux": (True, True),
}


def check_method(method):
    """`method` -> `(synthetic_gradient, aux)`; `backprop` means `bptt`."""
    method = "bptt" if method == "backprop" else method
    if method not in RECURRENT_METHODS:
        raise ValueError(
            "Received an invalid value for `method`, expected one of "
            f"{list(RECURRENT_METHODS)}. Received: method={method!r}"
        )
    return method, RECURRENT_METHODS[method]


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


# ------------------------------------------------------------------ episodes
def copy_episode(length, rng, bits=DEFAULT_BITS):
    """One copy episode: `(x, y, weights)` of `2 * length + 1` steps.

    Input channels: `bits` data bits and the delimiter; the output has
    `bits + 1` channels (the last, an end marker, is always 0 here so that
    copy and repeat copy share a model). Only the last `length` steps are
    scored.
    """
    length = _positive_int("length", length)
    steps = 2 * length + 1
    pattern = rng.integers(0, 2, size=(length, bits)).astype("float32")
    x = np.zeros((steps, bits + 2), "float32")
    x[:length, :bits] = pattern
    x[length, bits] = 1.0
    y = np.zeros((steps, bits + 1), "float32")
    y[length + 1 :, :bits] = pattern
    weights = np.zeros(steps, "float32")
    weights[length + 1 :] = 1.0
    return x, y, weights


def repeat_copy_episode(length, repeats, rng, bits=DEFAULT_BITS, max_repeats=10):
    """One repeat-copy episode (Graves et al. 2014).

    `length` random `bits`-bit vectors, then one delimiter step whose
    repeat channel holds `repeats / max_repeats`; the network must then
    write the sequence `repeats` times and finally raise an end marker.

    Layout (`L = length`, `R = repeats`), `L + 1 + L * R + 1` steps:

    - steps `0 .. L-1`: the vectors in channels `0 .. bits-1`;
    - step `L`: delimiter (channel `bits` is 1) and the repeat count
      (channel `bits + 1` is `R / max_repeats`);
    - steps `L+1 .. L+L*R`: zero input; targets: the vectors, `R` times;
    - the last step: zero input; target: the end marker (output channel
      `bits`) is 1, the bits are 0.

    The output phase (the last `L * R + 1` steps) is scored.

    Args:
        length: positive int, the number of vectors.
        repeats: positive int, at most `max_repeats`.
        rng: a `numpy.random.Generator`.
        bits: the width of a vector.
        max_repeats: the repeat count that the input channel maps to 1.

    Returns:
        `(x, y, weights)`: float32 arrays `(steps, bits + 2)`,
        `(steps, bits + 1)` and `(steps,)`.

    Example:

    >>> import numpy as np
    >>> from keras_dni.benchmarks.streams import repeat_copy_episode
    >>> x, y, w = repeat_copy_episode(2, 3, np.random.default_rng(0), bits=4)
    >>> x.shape, y.shape, int(w.sum())
    ((10, 6), (10, 5), 7)
    """
    length = _positive_int("length", length)
    repeats = _positive_int("repeats", repeats)
    max_repeats = _positive_int("max_repeats", max_repeats)
    if repeats > max_repeats:
        raise ValueError(
            "Received an invalid value for `repeats`, expected at most "
            f"`max_repeats` ({max_repeats}). Received: repeats={repeats}"
        )
    steps = length + 1 + length * repeats + 1
    pattern = rng.integers(0, 2, size=(length, bits)).astype("float32")
    x = np.zeros((steps, bits + 2), "float32")
    x[:length, :bits] = pattern
    x[length, bits] = 1.0
    x[length, bits + 1] = repeats / max_repeats
    y = np.zeros((steps, bits + 1), "float32")
    y[length + 1 : steps - 1, :bits] = np.tile(pattern, (repeats, 1))
    y[steps - 1, bits] = 1.0
    weights = np.zeros(steps, "float32")
    weights[length + 1 :] = 1.0
    return x, y, weights


class EpisodeStream:
    """`batch_size` endless streams of episodes, read a window at a time.

    Args:
        make_episode: `make_episode(rng) -> (x, y, weights)`, the next
            episode (read again for every new episode, so the curriculum can
            change it between reads: `stream.make_episode = ...`).
        batch_size: the number of streams (rows).
        rng: a `numpy.random.Generator`.

    Each row starts with a random number (0 to the first episode's length -
    1) of blank, unscored steps, so that the rows' episodes do not start in
    step with each other and with the windows.
    """

    def __init__(self, make_episode, batch_size, rng):
        self.make_episode = make_episode
        self.rng = rng
        self.batch_size = _positive_int("batch_size", batch_size)
        self._rows = []
        for _ in range(self.batch_size):
            x, y, w = make_episode(rng)
            blank = int(rng.integers(0, len(x)))
            self._rows.append(
                [
                    np.concatenate([np.zeros((blank,) + x.shape[1:], "float32"), x]),
                    np.concatenate([np.zeros((blank,) + y.shape[1:], "float32"), y]),
                    np.concatenate([np.zeros(blank, "float32"), w]),
                ]
            )

    def next(self, steps):
        """The next `steps` time steps of every row: `(x, y, weights)`."""
        steps = _positive_int("steps", steps)
        xs, ys, ws = [], [], []
        for row in self._rows:
            while len(row[0]) < steps:
                episode = self.make_episode(self.rng)
                for i in range(3):
                    row[i] = np.concatenate([row[i], episode[i]])
            xs.append(row[0][:steps])
            ys.append(row[1][:steps])
            ws.append(row[2][:steps])
            for i in range(3):
                row[i] = row[i][steps:]
        return np.stack(xs), np.stack(ys), np.stack(ws)


# ---------------------------------------------------------------- curricula
def copy_curriculum(start_length=1, max_length=64):
    """Stages `(N,)` for the copy task: `N = start_length .. max_length`."""
    return [(n,) for n in range(start_length, max_length + 1)]


def repeat_copy_curriculum(max_length=20, max_repeats=10):
    """Stages `(N, R)` of repeat copy: from (1, 1), raising N and R in turn.

    Each stage raises the smaller of `N` and `R` (`N` on a tie) by one,
    until both reach their maximum: (1, 1), (2, 1), (2, 2), (3, 2), ...
    """
    stages = [(1, 1)]
    n, r = 1, 1
    while n < max_length or r < max_repeats:
        if (n <= r and n < max_length) or r >= max_repeats:
            n += 1
        else:
            r += 1
        stages.append((n, r))
    return stages


TASKS = {
    # task -> (episode maker for a stage, output length of a stage)
    "copy": (
        lambda stage, bits: lambda rng: copy_episode(stage[0], rng, bits),
        lambda stage: stage[0],
    ),
    "repeat-copy": (
        lambda stage, bits: (
            lambda rng: repeat_copy_episode(stage[0], stage[1], rng, bits)
        ),
        lambda stage: stage[0] * stage[1],
    ),
}


# ------------------------------------------------------------------ training
def build_stream_model(
    truncation,
    method,
    batch_size,
    units=128,
    bits=DEFAULT_BITS,
    stream_discount=0.5,
    aux_weight=1.0,
    sg_input_normalization=None,
    sg_prediction_clip=RECURRENT_PREDICTION_CLIP,
    sg_states="auto",
):
    """A stateful LSTM (`DNIRNN`) with a linear read-out of `bits + 1` logits."""
    _, (synthetic_gradient, aux) = check_method(method)
    return keras.Sequential(
        [
            keras.Input((None, bits + 2), batch_size=batch_size),
            DNIRNN(
                keras.layers.LSTMCell(units),
                truncation=truncation,
                synthetic_gradient=synthetic_gradient,
                return_sequences=True,
                stateful=True,
                stream_discount=stream_discount,
                aux=aux,
                aux_weight=aux_weight,
                sg_input_normalization=sg_input_normalization,
                sg_prediction_clip=sg_prediction_clip,
                sg_states=sg_states,
                name="rnn",
            ),
            keras.layers.Dense(bits + 1, name="readout"),
        ]
    )


def run_stream_task(
    task,
    truncation,
    method,
    steps,
    seed,
    chunks=1,
    units=128,
    batch_size=32,
    learning_rate=3e-3,
    sg_learning_rate=1e-3,
    threshold=DEFAULT_THRESHOLD,
    window=50,
    stream_discount=0.5,
    aux_weight=1.0,
    stages=None,
    bits=DEFAULT_BITS,
    sg_input_normalization=None,
    sg_prediction_clip=RECURRENT_PREDICTION_CLIP,
    sg_states="auto",
    log_every=0,
    verbose=False,
):
    """Trains a stateful LSTM on a stream of copy or repeat-copy episodes.

    Every training step reads the next `chunks * truncation` time steps of
    the `batch_size` streams (`EpisodeStream`) and takes one Adam step
    (`M`: its own Adam at `sg_learning_rate`). The loss is the sigmoid
    cross-entropy of the scored steps summed over the output channels,
    divided by `batch_size * chunks * truncation` (a fixed normaliser, so
    that `M`'s target keeps its scale). After every `window` steps at a
    stage, the error of those steps (bits per scored time step) is compared
    with `threshold`; below it the stage counts as solved and the streams
    switch to the next stage's episodes (episodes already started finish
    as they are).

    Args:
        task: `"copy"` or `"repeat-copy"`.
        truncation: `T`.
        method: `"bptt"`, `"dni"` or `"dni-aux"`.
        steps: the budget of training steps.
        seed: seeds the weights and the data.
        chunks: chunks of `T` steps per training step.
        units, batch_size, learning_rate, sg_learning_rate: as in
            `copy_task.run_copy_task`.
        threshold: bits per scored step below which a stage is solved.
        window: training steps per curriculum decision.
        stream_discount, aux_weight, sg_input_normalization,
            sg_prediction_clip, sg_states: passed to `DNIRNN`.
        stages: the curriculum (default: `copy_curriculum()` or
            `repeat_copy_curriculum()`).
        bits: the width of a vector.
        log_every: every this many steps, record the mean norm of `M`'s
            prediction at the current state (0: never).
        verbose: print each solved stage.

    Returns:
        A dict: `max_length` (the largest output length solved: `N` for
        copy, `N * R` for repeat copy; 0 if none), `stage` (the last solved
        stage or `None`), `steps`, `seconds`, `history` (`(step, stage)` at
        which each stage was solved), `m_norms` (`(step, mean norm of M's
        prediction, mean norm of the state)`) and
        `final_error` (bits per scored step over the last window).
    """
    if task not in TASKS:
        raise ValueError(
            f"Received an invalid value for `task`, expected one of "
            f"{list(TASKS)}. Received: task={task!r}"
        )
    method, (synthetic_gradient, aux) = check_method(method)
    truncation = _positive_int("truncation", truncation)
    steps = _positive_int("steps", steps)
    chunks = _positive_int("chunks", chunks)
    if aux and chunks < 2:
        raise ValueError(
            "Received an invalid value for `chunks`: `method='dni-aux'` needs "
            "at least 2 chunks per training step (a step of one chunk has no "
            "border inside it, so no auxiliary loss). Received: chunks=1"
        )
    window = _positive_int("window", window)
    make, output_length = TASKS[task]
    if stages is None:
        stages = copy_curriculum() if task == "copy" else repeat_copy_curriculum()
    stages = [tuple(s) for s in stages]
    if not stages:
        raise ValueError("Received an empty curriculum: `stages` needs a stage.")
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_stream_model(
        truncation,
        method,
        batch_size,
        units=units,
        bits=bits,
        stream_discount=stream_discount,
        aux_weight=aux_weight,
        sg_input_normalization=sg_input_normalization,
        sg_prediction_clip=sg_prediction_clip,
        sg_states=sg_states,
    )
    rnn = model.get_layer("rnn")
    sg = rnn.synthetic_gradient
    sg_vars = sg.trainable_variables if synthetic_gradient else []
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
    length = chunks * truncation
    normaliser = float(batch_size * length)

    @tf.function
    def train_step(x, y, weights):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            nats = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
            per_step = tf.reduce_sum(nats, axis=-1) * weights
            loss = tf.reduce_sum(per_step) / normaliser
        grads = tape.gradient(loss, main_vars + sg_vars)
        optimizer.apply(grads[: len(main_vars)], main_vars)
        if sg_vars:
            sg_optimizer.apply(grads[len(main_vars) :], sg_vars)
        return tf.reduce_sum(per_step) / np.log(2.0)

    @tf.function
    def m_norm():
        joined = tf.concat([tf.convert_to_tensor(s) for s in rnn.states], -1)
        state = tf.reduce_mean(tf.norm(joined, axis=-1))
        if sg is None:
            return tf.constant(0.0), state
        prediction = sg.predict_gradient(joined)
        return tf.reduce_mean(tf.norm(prediction, axis=-1)), state

    index = 0
    stream = EpisodeStream(make(stages[0], bits), batch_size, rng)
    bits_sum, scored, count = 0.0, 0.0, 0
    history, m_norms = [], []
    best, solved, final_error = 0, None, None
    start = time.time()
    for step in range(steps):
        x, y, weights = stream.next(length)
        bits_sum += float(train_step(x, y, weights))
        scored += float(weights.sum())
        count += 1
        if log_every and (step + 1) % log_every == 0:
            m, state = m_norm()
            m_norms.append((step + 1, float(m), float(state)))
        if count == window:
            error = bits_sum / max(scored, 1.0)
            final_error = error
            bits_sum, scored, count = 0.0, 0.0, 0
            if not np.isfinite(error):
                break
            if error < threshold:
                solved = stages[index]
                best = output_length(solved)
                history.append((step + 1, list(solved)))
                if verbose:
                    print(f"step {step + 1}: {solved} solved ({error:.3f} bits)")
                if index + 1 == len(stages):
                    break
                index += 1
                stream.make_episode = make(stages[index], bits)
    return {
        "max_length": best,
        "stage": None if solved is None else list(solved),
        "steps": steps,
        "seconds": time.time() - start,
        "history": history,
        "m_norms": m_norms,
        "final_error": final_error,
    }
