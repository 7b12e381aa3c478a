"""The first wave's rules: their descriptions, read by validation, the public functions, the
registry, the test kit and the benchmarks (see :class:`fastweights.rules.Rule`)."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from array_api_compat import device

from .._rule import FORMS, QKV, REQUIRED, STATE, Arg, Option, Rule

_G = "log-decay per head, ``<= 0``; ``-inf`` resets the state to zero."
_GK = "log-decay per key channel, ``<= 0``; ``-inf`` resets that key row to zero."
_BETA = "write strength; per value (``[..., V]``) in the recurrent form only."
_NO_PARALLEL_GK = "a per-key-channel decay has no attention-like parallel form"


def retention_log_decay(xp: ModuleType, arrays: dict[str, Any]) -> dict[str, Any]:
    """RetNet's fixed log-decay ``g_h = log(1 - 2**(-5-h))`` per value head ``h``, broadcast to
    ``v.shape[:-1]`` (a read-only view), float64 if any of ``q, k, v`` is wider than 32 bits."""
    from ..._validate import is_float64_like

    v = arrays["v"]
    heads = [math.log(1.0 - 2.0 ** (-5 - h)) for h in range(v.shape[-2])]
    wide = any(is_float64_like(arrays[n]) for n in ("q", "k", "v"))
    g = xp.asarray(heads, dtype=xp.float64 if wide else xp.float32, device=device(v))
    return {**arrays, "g": xp.broadcast_to(g, tuple(v.shape[:-1]))}


LINEAR_ATTN = Rule(
    "linear_attn",
    "delta",
    "S_t = S_{t-1} + k_t v_t^T",
    (),
    FORMS,
    options=(
        Option(
            "normalize",
            False,
            "Divide by the running normaliser (see above).",
            step_doc="""\
        Also keep the normaliser ``z += k`` and divide ``o`` by ``scale q . z + 1e-10``;
        then ``state`` is the pair of pools ``(S, z)`` with ``z: [P, HV, K]``.""",
            state=(*STATE, Arg("z", "[N, HV, K]", "the normaliser, the sum of the keys.")),
        ),
    ),
    transition="diagonal",
    title="Linear attention: the Hebbian fast weight update ``S_t = S_{t-1} + k_t v_t^T``.",
    doc="""\
        With ``normalize=True`` the output is divided by ``q~_t . z_t + 1e-10`` where
        ``z_t = z_{t-1} + k_t`` (use positive feature maps upstream); the state is then the pair
        ``(S, z)`` with ``z: [N, HV, K]``, in ``initial_state`` and in the returned state.
        """,
    example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((1, 5, 2, 4)) for _ in range(3))
        >>> o, S = fastweights.linear_attn(q, k, v, scale=1.0, output_final_state=True)
        >>> bool(np.allclose(S[0, 0], k[0, :, 0].T @ v[0, :, 0]))
        True
        """,
    step_title="One token of :func:`fastweights.linear_attn`: ``S += k v^T``, then "
    "``o = S^T (scale q)``.",
    step_example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((2, 1, 4)) for _ in range(3))   # N=2, H=1, K=V=4
        >>> pool = np.zeros((2, 1, 4, 4))
        >>> o, pool = fastweights.step.linear_attn(q, k, v, pool, scale=1.0)
        >>> bool(np.allclose(pool[0, 0], np.outer(k[0, 0], v[0, 0])))
        True
        >>> bool(np.allclose(o[0, 0], pool[0, 0].T @ q[0, 0]))
        True
        """,
)
SIMPLE_GLA = Rule(
    "simple_gla",
    "delta",
    "S_t = exp(g_t) S_{t-1} + k_t v_t^T",
    (Arg("g", "[B, T, HV]", _G, log_decay=True),),
    FORMS,
    params={"gate": "g"},
    transition="diagonal",
    title="Linear attention with a scalar decay per head: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``.",
    doc="""\
        The rule of RetNet, Mamba2/SSD (``exp(g) = exp(dt A)``, ``k = B``, ``q = C``,
        ``v = dt x``), Lightning Attention and gated RFA; fla's ``chunk_simple_gla``.
        """,
    example="""\
        >>> import numpy as np, fastweights
        >>> q = k = v = np.ones((1, 3, 1, 2))
        >>> g = np.log(np.full((1, 3, 1), 0.5))
        >>> o, _ = fastweights.simple_gla(q, k, v, g, scale=1.0)
        >>> o[0, :, 0, 0].tolist()  # 2 * (1, 1 + 1/2, 1 + 1/2 + 1/4)
        [2.0, 3.0, 3.5]
        """,
    step_title="One token of :func:`fastweights.simple_gla`: ``S = exp(g) S + k v^T``.",
    step_example="""\
        One step equals a sequence call of length 1 with the same state:

        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((2, 1, 4)) for _ in range(3))
        >>> g = -rng.random((2, 1))
        >>> pool = rng.standard_normal((2, 1, 4, 4))
        >>> o_seq, s_seq = fastweights.simple_gla(q[:, None], k[:, None], v[:, None], g[:, None],
        ...                                       initial_state=pool, output_final_state=True)
        >>> o, pool = fastweights.step.simple_gla(q, k, v, g, pool)
        >>> bool(np.allclose(o, o_seq[:, 0])), bool(np.allclose(pool, s_seq))
        (True, True)
        """,
)
RETENTION = Rule(
    "retention",
    "delta",
    "simple_gla with g_h = log(1 - 2**(-5-h)) per value head h",
    (),
    FORMS,
    parent="simple_gla",
    to_parent=retention_log_decay,
    title="RetNet's retention: :func:`simple_gla` with the fixed decay ``1 - 2**(-5-h)``.",
    doc="""\
        Value head ``h = 0 .. HV-1`` has ``g_h = log(1 - 2**(-5-h))``.
        """,
    example="""\
        >>> import numpy as np, fastweights
        >>> q = k = v = np.ones((1, 2, 1, 1))
        >>> o, _ = fastweights.retention(q, k, v)
        >>> float(o[0, 1, 0, 0])  # 1 + (1 - 1/32)
        1.96875
        """,
    step_title="One token of :func:`fastweights.retention` (``g_h = log(1 - 2**(-5-h))``).",
    step_example="""\
        >>> import numpy as np, fastweights
        >>> q = k = v = np.ones((1, 1, 1))
        >>> pool = np.ones((1, 1, 1, 1))
        >>> o, pool = fastweights.step.retention(q, k, v, pool)
        >>> float(pool[0, 0, 0, 0])  # (1 - 1/32) * 1 + 1
        1.96875
        """,
)
GLA = Rule(
    "gla",
    "delta",
    "S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_t^T",
    (Arg("gk", "[B, T, HV, K]", _GK, log_decay=True),),
    ("recurrent", "chunk"),
    no_form={"parallel": _NO_PARALLEL_GK},
    params={"gate": "gk"},
    transition="diagonal",
    title="Gated linear attention: ``S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_t^T``.",
    doc="""\
        The decay acts on the key channels (rows of the key-first state); fla's ``chunk_gla``.
        It has no parallel form.
        """,
    example="""\
        >>> import numpy as np, fastweights
        >>> q = k = np.ones((1, 2, 1, 2)); v = np.ones((1, 2, 1, 1))
        >>> gk = np.log(np.array([1.0, 0.5]))[None, None, None, :].repeat(2, axis=1)
        >>> o, _ = fastweights.gla(q, k, v, gk, scale=1.0)
        >>> float(o[0, 1, 0, 0])  # channel 0 keeps 1 + 1, channel 1 keeps 1/2 + 1
        3.5
        """,
    step_title="One token of :func:`fastweights.gla`: ``S = Diag(exp(gk)) S + k v^T``.",
    step_example="""\
        The decay acts on the key rows of the state:

        >>> import numpy as np, fastweights
        >>> q, k, v = np.ones((1, 1, 2)), np.zeros((1, 1, 2)), np.zeros((1, 1, 3))
        >>> gk = np.log(np.array([[[0.5, 1.0]]]))
        >>> pool = np.ones((1, 1, 2, 3))
        >>> o, pool = fastweights.step.gla(q, k, v, gk, pool)
        >>> pool[0, 0, :, 0].tolist()
        [0.5, 1.0]
        """,
)
DELTA_RULE = Rule(
    "delta_rule",
    "delta",
    "S_t = S_{t-1} + k_t (beta_t * (v_t - S_{t-1}^T k_t))^T",
    (Arg("beta", "[B, R, HV]", _BETA, alternatives=("[B, R, HV, V]",), sample="rate"),),
    FORMS,
    params={"erase": True},
    transition="matrix",
    title="DeltaNet: ``S_t = S_{t-1} + k_t (beta_t * (v_t - S_{t-1}^T k_t))^T``.",
    doc="""\
        One step of online regression (the Widrow-Hoff rule) of values on keys with rate
        ``beta``; with unit keys and ``beta = 1`` the write replaces what key ``k_t`` stored.
        fla's ``chunk_delta_rule``.
        """,
    example="""\
        >>> import numpy as np, fastweights
        >>> k = np.array([1.0, 0.0]).reshape(1, 1, 1, 2).repeat(2, axis=1)
        >>> v = np.array([3.0, 5.0]).reshape(1, 2, 1, 1)
        >>> o, _ = fastweights.delta_rule(k, k, v, np.ones((1, 2, 1)), scale=1.0)
        >>> o[0, :, 0, 0].tolist()  # the second write overwrites the first
        [3.0, 5.0]
        """,
    step_title="One token of :func:`fastweights.delta_rule`: ``S += k (beta (v - S^T k))^T``.",
    step_example="""\
        With a unit key and ``beta = 1`` the step overwrites what the key recalls:

        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> k = np.array([[[0.6, 0.8, 0.0]]])
        >>> v = rng.standard_normal((1, 1, 2))
        >>> pool = rng.standard_normal((1, 1, 3, 2))
        >>> o, pool = fastweights.step.delta_rule(k, k, v, np.ones((1, 1)), pool, scale=1.0)
        >>> bool(np.allclose(pool[0, 0].T @ k[0, 0], v[0, 0])), bool(np.allclose(o, v))
        (True, True)
        """,
)
GATED_DELTA_RULE = Rule(
    "gated_delta_rule",
    "delta",
    "S' = exp(g_t) S_{t-1}; S_t = S' + k_t (beta_t * (v_t - S'^T k_t))^T",
    (
        Arg("g", "[B, T, HV]", _G, log_decay=True),
        Arg("beta", "[B, R, HV]", _BETA, alternatives=("[B, R, HV, V]",), sample="rate"),
    ),
    FORMS,
    params={"erase": True, "gate": "g"},
    transition="matrix",
    title="Gated DeltaNet: decay, then a delta step.",
    doc="""\
        ``S' = exp(g_t) S_{t-1}``; ``S_t = S' + k_t (beta_t * (v_t - S'^T k_t))^T``.
        fla's ``chunk_gated_delta_rule``.
        """,
    example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k = rng.standard_normal((2, 1, 100, 4, 64))
        >>> v = rng.standard_normal((1, 100, 4, 64))
        >>> g, beta = -rng.random((1, 100, 4)), rng.random((1, 100, 4))
        >>> o_chunk, _ = fastweights.gated_delta_rule(q, k, v, g, beta, form="chunk")
        >>> o_rec, _ = fastweights.gated_delta_rule(q, k, v, g, beta, form="recurrent")
        >>> bool(np.allclose(o_chunk, o_rec))
        True
        """,
    step_title="One token of :func:`fastweights.gated_delta_rule`: decay, then a delta step.",
    step_example="""\
        Decoding ``T`` tokens one by one gives the outputs of one sequence call:

        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> B, T, H, K = 2, 5, 1, 8
        >>> q, k, v = (rng.standard_normal((B, T, H, K)) for _ in range(3))
        >>> g, beta = -rng.random((B, T, H)), rng.random((B, T, H))
        >>> o_seq, _ = fastweights.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
        >>> pool = np.zeros((B, H, K, K))
        >>> steps = [fastweights.step.gated_delta_rule(q[:, t], k[:, t], v[:, t], g[:, t],
        ...                                            beta[:, t], pool, use_qk_l2norm=True)[0]
        ...          for t in range(T)]
        >>> bool(np.allclose(np.stack(steps, axis=1), o_seq))
        True
        """,
)
KDA = Rule(
    "kda",
    "delta",
    "S' = Diag(exp(gk_t)) S_{t-1}; S_t = S' + k_t (beta_t * (v_t - S'^T k_t))^T",
    (
        Arg("gk", "[B, T, HV, K]", _GK, log_decay=True),
        Arg("beta", "[B, R, HV]", _BETA, alternatives=("[B, R, HV, V]",), sample="rate"),
    ),
    ("recurrent", "chunk"),
    no_form={"parallel": _NO_PARALLEL_GK},
    params={"erase": True, "gate": "gk"},
    transition="matrix",
    title="Kimi Delta Attention: the gated delta rule with a per-key-channel decay.",
    doc="""\
        ``S' = Diag(exp(gk_t)) S_{t-1}``; ``S_t = S' + k_t (beta_t * (v_t - S'^T k_t))^T``.
        It has no parallel form.
        """,
    example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k = rng.standard_normal((2, 1, 6, 1, 3))
        >>> v = rng.standard_normal((1, 6, 1, 2))
        >>> gk, beta = -rng.random((1, 6, 1, 3)), rng.random((1, 6, 1))
        >>> o, state = fastweights.kda(q, k, v, gk, beta, output_final_state=True)
        >>> o.shape, state.shape
        ((1, 6, 1, 2), (1, 1, 3, 2))
        """,
    step_title="One token of :func:`fastweights.kda`: per-key-channel decay, then a delta step.",
    step_example="""\
        Two sequences kept in rows 3 and 0 of a pool of 4:

        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((2, 1, 4), dtype=np.float32) for _ in range(3))
        >>> gk = -rng.random((2, 1, 4), dtype=np.float32)
        >>> beta = rng.random((2, 1), dtype=np.float32)
        >>> pool = np.zeros((4, 1, 4, 4), dtype=np.float32)
        >>> o, out = fastweights.step.kda(q, k, v, gk, beta, pool, state_indices=[3, 0],
        ...                              use_qk_l2norm=True)
        >>> out is pool, [bool(np.any(pool[i])) for i in range(4)]
        (True, [True, False, False, True])
        """,
)
DELTA_PRODUCT = Rule(
    "delta_product",
    "delta",
    "num_householder delta steps per token after an optional decay exp(g_t)",
    (
        Arg("beta", "[B, R, HV]", _BETA, alternatives=("[B, R, HV, V]",), sample="rate"),
        Arg(
            "g",
            "[B, T, HV]",
            "log-decay per token, ``<= 0``, applied once before the token's steps.",
            log_decay=True,
            optional=True,
            keyword_only=True,
        ),
    ),
    ("recurrent", "chunk"),
    no_form={"parallel": "its several delta steps per token have no parallel form"},
    options=(
        Option(
            "num_householder",
            REQUIRED,
            "Steps per token, ``n >= 1``.",
            annotation="int",
            step=False,
        ),
    ),
    params={"erase": True, "gate": "g"},
    qkv=(
        QKV[0],
        Arg(
            "k", "[B, R, H, K]", "keys, ``R = T * num_householder`` rows, in order.", sample="unit"
        ),
        Arg("v", "[B, R, HV, V]", "values, ``R = T * num_householder`` rows."),
    ),
    transition="matrix",
    title="DeltaProduct: ``num_householder`` delta steps per token, after an optional decay.",
    doc="""\
        ``k``, ``v`` and ``beta`` have ``T * n`` rows (``n = num_householder``): rows
        ``t*n .. t*n+n-1`` are token ``t``'s steps. ``g`` (``[B, T, HV]``, optional) decays the
        state once per token before its steps; the output is read after the last step. With
        ``cu_seqlens`` (which counts tokens), sequence ``i`` owns rows ``n*cu[i] : n*cu[i+1]``.
        The chunk form chunks the ``T * n`` steps (``chunk_size`` counts steps).
        """,
    example="""\
        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q = rng.standard_normal((1, 4, 1, 3))
        >>> k = rng.standard_normal((1, 8, 1, 3)); v = rng.standard_normal((1, 8, 1, 2))
        >>> o, _ = fastweights.delta_product(q, k, v, np.ones((1, 8, 1)), num_householder=2)
        >>> o.shape
        (1, 4, 1, 2)
        """,
    step_title="One token of :func:`fastweights.delta_product`: optional decay, then ``n`` "
    "delta steps.",
    step_example="""\
        With ``n = 1`` and no gate it is one delta-rule step:

        >>> import numpy as np, fastweights
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((1, 1, 4)) for _ in range(3))
        >>> beta = rng.random((1, 1))
        >>> p1, p2 = np.zeros((2, 1, 1, 4, 4))
        >>> o1, _ = fastweights.step.delta_product(q, k[:, None], v[:, None], beta[:, None], p1)
        >>> o2, _ = fastweights.step.delta_rule(q, k, v, beta, p2)
        >>> bool(np.allclose(o1, o2)), bool(np.allclose(p1, p2))
        (True, True)
        """,
)

RULES = (
    LINEAR_ATTN,
    SIMPLE_GLA,
    RETENTION,
    GLA,
    DELTA_RULE,
    GATED_DELTA_RULE,
    KDA,
    DELTA_PRODUCT,
)
"""The family's rules, registered by :mod:`fastweights._ops`."""
