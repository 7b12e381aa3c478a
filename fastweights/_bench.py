"""Measuring fastweights against the machine's limits: shared by ``python -m fastweights bench``
and the asv suite in ``asv_benchmarks/``.

Speeds are effective rates: the recurrent pass's ``6 K V`` FLOPs per token, head and delta step
(the least work any form does), read against the float32 matmul rate and the memory copy
bandwidth measured in the same run, and against a plain per-token NumPy loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _api
from ._ops import RULES
from .backends import list_backends
from .rules._rule import Arg, dims_of

OPS = tuple(RULES)
"""Every op, from the rule descriptions."""
NUM_HOUSEHOLDER = 2


def backend_namespace(backend: str, op: str, form: str | None = None, *, step: bool = False) -> Any:
    """The array namespace ``backend`` computes on; NotImplementedError if it cannot run."""
    info = {b.name: b for b in list_backends()}.get(backend)
    if info is None or not info.available:
        reason = "not registered" if info is None else info.reason
        raise NotImplementedError(f"backend {backend} is not available: {reason}")
    inner = RULES[op].parent or op
    if inner not in (info.step_ops if step else info.ops):
        raise NotImplementedError(f"{backend} does not {'decode' if step else 'implement'} {op}")
    if form not in (None, "auto") and form not in info.ops[inner]:
        raise NotImplementedError(f"{backend} has no {form} form of {op}")
    if backend == "dask":
        raise NotImplementedError(
            "the dask backend runs Dask arrays across workers: asv's DaskScaling measures it"
        )
    if backend == "cupy":
        import cupy

        return cupy
    return np


def synchronize(xp: Any) -> None:
    """Wait for queued device work (no-op for NumPy)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def best_time(fn: Callable[[], Any], xp: Any = np, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls in seconds, device work included."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(xp)
        best = min(best, time.perf_counter() - start)
    return best


def _rows_per_token(op: str) -> int:
    return NUM_HOUSEHOLDER if "num_householder" in RULES[op].option_names else 1


def flops_per_token(op: str, H: int, K: int, V: int) -> int:
    """FLOPs of the recurrent pass per token, from the rule's description
    (:meth:`~fastweights.backends.Rule.flops_per_step`): ``6 K V`` per head and step for the
    delta family, ``8 K V`` for DPLR, ``mesa_net``'s solve with its default ``"exact"`` solver
    (``K^3/3 + 2 K^2``, plus ``4 K^2 + 4 K V`` for the updates and the read),
    ``recurrent_delta_rule``'s slow net, ``srwm``'s three reads and a write of its weight."""
    return RULES[op].flops_per_step(K, V) * H * _rows_per_token(op)


def _sample(rng: np.random.Generator, arg: Arg, shape: tuple[int, ...]) -> np.ndarray:
    f32 = np.float32
    if arg.log_decay:
        return -rng.uniform(0.01, 0.1, shape).astype(f32)
    if arg.sample == "rate":
        return rng.uniform(0.0, 1.0, shape).astype(f32)
    if arg.sample == "positive":  # mesa_net's lamb, as the rule description draws it
        return rng.uniform(0.25, 1.25, shape).astype(f32)
    x = rng.standard_normal(shape, dtype=f32)
    if arg.sample == "small":  # a matrix that maps bounded vectors to bounded vectors
        return x / np.float32(np.sqrt(max(shape[-1], 1)))
    if arg.sample in ("unit", "removal"):
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
    if arg.sample == "removal":
        x *= -rng.uniform(0.0, 1.0, (*shape[:-1], 1)).astype(f32)
    return x


def make_inputs(
    op: str, B: int, T: int, H: int, K: int, V: int, xp: Any = np, seed: int = 0
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments of one float32 call of ``op``, drawn as its description says (unit-norm keys,
    gates in [-0.1, -0.01], rates in (0, 1), positive arrays in [0.25, 1.25]); ``HV = H``."""
    rule = RULES[op]
    rng = np.random.default_rng(seed)
    n = _rows_per_token(op)
    sizes = {"B": B, "T": T, "R": T * n, "H": H, "HV": H, "K": K, "V": V, "W": V + 2 * K + 4}
    arrays = {
        a.name: _sample(rng, a, tuple(sizes[d] for d in dims_of(a.shape))) for a in rule.arrays
    }
    args = tuple(arrays[name] for name in rule.positional)
    kwargs: dict[str, Any] = {a.name: arrays[a.name] for a in rule.args if a.keyword_only}
    if n > 1:
        kwargs["num_householder"] = n
    if xp is not np:
        args = tuple(xp.asarray(a) for a in args)
        kwargs = {n: xp.asarray(a) if isinstance(a, np.ndarray) else a for n, a in kwargs.items()}
    return args, kwargs


def step_inputs(
    op: str, N: int, H: int, K: int, V: int, xp: Any = np, seed: int = 0
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments of one decoding step of ``op`` for ``N`` sequences (no pool), as
    :func:`make_inputs` draws them, in the one-token layout of the rule's description (arrays
    without a token axis, ``R_q`` of ``recurrent_delta_rule``, as they are; ``srwm``'s ``W0``,
    which the pool replaces, left out)."""
    rule = RULES[op]
    args, kwargs = make_inputs(op, N, 1, H, K, V, xp, seed)
    kwargs.pop("num_householder", None)
    product = _rows_per_token(op) > 1
    templates = {a.name: dims_of(a.shape) for a in rule.arrays}
    stepless = {a.name for a in rule.arrays if not a.step}

    def token(name: str, x: Any) -> Any:
        dims = templates[name]
        if "R" in dims and product:
            return x
        return x[:, 0] if {"T", "R"} & set(dims) else x

    named = dict(zip(rule.positional, args, strict=True))
    args = tuple(token(n, named[n]) for n in rule.step_positional)
    return args, {n: token(n, x) for n, x in kwargs.items() if n not in stepless}


def step_pool(op: str, N: int, H: int, K: int, V: int, xp: Any = np) -> Any:
    """A zero float32 state pool of ``N`` rows for ``op``'s decoding step: ``[N, H, K, V]``, or
    the rule's own state layout (``srwm``'s weights ``[N, H, K, V + 2K + 4]``, the pair of
    ``recurrent_delta_rule``)."""
    sizes = {"N": N, "H": H, "HV": H, "K": K, "V": V, "W": V + 2 * K + 4}
    parts = tuple(
        xp.zeros(tuple(sizes[d] for d in dims_of(a.shape)), dtype=xp.float32)
        for a in RULES[op].state_layout()
    )
    return parts[0] if len(parts) == 1 else parts


def run_op(op: str, args: Sequence[Any], kwargs: dict[str, Any], **options: Any) -> Any:
    return getattr(_api, op)(*args, **kwargs, **options)


def numpy_loop_gated_delta_rule(q: Any, k: Any, v: Any, g: Any, beta: Any) -> tuple[Any, Any]:
    """What a user writes instead: the gated delta rule one token at a time, heads vectorised,
    in the inputs' dtype."""
    B, T, H, K = q.shape
    S = np.zeros((B, H, K, v.shape[-1]), dtype=q.dtype)
    o = np.empty_like(v)
    q = q * np.asarray(K**-0.5, dtype=q.dtype)
    for t in range(T):
        S *= np.exp(g[:, t])[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - np.einsum("bhk,bhkv->bhv", k[:, t], S))
        S += k[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def matmul_gflops(xp: Any = np, n: int = 2048) -> float:
    """float32 ``n x n @ n x n`` rate over all BLAS threads, GFLOP/s."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = xp.asarray(a.T.copy()) if xp is not np else a.T.copy()
    xp.matmul(a, b)
    return 2 * n**3 / best_time(lambda: xp.matmul(a, b), xp, repeat=5) / 1e9


def copy_gbs(xp: Any = np, nbytes: int = 256 * 2**20) -> float:
    """Memory copy bandwidth, bytes read plus bytes written, GB/s."""
    src = xp.ones(nbytes // 4, dtype=xp.float32)
    dst = xp.empty_like(src)

    def copy() -> None:
        dst[...] = src

    return 2 * nbytes / best_time(copy, xp, repeat=5) / 1e9


@dataclass
class Row:
    what: str
    tokens_per_s: float
    gflops: float


def _progress(done: int, total: int, label: str) -> None:
    if sys.stderr.isatty():
        bar = "#" * (30 * done // total)
        sys.stderr.write(f"\r[{bar:<30}] {done}/{total} {label:<40}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_bench(
    ops: Sequence[str] = ("gated_delta_rule", "delta_rule", "simple_gla", "gla"),
    T: int = 2048,
    H: int = 4,
    D: int = 128,
    repeat: int = 3,
) -> tuple[float, float, list[Row]]:
    """Machine limits and the effective rate of each (op, available backend), form auto."""
    backends = [b.name for b in list_backends() if b.available]
    plan = [(op, b) for op in ops for b in backends]
    total = len(plan) + 3
    _progress(0, total, "matmul rate")
    peak = matmul_gflops()
    _progress(1, total, "copy bandwidth")
    copy = copy_gbs()
    rows = []
    _progress(2, total, "NumPy loop")
    args, _ = make_inputs("gated_delta_rule", 1, T, H, D, D)
    seconds = best_time(lambda: numpy_loop_gated_delta_rule(*args), repeat=1)
    flops = flops_per_token("gated_delta_rule", H, D, D) * T
    rows.append(Row("gated_delta_rule  NumPy loop", T / seconds, flops / seconds / 1e9))
    for i, (op, backend) in enumerate(plan, start=3):
        _progress(i, total, f"{op} / {backend}")
        try:
            xp = backend_namespace(backend, op)
        except NotImplementedError:
            continue
        args, kwargs = make_inputs(op, 1, T, H, D, D, xp)

        def call(op: str = op, args: Any = args, kwargs: Any = kwargs, b: str = backend) -> Any:
            return run_op(op, args, kwargs, backend=b)

        call()  # compile, warm caches
        seconds = best_time(call, xp, repeat)
        flops = flops_per_token(op, H, D, D) * T
        rows.append(Row(f"{op}  {backend}", T / seconds, flops / seconds / 1e9))
    _progress(total, total, "done")
    return peak, copy, rows


def main(T: int = 2048, H: int = 4, D: int = 128) -> int:
    """Print the side-by-side table of ``python -m fastweights bench``."""
    import platform

    peak, copy, rows = run_bench(T=T, H=H, D=D)
    print(f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"float32 matmul (2048^3): {peak:8.1f} GFLOP/s   memory copy: {copy:6.1f} GB/s")
    print(f"prefill B=1 T={T} H={H} K=V={D} float32, form='auto' (6*K*V FLOPs/token/head)\n")
    base = rows[0].tokens_per_s
    print(f"{'op / backend':34s} {'tokens/s':>12s} {'GFLOP/s':>9s} {'% matmul':>9s} {'x loop':>7s}")
    for r in rows:
        print(
            f"{r.what:34s} {r.tokens_per_s:12.0f} {r.gflops:9.2f} "
            f"{100 * r.gflops / peak:8.1f}% {r.tokens_per_s / base:7.1f}"
        )
    return 0
