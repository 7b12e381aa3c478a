"""``python -m fastweights demo``: the fast weight primer's headline, computed live.

Two memory experiments, no training (SPEC.md section 6):

1. *Capacity.* Store ``N`` random pairs ``(k_i, v_i)`` (unit keys in ``K`` dimensions) with the
   Hebbian rule (:func:`fastweights.linear_attn`) and with the delta rule at ``beta = 1``
   (:func:`fastweights.delta_rule`), then read every key back from the final state,
   ``S^T k_i``. The Hebbian read carries the crosstalk of every other pair, so its relative
   error is about ``(N - 1) / K``; the delta rule's stays lower (each write corrects what the
   key recalled, and past capacity old pairs fade instead of every pair blurring).
2. *Overwriting.* Write every key twice, with two different values, and ask whether the read
   is closer to the latest value than to the first. Hebbian memory only superimposes (about
   half the keys); the delta rule with ``beta = 1`` replaces what the key recalled.

Then a throughput section times :func:`fastweights.gated_delta_rule` through every available
backend beside the per-token NumPy loop of :mod:`fastweights.testing.naive`.

Every number is measured when the demo runs; nothing is stored.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

__all__ = [
    "DemoResult",
    "MemoryResult",
    "ThroughputResult",
    "Timing",
    "memory_experiments",
    "plot_memory",
    "run_demo",
    "throughput",
]

#: Numbers of stored pairs, as fractions of the key dimension (8 ... 128 for K = 64).
N_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1, 3 / 2, 2)

EXPLANATION = """\
Neuroscience reading: a key is presynaptic activity, a value the postsynaptic target, and the
read S^T k the actual postsynaptic response. linear_attn is the Hebbian rule, dS = k v^T: it
only adds, so every stored pair leaks into every read (crosstalk ~ (N-1)/K for random unit keys:
capacity ~ K). delta_rule is the Widrow-Hoff rule, dS = beta k (v - S^T k)^T = Hebbian on the
target plus anti-Hebbian on the actual response; beta is the neuromodulatory third factor that
gates plasticity. With unit keys and beta = 1 a write replaces exactly what the key recalled,
so the delta rule can update a memory where the Hebbian rule can only superimpose."""


@dataclass(frozen=True)
class MemoryResult:
    """The two memory experiments, one entry per ``N`` in ``ns``.

    Attributes
    ----------
    key_dim : int
        ``K = V``, the key (and value) dimension.
    trials : int
        Independent memories averaged per ``N``.
    ns : tuple of int
        Numbers of stored key-value pairs.
    hebbian_error, delta_error : tuple of float
        Mean relative recall error ``||S^T k_i - v_i||^2 / ||v_i||^2`` after storing ``N``
        pairs with :func:`fastweights.linear_attn` and :func:`fastweights.delta_rule`.
    theory_error : tuple of float
        ``(N - 1) / K``, the expected Hebbian crosstalk.
    hebbian_latest, delta_latest : tuple of float
        Fraction of keys, written twice, whose read is closer to the latest value than to the
        first.
    delta_write_error : float
        Largest ``||S_t^T k_t - v_t|| / ||v_t||`` of the delta rule, read right after each
        write: zero up to rounding, the "exact overwrite" fact.
    """

    key_dim: int
    trials: int
    ns: tuple[int, ...]
    hebbian_error: tuple[float, ...]
    delta_error: tuple[float, ...]
    theory_error: tuple[float, ...]
    hebbian_latest: tuple[float, ...]
    delta_latest: tuple[float, ...]
    delta_write_error: float

    def at(self, n: int) -> dict[str, float]:
        """Return every measurement for ``N = n`` as a dict keyed by attribute name."""
        i = self.ns.index(n)
        names = ("hebbian_error", "delta_error", "theory_error", "hebbian_latest", "delta_latest")
        return {name: getattr(self, name)[i] for name in names}


@dataclass(frozen=True)
class Timing:
    """One implementation timed on the throughput problem.

    Attributes
    ----------
    name : str
        Backend name, or ``"numpy loop"`` for the per-token baseline.
    first_s : float
        Seconds of the first call (includes JIT compilation, if any).
    best_s : float
        Best of the timed repeats, in seconds.
    tokens_per_s : float
        ``B * T / best_s``.
    speedup : float
        Baseline ``best_s`` over this ``best_s``.
    rel_err : float
        Relative RMS error of ``o`` against the float64 NumPy loop.
    """

    name: str
    first_s: float
    best_s: float
    tokens_per_s: float
    speedup: float
    rel_err: float


@dataclass(frozen=True)
class ThroughputResult:
    """:func:`fastweights.gated_delta_rule` timings on one problem size.

    Attributes
    ----------
    shape : dict
        ``B, T, H, K, V`` of the problem.
    dtype : str
        Input dtype.
    repeats : int
        Timed calls per implementation (after one warm-up call).
    baseline : Timing
        The per-token NumPy loop (:func:`fastweights.testing.naive.gated_delta_rule`).
    backends : tuple of Timing
        Every available backend that ran, ``form="auto"``.
    skipped : tuple of (str, str)
        Backends not timed, with the reason.
    load_average : float or None
        The 1-minute load average when timing started (other work on the machine slows
        every number down), None where the platform has none.
    """

    shape: dict[str, int]
    dtype: str
    repeats: int
    baseline: Timing
    backends: tuple[Timing, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    load_average: float | None = None


@dataclass
class DemoResult:
    """Everything :func:`run_demo` computed."""

    memory: MemoryResult
    throughput: ThroughputResult | None = None
    plot_path: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- memory experiments


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _read(state: Any, keys: np.ndarray) -> np.ndarray:
    """``S^T k`` for a state ``[B, 1, K, V]`` and keys ``[B, N, 1, K]`` -> ``[B, N, 1, V]``."""
    return np.einsum("bhkv,bnhk->bnhv", np.asarray(state), keys)


def _relative_error(recalled: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.sum((recalled - target) ** 2, axis=-1) / np.sum(target**2, axis=-1)


def _store(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write the pairs in order with both rules; return the two final states and delta's reads.

    The reads ``o_t`` of the delta rule query each key right after its own write.
    """
    import fastweights as fw

    _, s_hebb = fw.linear_attn(keys, keys, values, scale=1.0, output_final_state=True)
    beta = np.ones(values.shape[:3], dtype=values.dtype)
    o_delta, s_delta = fw.delta_rule(keys, keys, values, beta, scale=1.0, output_final_state=True)
    return np.asarray(s_hebb), np.asarray(s_delta), np.asarray(o_delta)


def memory_experiments(
    key_dim: int = 64,
    ns: Sequence[int] | None = None,
    *,
    trials: int = 8,
    seed: int = 0,
) -> MemoryResult:
    """Run the capacity and overwrite experiments (float64, one head, ``K = V = key_dim``).

    Parameters
    ----------
    key_dim : int
        Key and value dimension ``K = V``.
    ns : sequence of int, optional
        Numbers of pairs to store; default ``key_dim`` times :data:`N_FRACTIONS`.
    trials : int
        Independent memories per ``N`` (run as the batch axis of one call), averaged.
    seed : int
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    MemoryResult

    Examples
    --------
    >>> r = memory_experiments(16, [4, 8], trials=2)
    >>> r.at(4)["delta_latest"]
    1.0
    """
    if ns is None:
        ns = [max(1, round(f * key_dim)) for f in N_FRACTIONS]
    rng = np.random.default_rng(seed)
    k_dim = v_dim = key_dim
    hebb_err: list[float] = []
    delta_err: list[float] = []
    hebb_latest: list[float] = []
    delta_latest: list[float] = []
    write_err = 0.0
    for n in ns:
        # Capacity: N distinct pairs, read back from the final state.
        keys = _unit(rng.standard_normal((trials, n, 1, k_dim)))
        values = rng.standard_normal((trials, n, 1, v_dim))
        s_hebb, s_delta, o_delta = _store(keys, values)
        hebb_err.append(float(np.mean(_relative_error(_read(s_hebb, keys), values))))
        delta_err.append(float(np.mean(_relative_error(_read(s_delta, keys), values))))
        write_err = max(write_err, float(np.sqrt(np.max(_relative_error(o_delta, values)))))

        # Overwrite: every key written twice, the second pass in a fresh random order.
        first = rng.standard_normal((trials, n, 1, v_dim))
        latest = rng.standard_normal((trials, n, 1, v_dim))
        order = rng.permuted(np.tile(np.arange(n), (trials, 1)), axis=1)[:, :, None, None]
        seq_keys = np.concatenate([keys, np.take_along_axis(keys, order, axis=1)], axis=1)
        seq_vals = np.concatenate([first, np.take_along_axis(latest, order, axis=1)], axis=1)
        s_hebb, s_delta, _ = _store(seq_keys, seq_vals)
        for state, sink in ((s_hebb, hebb_latest), (s_delta, delta_latest)):
            recalled = _read(state, keys)
            d_latest = np.sum((recalled - latest) ** 2, axis=-1)
            d_first = np.sum((recalled - first) ** 2, axis=-1)
            sink.append(float(np.mean(d_latest < d_first)))

    return MemoryResult(
        key_dim=key_dim,
        trials=trials,
        ns=tuple(int(n) for n in ns),
        hebbian_error=tuple(hebb_err),
        delta_error=tuple(delta_err),
        theory_error=tuple((n - 1) / k_dim for n in ns),
        hebbian_latest=tuple(hebb_latest),
        delta_latest=tuple(delta_latest),
        delta_write_error=write_err,
    )


def format_memory(result: MemoryResult) -> str:
    """Format both memory tables with their captions."""
    k = result.key_dim
    lines = [
        f"Table 1. Store N random pairs (unit keys, K = V = {k}), read every key back:",
        "         relative error ||S^T k_i - v_i||^2 / ||v_i||^2, mean over pairs and "
        f"{result.trials} memories",
        f"  {'N':>5}  {'N/K':>5}  {'Hebbian':>9}  {'(N-1)/K':>9}  {'delta b=1':>9}",
    ]
    for i, n in enumerate(result.ns):
        lines.append(
            f"  {n:>5}  {n / k:>5.2f}  {result.hebbian_error[i]:>9.3f}  "
            f"{result.theory_error[i]:>9.3f}  {result.delta_error[i]:>9.3f}"
        )
    lines += [
        f"  Delta rule, read right after each write: ||S_t^T k_t - v_t|| / ||v_t|| <= "
        f"{result.delta_write_error:.1e}",
        "  (with unit keys and beta = 1 a write overwrites exactly).",
        "",
        "Table 2. Write each key twice (two different values), recall the latest:",
        "         fraction of keys whose read is closer to the latest value than to the first",
        f"  {'N':>5}  {'N/K':>5}  {'Hebbian':>9}  {'delta b=1':>9}",
    ]
    for i, n in enumerate(result.ns):
        lines.append(
            f"  {n:>5}  {n / k:>5.2f}  {result.hebbian_latest[i]:>9.3f}  "
            f"{result.delta_latest[i]:>9.3f}"
        )
    return "\n".join(lines)


def plot_memory(result: MemoryResult, path: str) -> str | None:
    """Draw both experiments into ``path`` with matplotlib (no pyplot, no display needed).

    Parameters
    ----------
    result : MemoryResult
        What to draw.
    path : str
        Output file; the format follows the extension.

    Returns
    -------
    str or None
        ``path``, or None when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ns = np.asarray(result.ns)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ns, result.hebbian_error, "o-", label="Hebbian (linear_attn)")
    ax1.plot(ns, result.theory_error, "k--", label="theory (N-1)/K")
    ax1.plot(ns, result.delta_error, "s-", label="delta rule, beta=1 (delta_rule)")
    ax1.set(xlabel="stored pairs N", ylabel="relative recall error", title="Capacity")
    ax2.plot(ns, result.hebbian_latest, "o-", label="Hebbian")
    ax2.plot(ns, result.delta_latest, "s-", label="delta rule, beta=1")
    ax2.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax2.set(
        xlabel="keys N (each written twice)",
        ylabel="fraction recalling the latest value",
        title="Overwriting",
        ylim=(0, 1.05),
    )
    for ax in (ax1, ax2):
        ax.axvline(result.key_dim, color="gray", lw=0.8, ls=":")
        ax.legend()
    fig.suptitle(f"fastweights demo: associative memory in K = {result.key_dim} dimensions")
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------------ throughput


def _time_call(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Return ``(first call seconds, best of repeats seconds, result of the first call)``."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best, result


def _rel_rms(x: Any, ref: np.ndarray) -> float:
    diff = np.asarray(x, dtype=np.float64) - ref
    return float(np.linalg.norm(diff) / np.linalg.norm(ref))


def throughput(
    batch: int = 1,
    length: int = 2048,
    heads: int = 4,
    dim: int = 128,
    *,
    dtype: str = "float32",
    repeats: int = 3,
    backends: Sequence[str] | None = None,
    seed: int = 0,
) -> ThroughputResult:
    """Time :func:`fastweights.gated_delta_rule` per backend against the NumPy loop.

    Each implementation gets one warm-up call (which may compile), then ``repeats`` timed
    calls with :func:`time.perf_counter`; the best is kept.

    Parameters
    ----------
    batch, length, heads, dim : int
        ``B, T, H`` and ``K = V``.
    dtype : str
        Input dtype, ``"float32"`` or ``"float64"``.
    repeats : int
        Timed calls after the warm-up.
    backends : sequence of str, optional
        Backends to time; default every available backend that has ``gated_delta_rule``.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    ThroughputResult
    """
    import fastweights as fw
    from fastweights.testing import naive

    rng = np.random.default_rng(seed)
    shape = (batch, length, heads)
    q = _unit(rng.standard_normal((*shape, dim))).astype(dtype)
    k = _unit(rng.standard_normal((*shape, dim))).astype(dtype)
    v = rng.standard_normal((*shape, dim)).astype(dtype)
    # Gated DeltaNet-like gates: decay ~ 0.95-0.99, write strength ~ sigmoid of a normal.
    g = -np.logaddexp(0.0, -(3.5 + 0.5 * rng.standard_normal(shape))).astype(dtype)
    beta = (1.0 / (1.0 + np.exp(-rng.standard_normal(shape)))).astype(dtype)
    tokens = batch * length
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def loop() -> Any:
        return naive.gated_delta_rule(q, k, v, g, beta)[0]

    first, best, ref_o = _time_call(loop, repeats)
    ref = np.asarray(ref_o, dtype=np.float64)
    base = Timing("numpy loop", first, best, tokens / best, 1.0, 0.0)

    timings: list[Timing] = []
    skipped: list[tuple[str, str]] = []
    infos = {b.name: b for b in fw.backends.list_backends()}  # highest priority first
    names = list(backends) if backends is not None else [n for n in infos if infos[n].available]
    for name in names:
        info = infos.get(name)
        if info is None:
            skipped.append((name, "not registered"))
            continue
        if not info.available:
            skipped.append((name, str(info.reason or "unavailable")))
            continue
        if "gated_delta_rule" not in dict(getattr(info, "ops", {}) or {}):
            skipped.append((name, "has no gated_delta_rule"))
            continue

        def call(name: str = name) -> Any:
            return fw.gated_delta_rule(q, k, v, g, beta, backend=name, form="auto")[0]

        try:
            b_first, b_best, out = _time_call(call, repeats)
        except (TypeError, ValueError) as exc:  # the backend cannot run these arrays
            skipped.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        timings.append(
            Timing(name, b_first, b_best, tokens / b_best, best / b_best, _rel_rms(out, ref))
        )
    return ThroughputResult(
        shape={"B": batch, "T": length, "H": heads, "K": dim, "V": dim},
        dtype=dtype,
        repeats=repeats,
        baseline=base,
        backends=tuple(timings),
        skipped=tuple(skipped),
        load_average=load,
    )


def _cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one, else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_throughput(result: ThroughputResult) -> str:
    """Format the throughput table with the machine it was measured on."""
    s = result.shape
    cpu = _cpu_name()
    load = "" if result.load_average is None else f" (load average {result.load_average:.1f})"
    lines = [
        f"gated_delta_rule, B={s['B']} T={s['T']} H={s['H']} K=V={s['K']} {result.dtype}, "
        'form="auto"',
        f"measured now on {cpu}, {os.cpu_count()} logical cores{load}, Python "
        f"{platform.python_version()}",
        f"best of {result.repeats} calls after one warm-up call (the first call includes any JIT "
        "compilation)",
        f"  {'implementation':<22} {'first call':>11} {'best':>10} {'tokens/s':>11} "
        f"{'speed-up':>9} {'rel. err':>9}",
    ]
    for t in (result.baseline, *result.backends):
        label = t.name if t is result.baseline else f"backend={t.name}"
        err = "(oracle)" if t is result.baseline else f"{t.rel_err:.1e}"
        lines.append(
            f"  {label:<22} {t.first_s:>10.3f}s {t.best_s:>9.4f}s {t.tokens_per_s:>11,.0f} "
            f"{t.speedup:>8.1f}x {err:>9}"
        )
    lines.append(
        "  numpy loop = fastweights.testing.naive.gated_delta_rule: one Python step per token, "
        "float64"
    )
    lines.append("  rel. err = relative RMS difference of o from the numpy loop")
    for name, reason in result.skipped:
        lines.append(f"  skipped backend={name}: {reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- driver


def _warm_numba(bench: bool, backends: Sequence[str] | None) -> None:
    """Compile (or load from the cache) the numba kernels the demo runs, with a progress bar on
    stderr: the recurrent form in float64 (the memory experiments, when numba runs them) and
    float32 (the throughput section)."""
    import fastweights as fw
    from fastweights._kernel_cache import warmup
    from fastweights._registry import select
    from fastweights._validate import validate

    info = {b.name: b for b in fw.backends.list_backends()}.get("numba")
    if info is None or not info.available:
        return
    x = np.zeros((1, 2, 1, 4))
    dtypes = ["float64"] if select(validate("linear_attn", x, x, x), None).name == "numba" else []
    if bench and (backends is None or "numba" in backends):
        dtypes.append("float32")
    if dtypes:
        print("Preparing the numba kernels (compiled on the first run only):", file=sys.stderr)
        ops = ["linear_attn", "delta_rule", "gated_delta_rule"]
        warmup(ops, dtypes, ["recurrent"], progress=True)


def run_demo(
    *,
    seed: int = 0,
    quick: bool = False,
    plot: str | None = "fastweights_demo.png",
    bench: bool = True,
    trials: int | None = None,
    backends: Sequence[str] | None = None,
    size: tuple[int, int, int, int] | None = None,
    repeats: int = 3,
    out: TextIO | None = None,
) -> DemoResult:
    """Run the demo, print it and return what it measured.

    Parameters
    ----------
    seed : int
        Seed of every random draw.
    quick : bool
        Fewer memories per ``N`` and a smaller throughput problem.
    plot : str or None
        Figure path, or None for no figure.
    bench : bool
        Run the throughput section.
    trials : int, optional
        Memories per ``N`` (default 8, 4 when ``quick``).
    backends : sequence of str, optional
        Backends to time (default: every available one).
    size : (B, T, H, D), optional
        Throughput problem (default ``(1, 2048, 4, 128)``, ``(1, 512, 2, 64)`` when ``quick``).
    repeats : int
        Timed calls per implementation.
    out : file-like, optional
        Where to print (default ``sys.stdout``).

    Returns
    -------
    DemoResult
    """
    out = sys.stdout if out is None else out
    if trials is None:
        trials = 4 if quick else 8
    _warm_numba(bench, backends)
    result = DemoResult(memory_experiments(64, trials=trials, seed=seed))
    print("fastweights demo: associative memory with fast weights (no training)\n", file=out)
    print(format_memory(result.memory), file=out)
    print(f"\n{EXPLANATION}\n", file=out)

    if plot:
        result.plot_path = plot_memory(result.memory, plot)
        if result.plot_path is None:
            print("Plot skipped: matplotlib is not installed (pip install matplotlib).", file=out)
        else:
            print(f"Plot written to {result.plot_path}", file=out)

    if bench:
        if size is None:
            size = (1, 512, 2, 64) if quick else (1, 2048, 4, 128)
        b, t, h, d = size
        print("\nThroughput (measured live)", file=out)
        out.flush()
        result.throughput = throughput(b, t, h, d, repeats=repeats, backends=backends, seed=seed)
        print(format_throughput(result.throughput), file=out)
    return result
