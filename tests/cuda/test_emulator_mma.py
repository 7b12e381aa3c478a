"""Tensor cores in the emulator and ``kernels/mma.cuh``, against scalar NumPy definitions.

* ``cudasim::mma_m16n8k16`` (PTX ``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}...``) on
  per-lane registers that the test builds from matrices with the PTX ISA's fragment layout,
  bitwise against float32 accumulation of exact products in k order;
* ``fw_warp_mma`` (tensor-core path for half/bfloat16, scalar path for float/double) on tiles in
  every A/B layout, accumulating into C;
* warp-collective checks: a warp of fewer than 32 threads or with exited lanes is rejected;
* NVRTC compiles the header's kernels for sm_80 and sm_90 without spills, and the half and
  bfloat16 instantiations contain the ``mma.sync`` instruction.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

KERNELS = Path(__file__).resolve().parents[2] / "backends" / "cupy" / "kernels"
needs_gxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None, reason="g++ is not on PATH"
)

_TEST_KERNELS = r"""
template <bool BF16>
__global__ void mma_raw(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned ar[4], br[2];
    float cr[4], dr[4];
    for (int r = 0; r < 4; ++r) { ar[r] = a[4 * t + r]; cr[r] = c[4 * t + r]; }
    for (int r = 0; r < 2; ++r) br[r] = b[2 * t + r];
    fw_mma_m16n8k16<BF16>(dr, ar, br, cr);
    for (int r = 0; r < 4; ++r) d[4 * t + r] = dr[r];
}

// D (16 x 8NT) = A (16 x k) B (k x 8NT) + C; A stored [k][16] when AT, B stored [8NT][k] when BT.
template <typename T, typename Tc, bool AT, bool BT>
__global__ void warp_mma(const T* A, const T* B, const Tc* C, Tc* D, int k) {
    constexpr int NT = 2;
    fw_acc16x8<Tc> acc[NT];
    fw_acc_load<NT>(acc, C, 8 * NT);
    fw_warp_mma<NT, AT, BT>(acc, A, AT ? 16 : k, B, BT ? k : 8 * NT, k);
    fw_acc_store<NT>(D, 8 * NT, acc);
}

// Lanes >= live return first: the product must reject the partial warp.
template <typename T>
__global__ void partial_warp(const T* A, const T* B, float* D, int live) {
    if ((int)(threadIdx.x & 31u) >= live) return;
    fw_acc16x8<float> acc[1];
    fw_acc_zero<1>(acc);
    fw_warp_mma<1, false, true>(acc, A, 16, B, 16, 16);
    fw_acc_store<1>(D, 8, acc);
}

// Lanes 0-15 and 16-31 reach the product at two different lines.
template <typename T>
__global__ void divergent_sites(const T* A, const T* B, float* D) {
    fw_acc16x8<float> acc[1];
    fw_acc_zero<1>(acc);
    if (threadIdx.x < 16) fw_warp_mma<1, false, true>(acc, A, 16, B, 16, 16);
    else fw_warp_mma<1, false, true>(acc, A, 16, B, 16, 16);
    fw_acc_store<1>(D, 8, acc);
}

// float -> half / bfloat16 -> float through fw_acc_store and fw_acc_load.
template <typename To>
__global__ void round_trip(const float* C, To* H, float* D) {
    fw_acc16x8<float> acc[2];
    fw_acc_load<2>(acc, C, 16);
    fw_acc_store<2>(H, 16, acc);
    fw_acc_load<2>(acc, H, 16);
    fw_acc_store<2>(D, 16, acc);
}
"""

TYPES = {"half": "fw_half", "bf16": "fw_bf16", "float": "float", "double": "double"}
COMPUTE = {"half": "float", "bf16": "float", "float": "float", "double": "double"}


def _names() -> list[str]:
    names = ["mma_raw<false>", "mma_raw<true>"]
    for t, ct in TYPES.items():
        for at in ("false", "true"):
            for bt in ("false", "true"):
                names.append(f"warp_mma<{ct}, {COMPUTE[t]}, {at}, {bt}>")
    names += [f"partial_warp<{TYPES[t]}>" for t in ("half", "float")]
    names += [f"divergent_sites<{TYPES[t]}>" for t in ("half", "float")]
    names += ["round_trip<fw_half>", "round_trip<fw_bf16>"]
    return names


def _source() -> str:
    parts = [(KERNELS / "common.cuh").read_text(), (KERNELS / "mma.cuh").read_text()]
    return "\n".join([*parts, _TEST_KERNELS])


@pytest.fixture(scope="module")
def mod():
    from fastweights.backends.cupy.emulator import RawModule

    return RawModule(_source(), ("-std=c++17",), name_expressions=_names())


# ---- scalar definitions


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _random_inputs(rng, kind: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(bits as uint16, exact values as float32) of random half or bfloat16 numbers, with
    magnitudes spread over several binades (and half subnormals)."""
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-6, 6, shape)
    if kind == "half":
        x = np.where(rng.random(shape) < 0.05, x * 2.0**-20, x)  # subnormals
        h = x.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float32)
    bits = _bf16_bits(x.astype(np.float32))
    return bits, _bf16_value(bits)


def _float32_mma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """c + a @ b in float32: exact products, summed in k order, each sum rounded."""
    s = c.astype(np.float32).copy()
    for k in range(a.shape[-1]):
        s = (s + a[..., :, k, None] * b[..., None, k, :]).astype(np.float32)
    return s


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo.astype(np.uint32) | (hi.astype(np.uint32) << 16)


def _fragments(abits: np.ndarray, bbits: np.ndarray, c: np.ndarray):
    """Per-lane registers of A [W,16,16], B [W,16,8], C [W,16,8] (PTX ISA, m16n8k16):
    a_i (i < 8): row g + 8 for i in {2,3,6,7}, col 2q + (i & 1) + 8 for i >= 4;
    b_i (i < 4): row 2q + (i & 1) + 8 for i >= 2, col g; c_i: row g + 8 for i >= 2,
    col 2q + (i & 1); g = lane // 4, q = lane % 4; registers hold pairs, low half first."""
    lane = np.arange(32)
    g, q = lane // 4, lane % 4
    a_row = [g, g, g + 8, g + 8, g, g, g + 8, g + 8]
    a_col = [2 * q + (i & 1) + (8 if i >= 4 else 0) for i in range(8)]
    ah = np.stack([abits[:, a_row[i], a_col[i]] for i in range(8)], -1)  # [W, 32, 8]
    a = _pack(ah[..., 0::2], ah[..., 1::2])
    b_row = [2 * q + (i & 1) + (8 if i >= 2 else 0) for i in range(4)]
    bh = np.stack([bbits[:, b_row[i], g] for i in range(4)], -1)
    b = _pack(bh[..., 0::2], bh[..., 1::2])
    c_row = [g, g, g + 8, g + 8]
    c_col = [2 * q + (i & 1) for i in range(4)]
    cr = np.stack([c[:, c_row[i], c_col[i]] for i in range(4)], -1).astype(np.float32)
    a, b, cr = (np.ascontiguousarray(x) for x in (a, b, cr))
    return a, b, cr, (c_row, c_col)


# ---- the instruction


@needs_gxx
@pytest.mark.cuda_emulated
@pytest.mark.parametrize("kind", ["half", "bf16"])
def test_mma_instruction_against_scalar_definition(mod, kind):
    rng = np.random.default_rng(1 if kind == "half" else 2)
    warps = 4
    abits, av = _random_inputs(rng, kind, (warps, 16, 16))
    bbits, bv = _random_inputs(rng, kind, (warps, 16, 8))
    c = (rng.standard_normal((warps, 16, 8)) * 4).astype(np.float32)
    a, b, cr, (c_row, c_col) = _fragments(abits, bbits, c)
    d = np.zeros(cr.shape, np.float32)
    kern = mod.get_function(f"mma_raw<{'true' if kind == 'bf16' else 'false'}>")
    kern((2,), (64,), (a, b, cr, d))
    got = np.empty_like(c)
    for i in range(4):
        got[:, c_row[i], c_col[i]] = d[..., i]
    np.testing.assert_array_equal(got, _float32_mma(av, bv, c))  # bitwise
    exact = np.einsum("wmk,wkn->wmn", av.astype(np.float64), bv.astype(np.float64)) + c
    scale = np.abs(av).astype(np.float64) @ np.abs(bv) + np.abs(c)
    assert np.all(np.abs(got - exact) <= 17 * 2.0**-24 * scale)


# ---- the warp product of mma.cuh


def _tile_inputs(rng, t: str, shape):
    if t in ("half", "bf16"):
        bits, val = _random_inputs(rng, t, shape)
        return bits.view(np.float16) if t == "half" else bits, val
    x = rng.standard_normal(shape).astype(np.float32 if t == "float" else np.float64)
    return x, x


@needs_gxx
@pytest.mark.cuda_emulated
@pytest.mark.parametrize("bt", [False, True], ids=["B", "Bt"])
@pytest.mark.parametrize("at", [False, True], ids=["A", "At"])
@pytest.mark.parametrize("t", list(TYPES))
def test_warp_mma_against_numpy(mod, t, at, bt):
    rng = np.random.default_rng([ord(t[0]), at, bt])
    k = 32
    a_in, av = _tile_inputs(rng, t, (16, k))
    b_in, bv = _tile_inputs(rng, t, (k, 16))
    ctype = np.float64 if t == "double" else np.float32
    c = rng.standard_normal((16, 16)).astype(ctype)
    a_mem = np.ascontiguousarray(a_in.T if at else a_in)
    b_mem = np.ascontiguousarray(b_in.T if bt else b_in)
    d = np.zeros(c.shape, c.dtype)
    name = f"warp_mma<{TYPES[t]}, {COMPUTE[t]}, {str(at).lower()}, {str(bt).lower()}>"
    mod.get_function(name)((1,), (32,), (a_mem, b_mem, c, d, np.int32(k)))
    exact = av.astype(np.float64) @ bv.astype(np.float64) + c
    scale = np.abs(av).astype(np.float64) @ np.abs(bv) + np.abs(c)
    eps = 2.0**-53 if t == "double" else 2.0**-24
    assert np.all(np.abs(d - exact) <= (k + 1) * eps * scale)
    if t in ("half", "bf16"):  # tensor cores: float32 sums of exact products in k order
        np.testing.assert_array_equal(d, _float32_mma(av, bv, c))


@needs_gxx
@pytest.mark.cuda_emulated
@pytest.mark.parametrize("t", ["half", "float"])
def test_partial_warp_is_rejected(mod, t):
    from fastweights.backends.cupy.emulator import LaunchError

    rng = np.random.default_rng(3)
    a, _ = _tile_inputs(rng, t, (16, 16))
    b, _ = _tile_inputs(rng, t, (8, 16))
    d = np.zeros((16, 8), np.float32)
    kern = mod.get_function(f"partial_warp<{TYPES[t]}>")
    kern((1,), (32,), (a, b, d, np.int32(32)))  # the full warp works
    assert np.all(np.isfinite(d)) and np.abs(d).max() > 0
    with pytest.raises(LaunchError, match=r"fewer than 32 threads"):
        kern((1,), (16,), (a, b, d, np.int32(32)))
    with pytest.raises(LaunchError, match=r"all 32 lanes|deadlock"):
        kern((1,), (64,), (a, b, d, np.int32(20)))


# ---- NVRTC


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def _nvrtc_compile(arch: str) -> tuple[dict[str, str], str]:
    """``({mangled: name expression}, ptxas -v log)`` of the cubin for ``arch``."""
    try:
        try:
            from cuda.core import Program, ProgramOptions
        except ImportError:
            from cuda.core.experimental import Program, ProgramOptions
    except Exception as exc:
        pytest.skip(f"NVRTC through cuda.core is not usable ({type(exc).__name__}: {exc})")
    log = io.StringIO()
    opts = ProgramOptions(arch=arch, std="c++17", ptxas_options=["-v"])
    obj = Program(_source(), "c++", options=opts).compile(
        "cubin", name_expressions=_names(), logs=log
    )
    mangled = {
        (v.decode() if isinstance(v, bytes) else str(v)): k for k, v in obj.symbol_mapping.items()
    }
    return mangled, log.getvalue()


def _ptx(arch: str) -> str:
    """The PTX of the test kernels (NVRTC's C API: cuda.core's PTX target wants a driver)."""
    from cuda.bindings import nvrtc

    def ok(ret: Any) -> Any:
        err, *rest = ret
        assert int(err) == 0, err
        return rest[0] if len(rest) == 1 else rest

    prog = ok(nvrtc.nvrtcCreateProgram(_source().encode(), b"mma_test.cu", 0, [], []))
    for n in _names():
        ok(nvrtc.nvrtcAddNameExpression(prog, n.encode()))
    opts = [f"--gpu-architecture=compute_{arch[3:]}".encode(), b"-std=c++17"]
    err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    assert int(err) == 0, err
    size = ok(nvrtc.nvrtcGetPTXSize(prog))
    buf = b" " * size
    ok(nvrtc.nvrtcGetPTX(prog, buf))
    ok(nvrtc.nvrtcDestroyProgram(prog))
    return buf.decode(errors="replace")


@pytest.mark.cuda_compile
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_mma_header_compiles_without_spills(arch):
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    key = hashlib.sha256("\0".join([_source(), arch, f"{major}.{minor}"]).encode()).hexdigest()
    cache = Path(
        os.environ.get("FASTWEIGHTS_NVRTC_CACHE", Path.home() / ".cache" / "fastweights" / "nvrtc")
    )
    path = cache / f"ptxas_mma_{key[:24]}.json"
    if path.exists():
        report = json.loads(path.read_text())
    else:
        mangled, log = _nvrtc_compile(arch)
        code = _ptx(arch)
        entries: dict[str, dict[str, int]] = {}
        name = None
        for line in log.splitlines():
            if m := _ENTRY.search(line):
                name = mangled.get(m.group(1), m.group(1))
                entries[name] = {}
            elif name and (m := _FRAME.search(line)):
                entries[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
            elif name and (m := _USED.search(line)):
                entries[name]["registers"] = int(m[1])
        # which kernels (by mangled name in the PTX) use the tensor-core instruction
        funcs = re.split(r"\.entry\s+", code)[1:]
        with_mma = {
            mangled.get(f.split("(")[0].strip(), f.split("(")[0].strip())
            for f in funcs
            if "mma.sync.aligned.m16n8k16.row.col.f32" in f
        }
        report = {"entries": entries, "with_mma": sorted(with_mma)}
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, sort_keys=True))
    entries = report["entries"]
    assert sorted(entries) == sorted(_names())
    bad = {n: r for n, r in entries.items() if r["spill_stores"] or r["spill_loads"] or r["stack"]}
    assert not bad, f"spills or local memory: {bad}"
    tensor = {
        n
        for n in _names()
        if ("fw_half" in n or "fw_bf16" in n or n.startswith("mma_raw"))
        and not n.startswith("round_trip")
    }
    assert set(report["with_mma"]) == tensor


@needs_gxx
@pytest.mark.cuda_emulated
@pytest.mark.parametrize("t", ["half", "float"])
def test_lanes_at_different_call_sites_are_rejected(mod, t):
    from fastweights.backends.cupy.emulator import LaunchError

    rng = np.random.default_rng(4)
    a, _ = _tile_inputs(rng, t, (16, 16))
    b, _ = _tile_inputs(rng, t, (8, 16))
    with pytest.raises(LaunchError, match=r"divergent (mma\.sync|fw_warp_mma)"):
        mod.get_function(f"divergent_sites<{TYPES[t]}>")(
            (1,), (32,), (a, b, np.zeros((16, 8), np.float32))
        )


@needs_gxx
@pytest.mark.cuda_emulated
@pytest.mark.parametrize("kind", ["half", "bf16"])
def test_accumulator_store_rounds_to_nearest_even(mod, kind):
    rng = np.random.default_rng(5)
    c = (rng.standard_normal((16, 16)) * 2.0 ** rng.integers(-30, 30, (16, 16))).astype(np.float32)
    c[0, :6] = [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e30]
    c[1, :2] = np.float32(1 + 2**-8), np.float32(1 + 3 * 2**-8)  # bfloat16 ties
    c[2, :2] = np.float32(1 + 2**-11), np.float32(1 + 3 * 2**-11)  # half ties
    h = np.zeros((16, 16), np.uint16 if kind == "bf16" else np.float16)
    d = np.zeros((16, 16), np.float32)
    mod.get_function(f"round_trip<{TYPES[kind]}>")((1,), (32,), (c, h, d))
    if kind == "half":
        with np.errstate(over="ignore"):
            want = c.astype(np.float16)
        np.testing.assert_array_equal(
            h.view(np.uint16)[~np.isnan(c)], want.view(np.uint16)[~np.isnan(c)]
        )
    else:
        want_bits = _bf16_bits(c)
        np.testing.assert_array_equal(h[~np.isnan(c)], want_bits[~np.isnan(c)])
        want = _bf16_value(want_bits)
    np.testing.assert_array_equal(d, want.astype(np.float32))  # NaN == NaN here
