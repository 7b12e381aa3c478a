"""One-command check of the ``cupy`` backend on a machine with an NVIDIA GPU.

Runs ``pytest -m gpu tests/cuda`` (when the source tree's tests are there), then times the
kernels and prints a table with the card's name:

- prefill: ``gated_delta_rule`` with B=1, T=8192, H=16, K=V=128 (and, for comparison, the
  reference backend's Array-API chunk form on the same CuPy arrays: cuBLAS matmuls);
- decoding: one ``fastweights.step.gated_delta_rule`` with B=256, H=16, K=V=128 on a float32
  pool, against a device-to-device copy of that pool (the step reads and writes the pool once,
  as the copy does, so the ratio is the step's share of copy bandwidth);
- fla's ``chunk_gated_delta_rule`` and ``fused_recurrent_gated_delta_rule`` on the same shapes
  (bfloat16, torch), when flash-linear-attention is importable.

Without a GPU it says so and returns 1. Wired into ``python -m fastweights gpu-check``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFILL = {"B": 1, "T": 8192, "H": 16, "K": 128, "V": 128}
DECODE = {"B": 256, "H": 16, "K": 128, "V": 128}


def _device() -> tuple[Any, str] | str:
    """``(cupy, card name)``, or why there is no GPU to check."""
    try:
        import cupy
    except Exception as exc:
        return f"cupy is not importable ({type(exc).__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    except Exception as exc:
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    name = props["name"]
    return cupy, name.decode() if isinstance(name, bytes) else str(name)


def _tests_dir() -> Path | None:
    import fastweights

    here = Path(fastweights.__file__).resolve().parent.parent / "tests" / "cuda"
    return here if here.is_dir() else None


def _time_cupy(cupy: Any, fn: Callable[[], Any], repeat: int) -> float:
    """Median milliseconds of ``fn`` on the current stream (after one warm-up call)."""
    fn()
    cupy.cuda.Device().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def _time_torch(torch: Any, fn: Callable[[], Any], repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _inputs(xp: Any, dtype: Any, B: int, T: int, H: int, K: int, V: int) -> tuple[Any, ...]:
    rng = xp.random.default_rng(0) if hasattr(xp.random, "default_rng") else xp.random
    q = rng.standard_normal((B, T, H, K), dtype=xp.float32).astype(dtype)
    k = rng.standard_normal((B, T, H, K), dtype=xp.float32)
    k = (k / xp.sqrt((k * k).sum(-1, keepdims=True))).astype(dtype)
    v = rng.standard_normal((B, T, H, V), dtype=xp.float32).astype(dtype)
    g = (-0.1 * rng.random((B, T, H), dtype=xp.float32)).astype(dtype)
    beta = rng.random((B, T, H), dtype=xp.float32).astype(dtype)
    return q, k, v, g, beta


def _label(shape: dict[str, int]) -> str:
    return " ".join(f"{n}={x}" for n, x in shape.items())


def _bench_cupy(cupy: Any, repeat: int) -> list[tuple[str, str, str]]:
    import fastweights
    import fastweights.step

    rows = []
    p = PREFILL
    q, k, v, g, beta = _inputs(cupy, cupy.float32, p["B"], p["T"], p["H"], p["K"], p["V"])
    ms = _time_cupy(
        cupy, lambda: fastweights.gated_delta_rule(q, k, v, g, beta, backend="cupy"), repeat
    )
    shape = _label(p)
    rows.append(
        (
            f"prefill gated_delta_rule, cupy recurrent ({shape}, fp32)",
            f"{ms:.3f} ms",
            f"{p['T'] * 1e-3 / ms:.2f} Mtok/s",
        )
    )
    ms = _time_cupy(
        cupy,
        lambda: fastweights.gated_delta_rule(q, k, v, g, beta, backend="reference", form="chunk"),
        max(1, repeat // 5),
    )
    rows.append(
        (
            f"prefill gated_delta_rule, reference chunk form on CuPy ({shape}, fp32)",
            f"{ms:.3f} ms",
            f"{p['T'] * 1e-3 / ms:.2f} Mtok/s",
        )
    )
    q16, k16, v16, g16, b16 = (x.astype(cupy.float16) for x in (q, k, v, g, beta))
    ms = _time_cupy(
        cupy, lambda: fastweights.gated_delta_rule(q16, k16, v16, g16, b16, backend="cupy"), repeat
    )
    rows.append(
        (
            f"prefill gated_delta_rule, cupy recurrent ({shape}, fp16 in)",
            f"{ms:.3f} ms",
            f"{p['T'] * 1e-3 / ms:.2f} Mtok/s",
        )
    )

    d = DECODE
    q, k, v, g, beta = _inputs(cupy, cupy.float32, d["B"], 1, d["H"], d["K"], d["V"])
    q, k, v, g, beta = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]
    pool = cupy.zeros((d["B"], d["H"], d["K"], d["V"]), dtype=cupy.float32)
    copy = cupy.empty_like(pool)
    step_ms = _time_cupy(
        cupy,
        lambda: fastweights.step.gated_delta_rule(q, k, v, g, beta, pool, backend="cupy"),
        repeat,
    )
    copy_ms = _time_cupy(cupy, lambda: cupy.copyto(copy, pool), repeat)
    gbs = 2 * pool.nbytes / 1e6
    rows.append(
        (
            f"decode step gated_delta_rule, cupy ({_label(d)}, fp32 pool)",
            f"{step_ms:.3f} ms",
            f"{gbs / step_ms:.0f} GB/s",
        )
    )
    rows.append(
        (
            f"device-to-device copy of the pool ({pool.nbytes / 1e6:.0f} MB)",
            f"{copy_ms:.3f} ms",
            f"{gbs / copy_ms:.0f} GB/s",
        )
    )
    rows.append(("decode step / copy bandwidth", "", f"{100 * copy_ms / step_ms:.0f} %"))
    return rows


def _bench_fla(repeat: int) -> list[tuple[str, str, str]]:
    try:
        import torch
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
    except Exception as exc:
        return [("fla (flash-linear-attention)", "not importable", f"{type(exc).__name__}")]
    rows = []
    p, d = PREFILL, DECODE
    dev, bf16 = "cuda", torch.bfloat16

    def make(B: int, T: int, H: int, K: int, V: int) -> tuple[Any, ...]:
        q = torch.randn(B, T, H, K, device=dev, dtype=bf16)
        k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).to(bf16)
        v = torch.randn(B, T, H, V, device=dev, dtype=bf16)
        g = -0.1 * torch.rand(B, T, H, device=dev)
        beta = torch.rand(B, T, H, device=dev, dtype=bf16)
        return q, k, v, g, beta

    args = make(p["B"], p["T"], p["H"], p["K"], p["V"])
    for name, fn in (
        ("chunk", chunk_gated_delta_rule),
        ("fused_recurrent", fused_recurrent_gated_delta_rule),
    ):
        try:
            ms = _time_torch(torch, functools.partial(fn, *args), repeat)
            rows.append(
                (
                    f"prefill fla {name}_gated_delta_rule ({_label(p)}, bf16)",
                    f"{ms:.3f} ms",
                    f"{p['T'] * 1e-3 / ms:.2f} Mtok/s",
                )
            )
        except Exception as exc:
            rows.append((f"prefill fla {name}_gated_delta_rule", "failed", type(exc).__name__))
    args = make(d["B"], 1, d["H"], d["K"], d["V"])
    h0 = torch.zeros(d["B"], d["H"], d["K"], d["V"], device=dev, dtype=torch.float32)
    try:
        ms = _time_torch(
            torch,
            lambda: fused_recurrent_gated_delta_rule(
                *args, initial_state=h0, output_final_state=True
            ),
            repeat,
        )
        rows.append(
            (
                f"decode fla fused_recurrent_gated_delta_rule T=1 ({_label(d)}, bf16, fp32 state)",
                f"{ms:.3f} ms",
                f"{2 * h0.numel() * 4 / 1e6 / ms:.0f} GB/s",
            )
        )
    except Exception as exc:
        rows.append(("decode fla fused_recurrent_gated_delta_rule", "failed", type(exc).__name__))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Check the backend on this machine's GPU; 0 when the GPU tests pass, else 1.

    Parameters
    ----------
    argv : list of str, optional
        ``--no-tests`` (timings only), ``--no-bench`` (tests only), ``--repeat N``.
    """
    parser = argparse.ArgumentParser(prog="fastweights gpu-check", description=__doc__)
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    parser.add_argument("--no-bench", action="store_true", help="skip the timings")
    parser.add_argument("--repeat", type=int, default=10, help="timed repetitions (median)")
    args = parser.parse_args(argv)
    found = _device()
    if isinstance(found, str):
        print(f"gpu-check: no GPU to check: {found}")
        return 1
    cupy, card = found
    print(
        f"gpu-check on {card} (CuPy {cupy.__version__}, CUDA runtime "
        f"{cupy.cuda.runtime.runtimeGetVersion()})"
    )
    status = 0
    if not args.no_tests:
        tests = _tests_dir()
        if tests is None:
            print("gpu-check: tests/cuda not found (installed without the source tree); skipped")
        else:
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", str(tests)]
            print("$", " ".join(cmd), flush=True)
            status = 1 if subprocess.run(cmd, check=False).returncode else 0
    if not args.no_bench:
        rows = _bench_cupy(cupy, args.repeat) + _bench_fla(args.repeat)
        width = max(len(r[0]) for r in rows)
        print(f"\n{card}")
        print(f"{'what':<{width}}  {'time':>12}  {'rate':>14}")
        for what, ms, rate in rows:
            print(f"{what:<{width}}  {ms:>12}  {rate:>14}")
    return status


if __name__ == "__main__":
    sys.exit(main())
