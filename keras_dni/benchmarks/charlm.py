"""Character-level language modelling on the pydoc topics text (no download).

The text is `pydoc_data.topics.topics` (the help topics shipped with
CPython, about 465,000 characters of English and Python), joined in sorted
topic order and split by position into train / validation / test. A
stateful LSTM (`DNIRNN`) reads the training text as `batch_size` parallel
streams, `chunks * truncation` characters per training step, predicting
each next character; truncated BPTT, DNI and DNI + Aux differ only in the
`DNIRNN` arguments. Every `eval_every` steps the validation bits per
character (BPC) are measured; training stops early after `patience`
evaluations without improvement, and the test BPC is measured with the
weights of the best validation BPC.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_dni.benchmarks.streams import check_method
from keras_dni.models import default_sg_optimizer
from keras_dni.recurrent import DNIRNN
from keras_dni.recurrent import RECURRENT_PREDICTION_CLIP


def load_text():
    """The pydoc topics text: every topic of `pydoc_data.topics.topics`.

    Returns:
        A str, the topics' texts in sorted topic order, joined by newlines.
    """
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def split_text(text, fractions=(0.9, 0.05, 0.05)):
    """Splits `text` by position into train, validation and test parts.

    Args:
        text: a str (or any sliceable sequence).
        fractions: three non-negative numbers summing to 1: the shares of
            the first, middle and last part.

    Returns:
        `(train, valid, test)`, consecutive slices of `text` that together
        are `text`: `train = text[:a]`, `valid = text[a:b]`,
        `test = text[b:]` with `a = int(len * fractions[0])` and
        `b = int(len * (fractions[0] + fractions[1]))`.

    Example:

    >>> from keras_dni.benchmarks.charlm import split_text
    >>> split_text("abcdefghij", (0.6, 0.2, 0.2))
    ('abcdef', 'gh', 'ij')
    """
    fractions = tuple(fractions)
    if (
        len(fractions) != 3
        or any(
            isinstance(f, bool) or not isinstance(f, (int, float)) for f in fractions
        )
        or any(f < 0 for f in fractions)
        or abs(sum(fractions) - 1.0) > 1e-9
    ):
        raise ValueError(
            "Received an invalid value for `fractions`, expected three "
            "non-negative numbers summing to 1 (train, validation, test). "
            f"Received: fractions={fractions!r}"
        )
    n = len(text)
    a = int(n * fractions[0])
    b = int(n * (fractions[0] + fractions[1]))
    return text[:a], text[a:b], text[b:]


def make_vocabulary(text):
    """The sorted characters of `text`; index `len(vocab)` is "unknown"."""
    return sorted(set(text))


def encode(text, vocabulary):
    """`text` as int32 ids in `vocabulary`; unknown characters get `len(vocabulary)`."""
    index = {c: i for i, c in enumerate(vocabulary)}
    unknown = len(vocabulary)
    return np.array([index.get(c, unknown) for c in text], dtype="int32")


def as_streams(ids, batch_size):
    """`ids` cut into `batch_size` equal rows (dropping the tail that does not fit)."""
    length = len(ids) // batch_size
    if length < 2:
        raise ValueError(
            f"The text ({len(ids)} characters) is too short for "
            f"batch_size={batch_size} streams."
        )
    return np.asarray(ids[: length * batch_size]).reshape(batch_size, length)


def build_charlm_model(
    vocab_size,
    truncation,
    method,
    batch_size,
    units=128,
    embedding=32,
    stream_discount=0.5,
    aux_weight=1.0,
    sg_states="auto",
    sg_input_normalization=None,
    sg_prediction_clip=RECURRENT_PREDICTION_CLIP,
):
    """Embedding, a stateful LSTM (`DNIRNN`) and a softmax read-out (logits)."""
    _, (synthetic_gradient, aux) = check_method(method)
    return keras.Sequential(
        [
            keras.Input((None,), batch_size=batch_size, dtype="int32"),
            keras.layers.Embedding(vocab_size, embedding, name="embedding"),
            DNIRNN(
                keras.layers.LSTMCell(units),
                truncation=truncation,
                synthetic_gradient=synthetic_gradient,
                return_sequences=True,
                stateful=True,
                stream_discount=stream_discount,
                aux=aux,
                aux_weight=aux_weight,
                sg_states=sg_states,
                sg_input_normalization=sg_input_normalization,
                sg_prediction_clip=sg_prediction_clip,
                name="rnn",
            ),
            keras.layers.Dense(vocab_size, name="readout"),
        ]
    )


def bits_per_character(model, rows, window):
    """BPC of `model` on `rows` (`(batch, length)` ids), read as streams.

    Each row is fed from its start in windows of `window` characters with
    the state carried (the model's stateful `DNIRNN` starts from zero; its
    state before the call is restored afterwards), predicting characters
    `1 .. length - 1` of each row from those before them. The result is the
    mean over those predictions of `-log2 p(character)`.

    Args:
        model: a model built by `build_charlm_model` (logits out).
        rows: int array `(batch_size, length)`.
        window: characters per call.

    Returns:
        A float, bits per character.
    """
    rnn = model.get_layer("rnn")
    saved = [s.numpy() for s in rnn.states]
    rnn.reset_state()
    rows = np.asarray(rows)
    total, count = 0.0, 0
    inputs, targets = rows[:, :-1], rows[:, 1:]
    # One traced function per window length, kept on the model.
    fns = model.__dict__.setdefault("_bpc_functions", {})
    for start in range(0, inputs.shape[1], window):
        x = inputs[:, start : start + window]
        y = targets[:, start : start + window]
        if x.shape[1] not in fns:
            fns[x.shape[1]] = tf.function(
                lambda x, y: tf.reduce_sum(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=y, logits=tf.cast(model(x, training=False), tf.float32)
                    )
                )
            )
        total += float(fns[x.shape[1]](x, y))
        count += y.size
    for variable, value in zip(rnn.states, saved):
        variable.assign(value)
    return total / count / np.log(2.0)


def run_charlm(
    truncation,
    method,
    steps,
    seed,
    chunks=None,
    units=128,
    embedding=32,
    batch_size=32,
    learning_rate=3e-3,
    sg_learning_rate=1e-3,
    stream_discount=0.5,
    aux_weight=1.0,
    sg_states="auto",
    sg_input_normalization=None,
    sg_prediction_clip=RECURRENT_PREDICTION_CLIP,
    eval_every=500,
    patience=4,
    eval_window=100,
    text=None,
    verbose=False,
):
    """Trains one character-level LSTM language model; returns its metrics.

    Args:
        truncation: `T`.
        method: `"bptt"`, `"dni"` or `"dni-aux"`.
        steps: the most training steps.
        seed: seeds the weights (the data order is fixed).
        chunks: chunks of `T` characters per training step (default:
            `ceil(20 / T)`, about 20 characters a step at every `T`).
        units, embedding: LSTM and embedding widths.
        batch_size: parallel streams.
        learning_rate, sg_learning_rate: Adam learning rates of the network
            and of `M`.
        stream_discount, aux_weight, sg_states, sg_input_normalization,
            sg_prediction_clip: passed to `DNIRNN`.
        eval_every: steps between validation measurements.
        patience: validation measurements without improvement before
            stopping.
        eval_window: characters per call when measuring BPC.
        text: the text (default: `load_text()`).
        verbose: print each validation measurement.

    Returns:
        A dict: `test_bpc`, `valid_bpc` (best), `train_bpc` (mean over the
        last `eval_every` steps), `best_step`, `steps_run`, `seconds`,
        `history` (`(step, valid_bpc)`), `chunks`, `vocab_size`,
        `characters` (train/valid/test sizes).
    """
    method, (synthetic_gradient, _) = check_method(method)
    for name, value in (("truncation", truncation), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected a positive "
                f"integer. Received: {name}={value!r}"
            )
    if chunks is None:
        chunks = -(-20 // truncation)
    text = load_text() if text is None else text
    train, valid, test = split_text(text)
    vocabulary = make_vocabulary(train)
    vocab_size = len(vocabulary) + 1
    train_rows = as_streams(encode(train, vocabulary), batch_size)
    valid_rows = as_streams(encode(valid, vocabulary), batch_size)
    test_rows = as_streams(encode(test, vocabulary), batch_size)
    keras.utils.set_random_seed(seed)
    model = build_charlm_model(
        vocab_size,
        truncation,
        method,
        batch_size,
        units=units,
        embedding=embedding,
        stream_discount=stream_discount,
        aux_weight=aux_weight,
        sg_states=sg_states,
        sg_input_normalization=sg_input_normalization,
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

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
        grads = tape.gradient(loss, main_vars + sg_vars)
        optimizer.apply(grads[: len(main_vars)], main_vars)
        if sg_vars:
            sg_optimizer.apply(grads[len(main_vars) :], sg_vars)
        return loss

    length = chunks * truncation
    position = 0
    best, best_step, best_weights = np.inf, 0, model.get_weights()
    history, train_losses = [], []
    waited = 0
    start = time.time()
    step = 0
    for step in range(1, steps + 1):
        if position + length + 1 > train_rows.shape[1]:
            position = 0  # a new epoch: the streams start again
            rnn.reset_state()
        x = train_rows[:, position : position + length]
        y = train_rows[:, position + 1 : position + length + 1]
        position += length
        loss = float(train_step(x, y))
        if not np.isfinite(loss):
            break
        train_losses.append(loss)
        if step % eval_every == 0 or step == steps:
            valid_bpc = bits_per_character(model, valid_rows, eval_window)
            history.append((step, valid_bpc))
            if verbose:
                train_bpc = np.mean(train_losses[-eval_every:]) / np.log(2)
                print(
                    f"step {step}: train {train_bpc:.3f} valid {valid_bpc:.3f} BPC",
                    flush=True,
                )
            if valid_bpc < best:
                best, best_step, best_weights = valid_bpc, step, model.get_weights()
                waited = 0
            else:
                waited += 1
                if waited >= patience:
                    break
    seconds = time.time() - start
    model.set_weights(best_weights)
    test_bpc = bits_per_character(model, test_rows, eval_window)
    return {
        "test_bpc": test_bpc,
        "valid_bpc": best,
        "train_bpc": float(np.mean(train_losses[-eval_every:]) / np.log(2.0))
        if train_losses
        else None,
        "best_step": best_step,
        "steps_run": step,
        "seconds": seconds,
        "history": history,
        "chunks": chunks,
        "vocab_size": vocab_size,
        "characters": [len(train), len(valid), len(test)],
    }
