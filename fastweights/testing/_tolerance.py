"""Tolerances of SPEC.md section 4 and conversions between array namespaces."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> Any:
    """Copy an array of any namespace (NumPy, CuPy, torch, JAX, Dask, array-api-strict) to
    NumPy.

    Tuples (the ``(S, z)`` state of normalised linear attention) are converted element-wise;
    None stays None.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from fastweights.testing import to_numpy
    >>> to_numpy(xp.asarray([1.0, 2.0]))
    array([1., 2.])
    """
    if x is None or isinstance(x, np.ndarray):
        return x
    if isinstance(x, tuple):
        return tuple(to_numpy(a) for a in x)
    module = type(x).__module__
    if module.startswith("cupy"):
        return x.get()
    if module.startswith("torch"):
        return x.detach().cpu().numpy()
    if module.startswith("dask"):
        return to_numpy(x.compute())  # errors raised while computing reach the caller
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError):
        return np.from_dlpack(x)


def to_namespace(x: Any, xp: Any) -> Any:
    """Convert a NumPy array (or a tuple of them) to namespace ``xp`` (None or NumPy: no-op).

    Examples
    --------
    >>> import numpy as np, array_api_strict as xp
    >>> from fastweights.testing import to_namespace
    >>> type(to_namespace(np.ones(2), xp)).__module__.split(".")[0]
    'array_api_strict'
    """
    if x is None or xp is None or xp is np or getattr(xp, "__name__", "") == "numpy":
        return x
    if isinstance(x, tuple):
        return tuple(to_namespace(a, xp) for a in x)
    return xp.asarray(x)


def _dtype_name(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:  # another library's dtype, e.g. torch.float32
        return str(dtype).rsplit(".", 1)[-1]


def tolerance(dtype: Any, form: str, *, name: str = "") -> float:
    """Relative RMS tolerance against the float64 oracle (SPEC.md section 4).

    Parameters
    ----------
    dtype : str or dtype
        Dtype of the inputs: ``float64``, ``float32`` or ``float16``.
    form : str
        ``"recurrent"``, ``"chunk"``, ``"parallel"`` or ``"auto"`` (treated as the loosest).
    name : str
        Golden case name; cases named ``*long_strong*`` get 1e-10 in float64.

    Returns
    -------
    float

    Examples
    --------
    >>> from fastweights.testing import tolerance
    >>> tolerance("float32", "recurrent"), tolerance("float32", "chunk")
    (1e-05, 5e-05)
    """
    d = _dtype_name(dtype)
    if d == "float64":
        return 1e-10 if "long_strong" in name else 1e-12
    if d == "float32":
        return 1e-5 if form == "recurrent" else 5e-5
    if d == "float16":
        return 5e-3
    raise ValueError(f"no tolerance for dtype {d!r}")


def relative_rms(x: Any, ref: Any) -> float:
    """Relative RMS error ``||x - ref|| / ||ref||`` over the entries where ``ref`` is finite.

    When ``ref`` is zero there, the absolute norm ``||x||`` is returned. Entries where ``ref``
    is finite and ``x`` is not make the error infinite.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.testing import relative_rms
    >>> relative_rms(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    0.0
    >>> relative_rms(np.array([np.nan, 2.0]), np.array([1.0, 2.0]))
    inf
    """
    x = np.asarray(to_numpy(x), dtype=np.float64)
    ref = np.asarray(to_numpy(ref), dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape {x.shape} differs from the reference's {ref.shape}")
    finite = np.isfinite(ref)
    if not np.all(np.isfinite(x[finite])):
        return float("inf")
    diff = float(np.linalg.norm(x[finite] - ref[finite]))
    norm = float(np.linalg.norm(ref[finite]))
    return diff / norm if norm > 0 else diff


def assert_close(x: Any, ref: Any, *, dtype: Any, form: str, name: str = "") -> None:
    """Assert ``x`` matches the float64 oracle ``ref`` within the SPEC tolerance.

    Parameters
    ----------
    x : array
        Result, of any namespace.
    ref : numpy.ndarray
        Float64 oracle.
    dtype : str or dtype
        Dtype of the inputs that produced ``x``.
    form : str
        Form that produced ``x``.
    name : str
        Label for the message (a ``long_strong`` golden case name loosens float64).

    Raises
    ------
    AssertionError
        On a shape mismatch, a NaN/Inf where ``ref`` is finite, a value other than
        ``ref``'s where ``ref`` is NaN or Inf, or an error above the tolerance.

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.testing import assert_close
    >>> ref = np.linspace(1.0, 2.0, 5)
    >>> assert_close(ref.astype(np.float32), ref, dtype="float32", form="recurrent")
    """
    label = f"{name} " if name else ""
    if x is None:
        raise AssertionError(f"{label}is None")
    xn = np.asarray(to_numpy(x))
    refn = np.asarray(to_numpy(ref))
    if xn.shape != refn.shape:
        raise AssertionError(f"{label}shape {xn.shape}, expected {refn.shape}")
    xf = xn.astype(np.float64)
    reff = refn.astype(np.float64)
    special = ~np.isfinite(reff)
    if not np.array_equal(xf[special], reff[special], equal_nan=True):
        raise AssertionError(f"{label}differs where the reference is NaN or Inf")
    tol = tolerance(dtype, form, name=name)
    err = relative_rms(xf, reff)
    if not err <= tol:
        bad = int(np.sum(~np.isfinite(xf) & np.isfinite(reff)))
        extra = f" ({bad} non-finite entries where the reference is finite)" if bad else ""
        raise AssertionError(
            f"{label}relative RMS error {err:.3g} > {tol:g} "
            f"(dtype={_dtype_name(dtype)}, form={form}){extra}"
        )
