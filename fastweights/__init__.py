"""fastweights: fast weight programmers for every Array API library.

Linear attention, DeltaNet, Gated DeltaNet, GLA, KDA, DeltaProduct, the DPLR family (DPLR,
IPLR, RWKV-7), and RetNet and Mamba2/SSD through :func:`simple_gla`, as closed-form
inference ops on NumPy, CuPy, torch, JAX or any Array API namespace, with pluggable backends
(see :mod:`fastweights.backends`).

Examples
--------
>>> import numpy as np, fastweights
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((1, 32, 2, 16), dtype=np.float32) for _ in range(3))
>>> g, beta = -rng.random((1, 32, 2), dtype=np.float32), rng.random((1, 32, 2), dtype=np.float32)
>>> o, state = fastweights.gated_delta_rule(q, k, v, g, beta, output_final_state=True)
>>> o.shape, state.shape, o.dtype
((1, 32, 2, 16), (1, 2, 16, 16), dtype('float32'))
"""

from __future__ import annotations

import importlib as _importlib
import importlib.util as _importlib_util
import pathlib as _pathlib
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING


def _alias_source_backends() -> None:
    # Installed, `backends/` is the subpackage `fastweights.backends` (setuptools package-dir).
    # Imported from a source checkout instead (e.g. `python -m fastweights` in the repository
    # root shadows the installed copy), that folder is this package's sibling.
    here = _pathlib.Path(__file__).resolve().parent
    source = here.parent / "backends" / "__init__.py"
    if (here / "backends").is_dir() or not source.is_file():
        return
    spec = _importlib_util.spec_from_file_location(
        f"{__name__}.backends", source, submodule_search_locations=[str(source.parent)]
    )
    if spec is None or spec.loader is None:
        return
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_alias_source_backends()

from . import step  # noqa: E402

# Imported by name: type checkers see `backends/` as its own top-level package.
backends = _importlib.import_module(f"{__name__}.backends")
from ._api import *  # noqa: E402, F403 -- one function per rule, generated
from ._api import __all__ as _op_names  # noqa: E402
from ._kernel_cache import warmup  # noqa: E402
from ._plan import plan  # noqa: E402
from ._registry import use_backend  # noqa: E402
from ._serving import rollback  # noqa: E402
from ._vjp import vjp  # noqa: E402

if _TYPE_CHECKING:  # the ops are generated from their rules' descriptions (see _public)
    from collections.abc import Callable as _Callable
    from typing import Any as _Any

    def __getattr__(name: str) -> _Callable[..., tuple[_Any, _Any]]:
        raise AttributeError(name)


try:
    from importlib.metadata import version as _version

    __version__ = _version("fastweights")
except Exception:  # a bare source tree
    __version__ = "0+unknown"

__all__ = ["backends", *_op_names, "plan", "rollback", "step", "use_backend", "vjp", "warmup"]
