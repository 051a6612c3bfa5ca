"""Hyperparameter checks at the API's boundary.

Each check names the argument, the value it got and what would work: a ``TypeError`` for a value of
the wrong kind (a string, ``None``, a bool where a number is meant), a ``ValueError`` for a number
outside its range or not finite. Every layer and function that takes a hyperparameter calls one of
these before it changes anything.
"""
from __future__ import annotations

import math
import numbers

import torch


def _range(low, high, low_open=False, high_open=False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def integer(name: str, value, *, low: int | None = None, high: int | None = None, who: str = "") -> int:
    """An int (not a bool) with ``low <= value <= high``."""
    want = f"an integer {_range(low, high)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}{name}={value!r} must be {want}, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{who}{name}={value!r} must be {want}")
    return int(value)


def real(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False, nonzero: bool = False, who: str = "", desc: str | None = None) -> float:
    """A finite real number (not a bool) in the given interval; ``nonzero`` excludes 0."""
    if desc is None:
        bounds = _range(low, high, low_open, high_open)
        desc = (bounds if low is not None and high is not None else
                f"{bounds} and finite" if bounds else "finite") + (" and not 0" if nonzero else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}{name}={value!r} must be a number ({desc}), got {type(value).__name__}")
    v = float(value)
    bad = (not math.isfinite(v) or (nonzero and v == 0)
           or (low is not None and (v <= low if low_open else v < low))
           or (high is not None and (v >= high if high_open else v > high)))
    if bad:
        raise ValueError(f"{who}{name}={value!r} must be {desc}")
    return v


def positive(name: str, value, who: str = "", hint: str = "") -> float:
    return real(name, value, low=0, low_open=True, who=who,
                desc=f"a positive number (finite, > 0){hint}")


def boolean(name: str, value, who: str = "") -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{who}{name}={value!r} must be True or False, got {type(value).__name__}")
    return value


def float_dtype(name: str, value, *, optional: bool = True, who: str = "") -> torch.dtype | None:
    """A floating-point ``torch.dtype`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{who}{name}={value!r} must be a floating-point torch.dtype such as torch.float32 "
                        f"or torch.bfloat16{' (or None)' if optional else ''}")
    return value


def names(name: str, value, who: str = "") -> list[str]:
    """A list or tuple of strings (a bare string is refused: it would be read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{who}{name}={value!r} must be a list of module names, e.g. ['classifier']")
    return list(value)


def check_rank(r, d: int, k: int, who: str, why: str = "") -> int:
    """A rank ``1 <= r <= min(d, k)`` for a layer with out_features d and in_features k (anything else,
    a float, a bool or a string included, is a ``ValueError`` that says which ranks fit)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= min(d, k):
        raise ValueError(f"{who} rank r={r!r} does not fit a layer with out_features={d} and in_features={k}: "
                         f"choose an integer 1 <= r <= {min(d, k)}{' ' + why if why else ''}.")
    return int(r)
