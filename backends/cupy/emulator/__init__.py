"""CPU emulation of CuPy's ``RawModule`` for the CUDA kernels of the ``cupy`` backend.

:mod:`.cudasim` compiles the unchanged CUDA C++ source with ``g++ -std=c++20`` against
``cuda_cpu_shim.h`` and runs the kernels on NumPy arrays, so every CI run (without a GPU)
executes the backend's kernels. ``FASTWEIGHTS_CUDA_EMULATE=1`` routes the backend through it.

Blocks run one at a time, a block's threads as fibers (deterministic; ``CUDASIM_ORDER`` =
``forward``, ``reverse``, ``random`` or ``roundrobin`` picks who runs between barriers, so a
missing ``__syncthreads`` changes results) or as threads (``CUDASIM_MODE=threads``). Checked:
argument types against the C++ signature, divergent barriers, partial-warp shuffles and
deadlocks. Not emulated: implicit warp lock-step, inline PTX (kept behind ``__CUDA_ARCH__``),
textures, cooperative grid sync. Compiled modules are cached in ``CUDASIM_CACHE_DIR`` (default
``cudasim/`` in fastweights' kernel cache, which ``python -m fastweights cache`` shows and
``--clear`` empties); ``CUDASIM_CXX`` and ``CUDASIM_CXXFLAGS`` choose the compiler and flags.

Sanitizers (the runtime must be preloaded into Python)::

    CUDASIM_CXXFLAGS=-fsanitize=address ASAN_OPTIONS=detect_leaks=0 \
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" ...
    CUDASIM_MODE=threads CUDASIM_CXXFLAGS=-fsanitize=thread \
    LD_PRELOAD="$(gcc -print-file-name=libtsan.so) $(gcc -print-file-name=libstdc++.so)" ...
"""

from .cudasim import CompileError, LaunchError, RawKernel, RawModule

__all__ = ["CompileError", "LaunchError", "RawKernel", "RawModule"]
