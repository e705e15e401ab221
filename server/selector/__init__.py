"""Runtime selection: hint > environment > auto-detection > default, with trust and fallback."""

from tensorline.server._errors import FALLBACK_KINDS
from tensorline.server.selector._selector import (
    ENV_FALLBACK,
    ENV_RUNTIME,
    HEAVY_LIBRARIES,
    HINT_ALIASES,
    INPROCESS,
    SANDBOX,
    UNAVAILABLE,
    RuntimeDecision,
    RuntimeName,
    Selector,
    heavy_library_in,
    normalize_hint,
)

__all__ = [
    "ENV_FALLBACK",
    "ENV_RUNTIME",
    "FALLBACK_KINDS",
    "HEAVY_LIBRARIES",
    "HINT_ALIASES",
    "INPROCESS",
    "SANDBOX",
    "UNAVAILABLE",
    "RuntimeDecision",
    "RuntimeName",
    "Selector",
    "heavy_library_in",
    "normalize_hint",
]
