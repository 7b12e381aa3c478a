"""Every op as a ``torch.autograd.Function`` on CPU tensors, the kernels underneath.

``fastweights.torch.<op>`` takes the arguments of ``fastweights.<op>`` (but the serving
keywords ``state_pool``, ``state_indices`` and ``output_state_snapshots``) as CPU tensors and
returns ``(o, final_state)`` tensors, ``final_state`` None unless ``output_final_state=True``.
Gradients flow to every floating tensor argument that requires grad (``q``, ``k``, ``v``, the
rule's gates and vectors, ``initial_state``).

Nothing is copied on the way in or out: each tensor reaches the kernels as a NumPy view of its
memory (``Tensor.detach().numpy()``, any strides; bfloat16 as a float32 copy, as the kernels
compute it), and the results come back over the kernels' own arrays (``torch.from_numpy``).
The forward runs :func:`fastweights.vjp` when a tensor requires grad (the ``numba`` kernels
when numba is installed, else the NumPy reference; ``backend=`` chooses as in the op), and the
backward calls its ``pullback``: one forward and one reverse sweep, no recomputation of the
forward. Without a tensor that requires grad (or under ``torch.no_grad()``) it runs the op
alone.

Not differentiable twice (the backward is not itself a torch graph), not for CUDA tensors
(``TypeError``: move them to the CPU, or differentiate the ``reference`` backend's torch ops
with autograd, which runs on the device), and not under ``torch.func`` transforms.

Examples
--------
>>> import torch
>>> import fastweights.torch as fwt
>>> q, k, v = (torch.ones(1, 8, 2, 4) / 2 for _ in range(3))
>>> beta = torch.full((1, 8, 2), 0.5, requires_grad=True)
>>> o, _ = fwt.delta_rule(q, k, v, beta)
>>> o.sum().backward()
>>> beta.grad.shape
torch.Size([1, 8, 2])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._adapters import make_ops, options, split
from ._interop import _torch_view


def _view(name: str, x: Any) -> np.ndarray:
    """A NumPy view of a CPU tensor (float32 copy for bfloat16), or ``TypeError``."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.device.type != "cpu":
        raise TypeError(
            f"fastweights.torch runs CPU tensors, {name} is on {x.device}: move it to the CPU, "
            "or call fastweights with backend='reference' (torch ops that autograd "
            "differentiates on the device)"
        )
    view, why = _torch_view(name, x, torch)
    if view is None:
        raise TypeError(f"fastweights.torch: {why}")
    return view


def _tensor(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A kernel's result as a tensor of ``dtype`` (no copy when the dtype is already it)."""
    t = torch.from_numpy(np.asarray(x))
    return t if t.dtype == dtype else t.to(dtype)


class _Op(torch.autograd.Function):
    """One op call: ``apply(name, struct, static, *tensors)`` -> ``(o, *state tensors)``.

    ``struct`` lists the arrays by name (``(name, n)`` for a tuple of ``n`` tensors, else
    ``(name, 0)``), ``static`` the options as :func:`fastweights._adapters.split` gives them.
    """

    @staticmethod
    def forward(ctx: Any, name: str, struct: Any, static: Any, *tensors: torch.Tensor) -> Any:
        import fastweights

        labels = [arg if not n else f"{arg}[{i}]" for arg, n in struct for i in range(max(n, 1))]
        views = [_view(label, t) for label, t in zip(labels, tensors, strict=True)]
        arrays: dict[str, Any] = {}
        j = 0
        for arg, n in struct:
            arrays[arg] = tuple(views[j : j + n]) if n else views[j]
            j += max(n, 1)
        op = getattr(fastweights, name)
        opts = options(static)
        if any(ctx.needs_input_grad[3:]):
            o, state, ctx.pullback = fastweights.vjp(op, **arrays, **opts)
        else:
            o, state = op(**arrays, **opts, output_final_state=True)
            ctx.pullback = None
        ctx.struct = struct
        ctx.dtypes = [t.dtype for t in tensors]
        states = list(state) if isinstance(state, tuple | list) else [state]
        out = _out_tensor(name, struct, tensors)
        ctx.state_dtypes = [s.dtype for s in states]
        return (_tensor(o, out.dtype), *(torch.from_numpy(np.asarray(s)) for s in states))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, do: torch.Tensor, *dstates: torch.Tensor) -> Any:
        if ctx.pullback is None:  # pragma: no cover - autograd calls it only with a graph
            return (None, None, None, *(None for _ in ctx.dtypes))
        d_o = np.ascontiguousarray(_view("do", do))
        ds = [
            np.ascontiguousarray(_view("dstate", d).astype(dt, copy=False))
            for d, dt in zip(dstates, ctx.state_dtypes, strict=True)
        ]
        grads = ctx.pullback(d_o, ds[0] if len(ds) == 1 else tuple(ds))
        flat = [
            g
            for arg, _ in ctx.struct
            for g in (grads[arg] if isinstance(grads[arg], tuple) else (grads[arg],))
        ]
        out = [
            _tensor(g, dt) if need else None
            for g, dt, need in zip(flat, ctx.dtypes, ctx.needs_input_grad[3:], strict=True)
        ]
        return (None, None, None, *out)


def _out_tensor(name: str, struct: Any, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The tensor whose dtype ``o`` takes (``v``; ``srwm``: ``x``)."""
    from ._ops import RULES

    leaves = [arg for arg, n in struct for _ in range(max(n, 1))]
    return tensors[leaves.index(RULES[name].out)]


def _build(name: str) -> Callable[..., Any]:
    def fn(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        arrays, static, keep = split(name, args, kwargs)
        struct = tuple((n, len(x) if isinstance(x, tuple) else 0) for n, x in arrays.items())
        tensors = [
            t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
            for x in arrays.values()
            for t in (x if isinstance(x, tuple) else (x,))
        ]
        outs = _Op.apply(name, struct, static, *tensors)
        o, states = outs[0], outs[1:]
        state = states[0] if len(states) == 1 else tuple(states)
        return o, state if keep else None

    return fn


_OPS = make_ops(_build, __name__, "as a ``torch.autograd.Function`` on CPU tensors")
globals().update(_OPS)

__all__ = sorted(_OPS)  # built from the registry
