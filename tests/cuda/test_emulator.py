"""The CUDA emulator itself: semantics it reproduces and bugs it must catch.

These are the checks of the original ``cudasim`` folder as pytest tests: a fast-weight scan
kernel against NumPy under every thread order, kernels with planted bugs (missing or divergent
``__syncthreads``, partial-warp shuffles, out-of-bounds writes, data races), argument checks
stricter than CuPy's, warp intrinsics, 2-D grids, dynamic shared memory and atomics.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(
        shutil.which(os.environ.get("CUDASIM_CXX", "g++")) is None, reason="g++ is not on PATH"
    ),
]

HERE = Path(__file__).resolve().parent
ORDERS = ("forward", "reverse", "random", "roundrobin")


def _cudasim():
    from fastweights.backends.cupy.emulator import cudasim

    return cudasim


@pytest.fixture(scope="module")
def bugs():
    return _cudasim().RawModule((HERE / "bug_kernels.cu").read_text())


def _scan_reference(q, k, v):
    """``S += k v^T; o = S^T q`` per (batch*head) row, and ``|o_t|^2``."""
    S = np.zeros((q.shape[0], q.shape[2], v.shape[2]))
    o, norms = np.empty(v.shape), np.empty(q.shape[:2])
    for t in range(q.shape[1]):
        S += k[:, t, :, None] * v[:, t, None, :]
        o[:, t] = np.einsum("bk,bkv->bv", q[:, t], S)
        norms[:, t] = (o[:, t] ** 2).sum(-1)
    return o, norms


@pytest.mark.parametrize(
    "order", [o if o == "forward" else pytest.param(o, marks=pytest.mark.slow) for o in ORDERS]
)
@pytest.mark.parametrize(
    ("name", "dtype", "dk", "dv"),
    [
        ("fw_scan_f64", np.float64, 16, 64),
        ("fw_scan_f32", np.float32, 16, 64),
        ("fw_scan<float,16,64>", np.float32, 16, 64),
        ("fw_scan<double,64,128>", np.float64, 64, 128),
    ],
)
def test_example_scan_kernel(name, dtype, dk, dv, order):
    src = (HERE / "example_scan_kernel.cuh").read_text()
    names = ["fw_scan<float,16,64>", "fw_scan<double,64,128>"]
    kern = _cudasim().RawModule(src, ("-std=c++17",), name_expressions=names).get_function(name)
    rng = np.random.default_rng(0)
    bh, t = 3, 11
    q = rng.standard_normal((bh, t, dk)).astype(dtype)
    k = (rng.standard_normal((bh, t, dk)) / np.sqrt(dk)).astype(dtype)
    v = rng.standard_normal((bh, t, dv)).astype(dtype)
    o, norms = np.zeros((bh, t, dv), dtype), np.zeros((bh, t), dtype)
    kern((bh,), (dv,), (q, k, v, o, norms, np.int32(t)), order=order)
    ro, rn = _scan_reference(*(x.astype(np.float64) for x in (q, k, v)))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert np.abs(o - ro).max() / np.abs(ro).max() < tol
    assert np.abs(norms - rn).max() / np.abs(rn).max() < tol
    assert kern.signature == ["P" + np.dtype(dtype).str[1:]] * 5 + ["Si4"]


def test_missing_syncthreads_shows_under_another_order(bugs):
    x = np.random.default_rng(0).standard_normal((50, 128)).astype(np.float32)
    errors = {}
    for order in ORDERS:
        out = np.zeros(50, np.float32)
        bugs.get_function("missing_sync")((1,), (128,), (x, out, np.int32(50)), order=order)
        errors[order] = float(np.abs(out - x.sum(1)).max())
    assert errors["forward"] < 1e-4
    assert errors["reverse"] > 1.0


def test_divergent_syncthreads_is_an_error(bugs):
    with pytest.raises(_cudasim().LaunchError, match="divergent __syncthreads"):
        bugs.get_function("divergent_sync")((1,), (64,), (np.zeros(64, np.float32),))


def test_partial_warp_shuffle_is_an_error(bugs):
    with pytest.raises(_cudasim().LaunchError, match=r"deadlock|mask"):
        bugs.get_function("partial_shuffle")((1,), (64,), (np.zeros(64, np.float32),))


def test_exited_threads_do_not_block_barriers(bugs):
    x, out = np.arange(256, dtype=np.float32), np.zeros(256, np.float32)
    bugs.get_function("early_exit_ok")((1,), (256,), (x, out, np.int32(100)), order="reverse")
    np.testing.assert_array_equal(out[:100], x[:100][::-1])


def test_arguments_are_checked_like_the_gpu_reads_them(bugs):
    kern = bugs.get_function("early_exit_ok")
    x, out = np.arange(256, dtype=np.float32), np.zeros(256, np.float32)
    with pytest.raises(TypeError, match=r"numpy\.int32"):
        kern((1,), (256,), (x, out, 100.0))
    with pytest.raises(TypeError, match="expects pointer to f4"):
        kern((1,), (256,), (x.astype(np.float64), out, np.int32(100)))
    with pytest.raises(TypeError, match="not C-contiguous"):
        kern((1,), (256,), (np.zeros(512, np.float32)[::2], out, np.int32(100)))
    with pytest.raises(TypeError, match="expects 3 args"):
        kern((1,), (256,), (x, out))
    with pytest.raises(_cudasim().LaunchError, match="invalid launch configuration"):
        kern((1,), (2048,), (x, out, np.int32(100)))
    kern((1,), (256,), (x, out, 100))  # a Python int: CuPy passes int64, low bytes read


def test_dynamic_shared_memory_shuffle_down_ballot_atomics(bugs):
    n = 1000
    xs = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    total, ballots = np.zeros(1, np.float32), np.zeros((n + 127) // 128 * 4, np.uint32)
    bugs.get_function("dyn_smem_atomics")(
        ((n + 127) // 128,), (128,), (xs, total, ballots, np.int32(n)), shared_mem=128 * 4
    )
    pad = np.zeros(len(ballots) * 32, np.float32)
    pad[:n] = xs
    bits = np.uint64(1) << np.arange(32, dtype=np.uint64)
    expected = ((pad.reshape(-1, 32) > 0) * bits).sum(1).astype(np.uint32)
    assert total[0] == pytest.approx(xs.sum(), rel=1e-5, abs=1e-4)
    np.testing.assert_array_equal(ballots, expected)


_SEMANTICS = r"""
extern "C" __global__ void warp_ops(const int* x, int* bcast8, int* scan, int* xor1, int* down16) {
    int i = blockIdx.x * blockDim.x * blockDim.y + threadIdx.y * blockDim.x + threadIdx.x;
    int v = x[i];
    bcast8[i] = __shfl_sync(0xffffffffu, v, 0, 8);
    int s = v;
    for (int d = 1; d < 32; d <<= 1) {
        int t = __shfl_up_sync(0xffffffffu, s, d);
        if ((threadIdx.x & 31) >= d) s += t;
    }
    scan[i] = s;
    xor1[i] = __shfl_xor_sync(0xffffffffu, v, 1);
    down16[i] = __shfl_down_sync(0xffffffffu, v, 4, 16);
    __syncwarp();
}
extern "C" __global__ void transpose(const float* in, float* out, int n) {
    __shared__ float tile[32][33];
    int x = blockIdx.x * 32 + threadIdx.x, y = blockIdx.y * 32 + threadIdx.y;
    for (int j = 0; j < 32; j += blockDim.y)
        if (x < n && y + j < n) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * n + x];
    __syncthreads();
    x = blockIdx.y * 32 + threadIdx.x; y = blockIdx.x * 32 + threadIdx.y;
    for (int j = 0; j < 32; j += blockDim.y)
        if (x < n && y + j < n) out[(y + j) * n + x] = tile[threadIdx.x][threadIdx.y + j];
}
"""


def test_warp_intrinsics_with_widths():
    mod = _cudasim().RawModule(_SEMANTICS)
    x = np.random.default_rng(0).integers(0, 100, 2 * 32 * 2).astype(np.int32)
    outs = [np.zeros_like(x) for _ in range(4)]
    mod.get_function("warp_ops")((2,), (32, 2), (x, *outs))
    w = x.reshape(-1, 32)
    np.testing.assert_array_equal(outs[0].reshape(-1, 8), np.repeat(w.reshape(-1, 8)[:, :1], 8, 1))
    np.testing.assert_array_equal(outs[1].reshape(-1, 32), np.cumsum(w, 1))
    np.testing.assert_array_equal(outs[2].reshape(-1, 32), w[:, np.arange(32) ^ 1])
    seg, lanes = w.reshape(-1, 16), np.arange(16)
    down = np.where(lanes + 4 < 16, seg[:, np.minimum(lanes + 4, 15)], seg)
    np.testing.assert_array_equal(outs[3].reshape(-1, 16), down)


def test_two_dimensional_grid_and_block():
    mod = _cudasim().RawModule(_SEMANTICS)
    n = 70
    a = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    out = np.zeros_like(a)
    grid = ((n + 31) // 32, (n + 31) // 32)
    mod.get_function("transpose")(grid, (32, 8), (a, out, np.int32(n)), order="reverse")
    np.testing.assert_array_equal(out, a.T)


@pytest.mark.slow  # a module that fails to compile is never cached
def test_unknown_kernel_and_compile_errors():
    cudasim = _cudasim()
    mod = cudasim.RawModule('extern "C" __global__ void ok(float* x) { x[0] = 1.f; }')
    with pytest.raises(KeyError, match="not an extern"):
        mod.get_function("nope")
    bad = cudasim.RawModule('extern "C" __global__ void bad(float* x) { x[0] = undefined; }')
    with pytest.raises(cudasim.CompileError, match="undefined"):
        bad.get_function("bad")


def _sanitizer_env(kind: str) -> dict[str, str] | None:
    """Environment preloading the sanitizer runtime of ``g++`` (None if it has none)."""
    lib = subprocess.run(
        ["gcc", f"-print-file-name=lib{kind}.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    cxx = subprocess.run(
        ["gcc", "-print-file-name=libstdc++.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not os.path.isabs(lib) or not os.path.exists(lib):
        return None
    env = dict(os.environ, LD_PRELOAD=f"{lib} {cxx}", CUDASIM_CXXFLAGS=f"-fsanitize={kind}")
    if kind == "asan":
        env["CUDASIM_CXXFLAGS"] = "-fsanitize=address"
        env["ASAN_OPTIONS"] = "detect_leaks=0"
    else:
        env["CUDASIM_CXXFLAGS"] = "-fsanitize=thread"
        env["CUDASIM_MODE"] = "threads"
    return env


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_address_sanitizer_catches_out_of_bounds_write():
    env = _sanitizer_env("asan")
    if env is None:
        pytest.skip("gcc has no libasan")
    r = _run_python(
        """
        import numpy as np
        from fastweights.backends.cupy.emulator import RawModule
        mod = RawModule(open("bug_kernels.cu").read())
        mod.get_function("oob_write")((2,), (64,), (np.zeros(100, np.float32), np.int32(100)))
        """,
        env,
    )
    assert r.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr


@pytest.mark.slow
def test_thread_sanitizer_catches_missing_barrier():
    env = _sanitizer_env("tsan")
    if env is None:
        pytest.skip("gcc has no libtsan")
    r = _run_python(
        """
        import numpy as np
        from fastweights.backends.cupy.emulator import RawModule
        mod = RawModule(open("bug_kernels.cu").read(), mode="threads")
        x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        mod.get_function("missing_sync")((1,), (64,), (x, np.zeros(4, np.float32), np.int32(4)))
        """,
        env,
    )
    assert "ThreadSanitizer: data race" in r.stderr
