"""CPU torch tensors and bfloat16 arrays on the backends that run NumPy arrays, without copies.

A backend that rejects a call (the ``numba`` backend runs ``numpy.ndarray`` inputs only) may
still run its *NumPy twin*: the same call with every CPU torch tensor replaced by a NumPy view
of its memory (``Tensor.numpy()``: no copy, any strides) and every bfloat16 array (torch,
or NumPy with ``ml_dtypes.bfloat16``) by its float32 copy, as the kernels convert float16 inputs
to float32. The registry (:func:`fastweights._registry._choose`) tries the twin of a call
whenever a backend rejects the call itself, and then runs it through a :class:`Bridge`, which
hands the results back in the caller's library: ``o`` in the dtype of ``v`` (bfloat16 stays
bfloat16, as float16 stays float16), the final state as a tensor over the kernel's result
(``torch.from_numpy``: no copy), and a decoding pool as the caller's own tensor, updated in
place through the view.

A call with a tensor that requires grad, while torch records gradients, has no twin: the
kernels compute no gradients, and detaching would silently cut the graph. The automatic
choice then falls back to the ``reference`` backend, which runs torch's own ops and is
differentiable by autograd; naming a NumPy backend for it (``backend="numba"``) raises
``TypeError``. Inside ``torch.no_grad()`` or ``torch.inference_mode()`` such tensors are
read through ``detach()`` (nothing is recorded there anyway).
"""

from __future__ import annotations

import dataclasses
import operator
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._registry import Backend
    from ._validate import Call

GRAD_HINT = (
    "{name} requires grad, and backend {backend!r} computes no gradients (detaching would cut "
    "the graph silently): use backend='reference', which torch's autograd differentiates (the "
    "automatic choice does), torch.no_grad(), detached tensors, or fastweights.torch, whose "
    "ops run the kernels with gradients of their own (fastweights.vjp)"
)
"""Why a tensor that requires grad, while torch records gradients, is not run on a NumPy
backend (``{name}``, ``{backend}`` filled in)."""


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is a bfloat16 of any library (torch, JAX, ``ml_dtypes``).

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights._interop import is_bfloat16
    >>> is_bfloat16(np.float16), is_bfloat16("bfloat16")
    (False, True)
    """
    return str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1] == "bfloat16"


def _arrays(call: Call) -> list[tuple[str, Any]]:
    """Every array of ``call`` by name (states and pools included), None left out."""
    named = [("q", call.q), ("k", call.k), ("v", call.v), *call.inputs.items()]
    for name, state in (("initial_state", call.initial_state), ("state", call.state_pool)):
        if isinstance(state, tuple | list):
            named.extend((f"{name}[{i}]", x) for i, x in enumerate(state))
        elif state is not None:
            named.append((name, state))
    return [(n, x) for n, x in named if x is not None]


def _torch_view(name: str, x: Any, torch: Any) -> tuple[np.ndarray | None, str]:
    """A NumPy view of a CPU tensor (float32 copy for bfloat16), or None and why not."""
    if x.device.type != "cpu":
        return None, ""  # CUDA tensors: the NumPy backends' own reason says enough
    t = x.detach() if x.requires_grad else x
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)  # the compute dtype: one copy, as for float16 in the kernels
    try:
        return t.numpy(), ""
    except (RuntimeError, TypeError) as exc:  # functorch wrappers, subclasses, sparse, ...
        return None, f"{name} has no NumPy view ({str(exc).splitlines()[0]})"


def numpy_twin(call: Call) -> tuple[Call | None, str]:
    """The call with NumPy arrays in place of CPU tensors and float32 copies of bfloat16 ones.

    Returns ``(twin, grad)``: ``grad`` names the first tensor that requires grad while torch
    records gradients (the twin must then not run, see :data:`GRAD_HINT`), else it is empty.
    ``(None, why)`` when there is none: not a torch or bfloat16 call, or a tensor not on the
    CPU (``why`` empty), or a CPU tensor without a NumPy view (``why`` says which).
    """
    named = _arrays(call)
    torch = sys.modules.get("torch")
    grad = ""
    if torch is not None and call.xp.__name__.split(".")[-1] == "torch":
        recording = torch.is_grad_enabled()
        views: dict[int, np.ndarray] = {}
        for name, x in named:
            view, why = _torch_view(name, x, torch)
            if view is None:
                return None, why
            views[id(x)] = view
            if recording and x.requires_grad and not grad:
                grad = name
    elif call.xp.__name__.split(".")[-1] == "numpy" and any(is_bfloat16(x.dtype) for _, x in named):
        views = {id(x): x.astype(np.float32) for _, x in named if is_bfloat16(x.dtype)}
    else:
        return None, ""

    def swap(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return tuple(swap(y) for y in x)
        return None if x is None else views.get(id(x), x)

    twin = dataclasses.replace(
        call,
        xp=_numpy_namespace(),
        device="cpu",
        q=swap(call.q),
        k=swap(call.k),
        v=swap(call.v),
        inputs={name: swap(x) for name, x in call.inputs.items()},
        initial_state=swap(call.initial_state),
        state_pool=swap(call.state_pool),
        dtype=np.float64 if str(call.dtype).endswith("float64") else np.float32,
    )
    return twin, grad


def _numpy_namespace() -> Any:
    from ._validate import _numpy_namespace as namespace

    return namespace()


class Bridge:
    """A backend running the NumPy twin of one call; results come back in the caller's library.

    It has the backend's ``name``, ``priority``, ``ops`` and ``plan``; ``run`` and ``step``
    take the original call (the one the registry chose it for).
    """

    def __init__(self, backend: Backend, call: Call, twin: Call) -> None:
        self._backend, self._call, self._twin = backend, call, twin

    def __getattr__(self, name: str) -> Any:
        inner = getattr(self._backend, name)
        if name == "plan":
            return lambda call: inner(self._twin)
        return inner

    def _back(self, x: Any, original: Any) -> Any:
        """A NumPy result as the caller's kind of array (``original`` gives the dtype)."""
        if x is None:
            return None
        if isinstance(x, tuple | list):
            originals = original if isinstance(original, tuple | list) else (None,) * len(x)
            return tuple(self._back(y, o) for y, o in zip(x, originals, strict=True))
        if original is not None and x is self._swap_of(original):
            return original  # a decoding pool: the caller's own object, updated in place
        dtype = None if original is None else original.dtype
        if self._call.xp is self._twin.xp:  # NumPy with bfloat16 inputs
            return x if dtype is None or x.dtype == dtype else x.astype(dtype)
        import torch

        t = torch.from_numpy(x)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def _swap_of(self, original: Any) -> Any:
        pool, twin = self._call.state_pool, self._twin.state_pool
        if isinstance(pool, tuple | list):
            for p, t in zip(pool, twin, strict=True):
                if p is original:
                    return t
            return None
        return twin if pool is original else None

    def run(self, call: Call) -> tuple[Any, Any]:
        assert call is self._call, "a Bridge runs the call it was chosen for"
        o, final = self._backend.run(self._twin)
        return self._back(o, call.out), self._back(final, None)

    def step(self, call: Call) -> tuple[Any, Any]:
        assert call is self._call, "a Bridge runs the call it was chosen for"
        o, pool = self._backend.step(self._twin)
        new = self._back(pool, call.state_pool)
        if isinstance(new, tuple) and all(map(operator.is_, new, call.state_pool)):
            new = call.state_pool  # a pair of pools: the caller's own tuple
        return self._back(o, call.out), new

    def __repr__(self) -> str:
        return f"Bridge({self._backend!r})"


class Twins:
    """The NumPy twin of one call, built at most once while the registry tries backends."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self._built = False
        self._twin: Call | None = None
        self._why = ""

    def bridge(self, backend: Backend) -> tuple[Bridge | None, str]:
        """A :class:`Bridge` of ``backend`` (available, and declaring the op and form) if it
        accepts the twin's arrays, else None and why not (empty when the twin does not
        matter to ``backend``)."""
        if not self._built:
            self._twin, self._why = numpy_twin(self.call)
            self._built = True
        if self._twin is None:
            return None, self._why
        if backend.rejects(self._twin):
            return None, ""
        if self._why:  # a tensor requires grad
            return None, GRAD_HINT.format(name=self._why, backend=backend.name)
        return Bridge(backend, self.call, self._twin), ""


__all__ = ["Bridge", "Twins", "is_bfloat16", "numpy_twin"]
