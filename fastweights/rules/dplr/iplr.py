"""``iplr``: the DPLR rule with no decay (identity plus low rank)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .._rule import Arg, Rule


def to_dplr(xp: ModuleType, arrays: dict[str, Any]) -> dict[str, Any]:
    """``iplr(q, k, v, a, b)`` is ``dplr(q, k, v, a, b, gk=None)``."""
    return {**arrays, "gk": None}


IPLR = Rule(
    "iplr",
    "dplr",
    "S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T",
    (
        Arg(
            "a",
            "[B, T, HV, K]",
            "the vector that reads the old state (``a_t^T S_{t-1}``).",
            sample="removal",
        ),
        Arg("b", "[B, T, HV, K]", "the vector that writes what ``a`` read.", sample="unit"),
    ),
    ("recurrent", "chunk"),
    no_form={"parallel": "the low-rank transition has no attention-like parallel form"},
    parent="dplr",
    to_parent=to_dplr,
    flops=8,
    title="Identity plus low rank: :func:`fastweights.dplr` with no decay.",
    doc="""\
        ``S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q~_t``; fla's
        ``chunk_iplr_delta_rule``. The delta rule is the case ``a = -beta k``, ``b = k``,
        ``v <- beta v``.""",
    example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((1, 6, 1, 4)) for _ in range(3))
        >>> k = k / np.linalg.norm(k, axis=-1, keepdims=True)
        >>> beta = rng.random((1, 6, 1, 1))
        >>> o, _ = fastweights.iplr(q, k, beta * v, -beta * k, k)
        >>> o_delta, _ = fastweights.delta_rule(q, k, v, beta[..., 0])
        >>> bool(np.allclose(o, o_delta))
        True""",
    step_title="One token of :func:`fastweights.iplr`: ``S = S + b (a^T S) + k v^T``, then "
    "``o = S^T (scale q)``.",
    step_example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v, a, b = (rng.standard_normal((1, 1, 4)) for _ in range(5))
        >>> pool = np.zeros((1, 1, 4, 4))
        >>> o, pool = fastweights.step.iplr(q, k, v, a, b, pool)
        >>> bool(np.allclose(pool[0, 0], np.outer(k[0, 0], v[0, 0])))
        True""",
)
