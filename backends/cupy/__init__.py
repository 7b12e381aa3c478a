"""The ``cupy`` backend: CUDA C++ kernels for CuPy arrays on an NVIDIA GPU.

Every op runs as one launch of the recurrent scan kernel ``fw_recurrent``
(``kernels/recurrent.cu``): one thread block per (sequence, value head, tile of value columns),
the state in registers, the decay, delta-rule correction, write and read of each token fused;
packed sequences, grouped heads, per-value ``beta``, ``use_qk_l2norm`` and ``scale`` handled
inside. Decoding launches the same kernel with ``T == 1`` on the state pool, in place through
``state_indices``. float32 and float64 compute; float16 inputs accumulate in float32.

Nothing here imports CuPy before a call needs it. ``FASTWEIGHTS_CUDA_EMULATE=1`` makes the
backend accept NumPy arrays and run the same kernels on the CPU through
:mod:`fastweights.backends.cupy.emulator` (for tests on machines without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any, ClassVar

import numpy as np

from fastweights.backends import Call, install_hint

EMULATE_ENV = "FASTWEIGHTS_CUDA_EMULATE"
_FLOATS = frozenset({"float16", "float32", "float64"})
MAX_K = 256
"""The kernels hold a state column of ``K`` values in registers: ``K = 1 .. MAX_K``."""
MAX_GRID_Y = 65535
"""Value heads go on CUDA's grid y axis."""
FIRST_WAVE = (
    "linear_attn",
    "simple_gla",
    "gla",
    "delta_rule",
    "gated_delta_rule",
    "kda",
    "delta_product",
)


def emulating() -> bool:
    """Whether ``FASTWEIGHTS_CUDA_EMULATE`` asks for the CPU emulator (NumPy arrays)."""
    return os.environ.get(EMULATE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _cupy_unavailable() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return f"cupy is not installed ({install_hint('cuda12', 'cuda13')})"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # no driver, no device, broken install
        return f"no CUDA device ({type(exc).__name__}: {exc})".strip()
    return None


def _array_kind(x: Any) -> str:
    return type(x).__module__.split(".")[0]


class CupyBackend:
    """CUDA kernels through ``cupy.RawModule`` (see the module docstring)."""

    name = "cupy"
    priority = 20
    ops: ClassVar[dict[str, tuple[str, ...]]] = {op: ("recurrent",) for op in FIRST_WAVE}
    """What it runs, declared op by op: it is never handed anything else."""
    step_ops = FIRST_WAVE
    dtypes = "float16, float32, float64 (float16 accumulates in float32)"
    limits: ClassVar[dict[str, str]] = {"K": f"1..{MAX_K}", "HV": f"<= {MAX_GRID_Y}", "V": ">= 1"}

    def __init__(self) -> None:
        self._cupy_reason: tuple[str | None] | None = None

    def unavailable(self) -> str | None:
        if emulating():
            cxx = os.environ.get("CUDASIM_CXX", "g++")
            if shutil.which(cxx) is None:
                return f"{EMULATE_ENV}=1 but the C++ compiler {cxx!r} is not on PATH"
            return None
        if self._cupy_reason is None:
            self._cupy_reason = (_cupy_unavailable(),)
        return self._cupy_reason[0]

    def rejects(self, call: Call) -> str | None:
        kinds = {
            _array_kind(x) for x in (call.q, call.k, call.v, *call.inputs.values()) if x is not None
        }
        if kinds == {"numpy"}:
            if not emulating():
                return f"it takes CuPy arrays (NumPy arrays only with {EMULATE_ENV}=1)"
        elif kinds != {"cupy"}:
            return "it takes CuPy arrays"
        arrays = [call.q, call.k, call.v, *call.inputs.values()]
        for s in (call.initial_state, call.state_pool):
            arrays.extend(s if isinstance(s, tuple | list) else [s])
        for x in arrays:
            if x is not None and np.dtype(x.dtype).name not in _FLOATS:
                return f"dtype {x.dtype} is not float16, float32 or float64"
        if not 1 <= call.K <= MAX_K:
            return f"the kernels hold K = 1..{MAX_K} in registers, got K = {call.K}"
        if call.V < 1:
            return "V = 0 (no value columns)"
        if call.HV > MAX_GRID_Y:
            return f"the kernels put value heads on CUDA's grid y axis: HV <= {MAX_GRID_Y}"
        return None

    def plan(self, call: Call) -> dict[str, Any]:
        """One launch of the recurrent scan kernel, whatever the form asked."""
        return {"form": "recurrent", "why": "the kernels run the recurrent form only"}

    def run(self, call: Call) -> tuple[Any, Any]:
        from ._recurrent import run

        return run(call)

    def step(self, call: Call) -> tuple[Any, Any]:
        from ._recurrent import step

        return step(call)


backend = CupyBackend()
