"""Gathering and scattering rows of a decoding state pool, for any namespace."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np


def gather_rows(xp: ModuleType, pool: Any, idx: np.ndarray | None) -> Any:
    """``pool[idx]`` (a new array), or the whole pool when ``idx`` is None."""
    if idx is None:
        return pool
    return xp.take(pool, xp.asarray(idx, device=array_api_compat.device(pool)), axis=0)


def write_rows(xp: ModuleType, pool: Any, idx: np.ndarray | None, rows: Any) -> Any:
    """Store ``rows`` at ``pool[idx]``; returns the pool.

    In place where the namespace allows mutation (the same object comes back), as a new array
    otherwise (JAX). ``idx`` holds distinct in-range rows, checked by validation.
    """
    rows = xp.astype(rows, pool.dtype)
    if array_api_compat.is_jax_array(pool):
        return rows if idx is None else pool.at[idx].set(rows)
    if idx is None:
        pool[...] = rows
        return pool
    try:
        pool[xp.asarray(idx, device=array_api_compat.device(pool))] = rows
    except (TypeError, IndexError):
        # Namespaces that only support basic indexing in __setitem__ (array-api-strict).
        for j, i in enumerate(idx.tolist()):
            pool[i, ...] = rows[j, ...]
    return pool
