"""Input checks shared by the core's modules: one vocabulary for "is this argument
allowed?".

Every public function of the core checks its arguments before any work starts, so that
a bad one fails at once with one line that names the argument, its value and what is
allowed::

    steps must be a non-negative integer, got steps=2.5 of type float
    dt must be a real number in (0, 0.25], got dt=0.3
    sampler='euler' is not known; use one of 'ddpm', 'ddim'
    trigger must have shape (C, H, W) = (3, 16, 16), got trigger.shape=(3, 32, 32)

Each check returns the value, converted where there is something to convert (a NumPy
integer to ``int``, an ``int`` to ``float`` for a real number), so a caller writes
``steps = check_int("steps", steps, minimum=0)``. Bounds are inclusive unless the name
says otherwise (``above``/``below`` are strict, ``at_least``/``at_most`` are not).

A ``bool`` is refused wherever a number is asked for: Python counts ``True`` as the
integer 1, but ``steps=True`` is a mistake, not one step. NumPy's numbers are accepted
(``numpy.int64`` is an integer, ``numpy.float32`` a real number).

Exceptions: a value of the right type but outside what is allowed raises
``ValueError``; a value of the wrong type raises :class:`WrongTypeError`, which is a
``TypeError`` *and* a ``ValueError``. The core's first checks raised ``ValueError`` for
every bad argument and later ones ``TypeError`` for a wrong type; with both bases,
callers written against either (``except ValueError``, ``pytest.raises(TypeError)``)
keep working. NumPy's ``AxisError``, both a ``ValueError`` and an ``IndexError``, is the
same device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "WrongTypeError",
    "check_type",
    "check_bool",
    "check_int",
    "check_positive_int",
    "check_float",
    "check_fraction",
    "check_choice",
    "check_channels",
    "check_tensor",
    "check_image_batch",
]

T = TypeVar("T")

#: Longest value echoed in a message; longer ones are cut (a whole tensor, a long
#: string).
_ECHO_LIMIT = 80


class WrongTypeError(TypeError, ValueError):
    """An argument of the wrong type: a ``TypeError``, and also a ``ValueError``, so
    that ``except ValueError`` catches every bad argument (see the module's
    docstring)."""


# --------------------------------------------------------------------------- #
# Wording: "<name> must be <allowed>, got <name>=<value>".
# --------------------------------------------------------------------------- #


def _echo(value: object) -> str:
    """``repr(value)``, cut to :data:`_ECHO_LIMIT` characters."""
    text = repr(value)
    return text if len(text) <= _ECHO_LIMIT else text[: _ECHO_LIMIT - 3] + "..."


def _got(name: str, value: object, *, with_type: bool = False) -> str:
    """``got name=value`` (and ``of type T`` when the type is what is wrong)."""
    text = f"got {name}={_echo(value)}"
    return f"{text} of type {type(value).__name__}" if with_type else text


def _number(x: float) -> str:
    """A bound as a reader writes it: ``0``, ``0.25``, ``1e-06``, ``inf``."""
    if isinstance(x, numbers.Integral):
        return str(int(x))
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _with(allowed: str, *, allow_none: bool = False, meaning: str = "") -> str:
    """``allowed`` followed by ``or None`` and ``(meaning)`` when given."""
    return (
        allowed
        + (" or None" if allow_none else "")
        + (f" ({meaning})" if meaning else "")
    )


# --------------------------------------------------------------------------- #
# Python values: types, booleans, numbers, choices.
# --------------------------------------------------------------------------- #


def check_type(
    name: str, value: T, expected: type | tuple[type, ...], *, what: str = ""
) -> T:
    """``value`` if it is an instance of ``expected`` (a class or a tuple of classes).

    ``what`` words the allowed type (default: ``"a TrainConfig"``, from the class
    name), e.g. ``what="a PIL.Image.Image"``::

        config must be a TrainConfig, got dict
    """
    if not isinstance(value, expected):
        classes = expected if isinstance(expected, tuple) else (expected,)
        what = what or " or ".join(_article(cls.__name__) for cls in classes)
        raise WrongTypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def check_bool(name: str, value: object, *, meaning: str = "") -> bool:
    """``value`` as a ``bool`` if it is ``True`` or ``False`` (NumPy's too); ``1``,
    ``"yes"`` and ``None`` are refused::

        hflip must be True or False, got hflip='yes' of type str
    """
    if not isinstance(value, (bool, np.bool_)):
        allowed = _with("True or False", meaning=meaning)
        raise WrongTypeError(
            f"{name} must be {allowed}, {_got(name, value, with_type=True)}"
        )
    return bool(value)


def _integer_words(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    meaning: str = "",
) -> int | None:
    """``value`` as an ``int`` if it is an integer with ``minimum <= value <= maximum``.

    Either bound may be left out. A ``bool`` or a float such as ``2.0`` raises
    :class:`WrongTypeError`; an integer out of bounds raises ``ValueError``.
    ``allow_none`` lets ``None`` through (an optional size) and ``meaning`` words what
    the number is::

        n must be a positive integer (the number of images), got n=0
        num_inference_steps must be an integer in [1, 100], got num_inference_steps=500
    """
    if value is None and allow_none:
        return None
    allowed = _with(
        _integer_words(minimum, maximum), allow_none=allow_none, meaning=meaning
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise WrongTypeError(
            f"{name} must be {allowed}, {_got(name, value, with_type=True)}"
        )
    if (minimum is not None and value < minimum) or (
        maximum is not None and value > maximum
    ):
        raise ValueError(f"{name} must be {allowed}, {_got(name, value)}")
    return int(value)


def check_positive_int(
    name: str, value: object, *, meaning: str = "", allow_none: bool = False
) -> int | None:
    """``value`` as an ``int`` if it is an integer >= 1: :func:`check_int` with
    ``minimum=1`` (a count, a size)."""
    return check_int(name, value, minimum=1, allow_none=allow_none, meaning=meaning)


def check_float(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    finite: bool = True,
    allow_none: bool = False,
    meaning: str = "",
) -> float | None:
    """``value`` as a ``float`` if it is a real number within the given bounds.

    ``above`` and ``below`` are strict bounds (``value > above``), ``at_least`` and
    ``at_most`` inclusive ones; give at most one of each pair. NaN is always refused,
    and so are the infinities unless ``finite=False`` (then the message says "a number"
    rather than "a real number"). Integers are real numbers; a ``bool`` or a string
    raises :class:`WrongTypeError`::

        dt must be a real number in (0, 0.25], got dt=0.3
        threshold must be a real number > 0, got threshold=nan
    """
    if value is None and allow_none:
        return None
    if (above is not None and at_least is not None) or (
        below is not None and at_most is not None
    ):
        raise TypeError(
            "check_float takes one lower bound (above or at_least) and one upper bound "
            f"(below or at_most), got above={above}, at_least={at_least}, "
            f"below={below}, at_most={at_most}"
        )
    allowed = _with(
        ("a real number" if finite else "a number")
        + _interval_words(above, at_least, below, at_most),
        allow_none=allow_none,
        meaning=meaning,
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise WrongTypeError(
            f"{name} must be {allowed}, {_got(name, value, with_type=True)}"
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf if value > 0 else -math.inf
    inside = not math.isnan(number) and (math.isfinite(number) or not finite)
    inside = inside and (above is None or number > above)
    inside = inside and (at_least is None or number >= at_least)
    inside = inside and (below is None or number < below)
    inside = inside and (at_most is None or number <= at_most)
    if not inside:
        raise ValueError(f"{name} must be {allowed}, {_got(name, value)}")
    return number


def _interval_words(
    above: float | None,
    at_least: float | None,
    below: float | None,
    at_most: float | None,
) -> str:
    """`` in (0, 0.25]``, `` > 0``, `` <= 1`` or nothing."""
    low = ("(", above) if above is not None else ("[", at_least)
    high = (")", below) if below is not None else ("]", at_most)
    if low[1] is not None and high[1] is not None:
        return f" in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low[1] is not None:
        return f" {'>' if above is not None else '>='} {_number(low[1])}"
    if high[1] is not None:
        return f" {'<' if below is not None else '<='} {_number(high[1])}"
    return ""


def check_fraction(name: str, value: object, *, meaning: str = "") -> float:
    """``value`` as a ``float`` if it is a real number in ``[0, 1]`` (a rate, a
    share): :func:`check_float` with ``at_least=0, at_most=1``."""
    return check_float(name, value, at_least=0, at_most=1, meaning=meaning)


def _same(value: object, option: object) -> bool:
    """``value == option``, except that a ``bool`` only equals a ``bool`` and that a
    comparison that fails (or gives an array) means "not equal"."""
    if isinstance(value, (bool, np.bool_)) != isinstance(option, (bool, np.bool_)):
        return False
    try:
        return bool(value == option)
    except (TypeError, ValueError, RuntimeError):
        return False


def check_choice(
    name: str, value: object, allowed: Iterable[T], *, what: str = "known"
) -> T:
    """The option of ``allowed`` that ``value`` equals (a name from a fixed list).

    ``what`` words the list in the message, e.g. ``what="a trigger kind"``::

        sampler='euler' is not known; use one of 'ddpm', 'ddim'
        kind='star' is not a trigger kind; use one of 'box', 'white_box', ...
    """
    options = tuple(allowed)
    for option in options:
        if _same(value, option):
            return option
    listed = ", ".join(_echo(option) for option in options)
    raise ValueError(f"{name}={_echo(value)} is not {what}; use one of {listed}")


def check_channels(
    name: str, value: object, *, allow_none: bool = False, meaning: str = ""
) -> int | None:
    """``value`` as an ``int`` if it is 1 (grey) or 3 (RGB), the channel counts of the
    core's images; ``allow_none`` lets ``None`` through::

        channels must be 1 (grey) or 3 (RGB), got channels=2
    """
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value not in (1, 3)
    ):
        choices = "1 (grey), 3 (RGB) or None" if allow_none else "1 (grey) or 3 (RGB)"
        raise ValueError(
            f"{name} must be {_with(choices, meaning=meaning)}, {_got(name, value)}"
        )
    return int(value)


# --------------------------------------------------------------------------- #
# Tensors.
# --------------------------------------------------------------------------- #


def _axes(layout: str) -> str:
    """``"C,H,W"`` -> ``"(C, H, W)"``, ``"B"`` -> ``"(B,)"``: a shape's axes as Python
    writes a tuple."""
    names = [axis.strip() for axis in layout.split(",")]
    return f"({', '.join(names)}{',' if len(names) == 1 else ''})"


def check_tensor(
    name: str,
    value: object,
    *,
    layout: str = "",
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    floating: bool = False,
    finite: bool = False,
    meaning: str = "",
) -> Tensor:
    """``value`` if it is a ``torch.Tensor`` of the given layout, shape and dtype.

    Args:
        name: the argument's name, for the message.
        value: what was passed.
        layout: the axes' names, e.g. ``"C,H,W"``; the tensor must have that many
            dimensions, and messages show them: ``(C, H, W)``.
        shape: the exact shape, e.g. ``(3, 16, 16)``.
        dtype: the exact dtype, e.g. ``torch.bool``.
        floating: the dtype must be a floating-point one.
        finite: refuse NaN and infinite values (reads the whole tensor).
        meaning: words why the shape is required, e.g. ``"the images' C,H,W"``.

    Checked in that order: type (:class:`WrongTypeError`), number of dimensions and
    shape (``ValueError``), dtype (:class:`WrongTypeError`), values (``ValueError``)::

        target must have shape (C, H, W) = (3, 16, 16), got target.shape=(1, 16, 16)
        poisoned must be a bool tensor, got poisoned.dtype=torch.int64
    """
    axes = _axes(layout) if layout else ""
    if not isinstance(value, Tensor):
        of_shape = f" of shape {axes}" if axes else ""
        raise WrongTypeError(
            f"{name} must be a torch.Tensor{of_shape}, got {type(value).__name__}"
        )
    got_shape = f"got {name}.shape={tuple(value.shape)}"
    why = f" ({meaning})" if meaning else ""
    if shape is not None and tuple(value.shape) != tuple(shape):
        named = f"{axes} = {tuple(shape)}" if axes else f"{tuple(shape)}"
        raise ValueError(f"{name} must have shape {named}{why}, {got_shape}")
    if axes and value.ndim != len(layout.split(",")):
        raise ValueError(f"{name} must have shape {axes}{why}, {got_shape}")
    if dtype is not None and value.dtype != dtype:
        wanted = str(dtype).removeprefix("torch.")
        raise WrongTypeError(
            f"{name} must be {_article(wanted)} tensor, got {name}.dtype={value.dtype}"
        )
    if floating and not value.is_floating_point():
        raise WrongTypeError(
            f"{name} must be a floating-point tensor, got {name}.dtype={value.dtype}"
        )
    if finite and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite values")
    return value


def check_image_batch(
    name: str,
    images: object,
    *,
    min_size: int = 1,
    value_range: str = "[-1, 1]",
    require_finite: bool = True,
) -> Tensor:
    """A float ``B,C,H,W`` tensor with B >= 1, C in {1, 3} and H, W >= ``min_size``.

    ``value_range`` only words the message (the range itself is checked by callers that
    need it); ``require_finite`` rejects NaN and infinite values.
    """
    if not isinstance(images, Tensor):
        raise WrongTypeError(
            f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}"
        )
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must have shape (B, C, H, W) with B >= 1 and C in {{1, 3}}, "
            f"got {name}.shape={tuple(images.shape)}"
        )
    if images.shape[-2] < min_size or images.shape[-1] < min_size:
        raise ValueError(
            f"{name} must be at least {min_size}x{min_size} pixels, got {name}.shape={tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise WrongTypeError(
            f"{name} must be a float tensor with values in {value_range}, got {name}.dtype={images.dtype}"
        )
    return check_tensor(name, images, finite=require_finite)
