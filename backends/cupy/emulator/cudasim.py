"""A CPU stand-in for ``cupy.RawModule`` / ``cupy.RawKernel``, for tests without a GPU.

The *same CUDA C++ source string* that CuPy would compile with NVRTC is compiled by ``g++
-std=c++20`` against ``cuda_cpu_shim.h`` into a shared library, and its kernels are launched on
NumPy arrays::

    mod = RawModule(code=SRC, options=("-std=c++17",), name_expressions=["k<float,16>"])
    ker = mod.get_function("k<float,16>")            # or an extern "C" name
    ker((grid,), (block,), (q, k, v, o, np.int32(T)), shared_mem=0, order="reverse")

Blocks run one at a time; the threads of a block run as fibers (default, deterministic, the
``order`` between barriers is selectable) or as real threads (``mode="threads"``, for
ThreadSanitizer). Arguments are checked against the C++ signature (dtype of the pointed-to data
and scalar types) more strictly than CuPy, which silently reinterprets bytes.

Environment: ``CUDASIM_MODE=fiber|threads``, ``CUDASIM_CXX`` (default ``g++``),
``CUDASIM_CXXFLAGS`` (extra flags, e.g. ``-fsanitize=address``), ``CUDASIM_CACHE_DIR`` (default
``cudasim/`` in fastweights' kernel cache, see :func:`cache_dir`), ``CUDASIM_ORDER`` (default
launch order: ``forward``, ``reverse``, ``random``, ``roundrobin``) and ``CUDASIM_SEED`` (seed
of the random order).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
SHIM = _HERE / "cuda_cpu_shim.h"
ORDERS = {"forward": 0, "reverse": 1, "random": 2, "roundrobin": 3}
_compile_lock = threading.Lock()


class CompileError(RuntimeError):
    """g++ rejected the translation unit (the message holds the end of its output)."""


class LaunchError(RuntimeError):
    """A launch failed: bad configuration, divergent barrier, deadlock, bad shuffle."""


def _strip_comments(src: str) -> str:
    """Blank out comments and string literals (keeps offsets and newlines)."""

    def blank(m: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\])*"', blank, src, flags=re.S)


_DYN_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\w+\s*\)\s*)?"
    r"([A-Za-z_][\w:<>, ]*?[\w>])\s+(?:(?:__align__|alignas)\s*\(\s*\w+\s*\)\s*)?"
    r"(\w+)\s*\[\s*\]\s*;"
)


def _transform(src: str) -> str:
    """``extern __shared__ T name[];`` -> a macro over the launch's dynamic smem buffer."""
    out, pos = [], 0
    for m in _DYN_SMEM.finditer(src):
        typ, name = m.group(1).strip(), m.group(2)
        line_after = src.count("\n", 0, m.end()) + 1
        out.append(src[pos : m.start()])
        out.append(
            f"\n#undef {name}\n"
            f"#define {name} (reinterpret_cast<{typ}*>(::cudasim::dynamic_smem()))\n"
            f'#line {line_after} "kern.cu"\n'
        )
        pos = m.end()
    out.append(src[pos:])
    return "".join(out)


_GLOBAL = re.compile(
    r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+"
    r"(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\("
)


def _extern_c_kernels(src: str) -> list[str]:
    s = _strip_comments(src)
    names = []
    # extern "C" __global__ void name(   (the string literal was blanked: match the blank)
    for m in re.finditer(r"extern\s+ {3}\s*(__global__[^;{(]*\()", s):
        g = _GLOBAL.match(m.group(1) + ")") or _GLOBAL.search(s, m.start(1))
        if g:
            names.append(g.group(1))
    # extern "C" { ... } blocks
    for m in re.finditer(r"extern\s+ {3}\s*\{", s):
        depth, i = 1, m.end()
        while i < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[i], 0)
            i += 1
        names += [g.group(1) for g in _GLOBAL.finditer(s, m.end(), i)]
    return list(dict.fromkeys(names))


def _cxx_flags_from_nvrtc(options: Iterable[str]) -> list[str]:
    """The NVRTC options with a CPU meaning (macros, include paths)."""
    flags = []
    for o in options:
        if o.startswith(("-D", "-U", "-I")) or o.startswith("--define-macro="):
            flags.append(o.replace("--define-macro=", "-D"))
        elif o.startswith("--include-path="):
            flags.append("-I" + o.split("=", 1)[1])
    return flags


_SCALAR_CODES: dict[str, type[np.generic]] = {
    "f4": np.float32,
    "f8": np.float64,
    "i1": np.int8,
    "i2": np.int16,
    "i4": np.int32,
    "i8": np.int64,
    "u1": np.uint8,
    "u2": np.uint16,
    "u4": np.uint32,
    "u8": np.uint64,
    "b1": np.bool_,
}


def _order_code(order: str | int | None) -> int:
    if order is None:
        order = os.environ.get("CUDASIM_ORDER", "forward")
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
        return ORDERS[order]
    return int(order)


class RawKernel:
    """One kernel of a compiled :class:`RawModule`; call it like ``cupy.RawKernel``."""

    def __init__(self, module: RawModule, idx: int, name: str):
        self.module, self.name = module, name
        lib = module._lib
        sig = getattr(lib, f"__cudasim_sig_{idx}")
        sig.restype = ctypes.c_char_p
        self.signature = [c for c in sig().decode().split(",") if c]
        self._launch = getattr(lib, f"__cudasim_launch_{idx}")
        self._launch.restype = ctypes.c_int

    def _pointer(self, i: int, want: str, a: Any, keep: list[Any]) -> ctypes.c_void_p:
        if a is None:
            v = ctypes.c_void_p(0)
        elif isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                raise TypeError(f"{self.name}: arg {i} is not C-contiguous")
            if a.dtype.kind == "c":  # complex <-> float2-like structs
                got = f"V{a.dtype.itemsize}"
            else:
                got = f"{a.dtype.kind}{a.dtype.itemsize}"
            if not want.startswith("V") and want != got:
                raise TypeError(
                    f"{self.name}: arg {i} expects pointer to {want}, got array of {a.dtype}"
                )
            v = ctypes.c_void_p(a.ctypes.data)
        else:
            raise TypeError(
                f"{self.name}: arg {i} expects a NumPy array (device pointer), "
                f"got {type(a).__name__}"
            )
        keep.append(v)
        return ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)

    def _scalar(self, i: int, tc: str, a: Any, keep: list[Any]) -> ctypes.c_void_p:
        if tc not in _SCALAR_CODES:
            size = int(tc[1:])
            if isinstance(a, np.void | np.ndarray) and np.asarray(a).nbytes == size:
                buf = ctypes.create_string_buffer(np.asarray(a).tobytes(), size)
                keep.append(buf)
                return ctypes.cast(buf, ctypes.c_void_p)
            raise TypeError(f"{self.name}: arg {i} is a struct of {size} bytes; pass a numpy.void")
        want = np.dtype(_SCALAR_CODES[tc])
        # What CuPy would pass: Python int -> long long, float -> double, bool -> bool.
        have: np.dtype[Any]
        if isinstance(a, bool | np.bool_):
            have = np.dtype(np.bool_)
        elif isinstance(a, int):
            have = np.dtype(np.int64)
        elif isinstance(a, float):
            have = np.dtype(np.float64)
        elif isinstance(a, np.generic | np.ndarray) and np.ndim(a) == 0:
            have = np.asarray(a).dtype
        else:
            raise TypeError(f"{self.name}: arg {i} expects scalar {want}, got {type(a).__name__}")
        if have != want:
            if not (have.kind in "iub" and want.kind in "iub"):
                raise TypeError(
                    f"{self.name}: arg {i} is C type {want} but CuPy would pass {have} "
                    f"(bytes reinterpreted on the GPU); wrap it as numpy.{want.name}(...)"
                )
            if np.asarray(a).astype(want).astype(have) != np.asarray(a, dtype=have):
                raise TypeError(f"{self.name}: arg {i} value {a!r} does not fit {want}")
        v = np.asarray(a, dtype=want).copy()
        keep.append(v)
        return ctypes.c_void_p(v.ctypes.data)

    def __call__(
        self,
        grid: Sequence[int],
        block: Sequence[int],
        args: Sequence[Any],
        *,
        shared_mem: int = 0,
        order: str | int | None = None,
        seed: int | None = None,
        strict: bool = True,
    ) -> None:
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        block3 = tuple(block) + (1,) * (3 - len(block))
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name}: expects {len(self.signature)} args, got {len(args)}")
        if seed is None:
            seed = int(os.environ.get("CUDASIM_SEED", "0"))
        keep: list[Any] = []
        argv = (ctypes.c_void_p * max(1, len(args)))()
        for i, (code, a) in enumerate(zip(self.signature, args, strict=True)):
            if code[0] == "P":
                argv[i] = self._pointer(i, code[1:], a, keep)
            else:
                argv[i] = self._scalar(i, code[1:], a, keep)
        g = (ctypes.c_uint * 3)(*grid3)
        b = (ctypes.c_uint * 3)(*block3)
        opts = (ctypes.c_int * 4)(_order_code(order), int(seed), int(bool(strict)), 0)
        err = ctypes.create_string_buffer(4096)
        rc = self._launch(g, b, ctypes.c_size_t(shared_mem), argv, opts, err, ctypes.c_size_t(4096))
        if rc:
            raise LaunchError(f"{self.name}: {err.value.decode()}")


def cache_dir() -> Path:
    """The folder of compiled modules: ``CUDASIM_CACHE_DIR`` when set, else ``cudasim/`` in
    fastweights' per-user kernel cache (``FASTWEIGHTS_CACHE_DIR`` or the platform's cache
    directory; ``python -m fastweights cache`` shows it and ``--clear`` empties it).

    Modules are named by a hash of the translation unit, the shim, the compiler and its flags,
    so one folder serves every kernel version and build mode.

    Examples
    --------
    >>> import os
    >>> from fastweights.backends.cupy.emulator.cudasim import cache_dir
    >>> os.environ.get("CUDASIM_CACHE_DIR") is not None or cache_dir().name == "cudasim"
    True
    """
    env = os.environ.get("CUDASIM_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    try:
        from fastweights.backends import emulator_cache_dir
    except ImportError:  # the emulator copied out of fastweights
        return Path.home() / ".cache" / "cudasim"
    return emulator_cache_dir()


class RawModule:
    """Like ``cupy.RawModule(code=..., options=..., name_expressions=...)``, on the CPU.

    Compiled lazily on the first :meth:`get_function`; the shared library is cached on disk
    in :func:`cache_dir` by a hash of the translation unit, compiler and flags.
    """

    def __init__(
        self,
        code: str,
        options: Sequence[str] = (),
        name_expressions: Sequence[str] | None = None,
        *,
        mode: str | None = None,
        extra_cxxflags: Sequence[str] = (),
    ):
        self.code, self.options = code, tuple(options)
        self.name_expressions = list(name_expressions or [])
        self.mode = mode or os.environ.get("CUDASIM_MODE", "fiber")
        self._names = self.name_expressions + [
            n for n in _extern_c_kernels(code) if n not in self.name_expressions
        ]
        self._lib: ctypes.CDLL | None = None
        self._extra = list(extra_cxxflags) + shlex.split(os.environ.get("CUDASIM_CXXFLAGS", ""))

    def _tu(self) -> str:
        parts = [
            f'#include "{SHIM}"',
            '#line 1 "kern.cu"',
            _transform(self.code),
            "",
            "// ---- cudasim stubs",
        ]
        for i, n in enumerate(self._names):
            parts.append(
                f'extern "C" const char* __cudasim_sig_{i}() '
                f"{{ return ::cudasim::signature(&{n}); }}"
            )
            parts.append(
                f'extern "C" int __cudasim_launch_{i}(const unsigned* g, const unsigned* b, '
                f"size_t smem, void** argv, const int* opts, char* err, size_t n) "
                f"{{ return ::cudasim::launch_kernel(&{n}, g, b, smem, argv, opts, err, n); }}"
            )
        return "\n".join(parts) + "\n"

    def compile(self) -> RawModule:
        """Build (or load from the cache) the shared library; returns self."""
        if self._lib is not None:
            return self
        cxx = os.environ.get("CUDASIM_CXX", "g++")
        flags = [
            "-std=c++20",
            "-O1",
            "-g",
            "-fPIC",
            "-shared",
            "-pthread",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-Wno-unused-variable",
            "-Wno-unused-function",
            "-Wno-unused-but-set-variable",
        ]
        if self.mode == "threads":
            flags.append("-DCUDASIM_THREADS")
        flags += _cxx_flags_from_nvrtc(self.options) + self._extra
        tu = self._tu()
        key = hashlib.sha256("\0".join([tu, SHIM.read_text(), cxx, *flags]).encode())
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        so = cache / f"mod_{key.hexdigest()[:24]}.so"
        with _compile_lock:
            if not so.exists():
                with tempfile.TemporaryDirectory() as d:
                    cpp = Path(d) / "kern.cpp"
                    cpp.write_text(tu)
                    tmp = Path(d) / "mod.so"
                    r = subprocess.run(
                        [cxx, *flags, str(cpp), "-o", str(tmp)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if r.returncode:
                        raise CompileError(r.stderr[-8000:])
                    os.replace(tmp, so)
        self._lib = ctypes.CDLL(str(so))
        return self

    def get_function(self, name: str) -> RawKernel:
        """The kernel ``name``: an ``extern "C"`` kernel or one of the name expressions."""
        if name not in self._names:
            raise KeyError(
                f'{name!r}: not an extern "C" __global__ kernel nor a name expression '
                f"(known: {self._names})"
            )
        self.compile()
        return RawKernel(self, self._names.index(name), name)


def RawKernelFromSource(code: str, name: str, options: Sequence[str] = (), **kw: Any) -> RawKernel:
    """Like ``cupy.RawKernel(code, name, options)``."""
    return RawModule(code, options, **kw).get_function(name)
