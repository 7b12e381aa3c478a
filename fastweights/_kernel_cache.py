"""The per-user folder of compiled kernels: where it is, what it holds, clearing and filling it.

Compiled numba kernels are cached in ``<root>/numba/<build>/``:

- ``<root>`` is ``FASTWEIGHTS_CACHE_DIR`` when set, else the platform's cache directory
  (``$XDG_CACHE_HOME/fastweights`` or ``~/.cache/fastweights`` on Linux,
  ``~/Library/Caches/fastweights`` on macOS, ``%LOCALAPPDATA%\\fastweights\\Cache`` on
  Windows), never the installed package or the source tree;
- ``<build>`` names the fastweights version, a digest of the kernels' sources, the numba and
  Python versions and the build mode (checked or not, ``NUMBA_BOUNDSCHECK``), so a kernel
  compiled by other code or in another mode is never loaded.

The CUDA emulator (``fastweights.backends.cupy.emulator``, used by the tests and by
``FASTWEIGHTS_CUDA_EMULATE=1``) caches its compiled modules in ``<root>/cudasim/`` (each named
by a hash of its source, compiler and flags) unless ``CUDASIM_CACHE_DIR`` moves them.

Nothing here imports numba: ``python -m fastweights cache`` works without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "CACHE_ENV",
    "CHECKED_ENV",
    "EMULATOR_CACHE_ENV",
    "WarmupItem",
    "cache_root",
    "cache_usage",
    "clear_cache",
    "emulator_cache_dir",
    "kernel_cache_dir",
    "numba_build",
    "numba_checked",
    "warmup",
]

CACHE_ENV = "FASTWEIGHTS_CACHE_DIR"
"""Environment variable that overrides the cache root."""

EMULATOR_CACHE_ENV = "CUDASIM_CACHE_DIR"
"""Environment variable that moves the CUDA emulator's compiled modules out of the root."""

CHECKED_ENV = "FASTWEIGHTS_NUMBA_CHECKED"
"""Environment variable that selects the checked build of the numba kernels."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def numba_checked() -> bool:
    """Whether ``FASTWEIGHTS_NUMBA_CHECKED`` asks for the checked build."""
    return _truthy(os.environ.get(CHECKED_ENV))


def _platform_cache_home() -> Path:
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "fastweights" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "fastweights"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative path.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fastweights"


def cache_root() -> Path:
    """The cache root: ``FASTWEIGHTS_CACHE_DIR``, else the platform's cache directory."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser().absolute()
    return _platform_cache_home()


def _kernel_sources() -> list[Path]:
    """The files whose code the numba kernels compile: the backend's modules, the core modules
    they import from, and the rules' constants (which numba freezes into the kernels)."""
    here = Path(__file__).resolve().parent
    import fastweights.backends as backends

    folder = Path(next(iter(backends.__path__))) / "numba"
    own = sorted(folder.glob("*.py"))
    core: set[Path] = {here / "_constants.py"}
    for path in own:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for name in re.findall(r"^from fastweights\.([\w.]+) import", text, re.MULTILINE):
            if name.split(".")[0] == "backends":
                # The toolkit re-exports the core (the constants' home, _constants.py, is
                # counted above); it lives in this package when installed but beside it in a
                # source tree, and the digest must be the same from both.
                continue
            base = here.joinpath(*name.split("."))
            core.update(p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file())
    return [*own, *sorted(core)]


@lru_cache(maxsize=1)
def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in _kernel_sources():
        digest.update(path.name.encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()[:16]


def _numba_version() -> str:
    module = sys.modules.get("numba")
    if module is not None:
        return str(getattr(module, "__version__", "unknown"))
    try:
        from importlib.metadata import version

        return version("numba")
    except Exception:
        return "none"


def _boundscheck() -> str:
    """numba's global ``NUMBA_BOUNDSCHECK`` (it overrides every function's option)."""
    module = sys.modules.get("numba")
    if module is not None:
        value = getattr(module.config, "BOUNDSCHECK", None)
        return "" if value is None else str(int(value))
    return os.environ.get("NUMBA_BOUNDSCHECK", "").strip()


def numba_build(checked: bool | None = None) -> str:
    """The name of this build's folder under ``<root>/numba``.

    Parameters
    ----------
    checked : bool, optional
        The checked build; default from ``FASTWEIGHTS_NUMBA_CHECKED``.

    Returns
    -------
    str
    """
    from fastweights import __version__

    if checked is None:
        checked = numba_checked()
    mode = "checked" if checked else "fast"
    bc = _boundscheck()
    if bc:
        mode += f"-boundscheck{bc}"
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    name = f"fastweights-{__version__}-src{_sources_digest()}-numba-{_numba_version()}-{py}-{mode}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def kernel_cache_dir(checked: bool | None = None) -> Path:
    """The folder this build's compiled numba kernels are cached in.

    Parameters
    ----------
    checked : bool, optional
        The checked build; default from ``FASTWEIGHTS_NUMBA_CHECKED``.

    Returns
    -------
    pathlib.Path
    """
    return cache_root() / "numba" / numba_build(checked)


def emulator_cache_dir() -> Path:
    """The folder of the CUDA emulator's compiled modules: ``CUDASIM_CACHE_DIR`` when set,
    else ``<root>/cudasim``.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import os
    >>> from fastweights._kernel_cache import cache_root, emulator_cache_dir
    >>> "CUDASIM_CACHE_DIR" in os.environ or emulator_cache_dir() == cache_root() / "cudasim"
    True
    """
    env = os.environ.get(EMULATOR_CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser().absolute()
    return cache_root() / "cudasim"


def _emulator_modules(folder: Path) -> list[Path]:
    """The emulator's compiled modules in ``folder`` (only files it writes: ``mod_*.so``)."""
    try:
        return sorted(p for p in folder.glob("mod_*.so") if p.is_file())
    except OSError:
        return []


def _size(path: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                size += os.stat(os.path.join(dirpath, name)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def cache_usage() -> dict[str, Any]:
    """What the cache holds: its root, this build's folder, files and bytes per build, and the
    CUDA emulator's modules.

    Returns
    -------
    dict
        ``root``, ``current`` (this build's folder), ``builds``: ``{name: (files, bytes)}``
        for every build folder under ``<root>/numba``, ``emulator`` (the emulator's folder,
        :func:`emulator_cache_dir`) and ``emulator_usage``: its modules' ``(files, bytes)``.
    """
    root = cache_root()
    builds: dict[str, tuple[int, int]] = {}
    folder = root / "numba"
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                builds[entry.name] = _size(entry)
    emulator = emulator_cache_dir()
    modules = _emulator_modules(emulator)
    size = 0
    for path in modules:
        with contextlib.suppress(OSError):
            size += path.stat().st_size
    return {
        "root": root,
        "current": kernel_cache_dir(),
        "builds": builds,
        "emulator": emulator,
        "emulator_usage": (len(modules), size),
    }


def clear_cache() -> tuple[int, int]:
    """Delete every compiled kernel: ``<root>/numba`` (all builds) and the CUDA emulator's
    modules (:func:`emulator_cache_dir`).

    Only what fastweights writes is removed: the ``numba`` folder and the emulator's
    ``mod_*.so`` files (with their folder when it is ``<root>/cudasim`` and left empty), never
    the rest of the root nor other files in a folder ``CUDASIM_CACHE_DIR`` names.

    Returns
    -------
    (files, bytes)
        What was removed.
    """
    files = size = 0
    folder = cache_root() / "numba"
    if folder.is_dir():
        files, size = _size(folder)
        shutil.rmtree(folder)
    emulator = emulator_cache_dir()
    for path in _emulator_modules(emulator):
        try:
            nbytes = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        files += 1
        size += nbytes
    if emulator == cache_root() / "cudasim":
        with contextlib.suppress(OSError):
            emulator.rmdir()  # only when empty
    return files, size


# ----------------------------------------------------------------------------------- warmup


@dataclass(frozen=True)
class WarmupItem:
    """One tiny call made by :func:`warmup`.

    Attributes
    ----------
    op : str
        The op.
    dtype : str
        Input dtype.
    form : str
        ``"recurrent"``, ``"chunk"``, ``"parallel"`` or ``"step"`` (the decoding step).
    seconds : float
        Wall time of the call: compiling or loading its kernel the first time.
    """

    op: str
    dtype: str
    form: str
    seconds: float


_DTYPES = ("float16", "float32", "float64")
_FORMS = ("recurrent", "chunk", "parallel", "step")


def _names(value: Any, allowed: Sequence[str], default: Sequence[str], arg: str) -> list[str]:
    if value is None:
        return list(default)
    if isinstance(value, str):
        value = [value]
    try:
        names = list(value)
    except TypeError:
        raise TypeError(f"{arg} must be a sequence of str, got {type(value).__name__}") from None
    out = []
    for name in names:
        if arg == "dtypes" and not isinstance(name, str):
            import numpy as np

            try:
                name = np.dtype(name).name
            except TypeError:
                raise TypeError(f"dtypes: {name!r} is not a dtype") from None
        if not isinstance(name, str):
            raise TypeError(f"{arg} must be a sequence of str, got an item {name!r}")
        if name not in allowed:
            raise ValueError(f"{arg}: {name!r} is not one of {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"{arg} is empty")
    return out


def _tiny_call(op: str, dtype: str, form: str, backend: str) -> None:
    """One call of ``op`` on a tiny problem: compiles (or loads) the kernel it needs."""
    import numpy as np

    import fastweights as fw
    from fastweights._bench import make_inputs, step_inputs, step_pool

    dt = np.dtype(dtype)
    K = V = 8
    if form == "step":
        args, kwargs = step_inputs(op, 1, 1, K, V)
        pool_dt = dt if dt.itemsize >= 4 else np.dtype(np.float32)
        zeros = step_pool(op, 1, 1, K, V)
        pool = (
            tuple(x.astype(pool_dt) for x in zeros)
            if isinstance(zeros, tuple)
            else zeros.astype(pool_dt)
        )
        cast = tuple(x.astype(dt) for x in args)
        getattr(fw.step, op)(*cast, pool, **{n: x.astype(dt) for n, x in kwargs.items()},
                             backend=backend)  # fmt: skip
        return
    args, kwargs = make_inputs(op, 1, 3, 1, K, V)
    kwargs = {n: x.astype(dt) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}
    getattr(fw, op)(*(x.astype(dt) for x in args), **kwargs, form=form, output_final_state=True,
                    backend=backend)  # fmt: skip


class _Bar:
    """A plain text progress bar on a stream: redrawn in place on a terminal, one line per
    item elsewhere (logs)."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        try:
            self.tty = bool(stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False

    def __call__(self, done: int, total: int, label: str) -> None:
        fill = self.WIDTH * done // max(total, 1)
        bar = "#" * fill + "-" * (self.WIDTH - fill)
        text = f"warmup [{bar}] {done:>{len(str(total))}}/{total} {label}"
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if done == total else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def warmup(
    ops: Iterable[str] | None = None,
    dtypes: Iterable[Any] | None = None,
    forms: Iterable[str] | None = None,
    *,
    backend: str = "numba",
    progress: bool | Callable[[int, int, str], None] | None = None,
) -> list[WarmupItem]:
    """Compile (or load from the cache) the kernels that calls of ``ops`` need, ahead of use.

    Runs one tiny call per op, dtype and form, so the first real call does not wait for
    the JIT compiler. The numba backend compiles one kernel per form and compute dtype (all
    ops share it): cold, each takes 10-30 s; cached, well under a second. Compiled kernels
    are kept in the folder ``python -m fastweights cache`` shows.

    Parameters
    ----------
    ops : sequence of str, optional
        Ops to prepare; default every op.
    dtypes : sequence of str or dtype, optional
        Input dtypes, of ``float16`` (computed in float32), ``float32`` and ``float64``;
        default float32 and float64.
    forms : sequence of str, optional
        ``"recurrent"``, ``"chunk"``, ``"parallel"`` and ``"step"`` (the decoding step of
        :mod:`fastweights.step`); default every form the backend has, and ``"step"``. Forms
        the backend lacks for an op are skipped.
    backend : str
        The backend to prepare.
    progress : bool or callable, optional
        Draw a progress bar on ``sys.stderr`` (default: when it is a terminal), or call
        ``progress(done, total, label)`` before each call and after the last.

    Returns
    -------
    list of WarmupItem
        The calls made, with their times.

    Raises
    ------
    ValueError
        An unknown op, dtype or form, or a backend that is not registered.
    TypeError
        The backend cannot run here (e.g. numba is not installed).

    Examples
    --------
    >>> import fastweights
    >>> done = fastweights.warmup(ops=["delta_rule"], dtypes=["float64"],
    ...                           forms=["recurrent", "step"], progress=False)
    >>> [(w.op, w.dtype, w.form) for w in done]
    [('delta_rule', 'float64', 'recurrent'), ('delta_rule', 'float64', 'step')]
    """
    import fastweights as fw
    from fastweights._ops import OPS

    infos = {b.name: b for b in fw.backends.list_backends()}
    if not isinstance(backend, str) or backend not in infos:
        raise ValueError(f"backend: {backend!r} is not registered (known: {', '.join(infos)})")
    info = infos[backend]
    if not info.available:
        raise TypeError(f"backend {backend!r} is unavailable: {info.reason}")
    op_names = _names(ops, tuple(OPS), tuple(OPS), "ops")
    dtype_names = _names(dtypes, _DTYPES, ("float32", "float64"), "dtypes")
    form_names = _names(forms, _FORMS, _FORMS, "forms")
    backend_ops = dict(info.ops)
    step_ops = set(getattr(info, "step_ops", ()) or ())
    plan: list[tuple[str, str, str]] = []
    for dtype in dtype_names:
        for form in form_names:
            for op in op_names:
                has = op in step_ops if form == "step" else form in backend_ops.get(op, ())
                if has:
                    plan.append((op, dtype, form))
    report: Callable[[int, int, str], None] | None
    if callable(progress):
        report = progress
    elif progress or (progress is None and _isatty(sys.stderr)):
        report = _Bar(len(plan), sys.stderr)
    else:
        report = None
    done: list[WarmupItem] = []
    for i, (op, dtype, form) in enumerate(plan):
        if report is not None:
            report(i, len(plan), f"{form} {dtype} {op}")
        start = time.perf_counter()
        _tiny_call(op, dtype, form, backend)
        done.append(WarmupItem(op, dtype, form, time.perf_counter() - start))
    if report is not None:
        seconds = sum(w.seconds for w in done)
        report(len(plan), len(plan), f"done in {seconds:.1f} s")
    return done


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
