"""Backends of fastweights: the built-in plugins, the registry, and the toolkit a backend uses.

This folder is installed as ``fastweights.backends``. Each built-in backend is a subpackage or
module here, registered through the ``fastweights.backends`` entry-point group exactly like a
third-party plugin, and imports only what this module exports:

- the protocol and registry: :class:`Backend`, :class:`BackendInfo`, :func:`get_backend`,
  :func:`list_backends`;
- the call a backend receives (:class:`Call`, validated: shapes, dtypes, sizes, host copies of
  ``cu_seqlens`` and ``state_indices``) and the rule descriptions (:data:`RULES`, :data:`OPS`,
  :class:`Rule`, :class:`Arg`): a backend declares, op by op, the forms it runs
  (``Backend.ops``) and is never handed an op or a form it did not declare; an instance rule
  (``retention``, ``iplr``, ``rwkv7``) arrives as its parent; :func:`dims_of` reads an
  argument's shape template;
- the rules' constants (:data:`L2NORM_EPS`, :data:`NORMALIZE_EPS`, :data:`SUB_BLOCK`), and
  :func:`cuda_defines` / :func:`cuda_macros` to pass them to CUDA sources;
- helpers: :func:`gather_rows` / :func:`write_rows` (decoding pools of any namespace),
  :func:`to_host_ints` (integer array-likes of any namespace on the host), and the per-user
  folders of compiled kernels (:func:`kernel_cache_dir`, :func:`numba_checked`,
  :func:`emulator_cache_dir`);
- :data:`FAMILIES`, the rule families' packages (problem preparation and Array API forms),
  which the ``reference`` backend runs.

Examples
--------
>>> from fastweights.backends import OPS, get_backend
>>> get_backend("numba").ops["dplr"]
('recurrent',)
"""

from fastweights._constants import L2NORM_EPS, NORMALIZE_EPS, SUB_BLOCK, cuda_defines, cuda_macros
from fastweights._install import install_hint
from fastweights._kernel_cache import emulator_cache_dir, kernel_cache_dir, numba_checked
from fastweights._ops import FAMILIES, FORMS, OPS, RULES, Arg, Rule
from fastweights._pool import gather_rows, write_rows
from fastweights._registry import Backend, BackendInfo, get_backend, list_backends
from fastweights._validate import Call, to_host_ints
from fastweights.rules._rule import dims_of

__all__ = [
    "FAMILIES",
    "FORMS",
    "L2NORM_EPS",
    "NORMALIZE_EPS",
    "OPS",
    "RULES",
    "SUB_BLOCK",
    "Arg",
    "Backend",
    "BackendInfo",
    "Call",
    "Rule",
    "cuda_defines",
    "cuda_macros",
    "dims_of",
    "emulator_cache_dir",
    "gather_rows",
    "get_backend",
    "install_hint",
    "kernel_cache_dir",
    "list_backends",
    "numba_checked",
    "to_host_ints",
    "write_rows",
]
