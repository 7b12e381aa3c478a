"""The DPLR family: a diagonal-plus-low-rank transition of the state (RULES2.md section 1).

Per value head, with ``alpha_t = exp(gk_t)``::

    S_t = (Diag(alpha_t) + b_t a_t^T) S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale q_t)

``a`` reads the old state, ``b`` writes; both the decay and the low-rank term act on the
undecayed ``S_{t-1}``. ``iplr`` (no decay) and ``rwkv7`` (RWKV-7's parametrisation) are
instances: validation rewrites them to ``dplr`` before dispatch. Forms: :mod:`.recurrent`
(the definition) and :mod:`.chunk` (the WY/UT chunk form). A per-key-channel decay has no
attention-like parallel form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._rule import Arg, Rule
from ._layout import cotangents, prepare, raw_grads
from .iplr import IPLR
from .recurrent import recurrent
from .rwkv7 import RWKV7

if TYPE_CHECKING:
    from ..._validate import Call

_VECTOR = "per value head; "

DPLR = Rule(
    "dplr",
    "dplr",
    "S_t = Diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T",
    (
        Arg(
            "a",
            "[B, T, HV, K]",
            "the vector that reads the old state (``a_t^T S_{t-1}``).",
            sample="removal",
        ),
        Arg("b", "[B, T, HV, K]", "the vector that writes what ``a`` read.", sample="unit"),
        Arg(
            "gk",
            "[B, T, HV, K]",
            "log-decay per key channel, ``<= 0``; ``-inf`` zeroes that row of the decayed "
            "part only (the low-rank term still reads the old state). None: no decay.",
            log_decay=True,
            optional=True,
        ),
    ),
    ("recurrent", "chunk"),
    no_form={"parallel": "a per-key-channel decay has no attention-like parallel form"},
    flops=8,
    transition="matrix",
    title="The generalized delta rule: a diagonal-plus-low-rank transition of the state.",
    doc="""\
        ``S_t = Diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``,
        ``o_t = S_t^T q~_t``. ``a`` reads the old state, ``b`` writes; the decay and the
        low-rank term both act on the undecayed ``S_{t-1}`` (fla's ``chunk_dplr_delta_rule``
        with its ``a``, ``b``; fla's docstrings write the value-first transpose). There is no
        ``beta``: a write strength goes into ``v``. The gated delta rule is the case
        ``gk = g``, ``a = -beta exp(g) k``, ``b = k``, ``v <- beta v``. The transition is not
        contractive in general (docs/rules/dplr.md). It has no parallel form.""",
    example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((1, 6, 1, 4)) for _ in range(3))
        >>> k = k / np.linalg.norm(k, axis=-1, keepdims=True)
        >>> beta, g = rng.random((1, 6, 1, 1)), -rng.random((1, 6, 1, 1))
        >>> a, gk = -beta * np.exp(g) * k, np.broadcast_to(g, k.shape)
        >>> o, _ = fastweights.dplr(q, k, beta * v, a, k, gk)
        >>> o_gdr, _ = fastweights.gated_delta_rule(q, k, v, g[..., 0], beta[..., 0])
        >>> bool(np.allclose(o, o_gdr))
        True""",
    step_title="One token of :func:`fastweights.dplr`: "
    "``S = Diag(exp(gk)) S + b (a^T S) + k v^T``, then ``o = S^T (scale q)``.",
    step_example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v, a, b = (rng.standard_normal((2, 1, 4)) for _ in range(5))
        >>> gk = -rng.random((2, 1, 4))
        >>> pool = rng.standard_normal((2, 1, 4, 4))
        >>> S0 = pool[0, 0].copy()
        >>> o, pool = fastweights.step.dplr(q, k, v, a, b, gk, pool, scale=1.0)
        >>> want = np.exp(gk[0, 0])[:, None] * S0 + np.outer(b[0, 0], a[0, 0] @ S0)
        >>> bool(np.allclose(pool[0, 0], want + np.outer(k[0, 0], v[0, 0])))
        True""",
)

RULES = (DPLR, IPLR, RWKV7)
"""The family's rules, registered by :mod:`fastweights._ops`."""


def form_unavailable(call: Call, form: str) -> str | None:
    """Every DPLR call has the rule's forms."""
    return None


def auto_form(call: Call) -> tuple[str, str]:
    """The form ``"auto"`` picks on the reference backend, and why: recurrent with a decay,
    chunk without.

    With per-key-channel decays the chunk form's elementwise scores cost more than the
    recurrent loop on NumPy (2.2-3.8x at T=2048, H=4, K=V=64 and 128); without a decay
    (``iplr``) the chunk form is 1.7-2.6x faster (docs/forms.md, 2-core VM).
    """
    if call.T <= 1:
        return "recurrent", "one step"
    if call.gk is not None:
        return "recurrent", "per-key-channel decays make the chunk form slower on NumPy"
    return "chunk", "no decay: matrix products over every chunk at once"


def run(call: Call, form: str) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call in ``form``."""
    problem, finish = prepare(call)
    if form == "recurrent":
        o, state = recurrent(problem)
    else:
        from .chunk import chunk

        o, state = chunk(problem, call.chunk_size)
    return finish(o, state)


def vjp(
    call: Call, form: str, do: Any, dstate: Any, *, sweeps: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Gradients of ``sum(o * do) + sum(final_state * dstate)`` with respect to the call's raw
    arguments (``fastweights.vjp``), by the reverse sweep of ``form``
    (:mod:`.recurrent_vjp`, or chunkwise: :mod:`.chunk_vjp`). ``sweeps`` replaces a form's
    problem-level sweep (a backend's kernels)."""
    problem, _ = prepare(call)
    do_p, ds_p = cotangents(call, problem, do, dstate)
    chosen = dict(sweeps or {})
    if form == "recurrent":
        from .recurrent_vjp import recurrent_vjp

        g = chosen.get(form, recurrent_vjp)(problem, do_p, ds_p, call.chunk_size)
    else:
        from .chunk_vjp import chunk_vjp

        g = chosen.get(form, chunk_vjp)(problem, do_p, ds_p, call.chunk_size)
    return raw_grads(call, g)
