"""The small ops around the recurrence: the short causal convolution and the gates.

Every Gated DeltaNet, Mamba2, KDA or RWKV-7 layer runs a few cheap operations before its fast
weight recurrence: a causal depthwise convolution of width ``W`` (2-4) over the projected
``q, k, v`` with a rolling state for decoding, and the parametrisations that turn projections
into log-decays and write strengths. This module has them, written once against the Array API
(NumPy, CuPy, torch, JAX, array-api-strict arrays in, the same library's arrays out) and run
by a numba kernel (parallel over rows) for NumPy arrays when numba is installed.

========================  ============================================================
function                   computes
========================  ============================================================
:func:`short_conv`         ``y_t = act(bias + sum_j weight[:, j] x_{t-W+1+j})``, causal
:func:`short_conv_step`    one token of it, updating a state pool in place
:func:`gated_delta_gate`   ``g = -exp(A_log) softplus(a + dt_bias)`` per head (GDN, Mamba2)
:func:`kda_gate`           the same per key channel (KDA), or its ``lower_bound`` form
:func:`rwkv7_decay`        ``w = -exp(-1/2) sigmoid(x)`` (RWKV-7's log-decay)
:func:`sigmoid_beta`       ``beta = sigmoid(b)`` (``2 sigmoid(b)`` with negative eigenvalues)
========================  ============================================================

Dtypes follow the ops of :mod:`fastweights`: the compute dtype is float64 when any floating
input is wider than 32 bits, else float32 (float16 and bfloat16 inputs are computed in
float32). The gates return the compute dtype; the convolution returns ``x``'s dtype and its
state in the compute dtype (a decoding pool keeps its own). Integer or complex inputs raise
``TypeError``; shapes and values ``ValueError``, naming the argument, before any work. The
caller's arrays are never modified, except a decoding pool, by design.

``backend`` (every function): ``None`` runs the numba kernel for NumPy arrays when numba is
installed and the Array API code otherwise; ``"reference"`` always runs the Array API code;
``"numba"`` insists on the kernel (``TypeError`` when it cannot run the call). These
functions are not ops of the backend registry: :func:`fastweights.use_backend` does not apply.

Examples
--------
>>> import numpy as np
>>> from fastweights import layers
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((2, 10, 8), dtype=np.float32)  # [B, T, D]
>>> weight = rng.standard_normal((8, 4), dtype=np.float32)  # [D, W]
>>> y, state = layers.short_conv(x, weight, activation="silu", output_final_state=True)
>>> y.shape, state.shape
((2, 10, 8), (2, 8, 3))
>>> g = layers.gated_delta_gate(rng.standard_normal((2, 10, 4)), np.zeros(4), np.ones(4))
>>> bool(np.all(g < 0)), g.dtype
(True, dtype('float64'))
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from ._install import install_hint
from ._pool import gather_rows, write_rows
from ._validate import (
    _check_arrays,
    _check_cu_seqlens,
    _check_flag,
    _check_indices,
    _check_writeable,
    _dims,
    _is_pool_dtype,
    _namespace,
    _unaliased,
)

Array = Any

__all__ = [
    "gated_delta_gate",
    "kda_gate",
    "rwkv7_decay",
    "short_conv",
    "short_conv_step",
    "sigmoid_beta",
]

RWKV7_DECAY_SCALE = math.exp(-0.5)
"""``exp(-1/2)``: RWKV-7's log-decay lies in ``(-exp(-1/2), 0)``."""

_ACTIVATIONS = {None: False, "silu": True, "swish": True}


# ------------------------------------------------------------------------------ checks


def _check_backend(backend: Any) -> str | None:
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(
            f"backend must be None, 'numba' or 'reference', got {type(backend).__name__}"
        )
    if backend not in ("numba", "reference"):
        raise TypeError(
            f"backend must be None, 'numba' or 'reference' for fastweights.layers, got {backend!r}"
        )
    return backend


def _check_activation(activation: Any) -> bool:
    """Whether the SiLU is applied."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(
            f"activation must be None, 'silu' or 'swish', got {type(activation).__name__}"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return _ACTIVATIONS[activation]


def _shape(name: str, x: Any) -> tuple[int, ...]:
    if type(x) is not np.ndarray:
        _namespace(name, x)
    return _dims(name, x)


def _check_rank(name: str, x: Any, rank: int, labels: str) -> tuple[int, ...]:
    shape = _shape(name, x)
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank} {labels}, got shape {shape}")
    return shape


def _expect(name: str, x: Any, expected: tuple[int, ...], labels: str) -> None:
    shape = _shape(name, x)
    if shape != expected:
        raise ValueError(f"{name} must have shape {labels} = {expected}, got {shape}")


_numba_missing: list[str] = []


def _numba_unavailable() -> str | None:
    if not _numba_missing:
        spec = importlib.util.find_spec("numba")
        _numba_missing.append(
            f"numba is not installed ({install_hint('numba')})"
            if spec is None or spec.origin is None
            else ""
        )
    return _numba_missing[0] or None


def _use_numba(backend: str | None, arrays: dict[str, Any], pool: Any = None) -> bool:
    """Whether the numba kernel runs this call (``TypeError`` if it was asked for and cannot)."""
    if backend == "reference":
        return False
    reason = _numba_unavailable()
    if reason is None:
        for name, x in arrays.items():
            if x is not None and not isinstance(x, np.ndarray | np.generic):
                reason = f"it runs numpy.ndarray inputs only, {name} is {type(x).__name__}"
                break
    if reason is None and pool is not None and not pool.dtype.isnative:
        reason = "it updates pools in native byte order only"
    if reason is not None and backend == "numba":
        raise TypeError(f"backend 'numba' cannot run this call: {reason}")
    return reason is None


# ------------------------------------------------------------------ Array API pieces


def _softplus(xp: ModuleType, z: Array) -> Array:
    """``log(1 + exp(z))`` without overflow: ``max(z, 0) + log1p(exp(-|z|))``."""
    return xp.where(z > 0, z, xp.zeros_like(z)) + xp.log1p(xp.exp(-xp.abs(z)))


def _sigmoid(xp: ModuleType, z: Array) -> Array:
    """``1 / (1 + exp(-z))`` without overflow (``e = exp(-|z|) <= 1`` on both sides)."""
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


# --------------------------------------------------------------------------- gates


def _gate(
    kind: int,
    a: Array,
    A_log: Array | None,
    dt_bias: Array | None,
    lead: tuple[int, ...],
    H: int,
    K: int,
    constant: float,
    backend: str | None,
    name: str = "a",
) -> Array:
    """The shared body of the gates: ``a`` viewed as ``[R, H, K]`` (``R`` the product of
    ``lead``), ``A_log [H]``, ``dt_bias [H, K]``.

    ``kind`` 0: ``-exp(A_log) softplus(a + dt_bias)``; 1: ``constant sigmoid(exp(A_log) (a +
    dt_bias))``; 2: ``constant sigmoid(a)``.
    """
    arrays = {name: a, "A_log": A_log, "dt_bias": dt_bias}
    xp, _, dtype = _check_arrays({n: x for n, x in arrays.items() if x is not None})
    shape = tuple(a.shape)
    R = math.prod(lead)
    if _use_numba(backend, arrays):
        from fastweights.backends.numba import conv

        out = conv.gate(kind, a, A_log, dt_bias, (R, H, K), constant, np.dtype(dtype))
        return out.reshape(shape)
    z = xp.reshape(xp.astype(a, dtype), (R, H, K))
    if dt_bias is not None:
        z = z + xp.reshape(xp.astype(dt_bias, dtype), (H, K))
    if kind == 0:
        A = xp.exp(xp.reshape(xp.astype(A_log, dtype), (H, 1)))
        out = -A * _softplus(xp, z)
    elif kind == 1:
        A = xp.exp(xp.reshape(xp.astype(A_log, dtype), (H, 1)))
        out = constant * _sigmoid(xp, A * z)
    else:
        out = constant * _sigmoid(xp, z)
    return xp.reshape(out, shape)


def gated_delta_gate(
    a: Array, A_log: Array, dt_bias: Array | None = None, *, backend: str | None = None
) -> Array:
    """Gated DeltaNet's and Mamba2's log-decay per head: ``g = -exp(A_log) softplus(a + dt_bias)``.

    The decay ``exp(g) = exp(-A dt)`` of a step of length ``dt = softplus(a + dt_bias)`` with
    rate ``A = exp(A_log)``, as Gated DeltaNet (fla's ``GatedDeltaNet``, transformers'
    ``Qwen3NextGatedDeltaNet``) and Mamba2 compute it. The result is the ``g`` of
    :func:`fastweights.gated_delta_rule` (and :func:`fastweights.simple_gla` for Mamba2's
    SSD), always ``<= 0``.

    ``softplus(z) = max(z, 0) + log1p(exp(-|z|))`` neither overflows for large ``z`` nor loses
    the small values of very negative ``z``.

    Parameters
    ----------
    a : array
        ``[..., H]``: the projection (``[B, T, H]`` for a sequence, ``[N, H]`` for a step).
    A_log : array
        ``[H]``: the log of each head's rate.
    dt_bias : array, optional
        ``[H]``: added to ``a`` before the softplus.
    backend : {None, "numba", "reference"}
        See :mod:`fastweights.layers`.

    Returns
    -------
    g : array
        ``a``'s shape; float64 when an input is wider than 32 bits, else float32.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.layers import gated_delta_gate
    >>> a = np.array([[-30.0, 0.0, 30.0]], dtype=np.float32)
    >>> gated_delta_gate(a, np.zeros(3, np.float32))  # -softplus(a)
    array([[-9.357623e-14, -6.931472e-01, -3.000000e+01]], dtype=float32)
    """
    backend = _check_backend(backend)
    shape = _shape("a", a)
    if len(shape) < 1:
        raise ValueError(f"a must have rank >= 1 [..., H], got shape {shape}")
    H = shape[-1]
    _expect("A_log", A_log, (H,), "[H]")
    if dt_bias is not None:
        _expect("dt_bias", dt_bias, (H,), "[H]")
    return _gate(0, a, A_log, dt_bias, shape[:-1], H, 1, 0.0, backend)


def kda_gate(
    a: Array,
    A_log: Array,
    dt_bias: Array | None = None,
    *,
    lower_bound: float | None = None,
    backend: str | None = None,
) -> Array:
    """KDA's log-decay per key channel: ``gk = -exp(A_log) softplus(a + dt_bias)``.

    Kimi Delta Attention's gate (fla's ``naive_kda_gate`` and ``fused_kda_gate``): the rate
    ``exp(A_log)`` is per head, ``dt_bias`` per head and key channel. With ``lower_bound`` (a
    negative number, fla's ``naive_kda_lowerbound_gate``) it is ``lower_bound * sigmoid(
    exp(A_log) (a + dt_bias))`` instead, bounded in ``(lower_bound, 0)``. The result is the
    ``gk`` of :func:`fastweights.kda`, always ``<= 0``.

    Parameters
    ----------
    a : array
        ``[..., H, K]``: the projection (``[B, T, H, K]`` for a sequence).
    A_log : array
        ``[H]``: the log of each head's rate.
    dt_bias : array, optional
        ``[H, K]``, or fla's flat ``[H * K]``: added to ``a``.
    lower_bound : float, optional
        A negative bound: the sigmoid form.
    backend : {None, "numba", "reference"}
        See :mod:`fastweights.layers`.

    Returns
    -------
    gk : array
        ``a``'s shape; float64 when an input is wider than 32 bits, else float32.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.layers import kda_gate
    >>> a = np.zeros((1, 5, 2, 4), dtype=np.float32)       # [B, T, H, K]
    >>> gk = kda_gate(a, np.log(np.array([1.0, 2.0], np.float32)))
    >>> gk[0, 0]                                           # -A * log(2)
    array([[-0.6931472, -0.6931472, -0.6931472, -0.6931472],
           [-1.3862944, -1.3862944, -1.3862944, -1.3862944]], dtype=float32)
    >>> float(kda_gate(a, np.zeros(2), lower_bound=-5.0)[0, 0, 0, 0])  # -5 * sigmoid(0)
    -2.5
    """
    backend = _check_backend(backend)
    shape = _shape("a", a)
    if len(shape) < 2:
        raise ValueError(f"a must have rank >= 2 [..., H, K], got shape {shape}")
    H, K = shape[-2:]
    _expect("A_log", A_log, (H,), "[H]")
    if dt_bias is not None:
        bias_shape = _shape("dt_bias", dt_bias)
        if bias_shape not in ((H, K), (H * K,)):
            raise ValueError(
                f"dt_bias must have shape [H, K] = {(H, K)} or [H * K] = {(H * K,)}, "
                f"got {bias_shape}"
            )
    kind, constant = 0, 0.0
    if lower_bound is not None:
        if isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real):
            raise TypeError(
                f"lower_bound must be a real number or None, got {type(lower_bound).__name__}"
            )
        if not float(lower_bound) < 0:
            raise ValueError(f"lower_bound must be negative, got {lower_bound}")
        kind, constant = 1, float(lower_bound)
    return _gate(kind, a, A_log, dt_bias, shape[:-2], H, K, constant, backend)


def rwkv7_decay(x: Array, *, backend: str | None = None) -> Array:
    """RWKV-7's log-decay: ``w = -exp(-1/2) sigmoid(x)``.

    As fla's ``RWKV7Attention`` computes it from its decay LoRA's output (``-0.6065306597126334
    * w_lora(x).sigmoid()``), the same as RWKV-7's ``exp(-exp(-softplus(-x) - 0.5))`` decay.
    The result is the ``w`` of :func:`fastweights.rwkv7`, in ``[-exp(-1/2), 0]``.

    Parameters
    ----------
    x : array
        Any shape: the decay projection (``[B, T, H, K]`` for a sequence).
    backend : {None, "numba", "reference"}
        See :mod:`fastweights.layers`.

    Returns
    -------
    w : array
        ``x``'s shape; float64 when ``x`` is wider than 32 bits, else float32.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.layers import rwkv7_decay
    >>> rwkv7_decay(np.array([-np.inf, 0.0, np.inf]))
    array([-0.        , -0.30326533, -0.60653066])
    """
    backend = _check_backend(backend)
    return _elementwise("x", x, -RWKV7_DECAY_SCALE, backend)


def sigmoid_beta(b: Array, *, allow_neg_eigval: bool = False, backend: str | None = None) -> Array:
    """The write strength ``beta = sigmoid(b)`` of the delta rules, in ``[0, 1]``.

    With ``allow_neg_eigval=True`` it is ``2 sigmoid(b)``, in ``[0, 2]`` (fla's
    ``allow_neg_eigval``: the transition ``I - beta k k^T`` may then have a negative
    eigenvalue). The result is the ``beta`` of :func:`fastweights.delta_rule`,
    :func:`fastweights.gated_delta_rule` and :func:`fastweights.kda`.

    Parameters
    ----------
    b : array
        Any shape: the projection (``[B, T, HV]``, or ``[B, T, HV, V]`` per value channel).
    allow_neg_eigval : bool
        Double it.
    backend : {None, "numba", "reference"}
        See :mod:`fastweights.layers`.

    Returns
    -------
    beta : array
        ``b``'s shape; float64 when ``b`` is wider than 32 bits, else float32.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.layers import sigmoid_beta
    >>> sigmoid_beta(np.array([-800.0, 0.0, 800.0]))
    array([0. , 0.5, 1. ])
    >>> sigmoid_beta(np.zeros(2, np.float32), allow_neg_eigval=True)
    array([1., 1.], dtype=float32)
    """
    backend = _check_backend(backend)
    double = _check_flag("allow_neg_eigval", allow_neg_eigval)
    return _elementwise("b", b, 2.0 if double else 1.0, backend)


def _elementwise(name: str, x: Array, constant: float, backend: str | None) -> Array:
    """``constant * sigmoid(x)``, ``x`` of any shape viewed as ``[R, 1, C]``."""
    shape = _shape(name, x)
    lead, C = (shape[:-1], shape[-1]) if shape else ((), 1)
    return _gate(2, x, None, None, lead, 1, C, constant, backend, name)


# -------------------------------------------------------------------- short convolution


def _conv_reference(
    xp: ModuleType,
    x: Array,
    weight: Array,
    bias: Array | None,
    silu: bool,
    state: Array | None,
    cu: np.ndarray | None,
    dtype: Any,
) -> tuple[Array, Array]:
    """The Array API convolution: outputs ``[B, T, D]`` and final states ``[N, D, W-1]``,
    both in ``dtype``."""
    T, D = int(x.shape[1]), int(x.shape[2])
    W = int(weight.shape[1])
    x = xp.astype(x, dtype)
    w = xp.astype(weight, dtype)
    prev = None if state is None else xp.permute_dims(xp.astype(state, dtype), (0, 2, 1))

    def one(xs: Array, pad: Array | None, L: int) -> tuple[Array, Array]:
        # xs [..., L, D]; pad [..., W-1, D] (the W-1 inputs before it, oldest first) or None.
        if pad is None:
            pad = xp.zeros(
                (*xs.shape[:-2], W - 1, D), dtype=dtype, device=array_api_compat.device(xs)
            )
        xe = xp.concat([pad, xs], axis=-2)
        y = w[:, 0] * xe[..., 0:L, :]
        for j in range(1, W):
            y = y + w[:, j] * xe[..., j : j + L, :]
        if bias is not None:
            y = y + xp.astype(bias, dtype)
        if silu:
            y = y * _sigmoid(xp, y)
        return y, xe[..., L : L + W - 1, :]

    if cu is None:
        y, last = one(x, prev, T)
    else:
        ys, lasts = [], []
        for n in range(cu.shape[0] - 1):
            s, e = int(cu[n]), int(cu[n + 1])
            yn, ln = one(x[0, s:e, :], None if prev is None else prev[n, ...], e - s)
            ys.append(yn)
            lasts.append(ln[None, ...])
        y = xp.concat(ys, axis=0)[None, ...]
        last = xp.concat(lasts, axis=0)
    return y, xp.permute_dims(last, (0, 2, 1))


def short_conv(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    activation: str | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> tuple[Array, Array | None]:
    """Causal depthwise convolution of width ``W`` along ``T``, with a rolling state.

    The short convolution of Gated DeltaNet, Mamba2 and KDA layers (fla's
    ``ShortConvolution``, causal-conv1d's ``causal_conv1d_fn``): channel ``d`` of token ``t``
    is ``y_t = act(bias + sum_{j=0}^{W-1} weight[d, j] x_{t-W+1+j})``, the last tap on the
    current token, the inputs before the sequence read from ``initial_state`` (zeros by
    default). ``act`` is the identity or the SiLU ``z sigmoid(z)``.

    The state of a sequence is its last ``W - 1`` inputs, ``[N, D, W-1]``, oldest first, as
    causal-conv1d keeps it (fla's ``[N, D, W]`` cache holds one older column: ours is
    ``cache[..., 1:]``). Running a sequence in pieces, each with the previous piece's final
    state, gives the outputs and state of one call; :func:`short_conv_step` continues it one
    token at a time.

    Parameters
    ----------
    x : array
        ``[B, T, D]``.
    weight : array
        ``[D, W]``, ``W >= 1`` (``ShortConvolution.weight[:, 0, :]`` of fla and torch).
    bias : array, optional
        ``[D]``.
    activation : {None, "silu", "swish"}
        ``"silu"`` (``"swish"`` is the same) applies the SiLU.
    initial_state : array, optional
        ``[N, D, W-1]``: the inputs before each sequence; zeros by default.
    output_final_state : bool
        Return the final state ``[N, D, W-1]``.
    cu_seqlens : integer array-like, optional
        Packed sequences, as in :func:`fastweights.gated_delta_rule`: ``[N+1]``, ``B == 1``;
        each sequence has its own state (an empty one passes its initial state through).
    backend : {None, "numba", "reference"}
        See :mod:`fastweights.layers`.

    Returns
    -------
    y : array
        ``[B, T, D]``, ``x``'s dtype.
    final_state : array or None
        ``[N, D, W-1]`` in the compute dtype (float64 if an input is wider than 32 bits,
        else float32) when ``output_final_state``, else None.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.layers import short_conv
    >>> x = np.arange(1.0, 6.0).reshape(1, 5, 1)           # [B, T, D]: 1 2 3 4 5
    >>> weight = np.array([[1.0, 10.0, 100.0]])            # [D, W]
    >>> y, state = short_conv(x, weight, output_final_state=True)
    >>> y[0, :, 0]                                         # 100 x_t + 10 x_{t-1} + x_{t-2}
    array([100., 210., 321., 432., 543.])
    >>> state                                              # the last W - 1 inputs
    array([[[4., 5.]]])
    >>> y2, _ = short_conv(x[:, 3:], weight, initial_state=short_conv(
    ...     x[:, :3], weight, output_final_state=True)[1])  # the same, in two pieces
    >>> y2[0, :, 0]
    array([432., 543.])
    """
    backend = _check_backend(backend)
    silu = _check_activation(activation)
    output_final_state = _check_flag("output_final_state", output_final_state)
    B, T, D = _check_rank("x", x, 3, "[B, T, D]")
    Dw, W = _check_rank("weight", weight, 2, "[D, W]")
    if Dw != D:
        raise ValueError(f"weight must have shape [D, W] with D = {D} (x.shape[2]), got {(Dw, W)}")
    if W < 1:
        raise ValueError(f"weight must have a width W >= 1 (weight.shape[1]), got {W}")
    if bias is not None:
        _expect("bias", bias, (D,), "[D]")
    cu = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, B, T)
    N = B if cu is None else int(cu.shape[0]) - 1
    if initial_state is not None:
        _expect("initial_state", initial_state, (N, D, W - 1), "[N, D, W-1]")
    arrays = {"x": x, "weight": weight, "bias": bias, "initial_state": initial_state}
    xp, _, dtype = _check_arrays({n: a for n, a in arrays.items() if a is not None})
    if _use_numba(backend, arrays):
        from fastweights.backends.numba import conv

        y, final = conv.short_conv(
            x, weight, bias, silu, initial_state, cu, N, output_final_state, np.dtype(dtype)
        )
    else:
        y, final = _conv_reference(xp, x, weight, bias, silu, initial_state, cu, dtype)
        y = xp.astype(y, x.dtype)
    return y, (final if output_final_state else None)


def short_conv_step(
    x: Array,
    weight: Array,
    conv_state: Array,
    bias: Array | None = None,
    *,
    activation: str | None = None,
    state_indices: Any = None,
    backend: str | None = None,
) -> tuple[Array, Array]:
    """One token of :func:`short_conv` per sequence, updating a pool of states in place.

    Row ``i`` of the batch reads and advances ``conv_state[state_indices[i]]`` (its last
    ``W - 1`` inputs, oldest first): ``y = act(bias + sum_{j<W-1} weight[:, j] state[:, j] +
    weight[:, W-1] x)``, then the state shifts by one and takes ``x`` as its newest column
    (causal-conv1d's ``causal_conv1d_update``). ``T`` steps give the outputs and the state of
    one :func:`short_conv` call.

    Parameters
    ----------
    x : array
        ``[N, D]``: one token per sequence.
    weight : array
        ``[D, W]``.
    conv_state : array
        The pool ``[P, D, W-1]``, float32 or float64 (its dtype is kept). Updated in place for
        NumPy, CuPy and torch (the same object is returned) and returned new for JAX; a
        read-only pool raises ``ValueError`` before anything is written. Inputs that are
        views of the pool are read before it is written.
    bias : array, optional
        ``[D]``.
    activation : {None, "silu", "swish"}
        ``"silu"`` (``"swish"`` is the same) applies the SiLU.
    state_indices : integer array-like, optional
        ``[N]`` distinct rows of the pool; default ``arange(N)`` (then ``P == N``).
    backend : {None, "numba", "reference"}
        See :mod:`fastweights.layers`.

    Returns
    -------
    y : array
        ``[N, D]``, ``x``'s dtype (computed in float64 if an input or the pool is wider than
        32 bits, else float32).
    conv_state : array
        The pool.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.layers import short_conv_step
    >>> weight = np.array([[1.0, 10.0, 100.0]])            # [D, W]
    >>> pool = np.zeros((4, 1, 2))                         # [P, D, W-1]
    >>> for t in (1.0, 2.0, 3.0):
    ...     y, pool = short_conv_step(np.array([[t]]), weight, pool, state_indices=[2])
    >>> y, pool[2]
    (array([[321.]]), array([[2., 3.]]))
    """
    backend = _check_backend(backend)
    silu = _check_activation(activation)
    N, D = _check_rank("x", x, 2, "[N, D]")
    Dw, W = _check_rank("weight", weight, 2, "[D, W]")
    if Dw != D:
        raise ValueError(f"weight must have shape [D, W] with D = {D} (x.shape[1]), got {(Dw, W)}")
    if W < 1:
        raise ValueError(f"weight must have a width W >= 1 (weight.shape[1]), got {W}")
    if bias is not None:
        _expect("bias", bias, (D,), "[D]")
    P, Dp, Wp = _check_rank("conv_state", conv_state, 3, "[P, D, W-1]")
    if (Dp, Wp) != (D, W - 1):
        raise ValueError(
            f"conv_state must have shape [P, D, W-1] with D = {D}, W - 1 = {W - 1}, got "
            f"{(P, Dp, Wp)}"
        )
    arrays = {"x": x, "weight": weight, "bias": bias, "conv_state": conv_state}
    xp, _, dtype = _check_arrays({n: a for n, a in arrays.items() if a is not None})
    if not _is_pool_dtype(conv_state, xp):
        raise TypeError(
            f"conv_state (the state pool) must be float32 or float64, got {conv_state.dtype}"
        )
    _check_writeable("conv_state", conv_state)
    idx = _check_indices(state_indices, N, P, "conv_state")
    # An input that is a view of the pool would change under the writes: read it first.
    x, weight = _unaliased(x, (conv_state,)), _unaliased(weight, (conv_state,))
    if bias is not None:
        bias = _unaliased(bias, (conv_state,))
    if _use_numba(
        backend, {"x": x, "weight": weight, "bias": bias, "conv_state": conv_state}, conv_state
    ):
        from fastweights.backends.numba import conv

        y = conv.short_conv_step(x, weight, bias, silu, conv_state, idx, np.dtype(dtype))
        return y, conv_state
    rows = xp.astype(gather_rows(xp, conv_state, idx), dtype)
    y, new = _conv_reference(xp, xp.reshape(x, (N, 1, D)), weight, bias, silu, rows, None, dtype)
    pool = write_rows(xp, conv_state, idx, new)
    return xp.astype(xp.reshape(y, (N, D)), x.dtype), pool
