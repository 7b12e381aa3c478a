"""flash-linear-attention's calling surface, computed by the fastweights ops.

Every function here has the name, the positional order, the keyword arguments and the
defaults of its counterpart in ``fla.ops`` (flash-linear-attention 0.6), so that porting fla
code is changing the import::

    from fla.ops import chunk_gated_delta_rule          # before
    from fastweights.fla import chunk_gated_delta_rule  # after

The arrays may come from any namespace fastweights accepts (NumPy, torch, CuPy, JAX, ...)
and the call runs on the backend fastweights picks for them; ``backend=`` and ``form=``
(fastweights' own keywords) may be added to any call. Layout and conventions are fla's:
``[B, T, H, ...]`` inputs, log-space gates, key-first states ``[N, H, K, V]``
(``state_v_first=True``: ``[N, H, V, K]``), ``o`` in ``q``'s dtype. The remaining
differences are listed in the guide *Porting from fla* (docs/guides/porting-from-fla.md):
there is no backward pass, and options that only tune fla's Triton kernels
(``chunk_size``, ``cu_seqlens_cpu``, ``safe_gate``, ...) are accepted and ignored.

Examples
--------
>>> import numpy as np
>>> from fastweights.fla import chunk_gated_delta_rule
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.standard_normal((3, 1, 16, 2, 8))
>>> g, beta = -rng.random((1, 16, 2)), rng.random((1, 16, 2))
>>> o, state = chunk_gated_delta_rule(
...     q, k, v, g, beta, use_qk_l2norm_in_kernel=True, output_final_state=True
... )
>>> o.shape, state.shape
((1, 16, 2, 8), (1, 2, 8, 8))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import array_api_compat

import fastweights as _fw  # the package: its ops are set before a submodule imports

from ._validate import to_host_ints

__all__ = [
    "chunk_delta_rule",
    "chunk_dplr_delta_rule",
    "chunk_gated_delta_product",
    "chunk_gated_delta_rule",
    "chunk_gdn",
    "chunk_gla",
    "chunk_iplr_delta_rule",
    "chunk_kda",
    "chunk_lightning_attn",
    "chunk_linear_attn",
    "chunk_mesa_net",
    "chunk_retention",
    "chunk_rwkv7",
    "chunk_simple_gla",
    "fused_chunk_linear_attn",
    "fused_chunk_retention",
    "fused_chunk_simple_gla",
    "fused_mul_recurrent_rwkv7",
    "fused_recurrent_delta_rule",
    "fused_recurrent_dplr_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gdn",
    "fused_recurrent_gla",
    "fused_recurrent_iplr_delta_rule",
    "fused_recurrent_kda",
    "fused_recurrent_lightning_attn",
    "fused_recurrent_linear_attn",
    "fused_recurrent_retention",
    "fused_recurrent_rwkv7",
    "fused_recurrent_simple_gla",
    "parallel_retention",
    "parallel_simple_gla",
]

#: The warning earlier fla releases gave when ``q`` looked head-first: ``T < H``.
HEAD_FIRST_WARNING = (
    "Input tensor shape suggests potential format mismatch: seq_len ({T}) < num_heads ({H}). "
    "This may indicate the inputs were passed in head-first format [B, H, T, ...]. "
    "Please verify your input tensor format matches the expected shape [B, T, H, ...]."
)

# Keyword arguments that only tune fla's Triton kernels (tile sizes, host copies, graph
# capture, gate-range hints for tensor cores): accepted and ignored.
_TUNING = frozenset(
    {
        "chunk_size",
        "cu_seqlens_cpu",
        "chunk_indices",
        "disable_recompute",
        "use_graph",
        "max_num_seqs",
        "safe_gate",
        "lower_bound",
    }
)
_FASTWEIGHTS = frozenset({"backend", "form"})


def _extras(name: str, kwargs: dict[str, Any], accepted: tuple[str, ...] = ()) -> dict[str, Any]:
    """Sort a call's extra keywords: fastweights' own (returned), fla's tuning (dropped),
    ``accepted`` (left in ``kwargs``); anything else is a TypeError, as in a plain function."""
    ours: dict[str, Any] = {}
    for key in list(kwargs):
        if key in _FASTWEIGHTS:
            ours[key] = kwargs.pop(key)
        elif key in _TUNING:
            kwargs.pop(key)
        elif key == "head_first" and key not in accepted:
            if kwargs.pop(key):
                raise ValueError(
                    f"{name}: head_first=True is not supported here (fla 0.6 removed it); pass "
                    "[B, T, H, ...] inputs"
                )
        elif key not in accepted and key != "cp_context":
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
    if kwargs.get("cp_context") is not None:
        raise ValueError(f"{name}: cp_context (fla's context parallelism) is not supported")
    kwargs.pop("cp_context", None)
    return ours


def _state_v_first(name: str, state_v_first: bool, kwargs: dict[str, Any]) -> bool:
    """fla's deprecated alias ``transpose_state_layout`` of ``state_v_first``."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError(
                f"{name}: cannot pass both state_v_first and the deprecated transpose_state_layout"
            )
        warnings.warn(
            "`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
            DeprecationWarning,
            stacklevel=3,
        )
        return bool(kwargs.pop("transpose_state_layout"))
    return state_v_first


def _xp(x: Any) -> ModuleType:
    return array_api_compat.array_namespace(x)


def _swap(xp: ModuleType, x: Any, a: int, b: int) -> Any:
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return xp.permute_dims(x, tuple(axes))


def _gate_dtype(xp: ModuleType, q: Any) -> Any:
    return xp.float64 if q.dtype == xp.float64 else xp.float32


def _softplus(xp: ModuleType, x: Any) -> Any:
    return xp.logaddexp(xp.zeros_like(x), x)


def _sigmoid(xp: ModuleType, x: Any) -> Any:
    return 1.0 / (1.0 + xp.exp(-x))


def _map_state(xp: ModuleType, state: Any, fn: Callable[[Any], Any]) -> Any:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(None if s is None else fn(s) for s in state)
    return fn(state)


def _run(
    name: str,
    op: Callable[..., Any],
    q: Any,
    k: Any,
    v: Any,
    gates: list[Any],
    *,
    scale: float | None,
    initial_state: Any,
    output_final_state: bool,
    cu_seqlens: Any,
    ours: dict[str, Any],
    use_qk_l2norm: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    head_first: bool = False,
    warn_layout: bool = False,
    op_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Run ``op(q, k, v, *gates)`` with fla's layout options applied around it.

    ``gates`` are the op's positional arrays after ``v``, each with the token axis second.
    """
    xp = _xp(q)
    q_dtype = q.dtype
    if head_first:  # earlier fla's [B, H, T, ...] layout
        warnings.warn(
            f"{name}: head_first=True is deprecated (fla 0.6 removed it); pass [B, T, H, ...] "
            "inputs instead",
            DeprecationWarning,
            stacklevel=3,
        )
        q, k, v = (_swap(xp, x, 1, 2) for x in (q, k, v))
        gates = [None if g is None else _swap(xp, g, 1, 2) for g in gates]
    elif warn_layout and q.shape[1] < q.shape[2]:
        warnings.warn(HEAD_FIRST_WARNING.format(T=q.shape[1], H=q.shape[2]), stacklevel=3)
    if state_v_first:
        initial_state = _map_state(xp, initial_state, lambda s: _swap(xp, s, -1, -2))
    packed = cu_seqlens is not None
    if reverse:  # run the flipped sequences forward: the same recurrence from T-1 down to 0
        q, k, v = (xp.flip(x, axis=1) for x in (q, k, v))
        gates = [None if g is None else xp.flip(g, axis=1) for g in gates]
        if packed:
            cu = to_host_ints("cu_seqlens", cu_seqlens, ValueError)
            cu_seqlens = cu[-1] - cu[::-1]
            initial_state = _map_state(xp, initial_state, lambda s: xp.flip(s, axis=0))
    kwargs = dict(op_kwargs or {})
    if use_qk_l2norm:
        kwargs["use_qk_l2norm"] = True
    o, state = op(
        q,
        k,
        v,
        *gates,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **kwargs,
        **ours,
    )
    if reverse:
        o = xp.flip(o, axis=1)
        if packed:
            state = _map_state(xp, state, lambda s: xp.flip(s, axis=0))
    if state_v_first:
        state = _map_state(xp, state, lambda s: _swap(xp, s, -1, -2))
    if head_first:
        o = _swap(xp, o, 1, 2)
    if o.dtype != q_dtype:
        o = xp.astype(o, q_dtype)
    return o, state


def _beta_in_kernel(
    xp: ModuleType, beta: Any, use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool
) -> Any:
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if use_beta_sigmoid_in_kernel:
        beta = _sigmoid(xp, beta)
        if allow_neg_eigval:
            beta = beta * 2.0
    return beta


def _gdn_gate(xp: ModuleType, g: Any, A_log: Any, dt_bias: Any) -> Any:
    """fla's Gated DeltaNet gate: ``g = -exp(A_log) * softplus(g + dt_bias)``, per head."""
    if A_log is None:
        raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
    if g is None:
        raise ValueError(
            "`g` (raw pre-activation) must be provided when `use_gate_in_kernel=True`."
        )
    if dt_bias is not None:
        g = g + dt_bias
    return -xp.exp(A_log) * _softplus(xp, g)


def _kda_gate(xp: ModuleType, g: Any, A_log: Any, dt_bias: Any, lower_bound: Any) -> Any:
    """fla's KDA gate: ``-exp(A_log) * softplus(g + dt_bias)``, or with ``lower_bound``
    ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``; ``A_log [HV]``, ``dt_bias [HV*K]``."""
    HV, K = g.shape[-2], g.shape[-1]
    if dt_bias is not None:
        g = g + xp.reshape(dt_bias, (HV, K))
    if lower_bound is not None:
        if A_log is not None:
            g = xp.exp(xp.reshape(A_log, (HV, 1))) * g
        return lower_bound * _sigmoid(xp, g)
    if A_log is None:
        raise ValueError(
            "`A_log` must be provided when `use_gate_in_kernel=True` and `lower_bound` is not set."
        )
    return -xp.exp(xp.reshape(A_log, (HV, 1))) * _softplus(xp, g)


def _check_scale(scale: float | None) -> None:
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")


def _full_g(xp: ModuleType, q: Any, g: Any, g_gamma: Any, head_first: bool = False) -> Any:
    """fla's simple-GLA gates: a per-token ``g [B, T, H]``, a constant ``g_gamma [H]``, both
    (added) or neither (``None``: no decay)."""
    if g_gamma is None:
        return g
    g_gamma = xp.asarray(g_gamma, device=array_api_compat.device(q))
    if g_gamma.ndim != 1:
        raise ValueError(f"g_gamma must be [H], got shape {tuple(g_gamma.shape)}")
    shape = (1, -1, 1) if head_first else (1, 1, -1)
    full = xp.broadcast_to(xp.reshape(g_gamma, shape), tuple(q.shape[:3]))
    return full if g is None else g + full


def _decay_or_plain(name: str, q: Any, k: Any, v: Any, g: Any, **kw: Any) -> tuple[Any, Any]:
    """``simple_gla`` with ``g``, ``linear_attn`` without."""
    if g is None:
        return _run(name, _fw.linear_attn, q, k, v, [], **kw)
    return _run(name, _fw.simple_gla, q, k, v, [g], **kw)


# --------------------------------------------------------------------------------------------
# docstrings


def _doc(
    fla_name: str,
    summary: str,
    body: str,
    setup: str,
    call: str,
    result: str = "((1, 16, 2, 8), (1, 2, 8, 8))",
    show: str = "o.shape, state.shape",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a function fla's name in a docstring with a runnable example."""

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        lines = "\n".join(
            f"    >>> {line}" if not line.startswith("...") else f"    {line}"
            for line in setup.strip().splitlines()
        )
        func.__doc__ = f"""{summary}

    ``fla.ops.{fla_name}``'s signature and defaults. {body}

    Returns ``(o, final_state)`` as fla does (``final_state`` is ``None`` unless
    ``output_final_state``); ``o`` has ``q``'s dtype. ``backend=`` and ``form=`` (fastweights'
    keywords) may be added; fla's kernel-tuning keywords are accepted and ignored. See the
    guide *Porting from fla* for what differs.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights import fla
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 16, 2, 8))
{lines}
    >>> o, state = fla.{call}
    >>> {show}
    {result}
    """
        return func

    return wrap


_G = "g = -rng.random((1, 16, 2))"
_GK = "gk = -rng.random((1, 16, 2, 8))"
_BETA = "beta = rng.random((1, 16, 2))"
_AB = "a = -0.1 * rng.random((1, 16, 2, 8)); b = 0.1 * rng.random((1, 16, 2, 8))"

# --------------------------------------------------------------------------------------------
# Gated DeltaNet


@_doc(
    "chunk_gated_delta_rule",
    "Gated DeltaNet: :func:`fastweights.gated_delta_rule` under fla's name.",
    "``g [B, T, HV]`` is the log decay, ``beta [B, T, HV]`` the write strength; "
    "``use_gate_in_kernel=True`` (with ``A_log``, ``dt_bias`` keywords) computes "
    "``g = -exp(A_log) * softplus(g + dt_bias)``; ``use_beta_sigmoid_in_kernel`` takes "
    "``sigmoid(beta)``, doubled with ``allow_neg_eigval``.",
    f"{_G}\n{_BETA}",
    "chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)",
)
def chunk_gated_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    chunk_indices: Any = None,
    cp_context: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "chunk_gated_delta_rule"
    state_v_first = _state_v_first(name, state_v_first, kwargs)
    kwargs["cp_context"] = cp_context
    ours = _extras(name, kwargs, ("head_first", "use_gate_in_kernel", "A_log", "dt_bias"))
    xp = _xp(q)
    if kwargs.get("use_gate_in_kernel", False):
        g = _gdn_gate(xp, g, kwargs.get("A_log"), kwargs.get("dt_bias"))
    beta = _beta_in_kernel(xp, beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _run(
        name,
        _fw.gated_delta_rule,
        q,
        k,
        v,
        [g, beta],
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
        state_v_first=state_v_first,
        head_first=bool(kwargs.get("head_first", False)),
        warn_layout=True,
    )


@_doc(
    "fused_recurrent_gated_delta_rule",
    "Gated DeltaNet, recurrent: the gated delta rule with fla's optional gates.",
    "``g [B, T, HV]`` (per head) and ``gk [B, T, HV, K]`` (per key channel, added to ``g``) "
    "are optional log decays: neither is :func:`fastweights.delta_rule`, ``g`` alone "
    ":func:`fastweights.gated_delta_rule`, ``gk`` :func:`fastweights.kda`; ``gv`` (per "
    "value channel) is not supported. ``beta`` defaults to ones, as in fla.",
    f"{_G}\n{_BETA}",
    "fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True)",
)
def fused_recurrent_gated_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    g: Any = None,
    gk: Any = None,
    gv: Any = None,
    beta: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Any = None,
    dt_bias: Any = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "fused_recurrent_gated_delta_rule"
    state_v_first = _state_v_first(name, state_v_first, kwargs)
    ours = _extras(name, kwargs, ("head_first",))
    if gv is not None:
        raise ValueError(f"{name}: gv (a per-value-channel decay) is not supported by fastweights")
    xp = _xp(q)
    if beta is None:
        beta = xp.ones(tuple(v.shape[:3]), dtype=q.dtype, device=array_api_compat.device(q))
    if use_gate_in_kernel:
        g = _gdn_gate(xp, g, A_log, dt_bias)
    beta = _beta_in_kernel(xp, beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    if gk is not None:
        op, gates = _fw.kda, [gk if g is None else gk + g[..., None], beta]
    elif g is not None:
        op, gates = _fw.gated_delta_rule, [g, beta]
    else:
        op, gates = _fw.delta_rule, [beta]
    return _run(
        name,
        op,
        q,
        k,
        v,
        gates,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
        state_v_first=state_v_first,
        head_first=bool(kwargs.get("head_first", False)),
    )


#: fla's short names (``fla.ops.chunk_gdn is fla.ops.chunk_gated_delta_rule``).
chunk_gdn = chunk_gated_delta_rule
fused_recurrent_gdn = fused_recurrent_gated_delta_rule


# --------------------------------------------------------------------------------------------
# KDA


def _kda(
    name: str,
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    A_log: Any,
    dt_bias: Any,
    use_gate_in_kernel: bool,
    use_beta_sigmoid_in_kernel: bool,
    allow_neg_eigval: bool,
    lower_bound: Any,
    state_v_first: bool,
    kwargs: dict[str, Any],
    warn_layout: bool,
    **common: Any,
) -> tuple[Any, Any]:
    state_v_first = _state_v_first(name, state_v_first, kwargs)
    if kwargs.pop("return_intermediate_states", False):
        raise ValueError(f"{name}: return_intermediate_states=True is not supported")
    ours = _extras(name, kwargs, ("head_first",))
    xp = _xp(q)
    if use_gate_in_kernel:
        g = _kda_gate(xp, g, A_log, dt_bias, lower_bound)
    beta = _beta_in_kernel(xp, beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _run(
        name,
        _fw.kda,
        q,
        k,
        v,
        [g, beta],
        ours=ours,
        state_v_first=state_v_first,
        head_first=bool(kwargs.get("head_first", False)),
        warn_layout=warn_layout,
        **common,
    )


@_doc(
    "chunk_kda",
    "Kimi Delta Attention: :func:`fastweights.kda` under fla's name.",
    "``g [B, T, HV, K]`` is the per-key-channel log decay (fastweights' ``gk``); "
    "``use_gate_in_kernel=True`` (with ``A_log [HV]``, ``dt_bias [HV*K]`` keywords) computes "
    "``g = -exp(A_log) * softplus(g + dt_bias)``, or with ``lower_bound`` "
    "``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``.",
    f"{_GK}\n{_BETA}",
    "chunk_kda(q, k, v, gk, beta, output_final_state=True)",
)
def chunk_kda(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    cp_context: Any = None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    kwargs["cp_context"] = cp_context
    kwargs["return_intermediate_states"] = return_intermediate_states
    A_log, dt_bias = kwargs.pop("A_log", None), kwargs.pop("dt_bias", None)
    return _kda(
        "chunk_kda",
        q,
        k,
        v,
        g,
        beta,
        A_log,
        dt_bias,
        use_gate_in_kernel,
        use_beta_sigmoid_in_kernel,
        allow_neg_eigval,
        lower_bound,
        state_v_first,
        kwargs,
        True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
    )


@_doc(
    "fused_recurrent_kda",
    "Kimi Delta Attention, recurrent: :func:`fastweights.kda` under fla's name.",
    "As :func:`chunk_kda`, with ``A_log`` and ``dt_bias`` as positional arguments after "
    "``beta``, as in fla.",
    f"{_GK}\n{_BETA}",
    "fused_recurrent_kda(q, k, v, gk, beta, output_final_state=True)",
)
def fused_recurrent_kda(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    A_log: Any = None,
    dt_bias: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _kda(
        "fused_recurrent_kda",
        q,
        k,
        v,
        g,
        beta,
        A_log,
        dt_bias,
        use_gate_in_kernel,
        use_beta_sigmoid_in_kernel,
        allow_neg_eigval,
        lower_bound,
        state_v_first,
        kwargs,
        False,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
    )


# --------------------------------------------------------------------------------------------
# GLA and simple GLA


@_doc(
    "chunk_gla",
    "Gated linear attention: :func:`fastweights.gla` under fla's name.",
    "``g [B, T, H, K]`` is the per-key-channel log decay (fastweights' ``gk``).",
    _GK,
    "chunk_gla(q, k, v, gk, output_final_state=True)",
)
def chunk_gla(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "chunk_gla"
    ours = _extras(name, kwargs, ("head_first",))
    return _run(
        name,
        _fw.gla,
        q,
        k,
        v,
        [g],
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        state_v_first=state_v_first,
        head_first=bool(kwargs.get("head_first", False)),
        warn_layout=True,
    )


@_doc(
    "fused_recurrent_gla",
    "Gated linear attention, recurrent: :func:`fastweights.gla` with fla's optional gate.",
    "``gk [B, T, H, K]`` is optional (``None``: no decay, linear attention); ``gv`` is not "
    "supported; ``reverse=True`` runs each sequence from its last token to its first.",
    _GK,
    "fused_recurrent_gla(q, k, v, gk, output_final_state=True)",
)
def fused_recurrent_gla(
    q: Any,
    k: Any,
    v: Any,
    gk: Any = None,
    gv: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "fused_recurrent_gla"
    state_v_first = _state_v_first(name, state_v_first, kwargs)
    ours = _extras(name, kwargs, ("head_first",))
    if gv is not None:
        raise ValueError(f"{name}: gv (a per-value-channel decay) is not supported by fastweights")
    op, gates = (_fw.linear_attn, []) if gk is None else (_fw.gla, [gk])
    return _run(
        name,
        op,
        q,
        k,
        v,
        gates,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        reverse=reverse,
        state_v_first=state_v_first,
        head_first=bool(kwargs.get("head_first", False)),
    )


def _simple_gla(
    name: str,
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    g_gamma: Any,
    kwargs: dict[str, Any],
    state_v_first: bool = False,
    warn_layout: bool = False,
    **common: Any,
) -> tuple[Any, Any]:
    state_v_first = _state_v_first(name, state_v_first, kwargs)
    ours = _extras(name, kwargs, ("head_first",))
    head_first = bool(kwargs.get("head_first", False))
    if g_gamma is not None:
        g = _full_g(_xp(q), q, g, g_gamma, head_first)
    return _decay_or_plain(
        name,
        q,
        k,
        v,
        g,
        ours=ours,
        state_v_first=state_v_first,
        head_first=head_first,
        warn_layout=warn_layout,
        **common,
    )


@_doc(
    "chunk_simple_gla",
    "Scalar-gated linear attention (RetNet, Mamba2/SSD, Lightning): "
    ":func:`fastweights.simple_gla` under fla's name.",
    "``g [B, T, H]`` (per token) and ``g_gamma [H]`` (constant per head) are optional log "
    "decays, added when both are given; neither is linear attention.",
    _G,
    "chunk_simple_gla(q, k, v, g, output_final_state=True)",
)
def chunk_simple_gla(
    q: Any,
    k: Any,
    v: Any,
    g: Any = None,
    g_gamma: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _simple_gla(
        "chunk_simple_gla",
        q,
        k,
        v,
        g,
        g_gamma,
        kwargs,
        state_v_first,
        True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


@_doc(
    "fused_recurrent_simple_gla",
    "Scalar-gated linear attention, recurrent: :func:`fastweights.simple_gla` under fla's name.",
    "As :func:`chunk_simple_gla`; ``reverse=True`` runs each sequence from its last token to "
    "its first.",
    _G,
    "fused_recurrent_simple_gla(q, k, v, g, output_final_state=True)",
)
def fused_recurrent_simple_gla(
    q: Any,
    k: Any,
    v: Any,
    g: Any = None,
    g_gamma: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _simple_gla(
        "fused_recurrent_simple_gla",
        q,
        k,
        v,
        g,
        g_gamma,
        kwargs,
        state_v_first,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        reverse=reverse,
    )


@_doc(
    "fused_chunk_simple_gla",
    "Scalar-gated linear attention, fused chunks: :func:`fastweights.simple_gla` under fla's name.",
    "As :func:`chunk_simple_gla`.",
    _G,
    "fused_chunk_simple_gla(q, k, v, g, output_final_state=True)",
)
def fused_chunk_simple_gla(
    q: Any,
    k: Any,
    v: Any,
    g: Any = None,
    g_gamma: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _simple_gla(
        "fused_chunk_simple_gla",
        q,
        k,
        v,
        g,
        g_gamma,
        kwargs,
        False,
        True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


@_doc(
    "parallel_simple_gla",
    "Scalar-gated linear attention in the parallel (attention-like) form.",
    "Runs :func:`fastweights.simple_gla` with ``form='parallel'`` (the automatic form with "
    "``cu_seqlens``). Returns ``(o, None)``: ``output_attentions=True`` is not supported.",
    _G,
    "parallel_simple_gla(q, k, v, g)",
    "((1, 16, 2, 8), None)",
    "o.shape, state",
)
def parallel_simple_gla(
    q: Any,
    k: Any,
    v: Any,
    g: Any = None,
    scale: float | None = None,
    output_attentions: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "parallel_simple_gla"
    if output_attentions:
        raise ValueError(f"{name}: output_attentions=True is not supported by fastweights")
    if cu_seqlens is None:
        kwargs.setdefault("form", "parallel")
    ours = _extras(name, kwargs)
    o, _ = _decay_or_plain(
        name,
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=None,
        output_final_state=False,
        cu_seqlens=cu_seqlens,
        ours=ours,
    )
    return o, None


# --------------------------------------------------------------------------------------------
# DeltaNet and DeltaProduct


@_doc(
    "chunk_delta_rule",
    "DeltaNet: :func:`fastweights.delta_rule` under fla's name.",
    "``beta [B, T, H]`` (or ``[B, T, H, V]``) is the write strength. Unlike fla's kernel, "
    "float32 inputs are accepted.",
    _BETA,
    "chunk_delta_rule(q, k, v, beta, output_final_state=True)",
)
def chunk_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    beta: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "chunk_delta_rule"
    ours = _extras(name, kwargs, ("head_first",))
    return _run(
        name,
        _fw.delta_rule,
        q,
        k,
        v,
        [beta],
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
        head_first=bool(kwargs.get("head_first", False)),
        warn_layout=True,
    )


@_doc(
    "fused_recurrent_delta_rule",
    "DeltaNet, recurrent: :func:`fastweights.delta_rule` under fla's name.",
    "``beta`` defaults to ones, as in fla; ``scale`` must be positive.",
    _BETA,
    "fused_recurrent_delta_rule(q, k, v, beta, output_final_state=True)",
)
def fused_recurrent_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    beta: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "fused_recurrent_delta_rule"
    ours = _extras(name, kwargs, ("head_first",))
    _check_scale(scale)
    if beta is None:
        xp = _xp(q)
        beta = xp.ones(tuple(v.shape[:3]), dtype=q.dtype, device=array_api_compat.device(q))
    return _run(
        name,
        _fw.delta_rule,
        q,
        k,
        v,
        [beta],
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
        head_first=bool(kwargs.get("head_first", False)),
    )


@_doc(
    "gated_delta_product.chunk_gated_delta_product",
    "Gated DeltaProduct: :func:`fastweights.delta_product` under fla's name.",
    "``k``, ``v``, ``beta`` have ``T * num_householder`` rows (the ``n`` delta steps of "
    "token ``t`` are rows ``t*n .. t*n+n-1``); ``g [B, T, H]`` (or ``None``) decays once per "
    "token. fla exports it from ``fla.ops.gated_delta_product``.",
    "k, v = rng.standard_normal((2, 1, 32, 2, 8))\nbeta = rng.random((1, 32, 2))\n" + _G,
    "chunk_gated_delta_product(q, k, v, g, beta, 2, output_final_state=True)",
)
def chunk_gated_delta_product(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    num_householder: int,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    cp_context: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "chunk_gated_delta_product"
    kwargs["cp_context"] = cp_context
    ours = _extras(name, kwargs)

    def op(q: Any, k: Any, v: Any, beta: Any, **kw: Any) -> Any:
        return _fw.delta_product(q, k, v, beta, g=g, num_householder=num_householder, **kw)

    return _run(
        name,
        op,
        q,
        k,
        v,
        [beta],
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
        warn_layout=True,
    )


# --------------------------------------------------------------------------------------------
# DPLR, IPLR, RWKV-7


def _dplr(
    name: str,
    q: Any,
    k: Any,
    v: Any,
    a: Any,
    b: Any,
    gk: Any,
    lower_bound: float | None,
    kwargs: dict[str, Any],
    **common: Any,
) -> tuple[Any, Any]:
    if lower_bound is not None and lower_bound >= 0:
        raise ValueError(
            f"`lower_bound` must be negative (gk is a log-decay < 0), got {lower_bound}."
        )
    ours = _extras(name, kwargs, ("head_first",))
    head_first = bool(kwargs.get("head_first", False))
    return _run(name, _fw.dplr, q, k, v, [a, b, gk], ours=ours, head_first=head_first, **common)


@_doc(
    "chunk_dplr_delta_rule",
    "Diagonal plus low rank: :func:`fastweights.dplr` under fla's name.",
    "``S_t = Diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``: fla's ``a``, ``b``, "
    "``gk`` are fastweights' ``a``, ``b``, ``gk``, in the same order.",
    f"{_AB}\n{_GK}",
    "chunk_dplr_delta_rule(q, k, v, a, b, gk, output_final_state=True)",
)
def chunk_dplr_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    a: Any,
    b: Any,
    gk: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    safe_gate: bool = False,
    chunk_size: int | None = None,
    disable_recompute: bool = False,
    cp_context: Any = None,
    lower_bound: float | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    kwargs["cp_context"] = cp_context
    return _dplr(
        "chunk_dplr_delta_rule",
        q,
        k,
        v,
        a,
        b,
        gk,
        lower_bound,
        kwargs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        warn_layout=True,
    )


@_doc(
    "fused_recurrent_dplr_delta_rule",
    "Diagonal plus low rank, recurrent: :func:`fastweights.dplr` under fla's name.",
    "As :func:`chunk_dplr_delta_rule`; ``reverse=True`` runs each sequence from its last "
    "token to its first.",
    f"{_AB}\n{_GK}",
    "fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk, output_final_state=True)",
)
def fused_recurrent_dplr_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    a: Any,
    b: Any,
    gk: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _dplr(
        "fused_recurrent_dplr_delta_rule",
        q,
        k,
        v,
        a,
        b,
        gk,
        None,
        kwargs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        reverse=reverse,
    )


@_doc(
    "chunk_iplr_delta_rule",
    "Identity plus low rank: :func:`fastweights.iplr` under fla's name.",
    "``S_t = S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``.",
    _AB,
    "chunk_iplr_delta_rule(q, k, v, a, b, output_final_state=True)",
)
def chunk_iplr_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    a: Any,
    b: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "chunk_iplr_delta_rule"
    ours = _extras(name, kwargs, ("head_first",))
    return _run(
        name,
        _fw.iplr,
        q,
        k,
        v,
        [a, b],
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        head_first=bool(kwargs.get("head_first", False)),
        warn_layout=True,
    )


@_doc(
    "fused_recurrent_iplr_delta_rule",
    "Identity plus low rank, recurrent: :func:`fastweights.iplr` under fla's name.",
    "As :func:`chunk_iplr_delta_rule`; ``scale`` must be positive.",
    _AB,
    "fused_recurrent_iplr_delta_rule(q, k, v, a, b, output_final_state=True)",
)
def fused_recurrent_iplr_delta_rule(
    q: Any,
    k: Any,
    v: Any,
    a: Any,
    b: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "fused_recurrent_iplr_delta_rule"
    ours = _extras(name, kwargs)
    _check_scale(scale)
    return _run(
        name,
        _fw.iplr,
        q,
        k,
        v,
        [a, b],
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
    )


@_doc(
    "chunk_rwkv7",
    "RWKV-7 in fla's form: :func:`fastweights.dplr` with ``q = r``, ``gk = w``.",
    "fla's RWKV-7 takes DPLR's ``a`` and ``b`` directly (``a = -kk``, ``b = kk * a`` in "
    "RWKV's own terms, which :func:`fastweights.rwkv7` takes instead), and ``w`` is the log "
    "decay. ``scale`` defaults to 1.0, as in fla.",
    f"{_AB}\nw = -rng.random((1, 16, 2, 8))",
    "chunk_rwkv7(q, w, k, v, a, b, output_final_state=True)",
)
def chunk_rwkv7(
    r: Any,
    w: Any,
    k: Any,
    v: Any,
    a: Any,
    b: Any,
    scale: float = 1.0,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    safe_gate: bool = False,
    chunk_size: int | None = None,
    disable_recompute: bool = False,
    cp_context: Any = None,
    lower_bound: float | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    kwargs["cp_context"] = cp_context
    return _dplr(
        "chunk_rwkv7",
        r,
        k,
        v,
        a,
        b,
        w,
        lower_bound,
        kwargs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        warn_layout=True,
    )


@_doc(
    "fused_recurrent_rwkv7",
    "RWKV-7 in fla's form, recurrent: :func:`fastweights.dplr` with ``q = r``, ``gk = w``.",
    "As :func:`chunk_rwkv7`, but with fla's defaults here: ``scale`` ``K ** -0.5`` and "
    "``output_final_state=True``.",
    f"{_AB}\nw = -rng.random((1, 16, 2, 8))",
    "fused_recurrent_rwkv7(q, w, k, v, a, b)",
)
def fused_recurrent_rwkv7(
    r: Any,
    w: Any,
    k: Any,
    v: Any,
    a: Any,
    b: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = True,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _dplr(
        "fused_recurrent_rwkv7",
        r,
        k,
        v,
        a,
        b,
        w,
        None,
        kwargs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


@_doc(
    "rwkv7.fused_mul_recurrent_rwkv7",
    "RWKV-7 in RWKV's own terms: :func:`fastweights.rwkv7` under fla's name.",
    "``(r, w, k, v, kk, a)`` is ``fastweights.rwkv7(r, k, v, w, kk, a)``: "
    "``S_t = Diag(exp(w_t)) S_{t-1} - (kk_t * a_t) (kk_t^T S_{t-1}) + k_t v_t^T``. ``scale`` "
    "defaults to 1.0, as in fla; ``reverse=True`` runs each sequence from its last token to "
    "its first. fla exports it from ``fla.ops.rwkv7``.",
    "w = -rng.random((1, 16, 2, 8))\nkk = rng.standard_normal((1, 16, 2, 8))\n"
    "kk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)\na = rng.random((1, 16, 2, 8))",
    "fused_mul_recurrent_rwkv7(q, w, k, v, kk, a, output_final_state=True)",
)
def fused_mul_recurrent_rwkv7(
    r: Any,
    w: Any,
    k: Any,
    v: Any,
    kk: Any,
    a: Any,
    scale: float | None = 1.0,
    initial_state: Any = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "fused_mul_recurrent_rwkv7"
    ours = _extras(name, kwargs)
    return _run(
        name,
        _fw.rwkv7,
        r,
        k,
        v,
        [w, kk, a],
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        reverse=reverse,
    )


# --------------------------------------------------------------------------------------------
# linear attention, retention, lightning attention


def _linear_attn(
    name: str,
    q: Any,
    k: Any,
    v: Any,
    scale: float | None,
    initial_state: Any,
    output_final_state: bool,
    normalize: bool,
    cu_seqlens: Any,
    kwargs: dict[str, Any],
    reverse: bool = False,
    warn_layout: bool = False,
) -> tuple[Any, Any]:
    ours = _extras(name, kwargs)
    if not normalize:
        return _run(
            name,
            _fw.linear_attn,
            q,
            k,
            v,
            [],
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            ours=ours,
            reverse=reverse,
            warn_layout=warn_layout,
        )
    # fla's normalised form: state (S, z) with z [N, 1, H, K], the running sum of the keys;
    # a plain initial_state is S alone (z starts at zero); z is returned even without
    # output_final_state, as fla does.
    xp = _xp(q)
    kv_init, z_init = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
    pair = None
    if kv_init is not None or z_init is not None:
        N = (
            q.shape[0]
            if cu_seqlens is None
            else int(to_host_ints("cu_seqlens", cu_seqlens, ValueError).shape[0]) - 1
        )
        H, K, V = v.shape[2], q.shape[3], v.shape[3]
        dev, dt = array_api_compat.device(q), _gate_dtype(xp, q)
        if kv_init is None:
            kv_init = xp.zeros((N, H, K, V), dtype=dt, device=dev)
        z = (
            xp.zeros((N, H, K), dtype=dt, device=dev)
            if z_init is None
            else xp.reshape(z_init, (N, H, K))
        )
        pair = (kv_init, z)
    o, (S, z) = _run(
        name,
        _fw.linear_attn,
        q,
        k,
        v,
        [],
        scale=scale,
        initial_state=pair,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        ours=ours,
        reverse=reverse,
        warn_layout=warn_layout,
        op_kwargs={"normalize": True},
    )
    return o, (S if output_final_state else None, z[:, None])


_LA_DOC = (
    "Plain linear attention ``S_t = S_{t-1} + k_t v_t^T``. With ``normalize=True`` (the default "
    "here, as in fla) ``o_t`` is divided by ``q~_t . z_t + 1e-10``, ``z_t`` the running sum of "
    "the keys (:func:`fastweights.linear_attn` with ``normalize=True``); the state is then "
    "fla's pair ``(S, z)`` with ``z [N, 1, H, K]``, returned as ``(S or None, z)`` whatever "
    "``output_final_state`` says, and a plain ``initial_state`` is ``S`` alone."
)


@_doc(
    "chunk_linear_attn",
    "Linear attention: :func:`fastweights.linear_attn` under fla's name.",
    _LA_DOC,
    "",
    "chunk_linear_attn(q, k, v, normalize=False, output_final_state=True)",
)
def chunk_linear_attn(
    q: Any,
    k: Any,
    v: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _linear_attn(
        "chunk_linear_attn",
        q,
        k,
        v,
        scale,
        initial_state,
        output_final_state,
        normalize,
        cu_seqlens,
        kwargs,
        warn_layout=True,
    )


@_doc(
    "fused_chunk_linear_attn",
    "Linear attention, fused chunks: :func:`fastweights.linear_attn` under fla's name.",
    _LA_DOC,
    "",
    "fused_chunk_linear_attn(q, k, v, normalize=False, output_final_state=True)",
)
def fused_chunk_linear_attn(
    q: Any,
    k: Any,
    v: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _linear_attn(
        "fused_chunk_linear_attn",
        q,
        k,
        v,
        scale,
        initial_state,
        output_final_state,
        normalize,
        cu_seqlens,
        kwargs,
        warn_layout=True,
    )


@_doc(
    "fused_recurrent_linear_attn",
    "Linear attention, recurrent: :func:`fastweights.linear_attn` under fla's name.",
    "As :func:`chunk_linear_attn`, but ``normalize`` defaults to False here, as in fla; "
    "``reverse=True`` runs each sequence from its last token to its first.",
    "",
    "fused_recurrent_linear_attn(q, k, v, output_final_state=True)",
)
def fused_recurrent_linear_attn(
    q: Any,
    k: Any,
    v: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    reverse: bool = False,
    normalize: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _linear_attn(
        "fused_recurrent_linear_attn",
        q,
        k,
        v,
        scale,
        initial_state,
        output_final_state,
        normalize,
        cu_seqlens,
        kwargs,
        reverse=reverse,
    )


def _retention(name: str, q: Any, k: Any, v: Any, kwargs: dict[str, Any], **common: Any) -> Any:
    state_v_first = _state_v_first(name, common.pop("state_v_first", False), kwargs)
    ours = _extras(name, kwargs, ("head_first",))
    return _run(
        name,
        _fw.retention,
        q,
        k,
        v,
        [],
        ours=ours,
        state_v_first=state_v_first,
        head_first=bool(kwargs.get("head_first", False)),
        **common,
    )


_RET_DOC = "Multi-scale retention: ``simple_gla`` with ``g_h = log(1 - 2^(-5-h))`` per head ``h``."


@_doc(
    "chunk_retention",
    "RetNet's retention: :func:`fastweights.retention` under fla's name.",
    _RET_DOC,
    "",
    "chunk_retention(q, k, v, output_final_state=True)",
)
def chunk_retention(
    q: Any,
    k: Any,
    v: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _retention(
        "chunk_retention",
        q,
        k,
        v,
        kwargs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        warn_layout=True,
    )


@_doc(
    "fused_chunk_retention",
    "RetNet's retention, fused chunks: :func:`fastweights.retention` under fla's name.",
    _RET_DOC,
    "",
    "fused_chunk_retention(q, k, v, output_final_state=True)",
)
def fused_chunk_retention(
    q: Any,
    k: Any,
    v: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _retention(
        "fused_chunk_retention",
        q,
        k,
        v,
        kwargs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        warn_layout=True,
    )


@_doc(
    "fused_recurrent_retention",
    "RetNet's retention, recurrent: :func:`fastweights.retention` under fla's name.",
    _RET_DOC + " ``reverse=True`` runs each sequence from its last token to its first.",
    "",
    "fused_recurrent_retention(q, k, v, output_final_state=True)",
)
def fused_recurrent_retention(
    q: Any,
    k: Any,
    v: Any,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    return _retention(
        "fused_recurrent_retention",
        q,
        k,
        v,
        kwargs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        reverse=reverse,
        state_v_first=state_v_first,
    )


@_doc(
    "parallel_retention",
    "RetNet's retention in the parallel (attention-like) form.",
    _RET_DOC + " Runs with ``form='parallel'`` (the automatic form with ``cu_seqlens``). "
    "Returns ``(o, None)``: ``output_attentions=True`` is not supported.",
    "",
    "parallel_retention(q, k, v)",
    "((1, 16, 2, 8), None)",
    "o.shape, state",
)
def parallel_retention(
    q: Any,
    k: Any,
    v: Any,
    scale: float | None = None,
    output_attentions: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    name = "parallel_retention"
    if output_attentions:
        raise ValueError(f"{name}: output_attentions=True is not supported by fastweights")
    if cu_seqlens is None:
        kwargs.setdefault("form", "parallel")
    o, _ = _retention(
        name,
        q,
        k,
        v,
        kwargs,
        scale=scale,
        initial_state=None,
        output_final_state=False,
        cu_seqlens=cu_seqlens,
    )
    return o, None


def _lightning_g(q: Any, layer_idx: int, num_layers: int, head_first: bool) -> Any:
    xp = _xp(q)
    H = q.shape[1] if head_first else q.shape[2]
    h = xp.arange(H, dtype=_gate_dtype(xp, q), device=array_api_compat.device(q))
    return -(8 / H * (1 - layer_idx / num_layers)) * h


_LIGHTNING_DOC = (
    "Lightning attention (MiniMax): ``simple_gla`` with the constant per-head log decay "
    "``g_h = -(8 / H) (1 - layer_idx / num_layers) h``."
)


@_doc(
    "chunk_lightning_attn",
    "Lightning attention: :func:`fastweights.simple_gla` under fla's name.",
    _LIGHTNING_DOC,
    "",
    "chunk_lightning_attn(q, k, v, 0, 4, output_final_state=True)",
)
def chunk_lightning_attn(
    q: Any,
    k: Any,
    v: Any,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    g_gamma = _lightning_g(q, layer_idx, num_layers, bool(kwargs.get("head_first", False)))
    return _simple_gla(
        "chunk_lightning_attn",
        q,
        k,
        v,
        None,
        g_gamma,
        kwargs,
        False,
        True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


@_doc(
    "fused_recurrent_lightning_attn",
    "Lightning attention, recurrent: :func:`fastweights.simple_gla` under fla's name.",
    _LIGHTNING_DOC + " ``reverse=True`` runs each sequence from its last token to its first.",
    "",
    "fused_recurrent_lightning_attn(q, k, v, 0, 4, output_final_state=True)",
)
def fused_recurrent_lightning_attn(
    q: Any,
    k: Any,
    v: Any,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    g_gamma = _lightning_g(q, layer_idx, num_layers, bool(kwargs.get("head_first", False)))
    return _simple_gla(
        "fused_recurrent_lightning_attn",
        q,
        k,
        v,
        None,
        g_gamma,
        kwargs,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        reverse=reverse,
    )


# --------------------------------------------------------------------------------------------
# MesaNet


def chunk_mesa_net(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    lamb: Any,
    h_kk_init: Any = None,
    h_kv_init: Any = None,
    output_final_state: bool = False,
    max_CG_iteration: int = 30,  # fla's name
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Any = None,
    cu_seqlens_cpu: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any]:
    """MesaNet: :func:`fastweights.mesa_net` with fla's conjugate-gradient solver.

    ``fla.ops.chunk_mesa_net``'s signature and defaults: ``g``, ``beta`` ``[B, T, H]``,
    ``lamb [H, K]``, the two states passed and returned separately (``h_kk [N, H, K, K]``,
    ``h_kv [N, H, K, V]``), no ``scale`` (``q`` is not scaled, as in fla), and
    ``max_CG_iteration`` steps of fla's conjugate gradient (``solver="cg"``). Returns
    ``(o, h_kk, h_kv)``; the states are ``None`` unless ``output_final_state``. ``o`` has
    ``q``'s dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights import fla
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 1, 16, 2, 8))
    >>> g, beta = -rng.random((1, 16, 2)), rng.random((1, 16, 2))
    >>> lamb = np.ones((2, 8))
    >>> o, h_kk, h_kv = fla.chunk_mesa_net(
    ...     q, k, v, g, beta, lamb, output_final_state=True, use_qk_l2norm_in_kernel=True
    ... )
    >>> o.shape, h_kk.shape, h_kv.shape
    ((1, 16, 2, 8), (1, 2, 8, 8), (1, 2, 8, 8))
    """
    name = "chunk_mesa_net"
    ours = _extras(name, kwargs)
    init = None
    if h_kk_init is not None or h_kv_init is not None:
        xp = _xp(q)
        N = (
            q.shape[0]
            if cu_seqlens is None
            else int(to_host_ints("cu_seqlens", cu_seqlens, ValueError).shape[0]) - 1
        )
        H, K, V = v.shape[2], q.shape[3], v.shape[3]
        dev, dt = array_api_compat.device(q), _gate_dtype(xp, q)
        if h_kk_init is None:
            h_kk_init = xp.zeros((N, H, K, K), dtype=dt, device=dev)
        if h_kv_init is None:
            h_kv_init = xp.zeros((N, H, K, V), dtype=dt, device=dev)
        init = (h_kk_init, h_kv_init)
    o, state = _run(
        name,
        _fw.mesa_net,
        q,
        k,
        v,
        [g, beta, lamb],
        scale=1.0,
        initial_state=init,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        ours=ours,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
        warn_layout=True,
        op_kwargs={"solver": "cg", "max_cg_iterations": max_CG_iteration},
    )
    h_kk, h_kv = state if state is not None else (None, None)
    return o, h_kk, h_kv
