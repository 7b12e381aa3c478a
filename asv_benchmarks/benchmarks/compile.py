"""Start-up costs: a cold ``import fastweights`` and each backend's first call (compilation)."""

from __future__ import annotations

from fastweights._bench import backend_namespace

BACKENDS = ["reference", "numba", "cupy"]

_FIRST_CALL = """\
import numpy as np, fastweights
xp = np
if {backend!r} == "cupy":
    import cupy as xp
q = k = v = xp.ones((1, 16, 2, 32), dtype=xp.float32)
g = -xp.ones((1, 16, 2), dtype=xp.float32)
beta = 0.5 * xp.ones((1, 16, 2), dtype=xp.float32)
"""


def timeraw_import_fastweights() -> str:
    return "import fastweights"


class FirstCall:
    """The first call in a fresh process, with the on-disk compilation cache as it is."""

    params = BACKENDS
    param_names = ["backend"]
    timeout = 600

    def setup(self, backend: str) -> None:
        backend_namespace(backend, "gated_delta_rule")

    def timeraw_gated_delta_rule(self, backend: str) -> tuple[str, str]:
        code = f"fastweights.gated_delta_rule(q, k, v, g, beta, backend={backend!r})"
        return code, _FIRST_CALL.format(backend=backend)
