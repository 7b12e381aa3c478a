"""The dask backend's scaling (issue 16), measured in one run against the direct numba call.

Run ``python asv_benchmarks/dask_scaling.py`` (``--quick`` for tiny sizes, a smoke test of
under a minute). float32, H=4, K=V=128, inputs drawn by :func:`fastweights._bench.make_inputs`
(unit-norm keys, gates in [-0.1, -0.01]). Three workloads:

- one long sequence, B=1, T=2**17 (``--T``), ``gated_delta_rule`` (a "matrix" transition)
  and ``gla`` (a "diagonal" one): time blocks combined by the prefix scan, whose summaries run
  every time block but the first with V + K value columns;
- a wide batch, B=16, T=8192 (``--batch``, ``--batch-T``), ``gated_delta_rule``.

Configurations, timed in interleaved rounds (every configuration once per round, ``--repeats``
rounds, the median reported):

- ``numba 1t`` / ``numba 2t``: the direct single-process call on NumPy arrays, with
  ``numba.set_num_threads(1)`` and ``(2)``; ``numba 1t`` is the baseline of every speed-up;
- ``dask 1w 1blk``: the dask backend on a ``distributed.LocalCluster`` of one worker process
  with every array in ONE block: the cost of the Dask path itself;
- ``dask Nw``: ``N`` = 2 and 4 worker processes (``--workers``) of one thread each, the long
  sequence cut into ``N`` equal time blocks, the batch into ``N`` batch blocks (one block per
  worker);
- ``dask 2w 2:1``: two workers, the long sequence cut 2:1 (a first time block of 2T/3). The
  first time block runs from the initial state and needs no summary, so (the summaries cost
  about twice a plain run at K = V) a longer first block balances the two workers.

Workers run with ``NUMBA_NUM_THREADS=OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1`` (no
oversubscription: one thread per worker process). The inputs are persisted on each cluster
before timing (the data already lives on the workers, as in a pipeline); a timed call builds
the graph (``fastweights.<op>`` on the Dask arrays) and runs ``client.compute((o, S),
sync=True)``, which brings ``o`` and the final state back into this process. Each
configuration runs once untimed first (kernels compile here; the workers load them from
numba's on-disk cache), and its result is compared with the direct call's.

``--json FILE`` writes every figure and the machine; ``--plot FILE`` draws grouped bars of the
speed-ups, one group per workload (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import fastweights
from fastweights._bench import make_inputs

H, D = 4, 128
WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

BLAS_SPIN = 0.25
"""Seconds to wait before each timed call: OpenBLAS's threads keep spinning for 50-200 ms
after a threaded BLAS call (see numba_targets.py), and a kernel started meanwhile runs slower."""


@dataclass(frozen=True)
class Workload:
    name: str
    op: str
    B: int
    T: int
    axis: int  # the axis cut into blocks: 1 (T) for the long sequence, 0 (B) for the batch

    @property
    def tokens(self) -> int:
        return self.B * self.T

    def blocks(self, pieces: int | tuple[int, ...]) -> tuple[int, ...]:
        """Sizes along ``axis``: ``pieces`` equal blocks, or the given proportions."""
        n = self.T if self.axis == 1 else self.B
        weights = (1,) * pieces if isinstance(pieces, int) else pieces
        edges = [round(n * sum(weights[:i]) / sum(weights)) for i in range(len(weights) + 1)]
        return tuple(b - a for a, b in itertools.pairwise(edges))


@dataclass(frozen=True)
class Config:
    label: str
    threads: int = 0  # > 0: the direct numba call with this many numba threads
    workers: int = 0  # > 0: the dask backend on a cluster of this many worker processes
    pieces: int | tuple[int, ...] = 1
    long_only: bool = False


@dataclass
class Row:
    workload: str
    config: str
    times: list[float] = field(default_factory=list)
    build: list[float] = field(default_factory=list)  # of the timed calls: graph construction
    error: float = float("nan")  # relative RMS of o against the direct call
    blocks: dict[str, int] | None = None
    time_blocks: str = ""
    tasks: dict[str, list[float]] = field(default_factory=dict)
    """Of one more (untimed) call: per kind of task, its count and its seconds of compute in
    all and on the longest one (``sequence``, ``summary``, ``compose``, ``advance``,
    ``correct``, ...)."""


def configs(workers: list[int]) -> list[Config]:
    out = [Config("numba 1t", threads=1), Config("numba 2t", threads=2)]
    out.append(Config("dask 1w 1blk", workers=1, pieces=1))
    out += [Config(f"dask {n}w", workers=n, pieces=n) for n in workers if n > 1]
    if 2 in workers:
        out.append(Config("dask 2w 2:1", workers=2, pieces=(2, 1), long_only=True))
    return out


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    # Uncommitted changes to the library's code: the measured code is the working tree's.
    changed = _git("status", "--porcelain", "--", "backends", "fastweights").splitlines()
    import dask
    import distributed
    import numba

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": _threading_layer(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "fastweights": f"{fastweights.__version__} ({Path(fastweights.__file__).parent})",
        "commit": commit,
        "uncommitted": [line.split(maxsplit=1)[-1] for line in changed],
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            cwd=Path(fastweights.__file__).resolve().parent.parent,  # the measured checkout
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _threading_layer() -> str:
    import numba

    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel region has run yet
        return "not started"


def relative_rms(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / max(np.mean(ref**2), 1e-300)))


class Bench:
    """The clusters, the persisted inputs of the current workload, and the timed calls."""

    keep = False
    """Time ``client.persist`` (results left on the workers) instead of ``client.compute``."""

    def __init__(self, workers: list[int]) -> None:
        import distributed

        self.clients: dict[int, Any] = {}
        self.build: dict[str, list[float]] = {}  # seconds to build each call's graph
        self._stack = contextlib.ExitStack()
        # Each scheduler also serves HTTP (health, metrics) and warns when port 8787 is taken.
        warnings.filterwarnings("ignore", "Port .* is already in use", UserWarning)
        for n in sorted({1, *workers}):
            cluster = self._stack.enter_context(
                distributed.LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    env=WORKER_ENV,
                )
            )
            self.clients[n] = self._stack.enter_context(distributed.Client(cluster))
        self.lazy: dict[tuple[int, Any], tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def close(self) -> None:
        self._stack.close()

    def load(self, work: Workload, cfgs: list[Config]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Draw ``work``'s inputs and persist them on every cluster, chunked per config."""
        import dask.array as da
        import distributed

        self.lazy.clear()
        args, kwargs = make_inputs(work.op, work.B, work.T, H, D, D)
        for cfg in cfgs:
            if not cfg.workers:
                continue
            sizes = work.blocks(cfg.pieces)

            def chunked(x: Any, sizes: tuple[int, ...] = sizes) -> Any:
                if not isinstance(x, np.ndarray):
                    return x
                chunks = [sizes if i == work.axis else -1 for i in range(x.ndim)]
                return da.from_array(x, chunks=tuple(chunks))

            client = self.clients[cfg.workers]
            lazy_args = tuple(chunked(a) for a in args)
            lazy_kwargs = {n: chunked(x) for n, x in kwargs.items()}
            names = [n for n, x in lazy_kwargs.items() if isinstance(x, da.Array)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Sending large graph": the inputs, once
                done = client.persist([*lazy_args, *(lazy_kwargs[n] for n in names)])
            distributed.wait(done)
            lazy_args = tuple(done[: len(lazy_args)])
            lazy_kwargs = {**lazy_kwargs, **dict(zip(names, done[len(lazy_args) :], strict=True))}
            self.lazy[cfg.workers, cfg.pieces] = (lazy_args, lazy_kwargs)
        return args, kwargs

    def call(
        self, work: Workload, cfg: Config, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[[], tuple[Any, Any]]:
        op = getattr(fastweights, work.op)
        if cfg.threads:
            import numba

            def direct() -> tuple[Any, Any]:
                numba.set_num_threads(cfg.threads)
                return op(*args, **kwargs, output_final_state=True)

            return direct
        client = self.clients[cfg.workers]
        lazy_args, lazy_kwargs = self.lazy[cfg.workers, cfg.pieces]

        build = self.build.setdefault(cfg.label, [])

        def on_dask() -> tuple[Any, Any]:
            start = time.perf_counter()
            o, S = op(*lazy_args, **lazy_kwargs, output_final_state=True)
            build.append(time.perf_counter() - start)
            if self.keep:  # the results stay on the workers
                import distributed

                kept = client.persist([o, S])
                distributed.wait(kept)
                return o, S
            return tuple(client.compute((o, S), sync=True))

        return on_dask

    def tasks(self, cfg: Config, call: Callable[[], Any]) -> dict[str, list[float]]:
        """Run ``call`` once more and sum the workers' compute time by kind of task."""
        import distributed

        with distributed.get_task_stream(self.clients[cfg.workers]) as stream:
            call()
        out: dict[str, list[float]] = {}
        for task in stream.data:
            key = task["key"] if isinstance(task["key"], str) else task["key"][0]
            kind = key.split("-")[0]
            sec = sum(
                s["stop"] - s["start"] for s in task["startstops"] if s["action"] == "compute"
            )
            count, total, longest = out.get(kind, [0, 0.0, 0.0])
            out[kind] = [count + 1, total + sec, max(longest, sec)]
        return out

    def plan(self, work: Workload, cfg: Config) -> tuple[dict[str, int], str]:
        lazy_args, lazy_kwargs = self.lazy[cfg.workers, cfg.pieces]
        p = fastweights.plan(getattr(fastweights, work.op), *lazy_args, **lazy_kwargs)
        return p.params["blocks"], p.params["time_blocks"]


def measure(
    workloads: list[Workload],
    cfgs: list[Config],
    repeats: int,
    workers: list[int],
    start: float,
    keep: bool = False,
) -> list[Row]:
    rows: list[Row] = []
    bench = Bench(workers)
    print(f"# clusters started in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        for work in workloads:
            active = [c for c in cfgs if not (c.long_only and work.axis != 1)]
            if work.axis == 0:  # a batch block per worker needs B >= workers
                active = [c for c in active if not c.workers or c.workers <= work.B]
            t0 = time.perf_counter()
            args, kwargs = bench.load(work, active)
            print(
                f"# {work.name}: inputs drawn and persisted in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            calls = {c.label: bench.call(work, c, args, kwargs) for c in active}
            mine = {c.label: Row(work.name, c.label) for c in active}
            want = None
            for c in active:  # warm-up: compile, load kernels; check the result
                o, _ = calls[c.label]()
                if want is None:
                    want = np.asarray(o)
                mine[c.label].error = relative_rms(np.asarray(o), want)
                if c.workers:
                    mine[c.label].blocks, mine[c.label].time_blocks = bench.plan(work, c)
            del o, want
            for build in bench.build.values():
                build.clear()  # the warm-up's
            bench.keep = keep
            for _ in range(repeats):
                for c in active:
                    time.sleep(BLAS_SPIN)
                    t1 = time.perf_counter()
                    calls[c.label]()
                    mine[c.label].times.append(time.perf_counter() - t1)
            for label, build in bench.build.items():
                if label in mine:
                    mine[label].build = list(build)
            for c in active:
                if c.workers:
                    time.sleep(BLAS_SPIN)
                    mine[c.label].tasks = bench.tasks(c, calls[c.label])
            bench.keep = False
            rows += mine.values()
            base = statistics.median(mine["numba 1t"].times)
            for r in mine.values():
                sec = statistics.median(r.times)
                graph = f"graph {statistics.median(r.build) * 1e3:5.1f} ms, " if r.build else ""
                print(
                    f"  {r.config:14s} {sec:8.3f} s {work.tokens / sec:12,.0f} tokens/s "
                    f"{base / sec:6.2f}x  ({graph}rel. RMS of o {r.error:.1e})",
                    flush=True,
                )
                if r.tasks:
                    kinds = sorted(r.tasks.items(), key=lambda kv: -kv[1][1])
                    print(
                        "      tasks: "
                        + ", ".join(f"{k} {n:.0f}x {t * 1e3:.0f} ms" for k, (n, t, _) in kinds[:6]),
                        flush=True,
                    )
    finally:
        bench.close()
    return rows


def _rates(row: Row, rows: list[Row], workloads: list[Workload]) -> dict[str, float]:
    work = next(w for w in workloads if w.name == row.workload)
    base = next(r for r in rows if r.workload == work.name and r.config == "numba 1t")
    sec = statistics.median(row.times)
    return {
        "median_s": sec,
        "tokens_per_s": work.tokens / sec,
        "speedup": statistics.median(base.times) / sec,
    }


def table(rows: list[Row], workloads: list[Workload]) -> str:
    """Markdown: tokens/s and speed-up against ``numba 1t`` for each workload."""
    labels = list(dict.fromkeys(r.config for r in rows))
    head = "| configuration | " + " | ".join(w.name for w in workloads) + " |"
    lines = [head, "|---|" + "---:|" * len(workloads)]
    med = {(r.workload, r.config): statistics.median(r.times) for r in rows}
    for label in labels:
        cells = []
        for w in workloads:
            sec = med.get((w.name, label))
            if sec is None:
                cells.append("n/a")
                continue
            speed = med[w.name, "numba 1t"] / sec
            cells.append(f"{w.tokens / sec:,.0f} ({speed:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], workloads: list[Workload], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.config for r in rows))
    med = {(r.workload, r.config): statistics.median(r.times) for r in rows}
    fig, ax = plt.subplots(figsize=(8.0, 3.6), dpi=110)
    width = 0.8 / len(labels)
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]
    for j, label in enumerate(labels):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            if (w.name, label) in med:
                xs.append(i + (j - (len(labels) - 1) / 2) * width)
                ys.append(med[w.name, "numba 1t"] / med[w.name, label])
        bars = ax.bar(xs, ys, width, label=label, color=colors[j % len(colors)])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
    ax.set_xticks(range(len(workloads)), [f"{w.name}\nB={w.B}, T={w.T}" for w in workloads])
    ax.set_ylabel("speed-up over numba, 1 thread")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.set_ylim(0, max(2.2, ax.get_ylim()[1] * 1.15))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--T", type=int, default=2**17, help="length of the long sequence")
    parser.add_argument("--batch", type=int, default=16, help="B of the wide batch")
    parser.add_argument("--batch-T", type=int, default=8192, help="T of the wide batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--workers", default="2,4", help="worker counts beside 1, comma-separated")
    parser.add_argument("--json", help="write the figures and the machine to this file")
    parser.add_argument("--plot", help="draw the speed-ups to this image file")
    parser.add_argument("--machine", help="describe the machine (default: the CPU's name)")
    parser.add_argument(
        "--persist",
        action="store_true",
        help="time client.persist (o and S left on the workers) instead of client.compute",
    )
    ns = parser.parse_args(argv)
    if ns.quick:
        ns.T, ns.batch, ns.batch_T = 4096, 4, 1024
    workers = [int(n) for n in ns.workers.split(",") if n]
    workloads = [
        Workload("long gated_delta_rule", "gated_delta_rule", 1, ns.T, axis=1),
        Workload("long gla", "gla", 1, ns.T, axis=1),
        Workload("batch gated_delta_rule", "gated_delta_rule", ns.batch, ns.batch_T, axis=0),
    ]
    cfgs = configs(workers)
    info = machine()
    if ns.machine:
        info["description"] = ns.machine
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    dirty = f" + uncommitted {', '.join(info['uncommitted'])}" if info["uncommitted"] else ""
    print(
        f"# {info.get('description') or info['cpu']}, {info['cpus']} CPUs; "
        f"commit {info['commit']}{dirty}; numba "
        f"{info['numba']}, dask {info['dask']}; float32 H={H} K=V={D}; "
        f"{ns.repeats} rounds; load average before: {load:.2f}",
        flush=True,
    )
    start = time.perf_counter()
    rows = measure(workloads, cfgs, ns.repeats, workers, start, keep=ns.persist)
    wall = time.perf_counter() - start
    info["numba_threading_layer"] = _threading_layer()
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(table(rows, workloads))
    print(f"\n# {wall:.0f} s in all; load average after: {load_after:.2f}")
    if ns.json:
        out = {
            "machine": info,
            "load_average": [load, load_after],
            "settings": {
                "H": H,
                "K": D,
                "V": D,
                "dtype": "float32",
                "repeats": ns.repeats,
                "persist": ns.persist,
            },
            "workloads": [vars(w) | {"tokens": w.tokens} for w in workloads],
            "rows": [vars(r) | _rates(r, rows, workloads) for r in rows],
            "wall_s": wall,
        }
        Path(ns.json).write_text(json.dumps(out, indent=1) + "\n")
    if ns.plot:
        where = info.get("description") or f"{info['cpu']} ({info['cpus']} CPUs)"
        title = f"{where}, commit {info['commit']}: float32, H={H}, K=V={D}, median of {ns.repeats}"
        plot(rows, workloads, ns.plot, title)


if __name__ == "__main__":
    main()
