"""The shared input checks of ``baddiff_core.checks``: what each accepts, what it
refuses, with which exception and which message. Every case is worked out by hand."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from baddiff_core.checks import (
    WrongTypeError,
    check_bool,
    check_channels,
    check_choice,
    check_float,
    check_fraction,
    check_image_batch,
    check_int,
    check_positive_int,
    check_tensor,
    check_type,
)


def refused(error: type[Exception], message: str):
    """``pytest.raises`` for an exact message."""
    return pytest.raises(error, match=f"^{re.escape(message)}$")


# --------------------------------------------------------------------------- #
# The exception for a wrong type is both a TypeError and a ValueError.
# --------------------------------------------------------------------------- #


def test_a_wrong_type_is_a_type_error_and_a_value_error():
    assert issubclass(WrongTypeError, TypeError)
    assert issubclass(WrongTypeError, ValueError)
    with pytest.raises(TypeError):
        check_int("steps", "3")
    with pytest.raises(ValueError):
        check_int("steps", "3")


def test_a_value_out_of_bounds_is_only_a_value_error():
    with pytest.raises(ValueError) as info:
        check_int("steps", -1, minimum=0)
    assert not isinstance(info.value, TypeError)


# --------------------------------------------------------------------------- #
# Integers.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("flag", [True, False, np.bool_(True)])
def test_a_bool_is_not_an_integer(flag):
    with pytest.raises(WrongTypeError, match=r"got steps=(np\.)?(True|False)"):
        check_int("steps", flag)


@pytest.mark.parametrize("value", [2.0, 2.5, "2", None, [2]])
def test_an_integer_must_be_an_integer(value):
    with pytest.raises(WrongTypeError, match=f"of type {type(value).__name__}$"):
        check_int("steps", value, minimum=0)


@pytest.mark.parametrize(
    "value", [np.int8(7), np.int64(7), np.uint16(7), torch.tensor(7).item()]
)
def test_numpy_integers_are_integers_and_come_back_as_int(value):
    result = check_int("steps", value, minimum=0)
    assert result == 7 and type(result) is int


def test_integer_bounds_are_inclusive():
    assert check_int("k", 1, minimum=1, maximum=10) == 1
    assert check_int("k", 10, minimum=1, maximum=10) == 10
    with refused(ValueError, "k must be an integer in [1, 10], got k=0"):
        check_int("k", 0, minimum=1, maximum=10)
    with refused(ValueError, "k must be an integer in [1, 10], got k=11"):
        check_int("k", 11, minimum=1, maximum=10)


@pytest.mark.parametrize(
    "bounds, value, message",
    [
        (dict(minimum=1), 0, "n must be a positive integer, got n=0"),
        (dict(minimum=0), -1, "n must be a non-negative integer, got n=-1"),
        (dict(minimum=2), 1, "n must be an integer >= 2, got n=1"),
        (dict(maximum=5), 6, "n must be an integer <= 5, got n=6"),
        (dict(), 2.5, "n must be an integer, got n=2.5 of type float"),
    ],
)
def test_integer_messages_say_what_is_allowed(bounds, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_int("n", value, **bounds)


def test_integer_meaning_and_none():
    assert check_int("limit", None, minimum=1, allow_none=True) is None
    with refused(
        WrongTypeError,
        "limit must be a positive integer or None (images to keep), "
        "got limit=True of type bool",
    ):
        check_int("limit", True, minimum=1, allow_none=True, meaning="images to keep")
    with refused(
        ValueError, "limit must be a positive integer, got limit=None of type NoneType"
    ):
        check_int("limit", None, minimum=1)


def test_positive_int_is_check_int_from_one():
    assert check_positive_int("n", 1) == 1
    assert check_positive_int("n", None, allow_none=True) is None
    with refused(
        WrongTypeError,
        "n must be a positive integer (the number of images), got n=True of type bool",
    ):
        check_positive_int("n", True, meaning="the number of images")
    with refused(ValueError, "n must be a positive integer, got n=0"):
        check_positive_int("n", 0)


# --------------------------------------------------------------------------- #
# Real numbers.
# --------------------------------------------------------------------------- #


def test_strict_and_inclusive_float_bounds():
    # above/below are strict, at_least/at_most inclusive
    assert check_float("x", 0.25, above=0, at_most=0.25) == 0.25
    with refused(ValueError, "x must be a real number in (0, 0.25], got x=0"):
        check_float("x", 0, above=0, at_most=0.25)
    assert check_float("x", 5e-324, above=0) == 5e-324  # the smallest float > 0
    assert check_float("x", 0, at_least=0) == 0.0
    with refused(ValueError, "x must be a real number >= 0, got x=-5e-324"):
        check_float("x", -5e-324, at_least=0)
    with refused(ValueError, "x must be a real number in [0, 1), got x=1.0"):
        check_float("x", 1.0, at_least=0, below=1)
    with refused(ValueError, "x must be a real number < 1, got x=1"):
        check_float("x", 1, below=1)
    with refused(ValueError, "x must be a real number <= 1, got x=1.5"):
        check_float("x", 1.5, at_most=1)


def test_floats_refuse_nan_always_and_inf_unless_asked():
    with refused(ValueError, "x must be a real number, got x=nan"):
        check_float("x", math.nan)
    with refused(ValueError, "x must be a real number > 0, got x=inf"):
        check_float("x", math.inf, above=0)
    assert check_float("x", math.inf, above=0, finite=False) == math.inf
    with refused(ValueError, "x must be a number > 0, got x=nan"):
        check_float("x", math.nan, above=0, finite=False)
    with pytest.raises(ValueError, match="must be a real number, got x=1000"):
        check_float("x", 10**400)  # an int too large for a float is infinite


def test_integers_and_numpy_numbers_are_real_numbers():
    for value, expected in [(3, 3.0), (np.int64(3), 3.0), (np.float32(0.5), 0.5)]:
        result = check_float("x", value)
        assert result == expected and type(result) is float


@pytest.mark.parametrize("value", [True, "0.5", None, torch.tensor(0.5), 1j])
def test_a_float_must_be_a_real_number(value):
    with pytest.raises(WrongTypeError, match=f"of type {type(value).__name__}$"):
        check_float("lr", value, above=0)


def test_float_none_and_meaning():
    assert check_float("ema", None, above=0, below=1, allow_none=True) is None
    with refused(
        ValueError,
        "ema must be a real number in (0, 1) or None (the decay), got ema=1",
    ):
        check_float("ema", 1, above=0, below=1, allow_none=True, meaning="the decay")


def test_two_lower_bounds_are_a_programming_error():
    with pytest.raises(TypeError, match="one lower bound"):
        check_float("x", 1.0, above=0, at_least=0)


def test_a_fraction_is_in_the_closed_unit_interval():
    assert check_fraction("rate", 0) == 0.0
    assert check_fraction("rate", 1) == 1.0
    with refused(ValueError, "rate must be a real number in [0, 1], got rate=1.5"):
        check_fraction("rate", 1.5)
    with refused(ValueError, "rate must be a real number in [0, 1], got rate=nan"):
        check_fraction("rate", math.nan)


# --------------------------------------------------------------------------- #
# Booleans, choices, channels, types.
# --------------------------------------------------------------------------- #


def test_a_bool_must_be_true_or_false():
    assert check_bool("flip", True) is True
    result = check_bool("flip", np.bool_(False))
    assert result is False
    for value in (1, 0, "yes", None):
        with pytest.raises(
            WrongTypeError, match="^flip must be True or False, got flip="
        ):
            check_bool("flip", value)
    with refused(
        WrongTypeError,
        "flip must be True or False (mirror images), got flip=1 of type int",
    ):
        check_bool("flip", 1, meaning="mirror images")


def test_a_choice_names_the_value_and_the_options():
    assert check_choice("sampler", "ddim", ("ddpm", "ddim")) == "ddim"
    with refused(ValueError, "sampler='euler' is not known; use one of 'ddpm', 'ddim'"):
        check_choice("sampler", "euler", ("ddpm", "ddim"))
    with refused(ValueError, "kind='star' is not a trigger kind; use one of 'box'"):
        check_choice("kind", "star", ["box"], what="a trigger kind")
    # a mapping's keys are its options
    assert check_choice("solver", "ode", {"sde": 1.0, "ode": 2.0}) == "ode"


def test_a_choice_returns_the_option_and_keeps_bools_apart():
    result = check_choice("n", np.int64(3), (1, 3))
    assert result == 3 and type(result) is int
    with pytest.raises(ValueError, match="n=True is not known"):
        check_choice("n", True, (1, 3))  # True == 1 in Python, but it is no count
    with pytest.raises(ValueError, match="is not known"):
        check_choice("n", np.array([1, 3]), (1, 3))  # no ambiguous truth value
    with pytest.raises(ValueError, match=r"n=\[1\] is not known"):
        check_choice("n", [1], {"a": 1})  # unhashable: not an error of its own


def test_channels_are_one_or_three():
    assert check_channels("channels", 1) == 1
    assert check_channels("channels", np.int64(3)) == 3
    assert check_channels("channels", None, allow_none=True) is None
    for value in (2, True, 3.0, None):
        with pytest.raises(
            ValueError, match=r"^channels must be 1 \(grey\) or 3 \(RGB\)"
        ):
            check_channels("channels", value)
    with refused(
        ValueError,
        "channels must be 1 (grey), 3 (RGB) or None (as loaded), got channels=2",
    ):
        check_channels("channels", 2, allow_none=True, meaning="as loaded")


def test_a_type_check_names_the_class():
    value = {"a": 1}
    assert check_type("config", value, dict) is value
    with refused(WrongTypeError, "config must be a dict, got list"):
        check_type("config", [], dict)
    with refused(WrongTypeError, "config must be an int or a str, got list"):
        check_type("config", [], (int, str))
    with refused(WrongTypeError, "image must be a PIL.Image.Image, got list"):
        check_type("image", [], dict, what="a PIL.Image.Image")


def test_long_values_are_cut_in_messages():
    with pytest.raises(ValueError) as info:
        check_choice("name", "x" * 1000, ("a",))
    assert len(str(info.value)) < 150 and "xxx..." in str(info.value)


# --------------------------------------------------------------------------- #
# Tensors.
# --------------------------------------------------------------------------- #


def test_a_tensor_must_be_a_tensor():
    with refused(WrongTypeError, "x must be a torch.Tensor, got list"):
        check_tensor("x", [1.0])
    with refused(
        WrongTypeError, "x must be a torch.Tensor of shape (C, H, W), got ndarray"
    ):
        check_tensor("x", np.zeros((1, 2, 2)), layout="C,H,W")


def test_tensor_layout_and_shape():
    chw = torch.zeros(3, 4, 4)
    assert check_tensor("x", chw, layout="C,H,W") is chw
    with refused(ValueError, "x must have shape (C, H, W), got x.shape=(1, 3, 4, 4)"):
        check_tensor("x", chw[None], layout="C,H,W")
    with refused(
        ValueError,
        "x must have shape (C, H, W) = (1, 4, 4) (the images'), got x.shape=(3, 4, 4)",
    ):
        check_tensor("x", chw, layout="C,H,W", shape=(1, 4, 4), meaning="the images'")
    with refused(ValueError, "x must have shape (B,) = (5,), got x.shape=(4,)"):
        check_tensor("x", torch.zeros(4), layout="B", shape=(5,))
    with refused(ValueError, "x must have shape (5,), got x.shape=(4,)"):
        check_tensor("x", torch.zeros(4), shape=(5,))


def test_tensor_dtype_and_values():
    with refused(WrongTypeError, "x must be a bool tensor, got x.dtype=torch.int64"):
        check_tensor("x", torch.zeros(4, dtype=torch.int64), dtype=torch.bool)
    with refused(
        WrongTypeError, "x must be a floating-point tensor, got x.dtype=torch.uint8"
    ):
        check_tensor("x", torch.zeros(4, dtype=torch.uint8), floating=True)
    assert check_tensor("x", torch.zeros(4, dtype=torch.float16), floating=True).shape
    values = torch.tensor([0.0, math.nan, math.inf, -math.inf])
    check_tensor("x", values)  # values are only read when asked
    with refused(ValueError, "x must be finite, got 3 NaN or infinite values"):
        check_tensor("x", values, finite=True)


def test_tensor_shape_is_checked_before_dtype():
    with pytest.raises(ValueError, match=r"x\.shape=\(4,\)") as info:
        check_tensor(
            "x", torch.zeros(4, dtype=torch.int64), shape=(5,), dtype=torch.bool
        )
    assert not isinstance(info.value, TypeError)


def test_image_batch():
    batch = torch.zeros(2, 3, 8, 8)
    assert check_image_batch("images", batch, min_size=8) is batch
    with pytest.raises(
        ValueError, match=r"C in \{1, 3\}, got images\.shape=\(2, 2, 8, 8\)"
    ):
        check_image_batch("images", torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="at least 16x16 pixels"):
        check_image_batch("images", batch, min_size=16)
    with pytest.raises(TypeError, match=r"images\.dtype=torch\.uint8"):
        check_image_batch("images", batch.to(torch.uint8))
    batch[1, 2, 3, 4] = math.nan
    with pytest.raises(ValueError, match="got 1 NaN or infinite values"):
        check_image_batch("images", batch)
    check_image_batch("images", batch, require_finite=False)
