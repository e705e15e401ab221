"""Runtime selection: hint > environment > auto-detection > default, with trust and fallback."""

from tensorline.server.selector._selector import (
    ENV_FALLBACK,
    ENV_RUNTIME,
    HEAVY_LIBRARIES,
    HINT_ALIASES,
    INPROCESS,
    SANDBOX,
    RuntimeDecision,
    RuntimeName,
    Selector,
    heavy_library_in,
    normalize_hint,
)

__all__ = [
    "ENV_FALLBACK",
    "ENV_RUNTIME",
    "HEAVY_LIBRARIES",
    "HINT_ALIASES",
    "INPROCESS",
    "SANDBOX",
    "RuntimeDecision",
    "RuntimeName",
    "Selector",
    "heavy_library_in",
    "normalize_hint",
]
