"""``python -m fastweights gpu-check``: the ``cupy`` backend checked and timed on one GPU.

Within a wall-clock budget (``--budget``, default 315 s, compilation included; it prints its
own elapsed time), it:

1. runs ``pytest -m gpu tests/cuda`` in a subprocess (when the source tree's tests are there),
   stopped after ``--test-timeout`` seconds (default 150; ``pytest-xdist`` workers when it is
   installed, so that NVRTC compiles in parallel);
2. times a compact table, each entry as the median of ``--repeat`` runs after one warm-up
   (which compiles):

   - decoding: one ``fastweights.step.gated_delta_rule`` at B=256, H=16, K=V=128 on a float32
     state pool, against the card's measured device-to-device copy bandwidth (``cudaMemcpy``
     of 1 GiB): the step reads and writes the state once, so ``2 * state bytes / time`` over
     the copy's ``2 * bytes / time`` is its share of the copy bandwidth;
   - prefill: ``gated_delta_rule``, ``kda`` and ``dplr`` at B=1, T=8192, H=16, K=V=128 in
     every form the backend declares at run time (``backend.ops``; a form it lacks is "not
     built"), float16 inputs with a float32 state, then float32, each beside fla's
     ``chunk_*`` / ``fused_recurrent_*`` kernel on the same arrays (through DLPack) when
     ``fla`` imports, with the largest difference of the outputs;
   - the issue's targets: decoding at >= 70 % of the copy bandwidth; prefill within 2x of
     fla's ``chunk_gated_delta_rule`` and faster than its ``fused_recurrent_gated_delta_rule``.

3. writes ``gpu_check.json``, ``gpu_check.md`` (and ``gpu_tests.log``) into ``--out DIR``,
   with the card and the versions of CuPy, the CUDA runtime and driver, NVRTC, torch, triton
   and fla.

GPU times are CUDA-event times of calls queued behind a spin kernel, so that Python's dispatch
is hidden (``dispatch_hidden``); when a call synchronises, the per-call time is reported. An
entry is skipped (and says so) when too little of the budget is left for it.

``--small`` (or ``FASTWEIGHTS_CUDA_EMULATE=1``) runs the same steps end to end on NumPy arrays
through the CPU emulator with small shapes: every number is then labelled *emulated* and means
nothing as a timing. Without CuPy or a GPU (and not emulating) it says why and exits with 3.
Exit status: 0 when the tests passed (or were skipped) and none of our kernels failed, 1
otherwise, 2 for bad options, 3 when there is nothing to check.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

EMULATE_ENV = "FASTWEIGHTS_CUDA_EMULATE"
SCHEMA = "fastweights-gpu-check/1"
FULL = {
    "prefill": {"B": 1, "T": 8192, "H": 16, "K": 128, "V": 128},
    "decode": {"B": 256, "H": 16, "K": 128, "V": 128},
}
SMALL = {
    "prefill": {"B": 1, "T": 80, "H": 2, "K": 16, "V": 16},
    "decode": {"B": 4, "H": 2, "K": 16, "V": 16},
}
PREFILL_OPS = ("gated_delta_rule", "kda", "dplr")
FORMS = ("chunk", "recurrent")
DTYPES = ("float16", "float32")
FLA_KERNELS = {
    "gated_delta_rule": (
        "fla.ops.gated_delta_rule",
        {"chunk": "chunk_gated_delta_rule", "recurrent": "fused_recurrent_gated_delta_rule"},
    ),
    "kda": ("fla.ops.kda", {"chunk": "chunk_kda", "recurrent": "fused_recurrent_kda"}),
    "dplr": (
        "fla.ops.generalized_delta_rule",
        {"chunk": "chunk_dplr_delta_rule", "recurrent": "fused_recurrent_dplr_delta_rule"},
    ),
}
FLA_ARGS = {
    "gated_delta_rule": ("q", "k", "v", "g", "beta"),
    "kda": ("q", "k", "v", "g", "beta"),
    "dplr": ("q", "k", "v", "a", "b", "gk"),
}
"""fla's names of the op's arrays, passed by keyword (``fused_recurrent_gated_delta_rule``
takes ``gk`` and ``gv`` before ``beta``)."""
GATE_ARG = {"gated_delta_rule": 3, "kda": 3, "dplr": 5}
"""Position of the log-decay among the op's arrays: fla gets it as float32 (its kernels' usual
input; the float16 values converted exactly), ours in the other inputs' dtype."""
COPY_BYTES = 1 << 30
DECODE_TARGET_PCT = 70.0
PREFILL_CHUNK_FACTOR = 2.0
# Budget left (s) below which an entry is skipped: fla's Triton kernels compile and autotune
# on their first call, ours compile with NVRTC (cached on disk by CuPy after the tests).
RESERVE_OURS, RESERVE_FLA = 12.0, 45.0
OVERRUN_S = 90.0
"""Seconds past the budget after which the check writes what it has and exits (a kernel that
never returns must not eat a GPU session's time)."""
EMULATED_NOTE = (
    "EMULATED: the CUDA kernels ran on the CPU through the emulator (cudasim) with small "
    "shapes; the times below have no meaning as GPU timings."
)

_SPIN_SRC = r"""
extern "C" __global__ void fw_gpu_check_spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""


# --------------------------------------------------------------------------------------------
# Where we run: a GPU through CuPy, or the CPU emulator on NumPy arrays


class _Clock:
    """Times calls on one device; ``xp`` is the array module of our inputs."""

    emulated: bool
    xp: Any

    def sync(self) -> None:
        raise NotImplementedError

    def measure(self, fn: Callable[[], Any], repeat: int) -> dict[str, Any]:
        raise NotImplementedError

    def copy_fn(self, nbytes: int) -> tuple[Callable[[], Any], int]:
        raise NotImplementedError


class _Emulated(_Clock):
    emulated = True

    def __init__(self) -> None:
        self.xp = np

    def sync(self) -> None:
        pass

    def measure(self, fn: Callable[[], Any], repeat: int) -> dict[str, Any]:
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        ms = statistics.median(times)
        return {"ms": ms, "ms_per_call": ms, "ms_queued": None, "dispatch_hidden": None}

    def copy_fn(self, nbytes: int) -> tuple[Callable[[], Any], int]:
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        return (lambda: np.copyto(dst, src)), nbytes


class _Gpu(_Clock):
    emulated = False

    def __init__(self, cupy: Any) -> None:
        self.xp = cupy
        self._spin: Any = None

    def sync(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def _spin_for(self, ms: float) -> None:
        if self._spin is None:
            self._spin = self.xp.RawKernel(_SPIN_SRC, "fw_gpu_check_spin")
        self._spin((1,), (1,), (np.uint64(int(ms * 1e6)),))

    def measure(self, fn: Callable[[], Any], repeat: int) -> dict[str, Any]:
        cp = self.xp
        fn()  # compiles
        self.sync()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        times, host = [], []
        for _ in range(repeat):
            start.record()
            t = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t)
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        per_call = statistics.median(times)
        # Queued behind a spin kernel: while it spins, the calls are enqueued, so the events
        # time the GPU's work alone (unless a call synchronises, which the spin then shows).
        self._spin_for(min(2000.0, 2e3 * sum(host) + 5.0))
        start.record()
        for _ in range(repeat):
            fn()
        hidden = not start.done
        end.record()
        end.synchronize()
        queued = cp.cuda.get_elapsed_time(start, end) / repeat
        return {
            "ms": queued if hidden else per_call,
            "ms_per_call": per_call,
            "ms_queued": queued,
            "dispatch_hidden": hidden,
        }

    def copy_fn(self, nbytes: int) -> tuple[Callable[[], Any], int]:
        cp = self.xp
        src = cp.ones(nbytes, dtype=cp.uint8)
        dst = cp.empty_like(src)
        rt = cp.cuda.runtime
        kind = getattr(rt, "memcpyDeviceToDevice", 3)  # cudaMemcpyDeviceToDevice

        def copy() -> None:
            rt.memcpyAsync(
                dst.data.ptr, src.data.ptr, nbytes, kind, cp.cuda.get_current_stream().ptr
            )

        return copy, nbytes


def _gpu() -> tuple[Any, dict[str, Any]] | str:
    """``(cupy, card)``, or why there is no GPU to check."""
    try:
        import cupy
    except Exception as exc:
        return f"cupy is not importable ({type(exc).__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    except Exception as exc:
        return f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})"
    name = props.get("name", b"?")
    card = {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "multiprocessors": props.get("multiProcessorCount"),
        "memory_GB": round(props.get("totalGlobalMem", 0) / 1e9, 1),
        "compute_capability": f"{props.get('major')}.{props.get('minor')}",
    }
    return cupy, card


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _versions(cupy: Any | None, torch: Any | None, fla: Any | None) -> dict[str, str]:
    import fastweights

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastweights": str(fastweights.__version__),
    }
    root = Path(fastweights.__file__).resolve().parent.parent
    if (root / ".git").exists():
        with contextlib.suppress(Exception):
            out["fastweights_git"] = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
    if cupy is not None:
        out["cupy"] = cupy.__version__
        rt = cupy.cuda.runtime
        with contextlib.suppress(Exception):
            out["cuda_runtime"] = _cuda_version(rt.runtimeGetVersion())
        with contextlib.suppress(Exception):
            out["cuda_driver"] = _cuda_version(rt.driverGetVersion())
        with contextlib.suppress(Exception):
            out["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    else:
        cxx = os.environ.get("CUDASIM_CXX", "g++")
        with contextlib.suppress(Exception):
            text = subprocess.run(
                [cxx, "--version"], capture_output=True, text=True, timeout=20
            ).stdout
            out["emulator_cxx"] = text.splitlines()[0]
    if torch is not None:
        out["torch"] = torch.__version__
        if getattr(torch.version, "cuda", None):
            out["torch_cuda"] = str(torch.version.cuda)
        with contextlib.suppress(Exception):
            out["triton"] = importlib.metadata.version("triton")
    if fla is not None:
        version = getattr(fla, "__version__", None)
        if version is None:
            with contextlib.suppress(Exception):
                version = importlib.metadata.version("fla-core")
        out["fla"] = str(version or "?")
    return out


# --------------------------------------------------------------------------------------------
# fla (flash-linear-attention), when it imports


def _import_fla() -> tuple[Any, Any, dict[str, Any]] | str:
    """``(torch, fla, {op: module of its kernels})``, or why not."""
    if importlib.util.find_spec("fla") is None:
        return "fla is not installed"
    try:
        import torch
    except Exception as exc:
        return f"torch is not importable ({type(exc).__name__})"
    modules: dict[str, Any] = {}
    try:
        for op, (name, _) in FLA_KERNELS.items():
            modules[op] = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "fla":
            return f"fla is not importable ({exc})"
        return _import_fla_ops_alone(torch, exc)
    except Exception as exc:
        return _import_fla_ops_alone(torch, exc)
    return torch, sys.modules["fla"], modules


def _import_fla_ops_alone(
    torch: Any, first: BaseException
) -> tuple[Any, Any, dict[str, Any]] | str:
    """fla's ``__init__`` imports its layers and models (transformers); when that fails, its
    kernels are imported under a bare ``fla`` package that skips it."""
    spec = importlib.util.find_spec("fla") if "fla" not in sys.modules else None
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    if not where:
        found = sys.modules.get("fla")
        where = list(getattr(found, "__path__", []) or [])
    if not where:
        return f"fla is not importable ({type(first).__name__}: {first})"
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        del sys.modules[name]
    bare = types.ModuleType("fla")
    bare.__path__ = where
    with contextlib.suppress(Exception):
        bare.__version__ = importlib.metadata.version("fla-core")  # type: ignore[attr-defined]
    sys.modules["fla"] = bare
    try:
        modules = {op: importlib.import_module(name) for op, (name, _) in FLA_KERNELS.items()}
    except Exception as exc:
        return f"fla is not importable ({type(first).__name__}: {first}; {type(exc).__name__})"
    return torch, bare, modules


# --------------------------------------------------------------------------------------------
# Inputs


def _unit(xp: Any, x: Any) -> Any:
    return x / xp.sqrt((x * x).sum(axis=-1, keepdims=True))


def _prefill_inputs(xp: Any, op: str, s: dict[str, int], dtype: str) -> tuple[Any, ...]:
    """``(q, k, v, *gates)`` of ``op`` in ``dtype`` (fla's argument order too)."""
    rng = xp.random.default_rng(1)
    B, T, H, K, V = s["B"], s["T"], s["H"], s["K"], s["V"]
    f32 = xp.float32

    def normal(*shape: int) -> Any:
        return rng.standard_normal(shape, dtype=f32)

    def uniform(*shape: int) -> Any:
        return rng.random(shape, dtype=f32)

    q, k, v = normal(B, T, H, K), _unit(xp, normal(B, T, H, K)), normal(B, T, H, V)
    arrays: tuple[Any, ...]
    if op == "gated_delta_rule":
        arrays = (q, k, v, -0.1 * uniform(B, T, H), uniform(B, T, H))
    elif op == "kda":
        arrays = (q, k, v, -0.1 * uniform(B, T, H, K), uniform(B, T, H))
    else:  # dplr, as RWKV-7 uses it: a = -kk, b = kk * a_coef (a generalised delta rule)
        kk = _unit(xp, normal(B, T, H, K))
        a_coef = uniform(B, T, H, 1)
        arrays = (q, k, v, -kk, kk * a_coef, -0.1 * uniform(B, T, H, K))
    return tuple(x.astype(getattr(xp, dtype)) for x in arrays)


def _decode_inputs(xp: Any, s: dict[str, int]) -> tuple[Any, ...]:
    rng = xp.random.default_rng(2)
    B, H, K, V = s["B"], s["H"], s["K"], s["V"]
    f32 = xp.float32
    q = rng.standard_normal((B, H, K), dtype=f32)
    k = _unit(xp, rng.standard_normal((B, H, K), dtype=f32))
    v = rng.standard_normal((B, H, V), dtype=f32)
    g = -0.1 * rng.random((B, H), dtype=f32)
    beta = rng.random((B, H), dtype=f32)
    return q, k, v, g, beta


# --------------------------------------------------------------------------------------------
# The check


def _bytes(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _label(shape: dict[str, int]) -> str:
    return " ".join(f"{n}={x}" for n, x in shape.items())


class _Check:
    def __init__(self, args: argparse.Namespace, clock: _Clock, t0: float) -> None:
        self.args = args
        self.clock = clock
        self.xp = clock.xp
        self.t0 = t0
        self.deadline = t0 + args.budget
        self.shapes = SMALL if clock.emulated else FULL
        self.failed: list[str] = []
        self.partial: dict[str, Any] = {}
        """What the steps have so far (for a report written when the check overruns)."""
        fla = "not asked (--no-fla)" if args.no_fla else _import_fla()
        self.fla_reason = fla if isinstance(fla, str) else None
        self.torch: Any = None
        self.fla: Any = None
        self.fla_modules: dict[str, Any] = {}
        if not isinstance(fla, str):
            self.torch, self.fla, self.fla_modules = fla
        self._torch_stream: Any = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def _budget_skip(self, reserve: float) -> str | None:
        if self.left() < reserve:
            return f"skipped (time budget: {max(0.0, self.left()):.0f} s left)"
        return None

    # ----- torch / fla on our arrays

    def _to_torch(self, x: Any) -> Any:
        return self.torch.from_dlpack(x)

    def _torch_call(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Run torch work on our stream, so that one set of events times both."""
        torch = self.torch
        if self.clock.emulated or torch is None:
            return fn
        ptr = self.xp.cuda.get_current_stream().ptr
        if torch.cuda.current_stream().cuda_stream == ptr:
            return fn
        if self._torch_stream is None:
            self._torch_stream = torch.cuda.ExternalStream(ptr)

        def on_stream() -> Any:
            with torch.cuda.stream(self._torch_stream):
                return fn()

        return on_stream

    def _rel_diff(self, ours: Any, theirs: Any) -> float:
        """``max |ours - theirs| / max |theirs|`` in float32 (torch)."""
        torch = self.torch
        a = self._to_torch(ours).to(torch.float32)
        b = theirs.to(device=a.device, dtype=torch.float32)
        scale = float(b.abs().max())
        return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)

    def _timed(self, fn: Callable[[], Any], reserve: float) -> dict[str, Any]:
        skip = self._budget_skip(reserve)
        if skip:
            return {"status": skip}
        try:
            return {"status": "ok", **self.clock.measure(fn, self.args.repeat)}
        except TypeError as exc:  # a backend named explicitly that cannot take the call
            return {"status": "rejected", "error": f"{exc}"[:500]}
        except Exception as exc:
            return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}

    # ----- decoding

    def decode(self) -> dict[str, Any]:
        import fastweights.step

        xp, s = self.xp, self.shapes["decode"]
        q, k, v, g, beta = _decode_inputs(xp, s)
        pool = xp.zeros((s["B"], s["H"], s["K"], s["V"]), dtype=xp.float32)
        state_bytes = 2 * pool.nbytes  # read and written once per step
        nbytes = pool.nbytes if self.clock.emulated else max(pool.nbytes, COPY_BYTES)
        copy, moved = self.clock.copy_fn(nbytes)
        rows: list[dict[str, Any]] = []
        self.partial["decode"] = result = {
            "shape": s,
            "state_bytes_per_step": state_bytes,
            "copy_GBps": None,
            "rows": rows,
        }
        row: dict[str, Any] = {
            "what": f"device-to-device copy ({_bytes(moved)})",
            "impl": "copy",
        }
        row.update(self._timed(copy, 0.0))
        copy_gbps = 2 * moved / 1e6 / row["ms"] if row["status"] == "ok" else None
        result["copy_GBps"] = copy_gbps
        if row["status"] == "ok":
            row.update(GBps=copy_gbps, pct_of_copy=100.0)
        rows.append(row)
        del copy

        def add(row: dict[str, Any]) -> None:
            if row["status"] == "ok":
                row["GBps"] = state_bytes / 1e6 / row["ms"]
                if copy_gbps:
                    row["pct_of_copy"] = 100.0 * row["GBps"] / copy_gbps
            rows.append(row)

        row = {
            "what": "fastweights.step.gated_delta_rule (cupy, float32 inputs and pool)",
            "impl": "fastweights",
        }
        row.update(
            self._timed(
                lambda: fastweights.step.gated_delta_rule(q, k, v, g, beta, pool, backend="cupy"),
                RESERVE_OURS,
            )
        )
        if row["status"] == "error":
            self.failed.append("decode: " + row["error"])
        add(row)
        name = "fused_recurrent_gated_delta_rule"
        row = {"what": f"fla {name} (T=1, float32 inputs and state)", "impl": "fla"}
        if self.torch is None:
            row["status"] = f"fla not run: {self.fla_reason}"
        else:
            fn = getattr(self.fla_modules["gated_delta_rule"], name)
            names = FLA_ARGS["gated_delta_rule"]
            t = {
                n: self._to_torch(x)[:, None]
                for n, x in zip(names, (q, k, v, g, beta), strict=True)
            }
            h0 = self._to_torch(xp.zeros_like(pool))
            row.update(
                self._timed(
                    self._torch_call(lambda: fn(**t, initial_state=h0, output_final_state=True)),
                    RESERVE_FLA,
                )
            )
        add(row)
        return result

    # ----- prefill

    def prefill(self) -> dict[str, Any]:
        from fastweights.backends import get_backend

        declared = {op: tuple(get_backend("cupy").ops.get(op, ())) for op in PREFILL_OPS}
        rows: list[dict[str, Any]] = []
        shape = self.shapes["prefill"]
        result = {"shape": shape, "state": "float32", "declared_forms": declared, "rows": rows}
        self.partial["prefill"] = result
        for dtype in DTYPES:
            for op in PREFILL_OPS:
                try:
                    rows += self._prefill_op(op, dtype, declared[op])
                except Exception as exc:  # inputs or conversions: the others still run
                    self.failed.append(f"{op} {dtype}: {type(exc).__name__}: {exc}")
        return result

    def _prefill_op(self, op: str, dtype: str, forms: tuple[str, ...]) -> list[dict[str, Any]]:
        """The rows of ``op`` with ``dtype`` inputs: ours and fla's, chunk then recurrent."""
        import fastweights

        xp, s = self.xp, self.shapes["prefill"]
        tokens = s["B"] * s["T"]
        args = _prefill_inputs(xp, op, s, dtype)
        h0 = xp.zeros((s["B"], s["H"], s["K"], s["V"]), dtype=xp.float32)
        targs: Any = None
        th0: Any = None
        if self.torch is not None:
            tlist = [self._to_torch(x) for x in args]
            gate = GATE_ARG[op]
            tlist[gate] = tlist[gate].to(self.torch.float32)
            targs = dict(zip(FLA_ARGS[op], tlist, strict=True))
            th0 = self._to_torch(h0)
        outputs: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        for form in FORMS:
            row: dict[str, Any] = {"op": op, "form": form, "inputs": dtype}
            ours: dict[str, Any] = {"status": "not built"}
            if form in forms:
                fn = getattr(fastweights, op)

                def call(fn: Any = fn, form: str = form) -> Any:
                    return fn(
                        *args, initial_state=h0, output_final_state=True, backend="cupy", form=form
                    )

                ours = self._timed(call, RESERVE_OURS)
                if ours["status"] == "ok":
                    ours["Mtok_s"] = tokens * 1e-3 / ours["ms"]
                    outputs[form] = call()[0]
                elif ours["status"] == "error":
                    self.failed.append(f"{op} {form} {dtype}: {ours['error']}")
            row["fastweights"] = ours
            name = FLA_KERNELS[op][1][form]
            theirs: dict[str, Any] = {"kernel": name}
            if self.torch is None:
                theirs["status"] = f"fla not run: {self.fla_reason}"
            else:
                kernel = getattr(self.fla_modules[op], name)

                def fla_call(kernel: Any = kernel) -> Any:
                    return kernel(**targs, initial_state=th0, output_final_state=True)

                theirs.update(self._timed(self._torch_call(fla_call), RESERVE_FLA))
                if theirs["status"] == "ok":
                    theirs["Mtok_s"] = tokens * 1e-3 / theirs["ms"]
                    if ours["status"] == "ok":
                        row["ours_over_fla"] = ours["ms"] / theirs["ms"]
                        o_fla = self._torch_call(fla_call)()[0]
                        row["rel_diff_vs_fla"] = self._rel_diff(outputs[form], o_fla)
                        del o_fla
            row["fla"] = theirs
            rows.append(row)
        if "chunk" in outputs and "recurrent" in outputs:
            a, b = (outputs[f].astype(xp.float32) for f in ("chunk", "recurrent"))
            scale = float(xp.abs(b).max()) or 1.0
            rows[FORMS.index("chunk")]["rel_diff_chunk_vs_recurrent"] = (
                float(xp.abs(a - b).max()) / scale
            )
        return rows

    def reference_chunk(self) -> dict[str, Any]:
        """The reference backend's Array API chunk form on the same arrays (cuBLAS on a GPU):
        what ``form="chunk"`` ran on CuPy arrays before the backend had chunk kernels."""
        import fastweights

        s = self.shapes["prefill"]
        args = _prefill_inputs(self.xp, "gated_delta_rule", s, "float32")
        row: dict[str, Any] = {
            "what": "gated_delta_rule, reference backend, chunk form, float32",
            "impl": "reference",
        }
        row.update(
            self._timed(
                lambda: fastweights.gated_delta_rule(*args, backend="reference", form="chunk"),
                RESERVE_OURS,
            )
        )
        if row["status"] == "ok":
            row["Mtok_s"] = s["B"] * s["T"] * 1e-3 / row["ms"]
        return row


def _targets(
    decode: dict[str, Any] | None, prefill: dict[str, Any] | None, emulated: bool
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def verdict(ok: bool | None, why: str = "") -> str:
        if emulated:
            return "unmeasured (emulated)"
        if ok is None:
            return f"unmeasured ({why})" if why else "unmeasured"
        return "met" if ok else "missed"

    pct = None
    if decode is not None:
        ours = [r for r in decode["rows"] if r.get("impl") == "fastweights"]
        pct = ours[0].get("pct_of_copy") if ours else None
    out.append(
        {
            "target": f"decode step >= {DECODE_TARGET_PCT:.0f} % of copy bandwidth",
            "value": None if pct is None else round(pct, 1),
            "verdict": verdict(None if pct is None else pct >= DECODE_TARGET_PCT, "not timed"),
        }
    )
    rows = [] if prefill is None else [r for r in prefill["rows"] if r["op"] == "gated_delta_rule"]
    for dtype in DTYPES:
        mine = [
            r["fastweights"]["ms"]
            for r in rows
            if r["inputs"] == dtype and r["fastweights"].get("status") == "ok"
        ]
        best = min(mine) if mine else None
        fla = {
            r["form"]: r["fla"].get("ms")
            for r in rows
            if r["inputs"] == dtype and r["fla"].get("status") == "ok"
        }
        for form, name, test, words in (
            ("chunk", "chunk_gated_delta_rule", lambda a, b: a <= PREFILL_CHUNK_FACTOR * b,
             f"within {PREFILL_CHUNK_FACTOR:.0f}x of"),
            ("recurrent", "fused_recurrent_gated_delta_rule", lambda a, b: a < b, "faster than"),
        ):  # fmt: skip
            theirs = fla.get(form)
            why = "ours not timed" if best is None else "fla not timed" if theirs is None else ""
            ratio = None if why else best / theirs  # type: ignore[operator]
            out.append(
                {
                    "target": f"prefill gated_delta_rule ({dtype}, best form) {words} fla {name}",
                    "value": None if ratio is None else round(ratio, 3),
                    "verdict": verdict(None if why else test(best, theirs), why),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# The gpu tests, in a subprocess with a time cap


def _tests_dir() -> Path | None:
    import fastweights

    here = Path(fastweights.__file__).resolve().parent.parent / "tests" / "cuda"
    return here if here.is_dir() else None


def _run_tests(tests: Path, cap: float, workers: int, log: Path | None) -> dict[str, Any]:
    root = tests.parent.parent
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    cmd.append(str(tests))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    print("$", " ".join(cmd), f"  (stopped after {cap:.0f} s)", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    reader.join(timeout=10)
    seconds = time.perf_counter() - t
    if log is not None:
        log.write_text("$ " + " ".join(cmd) + "\n" + "".join(lines))
    words = r"passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?"
    summary = next(
        (
            ln.strip().strip("=").strip()
            for ln in reversed(lines)
            if re.search(rf"\d+ ({words})", ln)
        ),
        "",
    )
    counts = {w: int(n) for n, w in re.findall(rf"(\d+) ({words})", summary)}
    if timed_out:
        status = f"timed out after {cap:.0f} s"
    elif rc == 0:
        status = "passed" if counts.get("passed") else "skipped"
    elif rc == 5:
        status = "no tests collected"
    else:
        status = "failed"
    return {
        "command": " ".join(cmd),
        "status": status,
        "returncode": rc,
        "summary": summary,
        "counts": counts,
        "seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------------------------
# Reports


def _ms(cell: dict[str, Any], emulated: bool) -> str:
    if cell.get("status") != "ok":
        return str(cell.get("status", "")) + (f" ({cell['error']})" if "error" in cell else "")
    text = f"{cell['ms']:.3f}"
    if not emulated and cell.get("dispatch_hidden") is False:
        text += " (per call)"
    return text + (" (emulated)" if emulated else "")


def _num(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (what ``gpu_check.md`` holds)."""
    emulated = report["emulated"]
    card = report["card"]
    lines = ["# fastweights gpu-check", ""]
    if emulated:
        lines += [f"**{EMULATED_NOTE}**", ""]
    extra = ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in card.items() if k != "name" and v is not None
    )
    lines.append(f"- card: {card['name']}" + (f" ({extra})" if extra else ""))
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    lines.append(f"- started: {report['started']}")
    lines.append(
        f"- elapsed: {report['elapsed_s']:.1f} s of a {report['budget_s']:.0f} s budget"
        + (f" (repeat {report['repeat']}, median)" if report.get("repeat") else "")
    )
    tests = report.get("tests")
    if tests is None:
        lines.append("- tests: not run")
    else:
        lines.append(
            f"- tests: `{tests.get('command', '')}`: {tests['status']}"
            + (f", {tests['summary']}" if tests.get("summary") else "")
            + (f" ({tests['seconds']} s)" if "seconds" in tests else "")
        )
    unit = "ms (emulated)" if emulated else "ms"
    decode = report.get("decode")
    if decode is not None:
        lines += [
            "",
            f"## Decode step ({_label(decode['shape'])}, float32 state)",
            "",
            f"| what | {unit} | GB/s | % of copy bandwidth |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in decode["rows"]:
            lines.append(
                f"| {r['what']} | {_ms(r, emulated)} | {_num(r.get('GBps'), '.0f')} "
                f"| {_num(r.get('pct_of_copy'), '.1f')} |"
            )
    prefill = report.get("prefill")
    if prefill is not None:
        lines += [
            "",
            f"## Prefill ({_label(prefill['shape'])}, float32 state)",
            "",
            f"| op | form | inputs | fastweights cupy, {unit} | Mtok/s | fla kernel | fla, {unit} "
            "| ours / fla | max rel. diff vs fla | chunk vs recurrent |",
            "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in prefill["rows"]:
            ours, fla = r["fastweights"], r["fla"]
            lines.append(
                f"| {r['op']} | {r['form']} | {r['inputs']} | {_ms(ours, emulated)} "
                f"| {_num(ours.get('Mtok_s'), '.2f')} | {fla['kernel']} | {_ms(fla, emulated)} "
                f"| {_num(r.get('ours_over_fla'), '.2f')} "
                f"| {_num(r.get('rel_diff_vs_fla'), '.1e')} "
                f"| {_num(r.get('rel_diff_chunk_vs_recurrent'), '.1e')} |"
            )
        ref = report.get("reference_chunk")
        if ref is not None:
            lines += [
                "",
                f"For comparison, {ref['what']}: {_ms(ref, emulated)} {unit.split()[0]}"
                + (f", {ref['Mtok_s']:.2f} Mtok/s." if "Mtok_s" in ref else "."),
            ]
    if report.get("targets"):
        lines += ["", "## Targets", "", "| target | value | verdict |", "| --- | ---: | --- |"]
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {_num(t['value'], '')} | {t['verdict']} |")
    if report.get("failures"):
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def _write(out: Path | None, report: dict[str, Any]) -> None:
    text = markdown(report)
    print("\n" + text, flush=True)
    if out is None:
        return
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(text)
    print(f"gpu-check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")


# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _emulating(on: bool) -> Iterator[None]:
    old = os.environ.get(EMULATE_ENV)
    if on:
        os.environ[EMULATE_ENV] = "1"
    try:
        yield
    finally:
        if on and old is None:
            os.environ.pop(EMULATE_ENV, None)
        elif on and old is not None:
            os.environ[EMULATE_ENV] = old


def _watchdog(
    report: dict[str, Any], check: _Check, out: Path | None, t0: float, after: float
) -> threading.Timer:
    """A timer that, ``after`` seconds from ``t0``, writes the report so far and exits with 1."""

    def fire() -> None:
        for key, value in check.partial.items():
            if report.get(key) is None:
                report[key] = value
        why = f"stopped {after:.0f} s after the start, over the budget (a kernel that hangs?)"
        report["failures"] = [*check.failed, why]
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        report["exit_status"] = 1
        print(f"gpu-check: {why}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            _write(out, report)
        os._exit(1)

    timer = threading.Timer(max(0.0, after - (time.perf_counter() - t0)), fire)
    timer.daemon = True
    timer.start()
    return timer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastweights gpu-check",
        description="Check and time the cupy backend on this machine's GPU (the gpu tests, a "
        "decode and prefill table beside fla), within a time budget; --small runs it all "
        "under the CPU emulator with small shapes.",
    )
    parser.add_argument("--out", metavar="DIR", help="write gpu_check.json/.md and the test log")
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"run under the CPU emulator with small shapes (as {EMULATE_ENV}=1); no timing",
    )
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    parser.add_argument("--no-bench", action="store_true", help="skip the table")
    parser.add_argument("--no-fla", action="store_true", help="leave fla out of the table")
    parser.add_argument("--repeat", type=int, help="timed runs per entry (default 10; 2 small)")
    parser.add_argument(
        "--budget", type=float, help="seconds for the whole check (default 315; 150 small)"
    )
    parser.add_argument(
        "--test-timeout", type=float, help="seconds for the gpu tests (default 150; 60 small)"
    )
    parser.add_argument(
        "--test-workers",
        type=int,
        help="pytest-xdist workers for the tests (default: up to 8 when xdist is installed)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the check (see the module docstring); returns the exit status."""
    t0 = time.perf_counter()
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from fastweights.backends.cupy import emulating

    small = bool(args.small or emulating())
    args.repeat = args.repeat if args.repeat is not None else (2 if small else 10)
    args.budget = args.budget if args.budget is not None else (150.0 if small else 315.0)
    test_cap = args.test_timeout if args.test_timeout is not None else (60.0 if small else 150.0)
    if args.repeat < 1 or args.budget <= 0 or test_cap <= 0:
        print("gpu-check: --repeat, --budget and --test-timeout must be positive", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cupy: Any = None

    def nothing_to_check(status: str, why: str, hint: str) -> int:
        print(f"gpu-check: {status}: {why}.\n  {hint}", file=sys.stderr)
        if out is not None:
            stub = {"schema": SCHEMA, "status": status, "reason": why, "started": started}
            (out / "gpu_check.json").write_text(json.dumps(stub, indent=1) + "\n")
        return 3

    from fastweights.backends import get_backend

    try:
        get_backend("cupy")
    except TypeError as exc:
        return nothing_to_check(
            "the cupy backend is not registered",
            str(exc),
            "fastweights' backends register through its package's entry points: install it "
            "(in the checkout: pip install --no-build-isolation -e ., or offline with carried "
            "wheels: pip install --isolated --no-index --find-links wheels -e .)",
        )
    if small:
        cxx = os.environ.get("CUDASIM_CXX", "g++")
        if shutil.which(cxx) is None:
            return nothing_to_check(
                "nothing to check",
                f"the CPU emulator needs a C++ compiler: {cxx!r} is not on PATH",
                "Install g++ or name a compiler in CUDASIM_CXX.",
            )
        clock: _Clock = _Emulated()
        card: dict[str, Any] = {
            "name": "CPU emulator (cudasim), no GPU",
            "cpu": platform.processor() or platform.machine(),
        }
    else:
        found = _gpu()
        if isinstance(found, str):
            return nothing_to_check(
                "no GPU to check",
                found,
                "On a machine with an NVIDIA GPU, install CuPy (pip install '.[cuda12]' or "
                "'.[cuda13]');\n  `python -m fastweights gpu-check --small` runs the whole check "
                "under the CPU emulator instead (no timings).",
            )
        cupy, card = found
        clock = _Gpu(cupy)
    mode = "emulated, small shapes" if small else "GPU"
    print(f"gpu-check on {card['name']} ({mode}); budget {args.budget:.0f} s", flush=True)
    status = 0
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "emulated": small,
        "timing": EMULATED_NOTE if small else "CUDA events; median of --repeat runs",
        "card": card,
        "started": started,
        "budget_s": args.budget,
        "repeat": args.repeat,
        "tests": None,
        "decode": None,
        "prefill": None,
        "reference_chunk": None,
        "targets": [],
        "failures": [],
    }
    tests = None if args.no_tests else _tests_dir()
    if not args.no_tests and tests is None:
        report["tests"] = {"status": "not found (installed without the source tree's tests/)"}
    elif tests is not None:
        workers = args.test_workers
        if workers is None:
            workers = (
                min(8, (os.cpu_count() or 1) // 2)
                if not small and importlib.util.find_spec("xdist") is not None
                else 0
            )
        left = args.budget - (time.perf_counter() - t0)
        cap = max(10.0, min(test_cap, left - (0.0 if args.no_bench else 0.35 * left)))
        report["tests"] = _run_tests(
            tests, cap, workers, None if out is None else out / "gpu_tests.log"
        )
        if report["tests"]["status"] not in ("passed", "skipped"):
            status = 1
    with _emulating(small):
        check = _Check(args, clock, t0)
        report["versions"] = _versions(cupy, check.torch, check.fla)
        if check.fla_reason:
            report["fla"] = check.fla_reason
        if not args.no_bench:
            watchdog = _watchdog(report, check, out, t0, args.budget + OVERRUN_S)
            try:
                for key, step in (
                    ("decode", check.decode),
                    ("prefill", check.prefill),
                    ("reference_chunk", check.reference_chunk),
                ):
                    try:
                        report[key] = step()
                    except Exception as exc:
                        check.failed.append(f"{key}: {type(exc).__name__}: {exc}")
                    print(f"gpu-check: {key} done at {time.perf_counter() - t0:.1f} s", flush=True)
            finally:
                watchdog.cancel()
            report["targets"] = _targets(report["decode"], report["prefill"], small)
        report["failures"] = check.failed
        if check.failed:
            status = 1
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    report["exit_status"] = status
    _write(out, report)
    print(
        f"gpu-check: finished in {report['elapsed_s']:.1f} s (budget {args.budget:.0f} s), "
        f"exit status {status}",
        flush=True,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
