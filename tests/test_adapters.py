"""fastweights.jax and fastweights.torch: gradients through JAX and torch autodiff equal
``fastweights.vjp``'s ``pullback`` (under ``jit``, ``vmap``; ``gradcheck`` in float64)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import fastweights
from fastweights._ops import RULES
from fastweights.testing import random_call

OPS = sorted(RULES)


def _case(op: str, *, seed: int = 0, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Small random arguments of ``op``: (arrays, options), ``cu_seqlens`` among the options."""
    sizes = dict(batch=2, length=5, heads=1, groups=2, key_dim=3, value_dim=2)
    sizes.update(kw)
    call = random_call(op, seed=seed, **sizes)
    arrays = dict(call.arrays)
    opts = dict(call.kwargs)
    if "cu_seqlens" in arrays:
        opts["cu_seqlens"] = arrays.pop("cu_seqlens")
    return arrays, opts


def _leaves(x: Any) -> list[Any]:
    return list(x) if isinstance(x, tuple | list) else [x]


def _cotangents(o: Any, state: Any, seed: int = 1) -> tuple[np.ndarray, Any]:
    rng = np.random.default_rng(seed)
    do = rng.standard_normal(np.shape(o))
    ds = [rng.standard_normal(np.shape(s)) for s in _leaves(state)]
    return do, ds[0] if len(ds) == 1 else tuple(ds)


def _pullback(op: str, arrays: dict[str, Any], opts: dict[str, Any], dtype: Any) -> Any:
    """``(o, state, do, dstate, grads)`` of fastweights.vjp on NumPy arrays of ``dtype``."""
    cast = {
        n: tuple(np.asarray(y, dtype) for y in x) if isinstance(x, tuple) else np.asarray(x, dtype)
        for n, x in arrays.items()
    }
    o, state, pullback = fastweights.vjp(op, **cast, **opts)
    do, ds = _cotangents(o, state)
    do = do.astype(o.dtype)
    ds = (
        tuple(d.astype(s.dtype) for d, s in zip(ds, state, strict=True))
        if isinstance(ds, tuple)
        else ds.astype(state.dtype)
    )
    return cast, o, state, do, ds, pullback(do, ds)


def _close(got: Any, want: Any, rtol: float, what: str) -> None:
    for g, w in zip(_leaves(got), _leaves(want), strict=True):
        g = np.asarray(g)
        assert g.shape == w.shape and g.dtype == w.dtype, (what, g.shape, w.shape, g.dtype)
        scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-30)
        err = float(np.max(np.abs(g.astype(np.float64) - w), initial=0.0))
        assert err <= rtol * scale, f"{what}: error {err:.3g} over max {scale:.3g}"


# ------------------------------------------------------------------------------------ JAX


@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield jax
    finally:
        jax.config.update("jax_enable_x64", before)


def _jax_grads(op: str, arrays: dict[str, Any], opts: dict[str, Any], do: Any, ds: Any) -> Any:
    import jax
    import jax.numpy as jnp

    import fastweights.jax as fwj

    names = list(arrays)
    fn = getattr(fwj, op)

    def loss(*xs: Any) -> Any:
        o, state = fn(**dict(zip(names, xs, strict=True)), **opts, output_final_state=True)
        total = jnp.sum(o * do)
        for s, d in zip(_leaves(state), _leaves(ds), strict=True):
            total = total + jnp.sum(s * d)
        return total

    xs = [
        tuple(jnp.asarray(y) for y in x) if isinstance(x, tuple) else jnp.asarray(x)
        for x in arrays.values()
    ]
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(xs)))))(*xs)
    o, state = jax.jit(
        lambda *xs: fn(**dict(zip(names, xs, strict=True)), **opts, output_final_state=True)
    )(*xs)
    return o, state, dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("op", OPS)
def test_jax_grad_equals_pullback_float64(jax_x64: Any, op: str) -> None:
    arrays, opts = _case(op)
    arrays, o_ref, s_ref, do, ds, want = _pullback(op, arrays, opts, np.float64)
    o, state, grads = _jax_grads(op, arrays, opts, do, ds)
    _close(o, o_ref, 1e-12, f"{op} o")
    _close(state, s_ref, 1e-12, f"{op} state")
    for name, g in grads.items():
        _close(g, want[name], 1e-12, f"{op} d{name}")


@pytest.fixture
def jax_x32():
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        yield jax
    finally:
        jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("op", ["gated_delta_rule", "kda", "rwkv7", "mesa_net"])
def test_jax_grad_equals_pullback_float32(jax_x32: Any, op: str) -> None:
    arrays, opts = _case(op, seqlens=[3, 0, 4])
    arrays, o_ref, s_ref, do, ds, want = _pullback(op, arrays, opts, np.float32)
    o, state, grads = _jax_grads(op, arrays, opts, do, ds)
    _close(o, o_ref, 1e-6, f"{op} o")
    _close(state, s_ref, 1e-6, f"{op} state")
    for name, g in grads.items():
        _close(g, want[name], 1e-6, f"{op} d{name}")


def _stack(cases: list[dict[str, Any]]) -> dict[str, Any]:
    import jax.numpy as jnp

    return {
        n: tuple(jnp.stack([c[n][i] for c in cases]) for i in range(len(x)))
        if isinstance(x, tuple)
        else jnp.stack([c[n] for c in cases])
        for n, x in cases[0].items()
    }


@pytest.mark.parametrize(
    ("op", "kw"),
    [
        ("gated_delta_rule", {}),  # folded into B
        ("delta_product", {"seqlens": [3, 2]}),  # packed along T
        ("srwm", {}),  # W0 has no B axis: one call per element
    ],
)
def test_jax_vmap(jax_x64: Any, op: str, kw: dict[str, Any]) -> None:
    jax = jax_x64
    import jax.numpy as jnp

    import fastweights.jax as fwj

    fn = getattr(fwj, op)
    cases = [_case(op, seed=s, **kw) for s in range(3)]
    opts = cases[0][1]
    names = list(cases[0][0])
    batched = _stack([c for c, _ in cases])

    def f(*xs: Any) -> Any:
        return fn(**dict(zip(names, xs, strict=True)), **opts, output_final_state=True)

    def loss(*xs: Any) -> Any:
        o, state = f(*xs)
        return jnp.sum(o**2) + sum(jnp.sum(jnp.sin(s)) for s in _leaves(state))

    xs = list(batched.values())
    o, state = jax.jit(jax.vmap(f))(*xs)
    per_example = jax.jit(jax.vmap(jax.grad(loss, argnums=tuple(range(len(xs))))))(*xs)
    for i, (arrays, _) in enumerate(cases):
        one = [jnp.asarray(x) if not isinstance(x, tuple) else x for x in arrays.values()]
        o_i, s_i = f(*one)
        _close(o[i], np.asarray(o_i), 1e-12, f"{op} vmap o[{i}]")
        for s, t in zip(_leaves(state), _leaves(s_i), strict=True):
            _close(s[i], np.asarray(t), 1e-12, f"{op} vmap state[{i}]")
        g_i = jax.grad(loss, argnums=tuple(range(len(one))))(*one)
        for name, g, h in zip(names, per_example, g_i, strict=True):
            for a, b in zip(_leaves(g), _leaves(h), strict=True):
                _close(a[i], np.asarray(b), 1e-12, f"{op} vmap d{name}[{i}]")


def test_jax_grad_of_vmap_sums_shared_arguments(jax_x64: Any) -> None:
    """Arguments not mapped (in_axes None) get the sum of their gradients over the batch."""
    jax = jax_x64
    import jax.numpy as jnp

    import fastweights.jax as fwj

    arrays, _ = _case("gated_delta_rule", batch=1)
    q, k, v, g, beta = (jnp.asarray(arrays[n]) for n in ("q", "k", "v", "g", "beta"))
    qs = jnp.stack([q, 2 * q, -q])

    def loss(q: Any, beta: Any) -> Any:
        return jnp.sum(fwj.gated_delta_rule(q, k, v, g, beta)[0] ** 2)

    batched = jax.grad(lambda qs, beta: jnp.sum(jax.vmap(loss, (0, None))(qs, beta)), (0, 1))
    dqs, dbeta = jax.jit(batched)(qs, beta)
    want = [jax.grad(loss, (0, 1))(qs[i], beta) for i in range(3)]
    _close(dbeta, np.asarray(sum(w[1] for w in want)), 1e-12, "dbeta")
    for i in range(3):
        _close(dqs[i], np.asarray(want[i][0]), 1e-12, f"dq[{i}]")


def test_jax_jit_grad_compiles_in_seconds(jax_x32: Any) -> None:
    """The T=256 loss of issue 13: grad of a jit-compiled loss, first call (trace + compile +
    run); the pure-JAX reference path took 26 s to trace."""
    jax = jax_x32
    import jax.numpy as jnp

    import fastweights.jax as fwj

    rng = np.random.default_rng(0)
    B, T, H, K, V = 1, 256, 2, 16, 16
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0, 0.1, (B, T, H)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0, 1, (B, T, H)), jnp.float32)

    def loss(q: Any, k: Any, v: Any, g: Any, beta: Any) -> Any:
        o, _ = fwj.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
        return jnp.mean(o**2)

    fwj.gated_delta_rule(q, k, v, g, beta)  # the kernels' import and compile, not JAX's
    start = time.perf_counter()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, beta)
    jax.block_until_ready(grads)
    seconds = time.perf_counter() - start
    assert seconds < 30, f"jit(grad) took {seconds:.1f} s at T=256"
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in grads)


def test_jax_errors_at_trace_time() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import fastweights.jax as fwj

    q = jnp.ones((1, 4, 1, 3))
    with pytest.raises(ValueError, match="beta"):
        fwj.delta_rule(q, q, q, jnp.ones((1, 5, 1)))
    with pytest.raises(TypeError, match="state_pool"):
        fwj.delta_rule(q, q, q, jnp.ones((1, 4, 1)), state_pool=q)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fwj.delta_rule(q, q, q, jnp.ones((1, 4, 1)), cu_seqlens=np.array([0.0, 4.0]))
    traced = jax.jit(lambda cu: fwj.delta_rule(q, q, q, jnp.ones((1, 4, 1)), cu_seqlens=cu)[0])
    with pytest.raises(ValueError, match="static"):
        traced(jnp.array([0, 4]))


# ---------------------------------------------------------------------------------- torch


def _torch_grads(op: str, arrays: dict[str, Any], opts: dict[str, Any], do: Any, ds: Any) -> Any:
    import torch

    import fastweights.torch as fwt

    def tensor(x: Any) -> Any:
        return torch.from_numpy(np.array(x)).requires_grad_()

    ts = {
        n: tuple(map(tensor, x)) if isinstance(x, tuple) else tensor(x) for n, x in arrays.items()
    }
    o, state = getattr(fwt, op)(**ts, **opts, output_final_state=True)
    total = torch.sum(o * torch.from_numpy(do))
    for s, d in zip(_leaves(state), _leaves(ds), strict=True):
        total = total + torch.sum(s * torch.from_numpy(d))
    inputs = [t for x in ts.values() for t in _leaves(x)]
    flat = torch.autograd.grad(total, inputs)
    grads, i = {}, 0
    for n, x in ts.items():
        m = len(_leaves(x))
        grads[n] = tuple(flat[i : i + m]) if isinstance(x, tuple) else flat[i]
        i += m
    return o, state, grads


@pytest.mark.parametrize("op", OPS)
def test_torch_grad_equals_pullback(op: str) -> None:
    pytest.importorskip("torch")
    arrays, opts = _case(op, seqlens=[3, 0, 4] if op in ("kda", "srwm") else None)
    arrays, o_ref, s_ref, do, ds, want = _pullback(op, arrays, opts, np.float64)
    o, state, grads = _torch_grads(op, arrays, opts, do, ds)
    _close(o.detach().numpy(), o_ref, 1e-12, f"{op} o")
    _close([s.detach().numpy() for s in _leaves(state)], s_ref, 1e-12, f"{op} state")
    for name, g in grads.items():
        _close([x.numpy() for x in _leaves(g)], want[name], 1e-12, f"{op} d{name}")


def test_torch_float32_and_partial_requires_grad() -> None:
    torch = pytest.importorskip("torch")
    import fastweights.torch as fwt

    arrays, opts = _case("gated_delta_rule", use_qk_l2norm=True)
    arrays, o_ref, _, do, ds, want = _pullback("gated_delta_rule", arrays, opts, np.float32)
    ts = {n: torch.from_numpy(x) for n, x in arrays.items()}
    ts["beta"].requires_grad_()
    ts["initial_state"].requires_grad_()
    o, state = fwt.gated_delta_rule(**ts, **opts, output_final_state=True)
    assert o.dtype == torch.float32 and o.requires_grad
    (torch.sum(o * torch.from_numpy(do)) + torch.sum(state * torch.from_numpy(ds))).backward()
    assert ts["q"].grad is None
    _close(ts["beta"].grad.numpy(), want["beta"], 1e-6, "dbeta")
    _close(ts["initial_state"].grad.numpy(), want["initial_state"], 1e-6, "dS0")
    with torch.no_grad():
        o2, none = fwt.gated_delta_rule(**ts, **opts)
    assert not o2.requires_grad and none is None
    _close(o2.numpy(), o_ref, 1e-6, "o")


@pytest.mark.parametrize(
    ("op", "kw"),
    [
        ("gated_delta_rule", {"use_qk_l2norm": True}),
        ("rwkv7", {}),
        ("linear_attn", {"normalize": True}),
    ],
)
def test_torch_gradcheck(op: str, kw: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    import fastweights.torch as fwt

    arrays, opts = _case(op, batch=1, length=3, heads=1, groups=1, key_dim=2, value_dim=2, **kw)
    for a in RULES[op].args:  # gates strictly below 0, so that a step of eps stays valid
        if a.log_decay:
            arrays[a.name] = np.minimum(arrays[a.name], -0.05)
    names = list(arrays)
    shapes = [len(x) if isinstance(x, tuple) else 0 for x in arrays.values()]
    inputs = [
        torch.from_numpy(np.array(t)).requires_grad_() for x in arrays.values() for t in _leaves(x)
    ]

    def f(*xs: Any) -> Any:
        args, i = {}, 0
        for n, m in zip(names, shapes, strict=True):
            args[n] = tuple(xs[i : i + m]) if m else xs[i]
            i += max(m, 1)
        o, state = getattr(fwt, op)(**args, **opts, output_final_state=True)
        return (o, *_leaves(state))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_rejects_cuda_like_and_serving() -> None:
    torch = pytest.importorskip("torch")
    import fastweights.torch as fwt

    q = torch.ones(1, 4, 1, 3)
    with pytest.raises(TypeError, match="state_pool"):
        fwt.delta_rule(q, q, q, torch.ones(1, 4, 1), state_pool=q)
    with pytest.raises(TypeError, match="CPU tensors"):
        fwt.delta_rule(q.to("meta"), q, q, torch.ones(1, 4, 1))


def test_torch_inputs_reach_the_kernels_without_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    import fastweights.torch as fwt

    seen: dict[str, Any] = {}
    real = fastweights.vjp

    def spy(op: Any, **arrays: Any) -> Any:
        seen.update(arrays)
        return real(op, **arrays)

    monkeypatch.setattr(fastweights, "vjp", spy)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 6, 2, 8, generator=gen)[..., ::2] for _ in range(2))  # strided
    v = torch.randn(1, 6, 2, 3, generator=gen, requires_grad=True)
    beta = torch.rand(1, 6, 2, generator=gen)
    o, _ = fwt.delta_rule(q, k, v, beta)
    o.sum().backward()
    for name, t in {"q": q, "k": k, "v": v, "beta": beta}.items():
        assert np.shares_memory(seen[name], t.detach().numpy()), name
    assert v.grad is not None and v.grad.shape == v.shape


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_module_examples(framework: str) -> None:
    import doctest
    import importlib

    pytest.importorskip(framework)
    module = importlib.import_module(f"fastweights.{framework}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
    assert sorted(module.__all__) == sorted(RULES)
