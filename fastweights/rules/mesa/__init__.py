"""MesaNet (von Oswald et al., 2025): the read-out of a ridge regression solved at every token
(RULES2.md section 3).

Per value head, with ``q~_t = scale q_t``::

    H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T        [K, K]
    G_t = exp(g_t) G_{t-1} + beta_t k_t v_t^T        [K, V]
    (H_t + Diag(lamb)) x_t = q~_t,    o_t = G_t^T x_t

Forms: :mod:`.recurrent` (the definition) and :mod:`.chunk` (both states at every token of a
chunk from matrix products, then one batched solve). The solvers are in :mod:`.solve`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._rule import Arg, Option, Rule
from ._layout import prepare
from .recurrent import recurrent
from .vjp import vjp

if TYPE_CHECKING:
    from ..._validate import Call

__all__ = ["RULES", "auto_form", "form_unavailable", "run", "vjp"]

MESA_NET = Rule(
    "mesa_net",
    "mesa",
    "H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T, G_t = exp(g_t) G_{t-1} + beta_t k_t v_t^T",
    (
        Arg(
            "g",
            "[B, T, HV]",
            "log-decay per head, ``<= 0`` (fla's layer: ``logsigmoid``); ``-inf`` resets both "
            "states.",
            log_decay=True,
        ),
        Arg("beta", "[B, T, HV]", "write strength (fla's layer: ``sigmoid``).", sample="rate"),
        Arg(
            "lamb",
            "[HV, K]",
            "the ridge penalty ``Diag(lamb)`` per value head, positive (fla's layer: "
            "``softplus(param) + 0.25``); constant in time.",
            positive=True,
            sample="positive",
        ),
    ),
    ("recurrent", "chunk"),
    no_form={"parallel": "each token solves its own K x K system: no attention-like form"},
    options=(
        Option(
            "solver",
            "exact",
            """\
            ``"exact"``: solve by Cholesky (the reference backend uses the Array API's
            ``linalg.solve``); ``"cg"``: fla's conjugate gradient exactly (``x = 0``,
            ``max_cg_iterations`` steps, ``1e-5`` added to both denominators, no early stop),
            which stalls about 1e-4 away from the exact solve.""",
            annotation="str",
            choices=("exact", "cg"),
        ),
        Option(
            "max_cg_iterations",
            30,
            'Steps of ``solver="cg"`` (fla\'s ``max_CG_iteration``); ignored by ``"exact"``.',
            annotation="int",
            minimum=1,
        ),
    ),
    state=(
        Arg("H", "[N, HV, K, K]", "the keys' decayed Gram matrix (fla: ``h_kk``).", sample="gram"),
        Arg("G", "[N, HV, K, V]", "keys times values, decayed (fla: ``h_kv``)."),
    ),
    flops=lambda K, V: K**3 // 3 + 6 * K * K + 4 * K * V,  # solve, H update, G update, read
    title="MesaNet: each output reads a ridge regression of the values on the keys, solved at "
    "every token.",
    doc="""\
        ``H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T``, ``G_t = exp(g_t) G_{t-1} + beta_t
        k_t v_t^T``, and ``o_t = G_t^T x_t`` with ``(H_t + Diag(lamb)) x_t = q~_t``: the
        read-out of the exact minimiser of the discounted ridge regression of ``v`` on ``k``
        (von Oswald et al., 2025; fla's ``chunk_mesa_net``). The state is the pair
        ``(H [N, HV, K, K], G [N, HV, K, V])``, in and out, like ``linear_attn``'s ``(S, z)``;
        ``H`` must be symmetric positive semi-definite (a decayed sum of ``beta k k^T``).
        fla's layer applies no scale and l2-normalises ``q, k``: pass ``scale=1.0,
        use_qk_l2norm=True`` to match it. It has no parallel form.""",
    example="""\
        >>> import numpy as np, fastweights
        >>> from fastweights.testing import naive
        >>> rng = np.random.default_rng(0)
        >>> q, k = rng.standard_normal((2, 1, 6, 2, 8))
        >>> v = rng.standard_normal((1, 6, 2, 4))
        >>> g, beta = -rng.random((1, 6, 2)), rng.random((1, 6, 2))
        >>> lamb = np.full((2, 8), 0.5)
        >>> o, (H, G) = fastweights.mesa_net(q, k, v, g, beta, lamb, output_final_state=True)
        >>> bool(np.allclose(o, naive.mesa_net(q, k, v, g, beta, lamb)[0]))
        True
        >>> H.shape, G.shape
        ((1, 2, 8, 8), (1, 2, 8, 4))""",
    step_title="One token of :func:`fastweights.mesa_net`: update the pair ``(H, G)`` of "
    "pools, then ``o = G^T x`` with ``(H + Diag(lamb)) x = scale q``.",
    step_example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((3, 2, 8)) for _ in range(3))
        >>> g, beta, lamb = -rng.random((3, 2)), rng.random((3, 2)), np.ones((2, 8))
        >>> pools = np.zeros((5, 2, 8, 8)), np.zeros((5, 2, 8, 8))
        >>> o, pools = fastweights.step.mesa_net(q, k, v, g, beta, lamb, pools,
        ...                                      state_indices=[4, 0, 2])
        >>> o.shape, bool(np.any(pools[0][4])), bool(np.any(pools[0][1]))
        ((3, 2, 8), True, False)""",
)

RULES = (MESA_NET,)
"""The family's rules, registered by :mod:`fastweights._ops`."""


def form_unavailable(call: Call, form: str) -> str | None:
    """Every MesaNet call has the rule's forms."""
    return None


CHUNK_MAX_K = 32
"""Largest ``K`` for which ``"auto"`` takes the chunk form on the reference backend."""


def auto_form(call: Call) -> tuple[str, str]:
    """The form ``"auto"`` picks on the reference backend, and why.

    Both forms solve one ``K x K`` system per token; the chunk form saves the per-token Python
    loop but forms every token's ``H_t`` with matrix products. Measured on NumPy (float32,
    B=1, H=4, one thread, 2-vCPU Xeon VM): chunk 1.1-2.0x faster at K=V=16 and 32, the two
    even at K=V=64, recurrent 1.16x faster at K=V=128, where the solves dominate
    (docs/forms.md).
    """
    if call.T <= 1:
        return "recurrent", "one step"
    if call.K > CHUNK_MAX_K:
        return "recurrent", f"K = {call.K} > {CHUNK_MAX_K}: the solves dominate either form"
    return "chunk", "matrix products form each chunk's states, then one batched solve"


def run(call: Call, form: str) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call in ``form``."""
    problem, finish = prepare(call)
    if form == "recurrent":
        o, state = recurrent(problem)
    else:
        from .chunk import chunk

        o, state = chunk(problem, call.chunk_size)
    return finish(o, state)
