"""Argument checks shared by the public constructors (Keras-style messages)."""

import numbers


def check_hidden_units(name, value):
    """Returns `value` as a tuple of positive ints, or raises."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected a tuple of "
            f"positive integers (e.g. `(256,)`, or `()` for a linear model). "
            f"Received: {name}={value!r}"
        )
    for units in value:
        if (
            not isinstance(units, numbers.Integral)
            or isinstance(units, bool)
            or units <= 0
        ):
            raise ValueError(
                f"Received an invalid value for `{name}`, expected a tuple "
                f"of positive integers. Received: {name}={value!r}"
            )
    return tuple(int(u) for u in value)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected a bool. "
            f"Received: {name}={value!r}"
        )
    return value


def check_fraction(name, value):
    """A float in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected a float in "
            f"[0, 1]. Received: {name}={value!r}"
        )
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a float in "
            f"[0, 1]. Received: {name}={value!r}"
        )
    return float(value)


def check_optional_positive_int(name, value):
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer or None. Received: {name}={value!r}"
        )
    return int(value)


def check_decay(name, value):
    """`"auto"` or a float in [0, 1)."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected 'auto' or a "
            f"float in [0, 1). Received: {name}={value!r}"
        )
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected 'auto' or a "
            f"float in [0, 1). Received: {name}={value!r}"
        )
    return float(value)


def check_positive(name, value, optional=False):
    """A finite float above 0 (or `None`, if `optional`)."""
    if optional and value is None:
        return None
    expected = "a positive float" + (" or `None`" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected {expected}. "
            f"Received: {name}={value!r}"
        )
    if not 0.0 < float(value) < float("inf"):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected {expected}. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected one of "
            f"{list(choices)}. Received: {name}={value!r}"
        )
    return value
