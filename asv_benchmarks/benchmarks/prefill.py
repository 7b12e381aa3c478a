"""Prefill: every op on every backend and form, on CPU-sized shapes and on fla's GPU shapes.

``track_gflops`` counts the recurrent pass's ``6 K V`` FLOPs per token and head, the least work
any form does; read it against ``limits.MachineLimits.track_matmul_gflops``.
"""

from __future__ import annotations

from typing import Any

from fastweights._bench import (
    OPS,
    backend_namespace,
    best_time,
    flops_per_token,
    make_inputs,
    run_op,
    synchronize,
)

from ._quick import REPEAT, SMOKE

BACKENDS = ["reference", "numba", "cupy"]
H = 4
# Quick runs (`asv run --quick`, CI's dry run with FASTWEIGHTS_ASV_SMOKE): short inputs only.
LENGTHS = [512] if SMOKE else [512, 8192]
WIDTHS = [64] if SMOKE else [64, 128]
MEMORY_T = 512 if SMOKE else 8192


class Prefill:
    params = (list(OPS), BACKENDS, ["recurrent", "chunk", "auto"], LENGTHS, WIDTHS)
    param_names = ["op", "backend", "form", "T", "K=V"]
    timeout = 600

    def setup(self, op: str, backend: str, form: str, T: int, D: int) -> None:
        self.xp = backend_namespace(backend, op, form)
        self.args, self.kwargs = make_inputs(op, 1, T, H, D, D, self.xp)
        self.op, self.options = op, {"backend": backend, "form": form}
        self.call()  # compile and warm caches outside the timing

    def call(self) -> Any:
        return run_op(self.op, self.args, self.kwargs, **self.options)

    def time_prefill(self, op: str, backend: str, form: str, T: int, D: int) -> None:
        self.call()
        synchronize(self.xp)

    def track_gflops(self, op: str, backend: str, form: str, T: int, D: int) -> float:
        return flops_per_token(op, H, D, D) * T / best_time(self.call, self.xp, REPEAT) / 1e9

    track_gflops.unit = "GFLOP/s"  # type: ignore[attr-defined]

    def track_tokens_per_second(self, op: str, backend: str, form: str, T: int, D: int) -> float:
        return T / best_time(self.call, self.xp, REPEAT)

    track_tokens_per_second.unit = "tokens/s"  # type: ignore[attr-defined]


class PrefillMemory:
    """Peak host memory of the chunk form at long T (intermediates O(T C + T/C K V));
    T = 512 in quick runs."""

    params = (list(OPS), BACKENDS)
    param_names = ["op", "backend"]
    timeout = 600

    def setup(self, op: str, backend: str) -> None:
        if backend_namespace(backend, op, "chunk").__name__ == "cupy":
            raise NotImplementedError("peakmem measures host memory")
        self.args, self.kwargs = make_inputs(op, 1, MEMORY_T, H, 128, 128)

    def peakmem_chunk_T8192(self, op: str, backend: str) -> None:
        run_op(op, self.args, self.kwargs, backend=backend, form="chunk")


class PrefillGPU:
    """fla's benchmark shapes (B x T x H x K=V) on the GPU backend."""

    params = (
        ["gated_delta_rule", "delta_rule", "simple_gla", "gla", "kda"],
        ["recurrent", "chunk", "auto"],
        ["4x2048x16x128", "1x8192x96x128", "8x1024x8x64"],
    )
    param_names = ["op", "form", "shape"]
    timeout = 600

    def setup(self, op: str, form: str, shape: str) -> None:
        self.xp = backend_namespace("cupy", op, form)
        self.size = B, T, heads, D = tuple(int(s) for s in shape.split("x"))
        self.args, self.kwargs = make_inputs(op, B, T, heads, D, D, self.xp)
        self.op, self.form = op, form
        self.call()

    def call(self) -> Any:
        return run_op(self.op, self.args, self.kwargs, backend="cupy", form=self.form)

    def time_prefill(self, op: str, form: str, shape: str) -> None:
        self.call()
        synchronize(self.xp)

    def track_gflops(self, op: str, form: str, shape: str) -> float:
        B, T, heads, D = self.size
        return flops_per_token(op, heads, D, D) * B * T / best_time(self.call, self.xp) / 1e9

    track_gflops.unit = "GFLOP/s"  # type: ignore[attr-defined]
