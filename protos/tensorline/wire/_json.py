"""JSON from untrusted peers, parsed within bounds.

``json.loads`` recurses once per nesting level (a deep enough document raises RecursionError,
and one just below that depth still costs every later recursive walk), refuses integers of more
than 4,300 digits with a bare ValueError, and accepts NaN/Infinity, which the encoder on the way
back out refuses. ``loads`` turns all of these into one ``JsonRejected`` with a readable reason,
and measures nesting depth before parsing, without recursion.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import numpy as np

__all__ = ["JsonRejected", "json_depth", "loads"]


class JsonRejected(ValueError):
    """The text is not JSON this side accepts; ``limit`` when it broke a bound, not the syntax."""

    def __init__(self, reason: str, *, limit: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.limit = limit


# A JSON string, escapes included (the unrolled form: linear on any input).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings do not
    count), without parsing it: strings are cut out and the brackets left are counted."""
    skeleton = _STRING.sub("", text).encode("utf-8", "replace").translate(None, _NOT_BRACKETS)
    if not skeleton:
        return 0
    brackets = np.frombuffer(skeleton, np.uint8)
    steps = np.where((brackets == 0x5B) | (brackets == 0x7B), 1, -1)
    return int(np.cumsum(steps).max())


def _no_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRejected(f"number {text[:40]} is out of the range of a double")
    return value


def loads(text: str, *, max_depth: int = 0, max_chars: int = 0) -> Any:
    """Parse ``text``; JsonRejected for invalid JSON or one beyond ``max_chars`` characters or
    ``max_depth`` levels of nesting (0 = no bound of that kind)."""
    if max_chars and len(text) > max_chars:
        raise JsonRejected(f"{len(text)} characters exceed the limit of {max_chars}", limit=True)
    if max_depth and text.count("[") + text.count("{") > max_depth:
        depth = json_depth(text)
        if depth > max_depth:
            raise JsonRejected(f"nested {depth} levels deep; the limit is {max_depth}",
                               limit=True)
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise JsonRejected(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise JsonRejected("nested too deeply to parse", limit=True) from None
    except JsonRejected:
        raise
    except ValueError as exc:
        if "digits" in str(exc):
            raise JsonRejected(f"an integer has more than {sys.get_int_max_str_digits()} "
                               "digits", limit=True) from None
        raise JsonRejected(f"invalid JSON: {exc}") from None
