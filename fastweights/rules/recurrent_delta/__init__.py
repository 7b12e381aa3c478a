"""The Recurrent DeltaNet (Irie et al., 2021): the delta rule fed its own last output.

Per head, with ``h = tanh(o_{t-1})``::

    qh = softmax(q_t + R_q h)    kh = softmax(k_t + R_k h)    vh = v_t + R_v h
    b  = sigmoid(beta_t + r_beta . h)
    S_t = S_{t-1} + b kh (vh - S_{t-1}^T kh)^T,    o_t = scale S_t^T qh

Each token's key, value and rate depend on the output before it, so only the recurrent form
exists (:mod:`.recurrent`); the state is the pair ``(S, o_last)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._rule import SERVING, Arg, Rule
from .recurrent import prepare, recurrent
from .vjp import vjp

if TYPE_CHECKING:
    from ..._validate import Call

__all__ = ["RULES", "auto_form", "form_unavailable", "run", "vjp"]

_NO_FORM = "its keys, values and rates depend on its own previous output: no chunk or parallel form"

RECURRENT_DELTA_RULE = Rule(
    "recurrent_delta_rule",
    "recurrent_delta",
    "S_t = S_{t-1} + b kh (vh - S_{t-1}^T kh)^T with kh, vh, b read from tanh(o_{t-1})",
    (
        Arg("beta", "[B, T, HV]", "write strength logits (the op applies the sigmoid)."),
        Arg("R_q", "[H, K, V]", "recurrent weights of the queries.", sample="small"),
        Arg("R_k", "[H, K, V]", "recurrent weights of the keys.", sample="small"),
        Arg(
            "R_v",
            "[H, V, V]",
            "recurrent weights of the values (``(R_v h)_i = sum_j R_v[i, j] h_j``).",
            sample="small",
        ),
        Arg("r_beta", "[H, V]", "recurrent weights of the write strength.", sample="small"),
    ),
    ("recurrent",),
    no_form={"chunk": _NO_FORM, "parallel": _NO_FORM},
    state=(
        Arg("S", "[N, HV, K, V]", "the fast weights, key-first."),
        Arg("o", "[N, HV, V]", "the last output (``o_0``: zero if no state is given)."),
    ),
    common=("scale", "initial_state", "output_final_state", "cu_seqlens", "form", *SERVING),
    default_scale=1.0,
    same_heads=True,
    min_sizes={"K": 1},
    flops=lambda K, V: 6 * K * V + 2 * (2 * K + V) * V,  # and the slow net [R_q; R_k; R_v] h
    title="The Recurrent DeltaNet: the delta rule whose queries, keys, values and rates also "
    "read its own previous output.",
    doc="""\
        With ``h = tanh(o_{t-1})``: ``qh = softmax(q_t + R_q h)``, ``kh = softmax(k_t + R_k
        h)``, ``vh = v_t + R_v h``, ``b = sigmoid(beta_t + r_beta . h)``, then ``S_t =
        S_{t-1} + b kh (vh - S_{t-1}^T kh)^T`` and ``o_t = scale S_t^T qh`` (Irie et al.,
        2021, "Going beyond linear transformers with recurrent fast weight programmers").
        ``beta`` are logits; ``scale`` defaults to 1.0 (``qh`` is a softmax); one value head
        per key head (``HV == H``). The state is the pair ``(S [N, HV, K, V], o [N, HV, V])``.
        With every recurrent weight zero it is :func:`delta_rule` on ``softmax(q)``,
        ``softmax(k)`` and ``sigmoid(beta)``. Recurrent form only: the inputs of a token
        depend on the output before it.""",
    example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k = rng.standard_normal((2, 1, 6, 2, 8))
        >>> v, beta = rng.standard_normal((1, 6, 2, 4)), rng.standard_normal((1, 6, 2))
        >>> R_q, R_k = np.zeros((2, 2, 8, 4))
        >>> R_v, r_beta = np.zeros((2, 4, 4)), np.zeros((2, 4))
        >>> o, _ = fastweights.recurrent_delta_rule(q, k, v, beta, R_q, R_k, R_v, r_beta)
        >>> softmax = lambda x: np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)
        >>> sigmoid = lambda x: 1 / (1 + np.exp(-x))
        >>> o_delta, _ = fastweights.delta_rule(softmax(q), softmax(k), v, sigmoid(beta),
        ...                                     scale=1.0)
        >>> bool(np.allclose(o, o_delta))
        True""",
    step_title="One token of :func:`fastweights.recurrent_delta_rule`, from the pools of "
    "``(S, o_last)``.",
    step_example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k = rng.standard_normal((2, 3, 2, 8))
        >>> v, beta = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2))
        >>> R_q, R_k = 0.1 * rng.standard_normal((2, 2, 8, 4))
        >>> R_v, r_beta = 0.1 * rng.standard_normal((2, 4, 4)), np.zeros((2, 4))
        >>> pools = np.zeros((5, 2, 8, 4)), np.zeros((5, 2, 4))
        >>> o, pools = fastweights.step.recurrent_delta_rule(
        ...     q, k, v, beta, R_q, R_k, R_v, r_beta, pools, state_indices=[4, 0, 2])
        >>> bool(np.allclose(pools[1][[4, 0, 2]], o))  # the pool keeps the last output
        True""",
)

RULES = (RECURRENT_DELTA_RULE,)
"""The family's rules, registered by :mod:`fastweights._ops`."""


def form_unavailable(call: Call, form: str) -> str | None:
    return None


def auto_form(call: Call) -> tuple[str, str]:
    return "recurrent", "the only form: each token reads the output before it"


def run(call: Call, form: str) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call (the recurrent form)."""
    problem, finish = prepare(call)
    return finish(*recurrent(problem))
