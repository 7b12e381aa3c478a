"""The ``cupy`` backend: CUDA C++ kernels for CuPy arrays on an NVIDIA GPU.

Every op runs as one launch of the recurrent scan kernel ``fw_recurrent``
(``kernels/recurrent.cu``): one thread block per (sequence, value head, tile of value columns),
the state in registers, the decay, delta-rule correction, write and read of each token fused;
packed sequences, grouped heads, per-value ``beta``, ``use_qk_l2norm`` and ``scale`` handled
inside. Decoding launches the same kernel with ``T == 1`` on the state pool, in place through
``state_indices``. float32 and float64 compute; float16 inputs accumulate in float32.

Long sequences run the chunk form instead (``_chunk.py``, ``kernels/chunk.cu``): three launches
over every chunk of the batch (the UT solve and decayed scores per chunk, one sequential pass
over chunks with the state in registers, the intra-chunk output); :func:`chunk_plan` is the
rule ``form="auto"`` follows.

``dplr`` (and ``iplr``, ``rwkv7``, which arrive as ``dplr``) runs its recurrent form only, one
launch of ``fw_dplr`` (``_dplr.py``, ``kernels/dplr.cu``), with the same grid, tiles, packed
sequences and in-place decoding as ``fw_recurrent``. ``recurrent_delta_rule`` and ``srwm``
(``_rdelta.py``, ``_srwm.py``) run one block per (sequence, head), since each token reads the
whole previous output or weight; their state must fit the block's registers (``rejects``).

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
RECURRENT_ONLY = ("dplr", "recurrent_delta_rule", "srwm")
"""Ops with the recurrent scan only (``kernels/dplr.cu``: ``iplr`` and ``rwkv7`` arrive as
``dplr``; ``kernels/recurrent_delta.cu``; ``kernels/srwm.cu``)."""


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


CHUNK_MIN_ROWS = 128
"""``auto`` runs the chunk kernels from this many rows per sequence (two chunks of 64)."""
RECURRENT_FULL_GRID = 1024
"""... unless the recurrent kernel's grid has this many blocks (about 8 per SM of a 132-SM
card) and the sequences are shorter than ``CHUNK_LONG_ROWS``."""
CHUNK_LONG_ROWS = 1024


def chunk_plan(call: Call) -> dict[str, Any]:
    """The form the backend runs ``call`` with (docs/backends/cupy.md, "Chunk or recurrent").

    ``auto``: recurrent for decoding, per-value ``beta`` (no chunk form), and sequences shorter
    than ``CHUNK_MIN_ROWS`` rows (``T`` times DeltaProduct's ``n``; packed: the mean length);
    recurrent when the recurrent grid (sequences x value heads x value tiles) already fills
    the card (``RECURRENT_FULL_GRID`` blocks) and sequences are shorter than
    ``CHUNK_LONG_ROWS``; the chunk kernels otherwise.
    """
    if call.is_step:
        return {"form": "recurrent", "why": "one token is one recurrent step"}
    if call.op in RECURRENT_ONLY:
        return {"form": "recurrent", "why": f"the kernels run {call.op}'s recurrent form only"}
    from ._chunk import chunk_size

    if call.form == "chunk":
        return {"form": "chunk", "why": "asked for", "chunk_size": chunk_size(call)}
    if call.form == "recurrent":
        return {"form": "recurrent", "why": "asked for"}
    if call.beta_per_value:
        return {"form": "recurrent", "why": "a per-value beta has no chunk form"}
    from ._launch import tile_for

    n = call.num_householder
    if call.cu_seqlens is not None:
        rows = int(call.cu_seqlens[-1]) * n / max(1, call.N)
    else:
        rows = call.T * n
    if rows < CHUNK_MIN_ROWS:
        return {"form": "recurrent", "why": f"short sequences ({rows:g} < {CHUNK_MIN_ROWS} rows)"}
    compute = "float64" if np.dtype(call.dtype) == np.float64 else "float32"
    blocks = call.N * call.HV * -(-call.V // tile_for(call.K, compute).bv)
    if blocks >= RECURRENT_FULL_GRID and rows < CHUNK_LONG_ROWS:
        why = f"the recurrent grid ({blocks} blocks) fills the GPU and sequences are short"
        return {"form": "recurrent", "why": why}
    why = f"{rows:g} rows per sequence: chunks are parallel along T"
    return {"form": "chunk", "why": why, "chunk_size": chunk_size(call)}


class CupyBackend:
    """CUDA kernels through ``cupy.RawModule`` (see the module docstring)."""

    name = "cupy"
    priority = 20
    ops: ClassVar[dict[str, tuple[str, ...]]] = {
        **{op: ("recurrent", "chunk") for op in FIRST_WAVE},
        **{op: ("recurrent",) for op in RECURRENT_ONLY},
    }
    """What it runs, declared op by op: it is never handed anything else."""
    step_ops = (*FIRST_WAVE, *RECURRENT_ONLY)
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
        if call.op == "recurrent_delta_rule":
            from ._rdelta import rejects

            return rejects(call)
        if call.op == "srwm":
            from ._srwm import rejects as srwm_rejects

            return srwm_rejects(call)
        return None

    def plan(self, call: Call) -> dict[str, Any]:
        """The recurrent scan or the chunk kernels (``chunk_plan``), and why."""
        return chunk_plan(call)

    def run(self, call: Call) -> tuple[Any, Any]:
        if call.op == "dplr":
            from ._dplr import run as run_dplr

            return run_dplr(call)
        if call.op == "recurrent_delta_rule":
            from ._rdelta import run as run_rdelta

            return run_rdelta(call)
        if call.op == "srwm":
            from ._srwm import run as run_srwm

            return run_srwm(call)
        if chunk_plan(call)["form"] == "chunk":
            from ._chunk import run as run_chunk

            return run_chunk(call)
        from ._recurrent import run

        return run(call)

    def step(self, call: Call) -> tuple[Any, Any]:
        if call.op == "dplr":
            from ._dplr import step as step_dplr

            return step_dplr(call)
        if call.op == "recurrent_delta_rule":
            from ._rdelta import step as step_rdelta

            return step_rdelta(call)
        if call.op == "srwm":
            from ._srwm import step as step_srwm

            return step_srwm(call)
        from ._recurrent import step

        return step(call)


backend = CupyBackend()
