"""Measuring fastweights against the machine's limits: shared by ``python -m fastweights bench``
and the asv suite in ``asv_benchmarks/``.

Speeds are effective rates: the recurrent pass's ``6 K V`` FLOPs per token, head and delta step
(the least work any form does), read against the float32 matmul rate and the memory copy
bandwidth measured in the same run, and against a plain per-token NumPy loop.
"""

from __future__ import annotations

import functools
import os
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


# --- python -m fastweights bench -------------------------------------------------------------

BLAS_SPIN = 0.25
"""Seconds of idle before each measurement: OpenBLAS's threads keep spinning for 50-200 ms
after a matmul (measured on the development machine, docs/numba.md), and a kernel started
meanwhile shares its cores with them."""

ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "FASTWEIGHTS_BACKEND",
)
"""Environment variables that change the figures; the report shows those that are set."""

SCHEMA = "fastweights-bench/1"
"""The ``schema`` field of ``--json`` output; bumped when a field changes meaning."""

Shape = tuple[int, int, int, int, int]
"""``(B, T, H, K, V)``."""


def timings(
    fn: Callable[[], Any], xp: Any = np, repeat: int = 5, budget: float = float("inf")
) -> list[float]:
    """Wall times in seconds of ``repeat`` consecutive calls, device work included; fewer (at
    least one) once the calls have taken ``budget`` seconds in all."""
    out: list[float] = []
    while len(out) < repeat and (not out or sum(out) < budget):
        start = time.perf_counter()
        fn()
        synchronize(xp)
        out.append(time.perf_counter() - start)
    return out


@dataclass(frozen=True)
class Spread:
    """The median and spread of repeated measurements of one quantity."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        """The statistics of ``samples`` (at least one value)."""
        a = np.asarray(samples, dtype=float)
        q1, med, q3 = np.percentile(a, [25, 50, 75])
        return cls(float(med), float(a.min()), float(a.max()), float(q1), float(q3), tuple(samples))

    def rate(self, work: float) -> Spread:
        """``work`` per unit of these times: the median rate, and the slowest and fastest."""
        return Spread.of([work / s for s in self.samples])

    def to_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "q1": self.q1,
            "q3": self.q3,
            "samples": list(self.samples),
        }


def matmul_rates(xp: Any = np, n: int = 2048, repeat: int = 5, pause: float = BLAS_SPIN) -> Spread:
    """float32 ``n x n @ n x n`` rates in GFLOP/s over all BLAS threads: one warm-up call, a
    pause of ``pause`` seconds (the BLAS threads go idle, and nothing else of this process
    runs), then ``repeat`` timed calls; then the same pause, so that the next measurement does
    not share the cores with spinning BLAS threads."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = xp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))
    xp.matmul(a, b)
    synchronize(xp)
    time.sleep(pause)
    seconds = Spread.of(timings(lambda: xp.matmul(a, b), xp, repeat))
    time.sleep(pause)
    return seconds.rate(2 * n**3 / 1e9)


def copy_rates(xp: Any = np, nbytes: int = 256 * 2**20, repeat: int = 5) -> Spread:
    """Memory copy bandwidth, bytes read plus bytes written, GB/s, after one warm-up copy."""
    src = xp.ones(nbytes // 4, dtype=xp.float32)
    dst = xp.empty_like(src)

    def copy() -> None:
        dst[...] = src

    copy()
    return Spread.of(timings(copy, xp, repeat)).rate(2 * nbytes / 1e9)


def cpu_model() -> str:
    """The CPU's model name: ``/proc/cpuinfo``, else ``lscpu``, else :mod:`platform`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model name", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import shutil
    import subprocess

    if shutil.which("lscpu"):
        try:
            text = subprocess.run(
                ["lscpu"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        for line in text.splitlines():
            if line.strip().startswith("Model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def blas_info() -> list[dict[str, Any]]:
    """NumPy's BLAS libraries as threadpoolctl reports them (library, version, threads and
    kernel architecture), or an empty list without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("internal_api", "version", "num_threads", "architecture", "threading_layer")
    return [
        {k: lib[k] for k in keys if k in lib}
        for lib in threadpool_info()
        if lib.get("user_api") == "blas"
    ]


def machine_info() -> dict[str, Any]:
    """What the figures depend on besides the code: CPU, cores, system, versions, BLAS and
    the environment variables of :data:`ENV_VARS` that are set."""
    import platform

    from ._cli_info import fastweights_version

    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS or Windows
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastweights": fastweights_version(),
        "blas": blas_info(),
        "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }


@dataclass
class Measurement:
    """One (shape, op, backend) cell: seconds per call over the repeats, after a first call
    (compilation included) that is not counted."""

    op: str
    backend: str
    shape: Shape
    first_call_s: float
    seconds: Spread
    flops: float
    tokens: int

    def to_json(self, matmul: float, loop_tokens_per_s: float | None) -> dict[str, Any]:
        B, T, H, K, V = self.shape
        tokens = self.seconds.rate(self.tokens)
        gflops = self.seconds.rate(self.flops / 1e9)
        return {
            "op": self.op,
            "backend": self.backend,
            "form": "auto",
            "shape": {"B": B, "T": T, "H": H, "K": K, "V": V},
            "first_call_s": self.first_call_s,
            "seconds": self.seconds.to_json(),
            "tokens_per_s": tokens.to_json(),
            "gflops": gflops.to_json(),
            "percent_of_matmul": 100 * gflops.median / matmul,
            "vs_numpy_loop": (
                None if loop_tokens_per_s is None else tokens.median / loop_tokens_per_s
            ),
        }


def _shape_text(shape: Shape) -> str:
    B, T, H, K, V = shape
    kv = f"K=V={K}" if K == V else f"K={K} V={V}"
    return f"B={B} T={T} H={H} {kv}"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{_ms(seconds)} ms"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Progress:
    """``bench [i/n] label: result`` lines on ``stream``; on a terminal the label shows while
    the measurement runs (a first numba call compiles for 10-40 s)."""

    def __init__(self, stream: Any, total: int) -> None:
        self.stream, self.total, self.done = stream, total, 0

    def _head(self, label: str) -> str:
        return f"bench [{self.done + 1:>{len(str(self.total))}}/{self.total}] {label}"

    def start(self, label: str) -> None:
        if self.stream is not None and _isatty(self.stream):
            self.stream.write(f"\r\x1b[K{self._head(label)} ...")
            self.stream.flush()

    def end(self, label: str, result: str) -> None:
        if self.stream is not None:
            clear = "\r\x1b[K" if _isatty(self.stream) else ""
            self.stream.write(f"{clear}{self._head(label)}: {result}\n")
            self.stream.flush()
        self.done += 1


def _plan(
    ops: Sequence[str], backends: Sequence[str], shapes: Sequence[Shape]
) -> tuple[list[tuple[Shape, str, str, Any]], list[dict[str, str]]]:
    """The cells to measure, each with its namespace, and the skipped (op, backend) pairs."""
    cells = []
    skipped = []
    seen = set()
    for shape in shapes:
        for op in ops:
            for backend in backends:
                try:
                    xp = backend_namespace(backend, op)
                except NotImplementedError as exc:
                    if (op, backend) not in seen:
                        seen.add((op, backend))
                        skipped.append({"op": op, "backend": backend, "reason": str(exc)})
                    continue
                cells.append((shape, op, backend, xp))
    return cells, skipped


MATMUL_N = 2048
"""Size of the square float32 matmul that measures the machine's FLOP rate."""
COPY_BYTES = 256 * 2**20
"""Bytes copied to measure the memory bandwidth."""


def run_bench(
    ops: Sequence[str] = OPS,
    backends: Sequence[str] | None = None,
    shapes: Sequence[Shape] = ((1, 2048, 4, 128, 128),),
    repeats: int = 5,
    *,
    max_time: float = 30.0,
    pause: float | None = None,
    progress: Any = True,
) -> dict[str, Any]:
    """Measure the machine's limits, a per-token NumPy loop and every (shape, op, backend),
    float32, ``form="auto"``; return the report that ``--json`` writes.

    Each measurement is one untimed first call (compilation, caches), then ``repeats`` timed
    calls, or fewer (at least one) once they have taken ``max_time`` seconds; the report keeps
    every sample with its median, min, max and quartiles. The matmul
    rate is measured first and again last, each after a pause of ``pause`` seconds (default
    :data:`BLAS_SPIN`), and every measurement starts after the same pause, so that OpenBLAS's
    spinning threads do not share the cores with it. A line per measurement goes to
    ``progress``: a file, True for the current ``sys.stderr``, None or False for none.
    """
    pause = BLAS_SPIN if pause is None else pause
    if backends is None:
        backends = [b.name for b in list_backends() if b.available]
    load_before = load_average()
    cells, skipped = _plan(ops, backends, shapes)
    stream = sys.stderr if progress is True else progress or None
    bar = _Progress(stream, len(cells) + len(shapes) + 3)
    n = MATMUL_N
    mm_label = f"float32 matmul {n}^3"

    def limits(label: str, measure: Callable[[], Spread], unit: str) -> Spread:
        bar.start(label)
        out = measure()
        bar.end(label, f"{out.median:.1f} {unit} median ({out.min:.1f}-{out.max:.1f})")
        return out

    reps = max(repeats, 3)
    matmul = limits(mm_label, lambda: matmul_rates(n=n, repeat=reps, pause=pause), "GFLOP/s")
    copy = limits(
        f"memory copy {COPY_BYTES / 2**20:g} MiB",
        lambda: copy_rates(nbytes=COPY_BYTES, repeat=reps),
        "GB/s",
    )
    loops: dict[Shape, Measurement] = {}
    results: list[Measurement] = []
    for shape in shapes:
        B, T, H, K, V = shape
        label = f"gated_delta_rule / numpy loop  {_shape_text(shape)}"
        bar.start(label)
        args, _ = make_inputs("gated_delta_rule", B, T, H, K, V)
        time.sleep(pause)
        start = time.perf_counter()
        numpy_loop_gated_delta_rule(*args)
        first = time.perf_counter() - start
        secs = Spread.of(
            timings(functools.partial(numpy_loop_gated_delta_rule, *args), np, repeats, max_time)
        )
        loops[shape] = Measurement(
            "gated_delta_rule", "numpy-loop", shape, first, secs,
            flops_per_token("gated_delta_rule", H, K, V) * B * T, B * T,
        )  # fmt: skip
        bar.end(label, _result_text(secs))
        for cell_shape, op, backend, xp in cells:
            if cell_shape != shape:
                continue
            label = f"{op} / {backend}  {_shape_text(shape)}"
            bar.start(label)
            m = _measure(op, backend, shape, xp, repeats, pause, max_time)
            if isinstance(m, str):
                skipped.append({"op": op, "backend": backend, "reason": m})
                bar.end(label, f"skipped: {m}")
                continue
            results.append(m)
            bar.end(label, _result_text(m.seconds, m.first_call_s))
    matmul_after = limits(
        f"{mm_label}, again", lambda: matmul_rates(n=n, repeat=reps, pause=pause), "GFLOP/s"
    )
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "config": {
            "ops": list(ops),
            "backends": list(backends),
            "shapes": [dict(zip("BTHKV", s, strict=True)) for s in shapes],
            "repeats": repeats,
            "max_time_s": max_time,
            "dtype": "float32",
            "form": "auto",
            "pause_s": pause,
            "matmul_n": n,
            "copy_bytes": COPY_BYTES,
        },
        "limits": {
            "matmul_gflops": matmul.to_json(),
            "matmul_gflops_after": matmul_after.to_json(),
            "copy_gbs": copy.to_json(),
        },
        "numpy_loop": [
            m.to_json(matmul.median, None) | {"form": "recurrent"} for m in loops.values()
        ],
        "results": [
            r.to_json(matmul.median, loops[r.shape].seconds.rate(r.tokens).median) for r in results
        ],
        "skipped": skipped,
    }


def _result_text(seconds: Spread, first: float | None = None) -> str:
    n = len(seconds.samples)
    text = (
        f"{_duration(seconds.median)} median ({_duration(seconds.min)}-"
        f"{_duration(seconds.max)}, {n} call{'s' if n > 1 else ''})"
    )
    return text if first is None else f"{text}, first call {_duration(first)}"


def _measure(
    op: str, backend: str, shape: Shape, xp: Any, repeats: int, pause: float, max_time: float
) -> Measurement | str:
    """One cell, or the reason it could not run."""
    B, T, H, K, V = shape
    args, kwargs = make_inputs(op, B, T, H, K, V, xp)

    def call() -> Any:
        return run_op(op, args, kwargs, backend=backend)

    time.sleep(pause)
    start = time.perf_counter()
    try:
        call()  # compile, warm caches
        synchronize(xp)
    except (TypeError, ValueError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    first = time.perf_counter() - start
    seconds = Spread.of(timings(call, xp, repeats, max_time))
    flops = flops_per_token(op, H, K, V) * B * T
    return Measurement(op, backend, shape, first, seconds, flops, B * T)


def notes(report: dict[str, Any]) -> list[str]:
    """What a reader should know before trusting the figures of ``report``."""
    out = []
    env = report["machine"]["env"]
    if "OPENBLAS_CORETYPE" in env:
        out.append(
            f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} is set: OpenBLAS runs that CPU's "
            "kernels, not the ones it would pick, so the matmul rate (and the % column) may be "
            "off; compare with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m "
            "fastweights bench`"
        )
    cores = report["machine"]["usable_cores"] or 1
    loads = [x[0] for x in (report["load_average_before"], report["load_average_after"]) if x]
    if loads and max(loads) > 0.5 * cores:
        out.append(
            f"the machine was busy (1-minute load average up to {max(loads):.2f} on {cores} "
            "cores): rates are lower and noisier than on an idle machine"
        )
    before = report["limits"]["matmul_gflops"]["median"]
    after = report["limits"]["matmul_gflops_after"]["median"]
    if abs(after - before) > 0.15 * max(before, after):
        out.append(
            f"the matmul rate moved from {before:.1f} to {after:.1f} GFLOP/s during the run: "
            "something else used the cores"
        )
    return out


def format_report(report: dict[str, Any]) -> str:
    """The text of ``python -m fastweights bench``: the machine, its limits, then per shape a
    table of medians with their min-max spread."""
    m = report["machine"]
    lim = report["limits"]
    mm, mm2, cp = lim["matmul_gflops"], lim["matmul_gflops_after"], lim["copy_gbs"]
    blas = "; ".join(
        " ".join(str(b[k]) for k in ("internal_api", "version") if k in b)
        + f", {b.get('num_threads', '?')} threads, kernel {b.get('architecture', '?')}"
        for b in m["blas"]
    )
    env = " ".join(f"{k}={v}" for k, v in m["env"].items()) or "none of " + ", ".join(ENV_VARS)

    def load(x: list[float] | None) -> str:
        return "n/a" if x is None else "/".join(f"{v:.2f}" for v in x)

    cfg = report["config"]
    lines = [
        f"machine:  {m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), "
        f"{m['platform']}",
        f"versions: fastweights {m['fastweights']}, Python {m['python']}, NumPy {m['numpy']}",
        f"BLAS:     {blas or 'unknown (threadpoolctl not installed)'}",
        f"env:      {env}",
        f"load average (1/5/15 min): {load(report['load_average_before'])} before, "
        f"{load(report['load_average_after'])} after",
        f"float32 matmul {cfg['matmul_n']}^3: {mm['median']:.1f} GFLOP/s median ({mm['min']:.1f}-"
        f"{mm['max']:.1f}), BLAS threads idle before; {mm2['median']:.1f} at the end",
        f"memory copy {cfg['copy_bytes'] / 2**20:g} MiB: {cp['median']:.1f} GB/s median "
        f"({cp['min']:.1f}-{cp['max']:.1f})",
        f"float32, form='auto', per cell: one untimed first call, then the median of "
        f"{cfg['repeats']} calls (fewer past {cfg['max_time_s']:g} s; min-max); GFLOP/s counts "
        "the recurrent pass's work (6*K*V per token and head for the delta rule)",
    ]
    head = (
        f"{'op / backend':34s} {'median ms':>10s} {'min-max ms':>17s} {'tokens/s':>11s} "
        f"{'GFLOP/s':>8s} {'% matmul':>8s} {'x loop':>7s}"
    )
    for loop in report["numpy_loop"]:
        shape = tuple(loop["shape"][d] for d in "BTHKV")
        rows = [loop] + [r for r in report["results"] if r["shape"] == loop["shape"]]
        lines += ["", _shape_text(shape), head]
        base = loop["tokens_per_s"]["median"]
        for r in rows:
            s = r["seconds"]
            what = f"{r['op']}  {r['backend'].replace('-', ' ')}"
            spread = f"{_ms(s['min'])}-{_ms(s['max'])}"
            lines.append(
                f"{what:34s} {_ms(s['median']):>10s} {spread:>17s} "
                f"{r['tokens_per_s']['median']:11.0f} {r['gflops']['median']:8.2f} "
                f"{r['percent_of_matmul']:7.1f}% {r['tokens_per_s']['median'] / base:7.1f}"
            )
    if report["skipped"]:
        lines.append("")
        groups: dict[tuple[str, str], list[str]] = {}
        for s in report["skipped"]:
            groups.setdefault((s["backend"], s["reason"]), []).append(s["op"])
        lines += [f"skipped {b} for {', '.join(o)}: {r}" for (b, r), o in groups.items()]
    for note in notes(report):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: str) -> None:
    """Draw each cell's median GFLOP/s with its min-max spread, one panel per shape, beside
    the matmul rate; ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loops = report["numpy_loop"]
    fig, axes = plt.subplots(len(loops), 1, figsize=(10, 3.6 * len(loops)), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    matmul = report["limits"]["matmul_gflops"]["median"]
    for ax, loop in zip(axes[:, 0], loops, strict=True):
        rows = [r for r in report["results"] if r["shape"] == loop["shape"]]
        ops = list(dict.fromkeys(r["op"] for r in rows))
        width = 0.8 / max(len(backends), 1)
        for i, backend in enumerate(backends):
            mine = {r["op"]: r["gflops"] for r in rows if r["backend"] == backend}
            xs = [j + i * width for j, op in enumerate(ops) if op in mine]
            med = [mine[op]["median"] for op in ops if op in mine]
            err = [
                [mine[op]["median"] - mine[op]["min"] for op in ops if op in mine],
                [mine[op]["max"] - mine[op]["median"] for op in ops if op in mine],
            ]
            ax.bar(xs, med, width, yerr=err, capsize=2, label=backend)
        ax.axhline(matmul, color="k", ls="--", lw=1, label=f"float32 matmul {matmul:.0f}")
        ax.axhline(loop["gflops"]["median"], color="gray", ls=":", lw=1, label="NumPy loop")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], ops, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("GFLOP/s (median, min-max)")
        shape = tuple(loop["shape"][d] for d in "BTHKV")
        ax.set_title(f"{_shape_text(shape)}, float32, form='auto'")
        ax.legend(fontsize="small", ncols=2)
    fig.suptitle(f"fastweights bench on {report['machine']['cpu']}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    ops: Sequence[str] = OPS,
    backends: Sequence[str] | None = None,
    shapes: Sequence[Shape] = ((1, 2048, 4, 128, 128),),
    repeats: int = 5,
    json_path: str | None = None,
    plot_path: str | None = None,
    *,
    max_time: float = 30.0,
    pause: float | None = None,
) -> int:
    """Run :func:`run_bench` with progress on stderr, print :func:`format_report`, and write
    the JSON report and the figure where asked; the body of ``python -m fastweights bench``."""
    import json

    report = run_bench(ops, backends, shapes, repeats, max_time=max_time, pause=pause)
    print(format_report(report))
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {json_path}")
    if plot_path is not None:
        write_plot(report, plot_path)
        print(f"wrote {plot_path}")
    return 0
