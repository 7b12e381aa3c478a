"""``python -m fastweights info``: versions and the backend table.

Versions come from :mod:`importlib.metadata`, so optional packages (numba, CuPy, torch, JAX, ...)
are reported without being imported. Only :func:`fastweights.backends.list_backends` may import
a backend, and that is its job.
"""

from __future__ import annotations

import platform
import sys
import textwrap
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any, TextIO

from ._install import install_hint

__all__ = [
    "backend_rows",
    "format_backends",
    "format_versions",
    "numba_threading",
    "package_versions",
    "run_info",
]

# (label, distribution names tried in order). CuPy ships under several wheel names.
_REQUIRED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("numpy", ("numpy",)),
    ("array-api-compat", ("array-api-compat",)),
)
_OPTIONAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("numba", ("numba",)),
    ("cupy", ("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x")),
    ("torch", ("torch",)),
    ("jax", ("jax",)),
    ("array-api-strict", ("array-api-strict", "array_api_strict")),
    ("matplotlib", ("matplotlib",)),
)
_NOT_INSTALLED = "not installed"


def _dist_version(names: Iterable[str]) -> str | None:
    """Return the version of the first installed distribution among ``names``, else None."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def fastweights_version() -> str:
    """Return the installed fastweights version, or the source tree's ``__version__``.

    Returns
    -------
    str
        The version string; ``"unknown"`` when neither is available.
    """
    found = _dist_version(("fastweights",))
    if found is not None:
        return found
    import fastweights

    return str(getattr(fastweights, "__version__", "unknown"))


def package_versions() -> list[tuple[str, str]]:
    """Return ``(name, version)`` for fastweights, Python and the packages it can use.

    Returns
    -------
    list of (str, str)
        Absent optional packages have the version ``"not installed"``.

    Examples
    --------
    >>> dict(package_versions())["numpy"] != "not installed"
    True
    """
    rows = [
        ("fastweights", fastweights_version()),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
    ]
    for label, names in (*_REQUIRED, *_OPTIONAL):
        rows.append((label, _dist_version(names) or _NOT_INSTALLED))
    return rows


def format_versions(rows: Sequence[tuple[str, str]]) -> str:
    """Format ``(name, version)`` rows as an aligned two-column block."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {version}" for name, version in rows)


def _forms_text(ops: Any) -> str:
    """Render ``{op: (form, ...)}`` as ``op (form, form); ...``."""
    if not ops:
        return "-"
    items = sorted(dict(ops).items())
    return "; ".join(f"{op} ({', '.join(forms)})" for op, forms in items)


def backend_rows() -> list[dict[str, str]]:
    """Describe every registered backend from :func:`fastweights.backends.list_backends`.

    Returns
    -------
    list of dict
        Keys ``name``, ``priority``, ``status``, ``version``, ``ops``, ``step_ops``, ``dtypes``
        and ``limits``, all strings, highest priority first.
    """
    import fastweights

    rows = []
    for info in sorted(
        fastweights.backends.list_backends(), key=lambda b: (-int(b.priority), b.name)
    ):
        if info.available:
            status = "available"
        else:
            status = f"unavailable: {info.reason or 'no reason given'}"
        step_ops = tuple(getattr(info, "step_ops", ()) or ())
        rows.append(
            {
                "name": str(info.name),
                "priority": str(info.priority),
                "status": status,
                "version": str(getattr(info, "version", None) or ""),
                "ops": _forms_text(getattr(info, "ops", {})),
                "step_ops": ", ".join(sorted(step_ops)) if step_ops else "-",
                "dtypes": str(getattr(info, "dtypes", "") or ""),
                "limits": ", ".join(
                    f"{k} {v}" for k, v in dict(getattr(info, "limits", {}) or {}).items()
                ),
            }
        )
    return rows


def format_backends(rows: Sequence[dict[str, str]], width: int = 100) -> str:
    """Format :func:`backend_rows` output as a table with wrapped op lists.

    Parameters
    ----------
    rows : sequence of dict
        As returned by :func:`backend_rows`.
    width : int
        Line width for wrapping the op and form lists.

    Returns
    -------
    str
        One header line, then per backend a summary line and indented ``ops:``/``step:`` lines.
    """
    if not rows:
        return "  (no backends registered)"
    name_w = max(4, *(len(r["name"]) for r in rows))
    lines = [f"  {'name':<{name_w}}  {'priority':>8}  status"]
    indent = " " * 4
    for r in rows:
        version = f" (version {r['version']})" if r["version"] else ""
        head = f"  {r['name']:<{name_w}}  {r['priority']:>8}  "
        lines.extend(
            textwrap.wrap(
                r["status"] + version,
                width=width,
                initial_indent=head,
                subsequent_indent=" " * len(head),
                break_on_hyphens=False,
            )
        )
        extra = [("dtypes: ", r.get("dtypes", "")), ("limits: ", r.get("limits", ""))]
        for label, text in (("ops:  ", r["ops"]), ("step: ", r["step_ops"]), *extra):
            if not text:
                continue
            lines.extend(
                textwrap.wrap(
                    text,
                    width=width,
                    initial_indent=f"{indent}{label}",
                    subsequent_indent=indent + " " * len(label),
                    break_on_hyphens=False,
                )
            )
    return "\n".join(lines)


def numba_threading() -> list[tuple[str, str]]:
    """Return numba's threading layer, thread count and OpenMP wait policy as the numba
    backend runs its kernels, or an empty list when numba is not installed.

    Starts numba's worker threads (as the backend's first kernel would).

    Returns
    -------
    list of (str, str)
        ``(label, value)`` rows.

    Examples
    --------
    >>> rows = dict(numba_threading())
    >>> sorted(rows) in ([], ["threading layer", "threads", "wait policy"])
    True
    """
    if _dist_version(("numba",)) is None:
        return []
    try:
        from fastweights.backends.numba._layout import threading_info
    except ImportError:
        return []
    return list(threading_info().items())


def run_info(out: TextIO | None = None) -> int:
    """Print versions and the backend table; the body of ``python -m fastweights info``.

    Parameters
    ----------
    out : file-like, optional
        Where to print (default ``sys.stdout``).

    Returns
    -------
    int
        The exit status, 0.
    """
    out = sys.stdout if out is None else out
    print("fastweights: fast weight programmers for any Array API library\n", file=out)
    print("Versions", file=out)
    print(format_versions(package_versions()), file=out)
    print("\nBackends (highest priority first; `backend=NAME` picks one)", file=out)
    print(format_backends(backend_rows()), file=out)
    threading_rows = numba_threading()
    if threading_rows:
        print("\nNumba threads (the numba backend's kernels)", file=out)
        print(format_versions(threading_rows), file=out)
    print("\nInstalling an extra (a backend's dependencies)", file=out)
    print(f"  {install_hint('numba')}", file=out)
    try:
        extras = metadata.metadata("fastweights").get_all("Provides-Extra") or []
    except metadata.PackageNotFoundError:
        extras = []
    if extras:
        print(f"  extras: {', '.join(extras)}", file=out)
    return 0
