"""Stop OpenBLAS's idle workers from spinning on the cores a kernel is about to use.

OpenBLAS (the BLAS of NumPy's wheels) keeps each worker thread spinning for about 0.1 s after
a threaded BLAS call (``2**28`` cycles of ``nop``, unless ``OPENBLAS_THREAD_TIMEOUT`` was set
before NumPy loaded it), so a kernel started right after a matmul shares its cores with them:
a Gated DeltaNet prefill right after its input projection ran 1.6-1.9x its time alone.

Before a multi-threaded kernel launch, :func:`release_blas_threads` asks each OpenBLAS of the
process that runs its own pthreads pool to stop its workers (``blas_thread_shutdown_``, the
routine OpenBLAS runs itself around ``fork``); OpenBLAS starts them again at its next
threaded call (tens of microseconds), exactly as after a fork. Stopping the pool while another
thread is inside a BLAS call would corrupt that call, so by default (``auto``) it is done only
while the calling thread is the process's only Python thread (a script, a server's worker
process); ``FASTWEIGHTS_BLAS_RELEASE`` chooses otherwise:

- ``auto`` (default): release when :func:`threading.active_count` is 1;
- ``always``: release before every multi-threaded launch (the caller guarantees that no other
  thread is inside a BLAS call at that moment);
- ``never``: leave BLAS alone (then ``OPENBLAS_THREAD_TIMEOUT=4`` in the environment before
  NumPy is imported, or fewer BLAS threads, are the other remedies).

The libraries are found through threadpoolctl (a dependency of the ``numba`` extra); without
it, or with a BLAS other than OpenBLAS's pthreads build (MKL, BLIS, an OpenMP OpenBLAS), this
does nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

RELEASE_ENV = "FASTWEIGHTS_BLAS_RELEASE"
"""Environment variable: ``auto`` (default), ``always`` or ``never``."""

_POLICIES = ("auto", "always", "never")

_shutdowns: list[Callable[[], int]] | None = None


def policy() -> str:
    """The release policy in force: the value of ``FASTWEIGHTS_BLAS_RELEASE``, else ``auto``.

    An unknown value is refused with a ``ValueError`` naming the variable, when a kernel first
    asks for it.

    Examples
    --------
    >>> from fastweights.backends.numba._blas import policy
    >>> policy() in ("auto", "always", "never")
    True
    """
    value = os.environ.get(RELEASE_ENV, "auto").strip().lower() or "auto"
    if value not in _POLICIES:
        raise ValueError(f"{RELEASE_ENV} must be one of {', '.join(_POLICIES)}, got {value!r}")
    return value


def _find_shutdowns() -> list[Callable[[], int]]:
    """``blas_thread_shutdown_`` of every OpenBLAS with a pthreads pool loaded in the process."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    found = []
    for lib in ThreadpoolController().lib_controllers:
        if lib.internal_api != "openblas" or lib.threading_layer != "pthreads":
            continue
        shutdown = getattr(lib.dynlib, "blas_thread_shutdown_", None)
        if shutdown is not None:
            shutdown.restype = None
            shutdown.argtypes = []
            found.append(shutdown)
    return found


def blas_libraries() -> int:
    """How many OpenBLAS pthreads pools :func:`release_blas_threads` can stop (for ``info``).

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.backends.numba._blas import blas_libraries
    >>> blas_libraries() >= 0
    True
    """
    global _shutdowns
    if _shutdowns is None:
        _shutdowns = _find_shutdowns()
    return len(_shutdowns)


def release_blas_threads() -> bool:
    """Stop OpenBLAS's idle workers if the policy allows it now; whether it did.

    Called before every kernel launch on more than one thread. The libraries are looked up
    once, at the first call (NumPy's OpenBLAS is loaded by then).

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.backends.numba._blas import release_blas_threads
    >>> a = np.ones((512, 512), dtype=np.float32)
    >>> _ = a @ a  # OpenBLAS's workers now spin for about 0.1 s
    >>> isinstance(release_blas_threads(), bool)
    True
    """
    mode = policy()
    if mode == "never" or (mode == "auto" and threading.active_count() != 1):
        return False
    if blas_libraries() == 0:
        return False
    for shutdown in _shutdowns or ():
        shutdown()
    return True
