"""How every kernel of the numba backend is compiled, and the intrinsics they use.

The settings that make the state passes run at the machine's FMA rate are all local to the
functions compiled here; the user's global numba configuration is left alone:

- ``noalias``: numba's ``Flags.noalias`` marks the data pointers of a function's array
  arguments ``noalias`` (numba has no decorator option for it; :class:`NoAliasCompiler` sets
  the flag in a custom pipeline). Without it LLVM must assume that the state block and the
  accumulators overlap, so it neither keeps the accumulators in registers nor vectorises
  without runtime checks. Such a function must never receive overlapping arrays that it
  writes.
- :func:`prefer_512`: adds the LLVM attribute ``"prefer-vector-width"="512"`` to the function
  that calls it (what clang's ``-mprefer-vector-width=512`` does). LLVM tunes AVX-512 Intel
  parts with ``prefer-256-bit``, so its vectoriser emits ymm code unless told otherwise. It
  changes nothing on CPUs without 512-bit vectors.
- ``nrt=False`` (numba's ``_nrt=False``) for every kernel that allocates nothing: a function
  compiled with the NRT takes and drops an atomic reference on each array argument at each
  call, which costs more than a small kernel's work.
- ``error_model="numpy"``: a float division by zero gives Inf/NaN as in IEEE arithmetic
  instead of raising, which also lets LLVM vectorise divisions (numba's default checks each
  divisor for zero).
- ``fastmath={"contract"}`` lets LLVM fuse multiply-adds; kernels with short dot products add
  ``"reassoc"`` so the sums vectorise. No flag assumes finite values: NaN, Inf and ``-inf``
  gates behave as in IEEE arithmetic.

With ``NUMBA_DISABLE_JIT=1`` :func:`jit` returns the plain Python function and the intrinsics
have Python equivalents (a coverage run executes the kernels as Python).

Compiled kernels are cached in a per-user folder keyed by the fastweights version, a digest of
the kernels' sources, the numba and Python versions and the build mode
(:func:`fastweights._kernel_cache.kernel_cache_dir`), through a cache locator of their own:
the user's ``NUMBA_CACHE_DIR`` and the package folder are left alone. An unwritable folder
only costs the cache (kernels then compile in memory in every process).

**Checked build** (``FASTWEIGHTS_NUMBA_CHECKED=1``): every kernel is compiled with
``boundscheck=True`` and serially (``parallel=False``: numba's parallel regions do not pass an
exception on, ``omp`` and ``tbb`` turn it into a ``SystemError`` and ``workqueue`` drops it),
:func:`row` returns a range-checked row (its indices, the unit stride of the last axis and
every ``p[n]`` are checked; ``IndexError`` when out of range), :func:`address` checks its
index and the prefetches do nothing. It has its own cache folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import operator
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from numba import config, njit

from fastweights.backends import kernel_cache_dir, numba_checked

FASTMATH = {"contract"}
FASTMATH_REDUCE = {"contract", "reassoc"}

Decorator = Callable[[Callable[..., Any]], Any]

DISABLE_JIT = bool(getattr(config, "DISABLE_JIT", False))
"""``NUMBA_DISABLE_JIT=1``: kernels run as Python."""

CHECKED = numba_checked() and not DISABLE_JIT
"""``FASTWEIGHTS_NUMBA_CHECKED=1``: the checked build (see the module docstring)."""

log = logging.getLogger("fastweights")

if DISABLE_JIT:

    def jit(
        *,
        nrt: bool = True,
        reduce: bool = False,
        noalias: bool = False,
        parallel: bool = False,
        inline: bool = False,
    ) -> Decorator:
        """The function itself (pure-Python mode)."""
        return lambda func: func

    def prefer_512() -> None:
        """No-op in pure-Python mode."""

    def row(arr: Any, i: int, j: int, k: int, m: int) -> Any:
        """``arr[i, j, k, m:]`` (a pointer to ``arr[i, j, k, m]`` when compiled)."""
        return arr[i, j, k, m:]

    def prefetch(p: Any, n: int) -> None:
        """No-op in pure-Python mode."""

    def address(p: Any, n: int) -> int:
        """0 in pure-Python mode (the address of ``p[n]`` when compiled)."""
        return 0

    def prefetch_at(a: int) -> None:
        """No-op in pure-Python mode."""

else:
    from llvmlite import ir
    from numba import types
    from numba.core import caching, cgutils
    from numba.core.compiler import CompilerBase, DefaultPassBuilder
    from numba.extending import (
        intrinsic as _intrinsic,
    )
    from numba.extending import (
        make_attribute_wrapper,
        models,
        overload,
        register_model,
    )

    intrinsic: Callable[..., Any] = _intrinsic  # what it makes is called without typingctx

    class NoAliasCompiler(CompilerBase):
        """The default nopython pipeline with ``Flags.noalias`` set."""

        def define_pipelines(self) -> list[Any]:
            self.state.flags.noalias = True
            return [DefaultPassBuilder.define_nopython_pipeline(self.state)]

    # ------------------------------------------------------------------------- the cache

    class KernelCacheLocator(caching._CacheLocator):
        """Every kernel in this build's folder of the per-user cache; read-only if the folder
        exists but cannot be written."""

        def __init__(self, py_func: Any, py_file: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._path = str(kernel_cache_dir(CHECKED))
            self.writable = True

        def get_cache_path(self) -> str:
            return self._path

        def get_source_stamp(self) -> Any:
            # The folder is keyed by a digest of every kernel source; within it the file's
            # content hash (not its mtime: a reinstall of the same code stays cached).
            return _file_digest(self._py_file)

        def get_disambiguator(self) -> str:
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> KernelCacheLocator | None:
            if not os.path.isfile(py_file):
                return None
            self = cls(py_func, py_file)
            try:
                self.ensure_cache_path()
            except OSError:
                if not (os.path.isdir(self._path) and os.access(self._path, os.R_OK | os.X_OK)):
                    return None
                self.writable = False  # load what is there, save nothing
            return self

    @functools.cache
    def _file_digest(path: str) -> str:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()

    class _KernelCacheImpl(caching.CompileResultCacheImpl):
        """numba's cache of compile results with :class:`KernelCacheLocator` only (numba's
        ``NUMBA_CACHE_LOCATOR_CLASSES`` is for the user's functions)."""

        def __init__(self, py_func: Any) -> None:
            self._lineno = py_func.__code__.co_firstlineno
            qualname = getattr(py_func, "__qualname__", py_func.__name__)
            source = inspect.getfile(py_func)
            if not os.path.isfile(source):
                raise RuntimeError(f"{qualname} has no source file to cache it by")
            locator = KernelCacheLocator.from_function(py_func, source)
            if locator is None:
                raise OSError(f"cannot use the kernel cache folder {kernel_cache_dir(CHECKED)}")
            self._locator = locator
            modname = os.path.splitext(os.path.basename(source))[0]
            self._filename_base = self.get_filename_base(
                f"{modname}.{qualname}", getattr(sys, "abiflags", "")
            )

    class KernelCache(caching.FunctionCache):
        """numba's function cache in the kernel folder; a failure to read or write it falls
        back to compiling (a cache never breaks a call)."""

        _impl_class = _KernelCacheImpl

        def load_overload(self, sig: Any, target_context: Any) -> Any:
            try:
                return super().load_overload(sig, target_context)
            except Exception as exc:  # a truncated or foreign file: compile instead
                log.debug("fastweights: not loading %s from the cache: %s", self._name, exc)
                return None

        def save_overload(self, sig: Any, data: Any) -> None:
            if not self._impl.locator.writable:
                return
            try:
                super().save_overload(sig, data)
            except OSError as exc:
                _warn_unwritable(self._cache_path, exc)

        def has(self, sig: Any, codegen: Any) -> bool:
            """Whether the folder holds ``sig`` (read from the index, without loading it)."""
            try:
                return self._index_key(sig, codegen) in self._cache_file._load_index()
            except Exception:
                return False

    _warned: set[str] = set()

    def _warn_unwritable(path: str, exc: Any) -> None:
        if path not in _warned:
            _warned.add(path)
            log.warning(
                "the kernel cache folder %s cannot be written (%s): kernels are compiled in "
                "memory, again in every process; set FASTWEIGHTS_CACHE_DIR to a writable folder",
                path,
                exc,
            )

    def _enable_cache(dispatcher: Any) -> Any:
        try:
            dispatcher._cache = KernelCache(dispatcher.py_func)
        except OSError as exc:
            _warn_unwritable(str(kernel_cache_dir(CHECKED)), exc)
        except RuntimeError:
            pass  # defined without a source file (``python -c``): compiled in memory
        return dispatcher

    # --------------------------------------------------------------------------- jit

    def jit(
        *,
        nrt: bool = True,
        reduce: bool = False,
        noalias: bool = False,
        parallel: bool = False,
        inline: bool = False,
    ) -> Decorator:
        """``njit`` cached in the kernel folder, no bounds checks (except in the checked build),
        the GIL released and the options above.

        Parameters
        ----------
        nrt : bool
            Compile with the NRT (needed to allocate arrays).
        reduce : bool
            Allow reassociation, for vectorised sums.
        noalias : bool
            The array arguments do not overlap (see the module docstring).
        parallel : bool
            The function has a ``prange`` loop (run serially in the checked build).
        inline : bool
            Inline into every caller at numba's IR level (``inline="always"``): small helpers
            inside loops that must vectorise.
        """
        options: dict[str, Any] = {
            "fastmath": FASTMATH_REDUCE if reduce else FASTMATH,
            "boundscheck": CHECKED,
            "nogil": True,
            "error_model": "numpy",
        }
        if not nrt:
            options["_nrt"] = False
        if noalias:
            options["pipeline_class"] = NoAliasCompiler
        if parallel and not CHECKED:
            options["parallel"] = True
        if inline:
            options["inline"] = "always"
        decorate = njit(**options)
        return lambda func: _enable_cache(decorate(func))

    @intrinsic
    def prefer_512(typingctx: Any) -> Any:
        """Ask LLVM for 512-bit vectors in the calling function (see the module docstring)."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            # llvmlite knows a fixed list of function attributes; a string attribute goes
            # into the set directly and is printed verbatim into the IR.
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            return context.get_dummy_value()

        return types.void(), codegen

    # ------------------------------------------------------------------ raw rows, fast build

    @intrinsic
    def _row_pointer(typingctx: Any, arr: Any, i: Any, j: Any, k: Any, m: Any) -> Any:
        """``&arr[i, j, k, m]`` as a typed pointer (no checks)."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            return cgutils.get_item_pointer(context, builder, aryty, ary, args[1:])

        return types.CPointer(arr.dtype)(arr, i, j, k, m), codegen

    def _prefetch(builder: Any, addr: Any) -> None:
        """``llvm.prefetch(addr, read, locality 3: into L1, data)``."""
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [addr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [addr, *(ir.Constant(i32, c) for c in (0, 3, 1))])

    @intrinsic
    def _prefetch_pointer(typingctx: Any, ptr: Any, n: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            _prefetch(builder, builder.gep(args[0], [args[1]]))
            return context.get_dummy_value()

        return types.void(ptr, n), codegen

    @intrinsic
    def _pointer_address(typingctx: Any, ptr: Any, n: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.ptrtoint(builder.gep(args[0], [args[1]]), ir.IntType(64))

        return types.int64(ptr, n), codegen

    @intrinsic
    def _prefetch_address(typingctx: Any, addr: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            _prefetch(builder, builder.inttoptr(args[0], ir.IntType(8).as_pointer()))
            return context.get_dummy_value()

        return types.void(types.int64), codegen

    # -------------------------------------------------------------- checked rows, checked build

    class CheckedRow(types.Type):
        """A row ``arr[i, j, k, m:]`` as a pointer and a length; ``p[n]`` checks ``0 <= n <
        length``."""

        def __init__(self, dtype: Any) -> None:
            self.dtype = dtype
            super().__init__(name=f"CheckedRow({dtype})")

    @register_model(CheckedRow)
    class _CheckedRowModel(models.StructModel):
        def __init__(self, dmm: Any, fe_type: Any) -> None:
            members = [("ptr", types.CPointer(fe_type.dtype)), ("n", types.intp)]
            super().__init__(dmm, fe_type, members)

    make_attribute_wrapper(CheckedRow, "ptr", "ptr")
    make_attribute_wrapper(CheckedRow, "n", "n")

    @intrinsic
    def _checked_row(typingctx: Any, arr: Any, i: Any, j: Any, k: Any, m: Any) -> Any:
        """``CheckedRow`` of ``&arr[i, j, k, m]`` and ``arr.shape[3] - m`` (indices checked by
        the caller)."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            out = cgutils.create_struct_proxy(signature.return_type)(context, builder)
            out.ptr = cgutils.get_item_pointer(context, builder, aryty, ary, args[1:])
            last = cgutils.unpack_tuple(builder, ary.shape)[3]
            mm = context.cast(builder, args[4], signature.args[4], types.intp)
            out.n = builder.sub(last, mm)
            return out._getvalue()

        return CheckedRow(arr.dtype)(arr, i, j, k, m), codegen

    @overload(operator.getitem)
    def _checked_getitem(p: Any, n: Any) -> Any:
        if isinstance(p, CheckedRow) and isinstance(n, types.Integer):

            def impl(p: Any, n: Any) -> Any:
                if n < 0 or n >= p.n:
                    raise IndexError("fastweights checked build: row index out of range")
                return p.ptr[n]

            return impl
        return None

    @overload(operator.setitem)
    def _checked_setitem(p: Any, n: Any, value: Any) -> Any:
        if isinstance(p, CheckedRow) and isinstance(n, types.Integer):

            def impl(p: Any, n: Any, value: Any) -> None:
                if n < 0 or n >= p.n:
                    raise IndexError("fastweights checked build: row index out of range")
                p.ptr[n] = value

            return impl
        return None

    if CHECKED:

        @njit(inline="always")
        def row(arr: Any, i: int, j: int, k: int, m: int) -> Any:
            """``row(arr, i, j, k, m)``: ``arr[i, j, k, m:]`` as a :class:`CheckedRow`.

            Raises ``IndexError`` when an index is out of range or the last axis is not
            contiguous (what the raw pointer of the fast build assumes).
            """
            s = arr.shape
            if not (0 <= i < s[0] and 0 <= j < s[1] and 0 <= k < s[2] and 0 <= m <= s[3]):
                raise IndexError("fastweights checked build: row() index out of range")
            if s[3] > 1 and arr.strides[3] != arr.itemsize:
                raise IndexError("fastweights checked build: row() of a strided last axis")
            return _checked_row(arr, i, j, k, m)

        @njit(inline="always")
        def prefetch(p: Any, n: int) -> None:
            """No-op in the checked build."""

        @njit(inline="always")
        def address(p: Any, n: int) -> int:
            """The address of ``p[n]``; ``IndexError`` when ``n`` is out of range."""
            if n < 0 or n >= p.n:
                raise IndexError("fastweights checked build: address() index out of range")
            return _pointer_address(p.ptr, n)

        @njit(inline="always")
        def prefetch_at(a: int) -> None:
            """No-op in the checked build."""

    else:
        row = _row_pointer
        """``row(arr, i, j, k, m)``: a pointer to ``arr[i, j, k, m]``, indexable as ``p[n]``.

        ``p[n]`` is ``arr[i, j, k, m + n]`` when the last axis is contiguous (the caller
        guarantees ``arr.strides[3] == arr.itemsize``). Unlike a slice it takes no reference
        on the array's memory, its unit stride is known to LLVM (indexing a strided array
        with an offset vectorises into gathers), and it works without the NRT.
        """
        prefetch = _prefetch_pointer
        """``prefetch(p, n)``: fetch the cache line of ``p[n]`` (``p`` from :func:`row`) into
        L1 for reading."""
        address = _pointer_address
        """``address(p, n)``: the address of ``p[n]`` (``p`` from :func:`row`) as an int64,
        for a list of cache lines to prefetch later with :func:`prefetch_at`."""
        prefetch_at = _prefetch_address
        """``prefetch_at(a)``: fetch the cache line at address ``a`` (from :func:`address`)
        into L1 for reading. A prefetch never faults, whatever the address."""


def _signature_dtype(sig: Any) -> str:
    for ty in sig:
        dtype = getattr(ty, "dtype", None)
        if dtype is not None:
            return str(dtype)
    return "?"


@contextlib.contextmanager
def compiling(dispatcher: Any, sig: Any) -> Iterator[None]:
    """Around the first compilation of ``dispatcher`` for ``sig``: log one line (logger
    ``fastweights``, level INFO) when it is not in the cache and will be compiled."""
    name = dispatcher.py_func.__name__.removesuffix("_kernel")
    dtype = _signature_dtype(sig)
    cache = getattr(dispatcher, "_cache", None)
    cached = False
    has = getattr(cache, "has", None)  # a KernelCache
    if has is not None:
        cached = has(sig, dispatcher.targetctx.codegen())
        where = f"cached in {getattr(cache, 'cache_path', '?')}"
    else:
        where = "not cached (no writable cache folder)"
    if not cached:
        build = ", checked build" if CHECKED else ""
        log.info(
            "compiling numba kernel %s (%s%s), first call only, takes 10-30 s; %s",
            name,
            dtype,
            build,
            where,
        )
    start = time.perf_counter()
    yield
    log.debug(
        "numba kernel %s (%s) %s in %.1f s",
        name,
        dtype,
        "loaded" if cached else "compiled",
        time.perf_counter() - start,
    )


__all__ = [
    "CHECKED",
    "DISABLE_JIT",
    "address",
    "compiling",
    "jit",
    "prefer_512",
    "prefetch",
    "prefetch_at",
    "row",
]
