"""CPU torch tensors and bfloat16 arrays on the numba backend without copies (fastweights._interop).

The kernels must receive NumPy views of the caller's tensors (checked by a spy on the numba
backend: same data pointers), results come back as tensors over the kernels' arrays, a torch
decoding pool is updated in place, tensors that require grad stay on the differentiable
reference backend, and the transformers recipe of docs/guides/torch.md reproduces the
Qwen3-Next and Kimi Linear layers' own torch code.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastweights
from fastweights import _registry, _validate
from fastweights.backends import OPS, RULES, get_backend
from fastweights.testing import random_call
from fastweights.testing._cases import token_arrays

torch = pytest.importorskip("torch")

NUMBA = get_backend("numba")
pytestmark = pytest.mark.skipif(NUMBA.unavailable() is not None, reason="numba not installed")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "guides" / "torch.md"


def _ptr(x: Any) -> int:
    if isinstance(x, np.ndarray):
        return int(x.__array_interface__["data"][0])
    return int(x.data_ptr())


def _flat(x: Any) -> list[Any]:
    return [y for z in x for y in _flat(z)] if isinstance(x, tuple | list) else [x]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any]]:
    """Records ``(kind, call, result)`` of every numba run and step."""
    seen: list[tuple[str, Any, Any]] = []
    cls = type(NUMBA)
    for kind in ("run", "step"):
        original = getattr(cls, kind)

        def wrapper(self: Any, call: Any, _o: Any = original, _k: str = kind) -> Any:
            result = _o(self, call)
            seen.append((_k, call, result))
            return result

        monkeypatch.setattr(cls, kind, wrapper)
    return seen


def _tensors(call: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments as fresh torch tensors (``cu_seqlens`` too)."""
    args, kwargs = call.arguments()

    def conv(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return tuple(conv(y) for y in x)
        return torch.tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x

    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


def _close(x: Any, ref: Any, tol: float) -> None:
    for a, b in zip(_flat(x), _flat(ref), strict=True):
        a, b = a.double().numpy(), b.double().numpy()
        assert np.max(np.abs(a - b)) <= tol * (1 + np.max(np.abs(b))), np.max(np.abs(a - b))


NUMBA_OPS = sorted(op for op in OPS if op in NUMBA.ops)


@pytest.mark.parametrize("op", NUMBA_OPS)
def test_sequence_runs_on_numba_without_copies(op: str, spy: list[Any]) -> None:
    call = random_call(op, batch=1, length=5, heads=2, key_dim=4, value_dim=3)
    args, kwargs = _tensors(call)
    kwargs["output_final_state"] = True
    before = [x.clone() for x in _flat((args, list(kwargs.values()))) if torch.is_tensor(x)]
    o, final = getattr(fastweights, op)(*args, **kwargs)
    (kind, seen, (o_np, final_np)) = spy[-1]
    assert kind == "run" and isinstance(seen.q if seen.q is not None else seen.x, np.ndarray)
    given = dict(zip(RULES[op].positional, args, strict=False))
    for name, x in given.items():
        twin = seen.q if name == "q" else seen.k if name == "k" else seen.v if name == "v" else None
        twin = seen.inputs[name] if twin is None else twin
        assert _ptr(twin) == _ptr(x), f"{name} was copied"
    for a, b in zip(_flat(seen.initial_state), _flat(kwargs["initial_state"]), strict=True):
        assert _ptr(a) == _ptr(b), "initial_state was copied"
    assert torch.is_tensor(o) and o.dtype == args[2 if op != "srwm" else 0].dtype
    assert _ptr(o) == _ptr(o_np), "o was copied on the way back"
    for a, b in zip(_flat(final), _flat(final_np), strict=True):
        assert torch.is_tensor(a) and _ptr(a) == _ptr(b), "final_state was copied on the way back"
    after = [x for x in _flat((args, list(kwargs.values()))) if torch.is_tensor(x)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    ref = getattr(fastweights, op)(*args, **kwargs, backend="reference")
    _close((o, final), ref, 1e-9)


def _strided(x: np.ndarray, how: str) -> Any:
    """A tensor holding ``x`` with the layout ``how``."""
    if how == "contiguous":
        return torch.tensor(x)
    if how == "time-major":  # [T, B, ...] memory seen as [B, T, ...]
        return torch.tensor(np.ascontiguousarray(np.swapaxes(x, 0, 1))).transpose(0, 1)
    wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=torch.float64)
    wide[..., ::2] = torch.tensor(x)
    return wide[..., ::2]  # every other element of the last axis


@pytest.mark.parametrize("how", ["contiguous", "time-major", "last-axis-step-2"])
def test_strided_tensors_are_viewed(how: str, spy: list[Any]) -> None:
    call = random_call("gated_delta_rule", batch=2, length=6, heads=2, key_dim=4, value_dim=3)
    arrays = {n: call.arrays[n] for n in ("q", "k", "v", "g", "beta")}
    t = {n: _strided(x, how if x.ndim == 4 else "contiguous") for n, x in arrays.items()}
    o, final = fastweights.gated_delta_rule(*t.values(), output_final_state=True)
    seen = spy[-1][1]
    for name in ("q", "k", "v"):
        assert _ptr(getattr(seen, name)) == _ptr(t[name])
        assert np.shares_memory(getattr(seen, name), t[name].numpy())
    expected = fastweights.gated_delta_rule(*arrays.values(), output_final_state=True)
    _close((o, final), tuple(torch.tensor(e) for e in expected), 1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_dtypes(dtype: str, spy: list[Any]) -> None:
    call = random_call("kda", batch=1, length=6, heads=2, key_dim=4, value_dim=3)
    tdt = getattr(torch, dtype)
    args = [torch.tensor(call.arrays[n]).to(tdt) for n in ("q", "k", "v", "gk", "beta")]
    o, final = fastweights.kda(*args, output_final_state=True)
    assert spy, "not run on numba"
    assert o.dtype == tdt
    assert final.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    ref = fastweights.kda(*args, output_final_state=True, backend="reference")
    assert ref[0].dtype == o.dtype and ref[1].dtype == final.dtype  # the same dtype rule
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    _close((o, final), ref, tol)


@pytest.mark.slow  # jax compiles (~6 s)
def test_numpy_and_jax_bfloat16(spy: list[Any]) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    call = random_call("gated_delta_rule", batch=1, length=6, heads=2, key_dim=4, value_dim=3)
    arrays = [call.arrays[n] for n in ("q", "k", "v", "g", "beta")]
    bf = [x.astype(ml_dtypes.bfloat16) for x in arrays]
    bf[1] = bf[1].astype(np.float32)  # mixed with float32
    o, final = fastweights.gated_delta_rule(*bf, output_final_state=True)
    assert spy and spy[-1][1].q.dtype == np.float32  # computed in float32 by numba
    assert o.dtype == ml_dtypes.bfloat16 and final.dtype == np.float32
    ref = fastweights.gated_delta_rule(*bf, output_final_state=True, backend="reference")
    assert ref[0].dtype == o.dtype and ref[1].dtype == final.dtype
    _close(tuple(torch.tensor(x.astype(np.float32)) for x in (o, final)),
           tuple(torch.tensor(x.astype(np.float32)) for x in ref), 2e-2)  # fmt: skip
    jnp = pytest.importorskip("jax.numpy")
    oj, fj = fastweights.gated_delta_rule(*(jnp.asarray(x) for x in bf), output_final_state=True)
    assert oj.dtype == jnp.bfloat16 and fj.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fj), final, rtol=1e-3, atol=1e-3)


def test_dask_of_bfloat16_blocks(spy: list[Any]) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    da = pytest.importorskip("dask.array")
    call = random_call("gated_delta_rule", batch=2, length=6, heads=2, key_dim=4, value_dim=3)
    bf = [call.arrays[n].astype(ml_dtypes.bfloat16) for n in ("q", "k", "v", "g", "beta")]
    lazy = [da.from_array(x, chunks=(1, *x.shape[1:])) for x in bf]
    o, final = fastweights.gated_delta_rule(*lazy, output_final_state=True)
    assert o.dtype == ml_dtypes.bfloat16 and final.dtype == np.float32
    o, final = o.compute(scheduler="synchronous"), final.compute(scheduler="synchronous")
    assert spy  # the blocks ran on numba
    expected = fastweights.gated_delta_rule(*bf, output_final_state=True)
    np.testing.assert_array_equal(o.astype(np.float32), expected[0].astype(np.float32))
    np.testing.assert_allclose(final, expected[1], rtol=1e-6, atol=1e-6)


STEP_CASES = [
    ("gated_delta_rule", {}),
    ("linear_attn", {"normalize": True}),  # an (S, z) pair of pools
    ("mesa_net", {}),  # an (H, G) pair
]


@pytest.mark.parametrize(("op", "extra"), STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_step_updates_the_torch_pool_in_place(
    op: str, extra: dict[str, Any], spy: list[Any]
) -> None:
    call = random_call(op, batch=2, length=1, heads=2, key_dim=4, value_dim=3, **extra)
    keywords = {k: v for k, v in call.kwargs.items() if k != "num_householder"}
    args, kwargs = type(call)(op, token_arrays(call, 0), keywords).arguments(step=True)
    inputs = [torch.tensor(x) for x in args]
    state = call.arrays["initial_state"]
    states = state if isinstance(state, tuple) else (state,)
    pools = tuple(torch.zeros((4, *s.shape[1:]), dtype=torch.float32) for s in states)
    for p, s in zip(pools, states, strict=True):
        p[[3, 1]] = torch.tensor(s, dtype=torch.float32)
    pool = pools if isinstance(state, tuple) else pools[0]
    mirror = tuple(p.clone() for p in pools)
    before = [x.clone() for x in inputs]
    step = getattr(fastweights.step, op)
    o, new = step(*inputs, pool, state_indices=torch.tensor([3, 1]), **kwargs)
    kind, seen, _ = spy[-1]
    assert kind == "step" and new is pool  # the caller's own object(s)
    for a, b in zip(_flat(seen.state_pool), pools, strict=True):
        assert _ptr(a) == _ptr(b), "the pool was copied"
    assert all(torch.equal(a, b) for a, b in zip(before, inputs, strict=True))
    mirror_pool = mirror if isinstance(state, tuple) else mirror[0]
    ro, _ = step(*inputs, mirror_pool, state_indices=[3, 1], **kwargs, backend="reference")
    _close((o, pools), (ro, mirror), 1e-5)
    assert torch.equal(pools[0][[0, 2]], torch.zeros_like(pools[0][[0, 2]]))


def test_step_input_aliasing_the_pool_is_read_first(spy: list[Any]) -> None:
    pool = torch.rand(2, 2, 4, 4)
    q = k = pool[:, :, 0, :]  # views of the pool
    v = pool[:, :, :, 1].clone()
    g, beta = -torch.rand(2, 2), torch.rand(2, 2)
    q_before, mirror = q.clone(), pool.clone()
    o, _ = fastweights.step.gated_delta_rule(q, k, v, g, beta, pool)
    ro, _ = fastweights.step.gated_delta_rule(
        q_before, q_before, v, g, beta, mirror, backend="reference"
    )
    assert spy
    _close((o, pool), (ro, mirror), 1e-5)


def test_grad_stays_differentiable(spy: list[Any]) -> None:
    call = random_call("gated_delta_rule", batch=1, length=4, heads=1, key_dim=4, value_dim=3)
    q, k, v, g, beta = (torch.tensor(call.arrays[n]) for n in ("q", "k", "v", "g", "beta"))
    q.requires_grad_()
    plan = fastweights.plan(fastweights.gated_delta_rule, q, k, v, g, beta)
    assert plan.backend == "reference" and "requires grad" in plan.passed_over["numba"]
    o, _ = fastweights.gated_delta_rule(q, k, v, g, beta)
    o.sum().backward()
    assert q.grad is not None and not spy
    with pytest.raises(TypeError, match=r"q requires grad.*backend='reference'"):
        fastweights.gated_delta_rule(q, k, v, g, beta, backend="numba")
    with torch.no_grad():  # nothing is recorded: the kernels may run
        o2, _ = fastweights.gated_delta_rule(q, k, v, g, beta)
    assert spy and not o2.requires_grad
    _close(o2, o.detach(), 1e-12)


def test_environment_preference_and_read_only_memory(
    monkeypatch: pytest.MonkeyPatch, spy: list[Any]
) -> None:
    monkeypatch.setenv("FASTWEIGHTS_BACKEND", "numba")
    x = np.random.default_rng(0).standard_normal((1, 3, 1, 4))
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # torch: "the given NumPy array is not writable"
        t = torch.from_numpy(x)
    call = _validate.validate("linear_attn", t, t, t)
    assert _registry.select(call, None).name == "numba"
    o, _ = fastweights.linear_attn(t, t, t)
    assert spy and not x.flags.writeable and torch.equal(t, torch.from_numpy(x.copy()))
    _close(o, fastweights.linear_attn(t, t, t, backend="reference")[0], 1e-12)


# -- docs/guides/torch.md: the transformers recipe, run as written ---------------------------

transformers = pytest.importorskip("transformers")


def _recipe() -> str:
    text = DOCS.read_text()
    found = re.search(
        r"```\{code-block\} python\n:name: transformers-adapter\n\n(.*?)```", text, re.S
    )
    assert found, "docs/guides/torch.md lost its transformers-adapter block"
    return found.group(1)


def _layers() -> dict[str, tuple[Any, list[str], Any]]:
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi
    from transformers.models.qwen3_next import modeling_qwen3_next as qwen

    def qwen_layer() -> Any:
        config = qwen.Qwen3NextConfig(
            hidden_size=32, num_hidden_layers=1, layer_types=["linear_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_conv_kernel_dim=4, vocab_size=16,
        )  # fmt: skip
        return qwen.Qwen3NextGatedDeltaNet(config, 0)

    def kimi_layer() -> Any:
        config = kimi.KimiLinearConfig(
            hidden_size=32, num_hidden_layers=1, layer_types=["linear_attention"],
            linear_attn_config={"head_dim": 8, "num_heads": 2, "short_conv_kernel_size": 4},
            vocab_size=16,
        )  # fmt: skip
        layer = kimi.KimiLinearDeltaAttention(config, 0)
        with torch.no_grad():  # as KimiLinearPreTrainedModel._init_weights
            layer.forget_gate.A_log.uniform_(1.0, 16.0).log_()
            dt = torch.empty_like(layer.forget_gate.dt_bias).uniform_(-6.9, -2.3).exp()
            layer.forget_gate.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        return layer

    qwen_names = ["torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"]
    kimi_names = ["chunk_kimi_delta_attention", "recurrent_kimi_delta_attention"]
    return {
        "qwen3_next": (qwen, qwen_names, qwen_layer),
        "kimi_linear": (kimi, kimi_names, kimi_layer),
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("model", ["qwen3_next", "kimi_linear"])
def test_transformers_recipe(
    model: str, dtype: str, monkeypatch: pytest.MonkeyPatch, spy: list[Any]
) -> None:
    layers = _layers()
    module, names, make = layers[model]
    originals = {n: getattr(module, n) for n in names}
    for other, other_names, _ in layers.values():  # restored after the test: the recipe
        for name in other_names:  # sets these attributes of both modules
            monkeypatch.setattr(other, name, getattr(other, name))
    for name in names:  # the layer's own torch code (not fla's Triton kernels)
        monkeypatch.setattr(module, name, originals[name].__wrapped__)
    torch.manual_seed(0)
    layer = make().to(getattr(torch, dtype))
    x = torch.randn(2, 9, 32, dtype=getattr(torch, dtype))
    with torch.no_grad():
        expected = layer(x)
    exec(compile(_recipe(), str(DOCS), "exec"), {})
    assert all(getattr(module, n).__module__ != module.__name__ for n in names), "not installed"
    with torch.no_grad():
        got = layer(x)
    assert spy, "the recipe did not run on numba"
    assert got.dtype == expected.dtype
    _close(got, expected, 2e-5)  # the torch code computes in float32 for either dtype
    # Decoding from a state: the recurrent function against the layer's own.
    q, k = torch.randn(2, 2, 1, 2, 8, dtype=getattr(torch, dtype)).unbind(0)
    v = torch.randn(2, 1, 2, 8, dtype=getattr(torch, dtype))
    beta = torch.rand(2, 1, 2, dtype=getattr(torch, dtype))
    g = -torch.rand(2, 1, 2, *((8,) if model == "kimi_linear" else ()), dtype=torch.float32)
    state = torch.randn(2, 2, 8, 8, dtype=torch.float32)
    kwargs = {"initial_state": state, "output_final_state": True, "use_qk_l2norm_in_kernel": True}
    ours = getattr(module, names[1])(q, k, v, g, beta, **kwargs)
    theirs = originals[names[1]].__wrapped__(q, k, v, g, beta, **kwargs)
    assert ours[0].dtype == theirs[0].dtype
    _close(ours, theirs, 2e-5)
