"""The thread-local training context that DNI models open around a step.

Keyword arguments do not reach layers through `keras.Sequential` or
functional calls, so the `train_step` of `DNISequential`/`DNIModel` opens a
context that every `SyntheticGradient` called during the step reads: the
labels of the batch (for conditional DNI), the loss scale of the optimizer
(mixed precision) and whether to fall back to exact backprop (used by the
`SyntheticGradientMonitor`). The context is thread-local because
`tf.distribute.MirroredStrategy` runs its replicas in threads.
"""

import contextlib
import threading

_state = threading.local()


class TrainingContext:
    """What a DNI `train_step` tells the layers during one step.

    Args:
        labels: the targets `y` of the current batch, or `None`.
        loss_scale: scalar tensor, the factor the loss was multiplied by
            before differentiation (`optimizer.scale_loss(1.0)`).
        force_backprop: if `True`, every `SyntheticGradient` passes the
            incoming gradient down unchanged (exact backprop).
    """

    def __init__(self, labels=None, loss_scale=None, force_backprop=False):
        self.labels = labels
        self.loss_scale = loss_scale
        self.force_backprop = force_backprop
        self.records = []
        # `(layer, batch moments, weight)` per gradient model, added by the
        # backward pass, for the `train_step` to apply (`apply_solver_fits`).
        self.solver_fits = []


def current():
    """Returns the innermost open `TrainingContext`, or `None`."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def training_context(labels=None, loss_scale=None, force_backprop=False):
    """Opens a `TrainingContext` for the calls made inside the block."""
    ctx = TrainingContext(labels, loss_scale, force_backprop)
    if not hasattr(_state, "stack"):
        _state.stack = []
    _state.stack.append(ctx)
    try:
        yield ctx
    finally:
        _state.stack.pop()
