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
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from numba import config, njit

FASTMATH = {"contract"}
FASTMATH_REDUCE = {"contract", "reassoc"}

Decorator = Callable[[Callable[..., Any]], Any]

DISABLE_JIT = bool(getattr(config, "DISABLE_JIT", False))
"""``NUMBA_DISABLE_JIT=1``: kernels run as Python."""

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
    from numba.core import cgutils
    from numba.core.compiler import CompilerBase, DefaultPassBuilder
    from numba.core.extending import intrinsic

    class NoAliasCompiler(CompilerBase):
        """The default nopython pipeline with ``Flags.noalias`` set."""

        def define_pipelines(self) -> list[Any]:
            self.state.flags.noalias = True
            return [DefaultPassBuilder.define_nopython_pipeline(self.state)]

    def jit(
        *,
        nrt: bool = True,
        reduce: bool = False,
        noalias: bool = False,
        parallel: bool = False,
        inline: bool = False,
    ) -> Decorator:
        """``njit`` with ``cache=True``, no bounds checks, the GIL released and the options above.

        Parameters
        ----------
        nrt : bool
            Compile with the NRT (needed to allocate arrays).
        reduce : bool
            Allow reassociation, for vectorised sums.
        noalias : bool
            The array arguments do not overlap (see the module docstring).
        parallel : bool
            The function has a ``prange`` loop.
        inline : bool
            Inline into every caller at numba's IR level (``inline="always"``): small helpers
            inside loops that must vectorise.
        """
        options: dict[str, Any] = {
            "cache": True,
            "fastmath": FASTMATH_REDUCE if reduce else FASTMATH,
            "boundscheck": False,
            "nogil": True,
            "error_model": "numpy",
        }
        if not nrt:
            options["_nrt"] = False
        if noalias:
            options["pipeline_class"] = NoAliasCompiler
        if parallel:
            options["parallel"] = True
        if inline:
            options["inline"] = "always"
        return njit(**options)

    @intrinsic
    def prefer_512(typingctx: Any) -> Any:
        """Ask LLVM for 512-bit vectors in the calling function (see the module docstring)."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            # llvmlite knows a fixed list of function attributes; a string attribute goes
            # into the set directly and is printed verbatim into the IR.
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            return context.get_dummy_value()

        return types.void(), codegen

    @intrinsic
    def row(typingctx: Any, arr: Any, i: Any, j: Any, k: Any, m: Any) -> Any:
        """``row(arr, i, j, k, m)``: a pointer to ``arr[i, j, k, m]``, indexable as ``p[n]``.

        ``p[n]`` is ``arr[i, j, k, m + n]`` when the last axis is contiguous (the caller
        guarantees ``arr.strides[3] == arr.itemsize``). Unlike a slice it takes no reference
        on the array's memory, its unit stride is known to LLVM (indexing a strided array
        with an offset vectorises into gathers), and it works without the NRT.
        """

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
    def prefetch(typingctx: Any, ptr: Any, n: Any) -> Any:
        """``prefetch(p, n)``: fetch the cache line of ``p[n]`` (``p`` from :func:`row`) into L1
        for reading."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            _prefetch(builder, builder.gep(args[0], [args[1]]))
            return context.get_dummy_value()

        return types.void(ptr, n), codegen

    @intrinsic
    def address(typingctx: Any, ptr: Any, n: Any) -> Any:
        """``address(p, n)``: the address of ``p[n]`` (``p`` from :func:`row`) as an int64,
        for a list of cache lines to prefetch later with :func:`prefetch_at`."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.ptrtoint(builder.gep(args[0], [args[1]]), ir.IntType(64))

        return types.int64(ptr, n), codegen

    @intrinsic
    def prefetch_at(typingctx: Any, addr: Any) -> Any:
        """``prefetch_at(a)``: fetch the cache line at address ``a`` (from :func:`address`)
        into L1 for reading. A prefetch never faults, whatever the address."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            _prefetch(builder, builder.inttoptr(args[0], ir.IntType(8).as_pointer()))
            return context.get_dummy_value()

        return types.void(types.int64), codegen


def guard_cache(dispatcher: Any) -> None:
    """Drop this package's numba cache files when any source file of the backend changed.

    numba keys a cached function on its own source file and bytecode only: a cached kernel
    whose callee (a pass in another module) changed would be loaded stale. Called once before
    the first kernel runs; a stamp file next to the cache holds the digest of the sources.
    """
    if DISABLE_JIT:
        return
    path = getattr(getattr(dispatcher, "_cache", None), "_cache_path", None)
    if not path or not os.path.isdir(path):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    names = sorted(f for f in os.listdir(here) if f.endswith(".py"))
    digest = hashlib.sha256()
    for name in names:
        with open(os.path.join(here, name), "rb") as fh:
            digest.update(name.encode() + b"\0" + fh.read())
    stamp = os.path.join(path, "fastweights-numba-sources.sha256")
    try:
        with open(stamp) as fh:
            if fh.read() == digest.hexdigest():
                return
    except OSError:
        pass
    modules = {n[:-3] for n in names}
    try:
        for name in os.listdir(path):
            if name.endswith((".nbi", ".nbc")) and name.split(".", 1)[0] in modules:
                os.remove(os.path.join(path, name))
        with open(stamp, "w") as fh:
            fh.write(digest.hexdigest())
    except OSError:
        pass  # another process got there first, or a read-only cache: numba copes


__all__ = [
    "DISABLE_JIT",
    "address",
    "guard_cache",
    "jit",
    "prefer_512",
    "prefetch",
    "prefetch_at",
    "row",
]
