"""Every kernel instantiation compiles with NVRTC for sm_80 and sm_90, without a GPU.

``cuda.core``'s ``Program`` drives NVRTC to a cubin with ``-Xptxas -v``; the ptxas report is
parsed and each kernel must have no register spills, no local-memory stack frame, and fit the
register file and 48 KiB of static shared memory. Needs ``pip install ".[cuda-test]"``
(``cuda-core``, ``cuda-bindings``, ``nvidia-cuda-nvrtc``); skipped with the reason otherwise.
The ptxas reports are cached by source, options and NVRTC version under
``FASTWEIGHTS_NVRTC_CACHE`` (default ``~/.cache/fastweights/nvrtc``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from fastweights.backends import cuda_macros
from fastweights.backends.cupy import _launch as L

pytestmark = pytest.mark.cuda_compile

ARCHS = ("sm_80", "sm_90")
PAIRS = (("float", "float32"), ("fw_half", "float32"), ("double", "float64"))
KEY_SIZES = (8, 16, 32, 64, 128, 256)


def _nvrtc() -> tuple[Any, Any, str]:
    """``(Program, ProgramOptions, NVRTC version)``, or a skip naming what is missing."""
    try:
        try:
            from cuda.core import Program, ProgramOptions
        except ImportError:
            from cuda.core.experimental import Program, ProgramOptions
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
        if int(err) != 0:
            raise RuntimeError(f"nvrtcVersion failed: {err}")
    except Exception as exc:
        pytest.skip(
            f"NVRTC through cuda.core is not usable ({type(exc).__name__}: {exc}); "
            'pip install ".[cuda-test]" in a checkout of the repository'
        )
    return Program, ProgramOptions, f"{major}.{minor}"


def _names(tin: str, compute: str) -> list[str]:
    return [n for K in KEY_SIZES for n in L.group(tin, L.ctype(compute), L.tile_for(K, compute))]


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers.*?(\d+) bytes smem")


def _parse(log: str, mangled: dict[str, str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            name = mangled.get(m.group(1), m.group(1))
            out[name] = {}
        elif name and (m := _FRAME.search(line)):
            out[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif name and (m := _USED.search(line)):
            out[name].update(registers=int(m[1]), smem=int(m[2]))
    return out


def _compile(arch: str, tin: str, compute: str) -> dict[str, dict[str, int]]:
    Program, ProgramOptions, version = _nvrtc()
    names = _names(tin, compute)
    key = hashlib.sha256(
        "\0".join([L.source(), arch, version, *L.OPTIONS, *names]).encode()
    ).hexdigest()[:24]
    default = Path.home() / ".cache" / "fastweights" / "nvrtc"
    cache = Path(os.environ.get("FASTWEIGHTS_NVRTC_CACHE", default))
    path = cache / f"ptxas_{key}.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    log = io.StringIO()
    options = ProgramOptions(
        arch=arch, std="c++17", ptxas_options=["-v"], define_macro=list(cuda_macros())
    )
    obj = Program(L.source(), "c++", options=options).compile(
        "cubin", name_expressions=names, logs=log
    )
    mangled = {
        (v.decode() if isinstance(v, bytes) else str(v)): k for k, v in obj.symbol_mapping.items()
    }
    report = _parse(log.getvalue(), mangled)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, sort_keys=True))
    return report


@pytest.mark.parametrize(("tin", "compute"), PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("arch", ARCHS)
def test_instantiations_compile_without_spills(arch, tin, compute):
    report = _compile(arch, tin, compute)
    names = _names(tin, compute)
    assert sorted(report) == sorted(names)
    lines = [
        f"{n}: {r['registers']} registers, stack {r['stack']} B, "
        f"spills {r['spill_stores']}/{r['spill_loads']} B, smem {r['smem']} B"
        for n, r in sorted(report.items())
    ]
    print(f"\n{arch} {tin}/{compute}\n  " + "\n  ".join(lines))
    bad = [
        line
        for line, r in zip(lines, (report[n] for n in sorted(report)), strict=True)
        if r["spill_stores"]
        or r["spill_loads"]
        or r["stack"]
        or r["registers"] > 255
        or r["smem"] > 48 * 1024
    ]
    assert not bad, "kernels with spills, local memory or too many resources:\n" + "\n".join(bad)


def test_compiled_tiles_cover_every_key_size():
    for _, compute in PAIRS:
        picked = {L.tile_for(K, compute) for K in range(1, L.MAX_K + 1)}
        compiled = {L.tile_for(K, compute) for K in KEY_SIZES}
        assert picked == compiled
        for tile in picked:
            assert tile.threads % 32 == 0 and tile.threads <= 256
            assert tile.rows >= 8 and 32 % min(tile.ksplit, 32) == 0


# ---- the chunk-form kernels (kernels/chunk.cu, backends/cupy/_chunk.py)


def _chunk_names(compute: str) -> list[str]:
    from fastweights.backends.cupy import _chunk as CH

    names = list(CH.parallel_group(compute))
    for tile in dict.fromkeys(L.tile_for(K, compute) for K in KEY_SIZES):
        names += CH.state_group(compute, tile)
    return names


def _compile_chunk(arch: str, compute: str) -> dict[str, dict[str, int]]:
    from fastweights.backends.cupy import _chunk as CH

    Program, ProgramOptions, version = _nvrtc()
    names = _chunk_names(compute)
    key = hashlib.sha256(
        "\0".join([CH.source(), arch, version, *L.OPTIONS, *names]).encode()
    ).hexdigest()[:24]
    default = Path.home() / ".cache" / "fastweights" / "nvrtc"
    cache = Path(os.environ.get("FASTWEIGHTS_NVRTC_CACHE", default))
    path = cache / f"ptxas_chunk_{key}.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    log = io.StringIO()
    options = ProgramOptions(
        arch=arch, std="c++17", ptxas_options=["-v"], define_macro=list(cuda_macros())
    )
    obj = Program(CH.source(), "c++", options=options).compile(
        "cubin", name_expressions=names, logs=log
    )
    mangled = {
        (v.decode() if isinstance(v, bytes) else str(v)): k for k, v in obj.symbol_mapping.items()
    }
    report = _parse(log.getvalue(), mangled)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, sort_keys=True))
    return report


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunk_instantiations_compile_without_spills(arch, compute):
    report = _compile_chunk(arch, compute)
    names = _chunk_names(compute)
    assert sorted(report) == sorted(names)
    lines = {
        n: f"{n}: {r['registers']} registers, stack {r['stack']} B, "
        f"spills {r['spill_stores']}/{r['spill_loads']} B, smem {r['smem']} B"
        for n, r in sorted(report.items())
    }
    print(f"\n{arch} chunk {compute}\n  " + "\n  ".join(lines.values()))
    bad = [
        lines[n]
        for n, r in report.items()
        if r["spill_stores"]
        or r["spill_loads"]
        or r["stack"]
        or r["registers"] > 255
        or r["smem"] > 48 * 1024
    ]
    assert not bad, "kernels with spills, local memory or too many resources:\n" + "\n".join(bad)


# ---- the recurrent-only kernels (kernels/dplr.cu, kernels/recurrent_delta.cu, kernels/srwm.cu)

_RECURRENT_ONLY = ("_dplr", "_rdelta", "_srwm")


def _module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"fastweights.backends.cupy.{name}")


def _only_names(mod: str, tin: str, compute: str) -> list[str]:
    tiles = dict.fromkeys(L.tile_for(K, compute) for K in KEY_SIZES)
    return [n for tile in tiles for n in _module(mod).group(tin, L.ctype(compute), tile)]


def _compile_only(mod: str, arch: str, tin: str, compute: str) -> dict[str, dict[str, int]]:
    src = _module(mod).source()
    Program, ProgramOptions, version = _nvrtc()
    names = _only_names(mod, tin, compute)
    key = hashlib.sha256("\0".join([src, arch, version, *L.OPTIONS, *names]).encode()).hexdigest()
    default = Path.home() / ".cache" / "fastweights" / "nvrtc"
    cache = Path(os.environ.get("FASTWEIGHTS_NVRTC_CACHE", default))
    path = cache / f"ptxas{mod}_{key[:24]}.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    log = io.StringIO()
    options = ProgramOptions(
        arch=arch, std="c++17", ptxas_options=["-v"], define_macro=list(cuda_macros())
    )
    obj = Program(src, "c++", options=options).compile("cubin", name_expressions=names, logs=log)
    mangled = {
        (v.decode() if isinstance(v, bytes) else str(v)): k for k, v in obj.symbol_mapping.items()
    }
    report = _parse(log.getvalue(), mangled)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, sort_keys=True))
    return report


@pytest.mark.parametrize("mod", _RECURRENT_ONLY)
@pytest.mark.parametrize(("tin", "compute"), PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("arch", ARCHS)
def test_recurrent_only_instantiations_compile_without_spills(arch, tin, compute, mod):
    report = _compile_only(mod, arch, tin, compute)
    names = _only_names(mod, tin, compute)
    assert sorted(report) == sorted(names)
    lines = {
        n: f"{n}: {r['registers']} registers, stack {r['stack']} B, "
        f"spills {r['spill_stores']}/{r['spill_loads']} B, smem {r['smem']} B"
        for n, r in sorted(report.items())
    }
    print(f"\n{arch} {mod} {tin}/{compute}\n  " + "\n  ".join(lines.values()))
    bad = [
        lines[n]
        for n, r in report.items()
        if r["spill_stores"]
        or r["spill_loads"]
        or r["stack"]
        or r["registers"] > 255
        or r["smem"] > 48 * 1024
    ]
    assert not bad, "kernels with spills, local memory or too many resources:\n" + "\n".join(bad)
