"""The self-referential weight matrix (Irie et al., 2022): one matrix per head that produces
its own output, keys, queries and learning rates, and rewrites itself.

Per head, with ``phi = softmax`` over ``D`` and ``W [D, V + 2D + 4]`` (key-first)::

    [y_t, k_t, q_t, beta_t] = W_{t-1}^T phi(x_t)            (split V, D, D, 4)
    v_t = W_{t-1}^T phi(q_t),   vbar_t = W_{t-1}^T phi(k_t)
    W_t = W_{t-1} + phi(k_t) (lr_t * (v_t - vbar_t))^T      lr_t = sigmoid(beta_t) per block
    o_t = y_t                                               (read before the write)

Only the recurrent form exists (:mod:`.recurrent`): every quantity is read from the weight
the previous token wrote.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._rule import SERVING, Arg, Rule
from .recurrent import prepare, recurrent
from .vjp import vjp

if TYPE_CHECKING:
    from ..._validate import Call

__all__ = ["RULES", "auto_form", "form_unavailable", "run", "sizes", "vjp"]

_NO_FORM = "its keys, queries and rates are read from the weight it rewrites: recurrent only"


def sizes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """``B T H HV K V W`` of an srwm call (``K`` is the paper's ``D``, ``W = V + 2D + 4``)
    from ``x`` and ``W0`` (a sequence) or ``x`` and the pool (a decoding step)."""
    x = shapes["x"]
    step = "state" in shapes
    rank, labels = (3, "[N, H, D]") if step else (4, "[B, T, H, D]")
    if len(x) != rank:
        raise ValueError(f"x must have rank {rank} {labels}, got shape {x}")
    B, T, H, D = (x[0], 1, x[1], x[2]) if step else x
    if D < 1 or H < 1:
        raise ValueError(f"x must have H >= 1 heads and D >= 1 features, got shape {x}")
    name, weight = ("state", shapes["state"]) if step else ("W0", shapes["W0"])
    where = weight[1:3] if step else weight[:2]
    want = "[P, H, D, V + 2D + 4]" if step else "[H, D, V + 2D + 4]"
    if len(weight) != len(want.split(",")) or tuple(where) != (H, D):
        raise ValueError(f"{name} must have shape {want} with H, D = {H, D}, got {weight}")
    W = weight[-1]
    if W < 2 * D + 5:
        raise ValueError(
            f"{name} must have V + 2D + 4 columns with V >= 1, i.e. at least {2 * D + 5} for "
            f"D = {D}, got {W}"
        )
    return {"B": B, "N": B, "T": T, "H": H, "HV": H, "K": D, "V": W - 2 * D - 4, "W": W}


SRWM = Rule(
    "srwm",
    "srwm",
    "W_t = W_{t-1} + phi(k_t) (lr_t * (W_{t-1}^T phi(q_t) - W_{t-1}^T phi(k_t)))^T",
    (
        Arg("x", "[B, T, H, K]", "the input of each head (``K`` is the paper's ``D``)."),
        Arg(
            "W0",
            "[H, K, W]",
            "every sequence's initial weight, ``W = V + 2D + 4`` columns (output, key, "
            "query, four rate logits), key-first; ``V`` is read from it.",
            sample="small",
            step=False,
        ),
    ),
    ("recurrent",),
    no_form={"chunk": _NO_FORM, "parallel": _NO_FORM},
    state=(Arg("W", "[N, H, K, W]", "the weight of each sequence and head."),),
    qkv=(),
    common=("initial_state", "output_final_state", "cu_seqlens", "form", *SERVING),
    out="x",
    sizes=sizes,
    same_heads=True,
    flops=lambda K, V: 8 * K * (V + 2 * K + 4),  # three reads and a write of W
    title="The self-referential weight matrix: one weight per head computes its own output, "
    "keys, queries and learning rates, and rewrites itself.",
    doc="""\
        With ``phi = softmax`` over ``D``: ``[y_t, k_t, q_t, beta_t] = W_{t-1}^T phi(x_t)``
        (split ``V, D, D, 4``), ``v_t = W_{t-1}^T phi(q_t)``, ``vbar_t = W_{t-1}^T
        phi(k_t)``, ``W_t = W_{t-1} + phi(k_t) (lr_t * (v_t - vbar_t))^T`` with ``lr_t =
        sigmoid(beta_t)`` repeated over each block's columns, and ``o_t = y_t`` (Irie et al.,
        2022, "A modern self-referential weight matrix that learns to modify itself"). It
        reads before it writes (``o_t`` uses ``W_{t-1}``), unlike the other ops. ``W0`` is
        shared by every sequence; ``initial_state [N, H, D, V + 2D + 4]`` replaces it. ``o``
        has ``x``'s dtype. No ``scale``, ``use_qk_l2norm`` or ``chunk_size``: recurrent only.""",
    example="""\
        >>> import numpy as np, fastweights
        >>> from fastweights.testing import naive
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((1, 6, 2, 3))
        >>> W0 = rng.standard_normal((2, 3, 4 + 2 * 3 + 4))      # V = 4, D = 3
        >>> o, W = fastweights.srwm(x, W0, output_final_state=True)
        >>> o.shape, W.shape
        ((1, 6, 2, 4), (1, 2, 3, 14))
        >>> bool(np.allclose(o, naive.srwm(x, W0)[0]))
        True""",
    step_title="One token of :func:`fastweights.srwm`: each pool row is a weight (start a "
    "sequence with ``pool[i] = W0``).",
    step_example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> W0 = rng.standard_normal((2, 3, 14))
        >>> pool = np.stack([W0] * 4)                            # 4 sequences, all fresh
        >>> x = rng.standard_normal((2, 2, 3))
        >>> o, pool = fastweights.step.srwm(x, pool, state_indices=[3, 1])
        >>> o.shape, bool(np.all(pool[0] == W0)), bool(np.all(pool[3] == W0))
        ((2, 2, 4), True, False)""",
)

RULES = (SRWM,)
"""The family's rules, registered by :mod:`fastweights._ops`."""


def form_unavailable(call: Call, form: str) -> str | None:
    return None


def auto_form(call: Call) -> tuple[str, str]:
    return "recurrent", "the only form: each token reads the weight the last one wrote"


def run(call: Call, form: str) -> tuple[Any, Any]:
    """``(o, final_state)`` of a sequence call (the recurrent form)."""
    problem, finish = prepare(call)
    return finish(*recurrent(problem))
