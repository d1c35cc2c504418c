"""Validation helpers of the configuration records: how values show in messages, and the checks
the records' ``__post_init__`` share (positive counts, paths, numbers, collections, records from
mappings)."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence, Set
from dataclasses import fields
from typing import Any

from tierflow.errors import ConfigError, SamplingError


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; an int too long for ``repr`` (Python refuses
    more than 4300 digits) is shown by its size."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 5] + "...>"


def check_positive(owner: str, name: str, value: int | None, *, allow_none: bool = False,
                    error: type[Exception] = ConfigError, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{owner}.{name} must be an int >= {minimum}"
                    f"{' or None' if allow_none else ''}, got {show(value)}")


def check_path(name: str, value: Any, *, what: str = "a path") -> None:
    """A str or os.PathLike the OS can take: no NUL byte, encodable by ``os.fsencode`` (a lone
    surrogate is not)."""
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"EngineConfig.{name} must be {what}, got {type(value).__name__} {show(value)}")
    try:
        text = os.fspath(value)
        bad = "\0" in text if isinstance(text, str) else b"\0" in text
        os.fsencode(text)
    except (UnicodeEncodeError, TypeError):
        bad = True
    if bad:
        raise ConfigError(f"EngineConfig.{name} is not a path the OS can take (a NUL byte or text that is not valid "
                          f"Unicode), got {show(value)}; pass a plain path")



def is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isascii() and index.isdigit()     # "²".isdigit(), but int("²") fails



def collection_of(name: str, value: Any, what: str) -> tuple[Any, ...]:
    """The items of a list, tuple or set; anything else (a bare value, None, a mapping, a str or
    bytes for ids) is a SamplingError."""
    if isinstance(value, (str, bytes, bytearray, Mapping)) or not isinstance(value, (Sequence, Set)):
        raise SamplingError(f"SamplingParams.{name} must be a list, tuple or set of {what}, got "
                            f"{type(value).__name__} {show(value)}; pass () for none")
    return tuple(value)


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:      # a lone surrogate: no decoded text can ever contain it
        return False
    return True


def check_number(name: str, value: Any, *, low: float, high: float | None = None, zero: bool = False) -> None:
    """A finite int or float in [low, high]; ``zero`` names 0 as the other value allowed."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            number = float(value)
        except OverflowError:          # an int beyond float's range
            ok = False
        else:
            ok = math.isfinite(number) and number >= low and (high is None or number <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SamplingError(f"SamplingParams.{name} must be {'0 or ' if zero else ''}a finite number {bound}, "
                            f"got {show(value)}")



def record_from(cls: type[Any], value: Any, error: type[Exception], what: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise error(f"{what} must be {cls.__name__}, a dict of its fields, or None; got "
                    f"{type(value).__name__} {show(value)}")
    names = [f.name for f in fields(cls)]
    for key in value:
        if not isinstance(key, str) or key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"{cls.__name__} has no field {show(key)}{hint}; its fields are: {', '.join(names)}")
    return cls(**value)
