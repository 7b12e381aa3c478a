"""``rwkv7``: RWKV-7's state update as an instance of ``dplr`` (RULES2.md section 2).

RWKV-7 removes from the state what its normalised key ``kk`` reads, at the per-channel rate
``a``, then decays and writes: ``gk = w``, ``a_dplr = -kk``, ``b_dplr = kk * a``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .._rule import Arg, Rule


def to_dplr(xp: ModuleType, arrays: dict[str, Any]) -> dict[str, Any]:
    """``rwkv7(q, k, v, w, kk, a)`` is ``dplr(q, k, v, a=-kk, b=kk * a, gk=w)``."""
    rest = {n: x for n, x in arrays.items() if n not in ("w", "kk", "a")}
    kk, a = arrays["kk"], arrays["a"]
    return {**rest, "a": -kk, "b": kk * a, "gk": arrays["w"]}


def rwkv7_grads(xp: ModuleType, arrays: dict[str, Any], grads: dict[str, Any]) -> dict[str, Any]:
    """The adjoint of :func:`to_dplr`: ``rwkv7``'s gradients from the parent ``dplr``'s.

    ``arrays`` are rwkv7's raw arguments (``q, k, v, w, kk, a``), ``grads`` dplr's (keyed
    ``q, k, v, a, b, gk`` and ``initial_state`` when given). With ``a_dplr = -kk``,
    ``b_dplr = kk * a`` and ``gk = w``: ``w bar = gk bar``,
    ``kk bar = -a_dplr bar + a * b_dplr bar`` and ``a bar = kk * b_dplr bar``.
    """
    rest = {n: g for n, g in grads.items() if n not in ("a", "b", "gk")}
    da, db = grads["a"], grads["b"]
    kk, a = (xp.astype(arrays[n], db.dtype) for n in ("kk", "a"))
    return {**rest, "w": grads["gk"], "kk": a * db - da, "a": kk * db}


RWKV7 = Rule(
    "rwkv7",
    "dplr",
    "S_t = Diag(exp(w_t)) S_{t-1} - (kk_t * a_t)(kk_t^T S_{t-1}) + k_t v_t^T",
    (
        Arg(
            "w",
            "[B, T, HV, K]",
            "log-decay per key channel, ``<= 0`` (RWKV's ``-exp(w_raw)``).",
            log_decay=True,
        ),
        Arg(
            "kk",
            "[B, T, HV, K]",
            "the removal key (RWKV normalises it to unit length).",
            sample="unit",
        ),
        Arg(
            "a",
            "[B, T, HV, K]",
            "the in-context learning rate per key channel, in (0, 1).",
            sample="rate",
        ),
    ),
    ("recurrent", "chunk"),
    no_form={"parallel": "a per-key-channel decay has no attention-like parallel form"},
    parent="dplr",
    to_parent=to_dplr,
    grads_from_parent=rwkv7_grads,
    flops=8,
    title="RWKV-7's state update: :func:`fastweights.dplr` with ``gk = w``, ``a = -kk``, "
    "``b = kk * a``.",
    doc="""\
        ``S_t = Diag(exp(w_t)) S_{t-1} - (kk_t * a_t)(kk_t^T S_{t-1}) + k_t v_t^T``,
        ``o_t = S_t^T q~_t`` with ``q`` RWKV's receptance. An RWKV-7 layer passes the log decay
        ``w = -exp(w_raw)`` (fla's layer: ``-exp(-1/2) sigmoid(.)``), the unit removal key
        ``kk``, the in-context learning rate ``a`` in (0, 1) and ``scale=1.0`` (the default
        here is ``K ** -0.5``, as for every op). The state is key-first: RWKV's official code
        stores its transpose (docs/rules/rwkv7.md).""",
    example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> r, k, v = (rng.standard_normal((1, 8, 2, 16)) for _ in range(3))
        >>> w = -np.exp(-0.5) / (1 + np.exp(-rng.standard_normal((1, 8, 2, 16))))
        >>> kk = k / np.linalg.norm(k, axis=-1, keepdims=True)
        >>> a = rng.random((1, 8, 2, 16))
        >>> o, S = fastweights.rwkv7(r, k, v, w, kk, a, scale=1.0, output_final_state=True)
        >>> o.shape, S.shape
        ((1, 8, 2, 16), (1, 2, 16, 16))""",
    step_title="One token of :func:`fastweights.rwkv7`: "
    "``S = Diag(exp(w)) S - (kk * a)(kk^T S) + k v^T``, then ``o = S^T (scale q)``.",
    step_example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> r, k, v = (rng.standard_normal((1, 2, 8)) for _ in range(3))
        >>> w, a = -rng.random((1, 2, 8)), rng.random((1, 2, 8))
        >>> kk = k / np.linalg.norm(k, axis=-1, keepdims=True)
        >>> pool = np.zeros((4, 2, 8, 8))
        >>> o, pool = fastweights.step.rwkv7(r, k, v, w, kk, a, pool, scale=1.0,
        ...                                  state_indices=[3])
        >>> o.shape, bool(np.any(pool[3])), bool(np.any(pool[0]))
        ((1, 2, 8), True, False)""",
)
