"""Optional dependencies (``pip install 'remax[hub]'``, ``'remax[demo]'``): imported only where used, with one
clear line naming the extra to install when absent, instead of an ``ImportError`` traceback deep in a call."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that adds it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` saying which extra provides it and what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MissingExtraError(f"{purpose} needs the optional package {top!r} ({reason}); install it with: "
                                f"pip install 'remax[{extra}]'") from exc
