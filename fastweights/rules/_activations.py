"""Elementwise functions of the rules whose slow net lives inside the recurrence
(``recurrent_delta_rule``, ``srwm``), without overflow for any finite input."""

from __future__ import annotations

from types import ModuleType
from typing import Any


def softmax(xp: ModuleType, x: Any) -> Any:
    """Softmax over the last axis (the maximum subtracted first)."""
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def sigmoid(xp: ModuleType, x: Any) -> Any:
    """``1 / (1 + exp(-x))`` from ``exp(-|x|)``, which never overflows."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
