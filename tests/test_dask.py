"""The dask backend: lazy results equal to the single-machine call, on a real cluster too.

The golden and conformance suites also run the dask backend, with every array in blocks along
``B``, ``T`` and the heads (``_support.DaskBlocks``). Here: what those suites cannot see (no
computation before the result is computed, value checks inside the graph, how time blocks
combine, packed sequences, odd chunkings) and a ``LocalCluster`` of two worker processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import fastweights  # noqa: E402
from fastweights.testing import Call, assert_close, random_call, relative_rms, to_numpy  # noqa: E402

OPS = tuple(fastweights.testing.OPS)

# Blocks along B, T and the heads; the last axis whole.
BLOCKS = (1, 5, 1)


def lazy(x: Any, blocks: tuple[int, ...] = BLOCKS) -> Any:
    """``x`` as a Dask array with ``blocks`` rows per block along its first axes."""
    if x is None or isinstance(x, tuple):
        return x if x is None else tuple(lazy(a, blocks) for a in x)
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        return x
    chunks = tuple(
        blocks[i] if i < min(len(blocks), x.ndim - 1) else n for i, n in enumerate(x.shape)
    )
    return da.from_array(x, chunks=chunks)


def run_lazy(call: Call, blocks: tuple[int, ...] = BLOCKS, **extra: Any) -> tuple[Any, Any]:
    args, kwargs = call.arguments()
    args = tuple(lazy(a, blocks) for a in args)
    kwargs = {n: lazy(x, blocks) if n != "cu_seqlens" else x for n, x in kwargs.items()}
    return getattr(fastweights, call.op)(*args, **kwargs, **extra)


def single(call: Call, **extra: Any) -> tuple[Any, Any]:
    return call.run(getattr(fastweights, call.op), **extra)


def assert_same(got: tuple[Any, Any], want: tuple[Any, Any], *, dtype: Any = "float64") -> None:
    """float64: 1e-12 relative RMS of the single-machine call; float32: SPEC.md's tolerance."""
    for x, ref in zip(got, want, strict=True):
        if ref is None:
            assert x is None
            continue
        if isinstance(ref, tuple):
            assert_same(x, ref, dtype=dtype)
            continue
        x = to_numpy(x)
        assert x.shape == ref.shape and x.dtype == np.dtype(dtype)
        if np.dtype(dtype) == np.float64:
            assert relative_rms(x, ref) <= 1e-12
        else:
            assert_close(x, ref, dtype=dtype, form="auto")


def _with(call: Call, **arrays: Any) -> Call:
    return dataclasses.replace(call, arrays={**call.arrays, **arrays})


def forbid_compute(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    raise AssertionError("the op computed a Dask array before its result was computed")


# -- every op, every kind of time block --------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_lazy_result_equals_the_single_machine_call(op: str) -> None:
    call = random_call(op, seed=3, length=23, groups=2)
    with dask.config.set(scheduler=forbid_compute):
        o, S = run_lazy(call, output_final_state=True)
    parts = S if isinstance(S, tuple) else (S,)  # a pair state: (S, z), (H, G), (S, o)
    assert isinstance(o, da.Array) and all(isinstance(x, da.Array) for x in parts)
    assert o.numblocks[:3] == (2, 5, 2)
    assert_same((o, S), single(call, output_final_state=True))


@pytest.mark.parametrize(
    ("op", "options", "time_blocks"),
    [
        ("gla", {}, "scan"),
        ("gated_delta_rule", {}, "scan"),
        ("dplr", {}, "scan"),
        ("delta_product", {}, "scan"),
        ("linear_attn", {"normalize": True}, "state passing"),
        ("delta_rule", {"beta_per_value": True}, "state passing"),
        ("kda", {"use_qk_l2norm": True}, "scan"),
    ],
)
def test_time_blocks_combine_exactly(op: str, options: dict[str, Any], time_blocks: str) -> None:
    call = random_call(op, seed=5, length=31, groups=2, **options)
    args, kwargs = call.arguments()
    lazy_args = tuple(lazy(a) for a in args)
    lazy_kwargs = {n: lazy(x) for n, x in kwargs.items()}
    plan = fastweights.plan(getattr(fastweights, op), *lazy_args, **lazy_kwargs)
    assert plan.backend == "dask" and plan.params["time_blocks"] == time_blocks
    for dtype in ("float64", "float32"):
        cast = call.cast(np.dtype(dtype))
        got = run_lazy(cast, output_final_state=True)
        assert_same(got, single(call, output_final_state=True), dtype=dtype)


def test_a_numpy_initial_state_and_no_final_state() -> None:
    call = random_call("gated_delta_rule", seed=7, length=20)
    args, kwargs = call.arguments()
    S0 = kwargs.pop("initial_state")
    assert isinstance(S0, np.ndarray)
    o, S = fastweights.gated_delta_rule(*(lazy(a) for a in args), initial_state=S0, **kwargs)
    assert S is None
    assert_same((o,), (single(call)[0],))


def test_value_heads_stay_with_their_key_head() -> None:
    call = random_call("kda", seed=9, length=12, heads=2, groups=3, initial_state=False)
    args, _ = call.arguments()
    q, k, v, *rest = args
    lazy_v = da.from_array(v, chunks=(1, 4, 1, v.shape[3]))  # one value head per block
    lazy_args = (lazy(q), lazy(k), lazy_v, *(lazy(a) for a in rest))
    plan = fastweights.plan(fastweights.kda, *lazy_args)
    assert plan.params["blocks"]["HV"] == 2  # G = 3 value heads per block
    o, _ = fastweights.kda(*lazy_args)
    assert o.chunks[2] == (3, 3)
    assert_same((o,), (single(call)[0],))


def test_packed_sequences_run_with_t_in_one_block() -> None:
    call = random_call("gated_delta_rule", seed=11, seqlens=[5, 0, 9, 7])
    o, S = run_lazy(call, output_final_state=True)
    assert o.numblocks[1] == 1
    assert_same((o, S), single(call, output_final_state=True))


def test_a_dask_cu_seqlens_is_declined_at_the_call() -> None:
    call = random_call("gla", seed=11, seqlens=[5, 9])
    args, kwargs = call.arguments()
    kwargs["cu_seqlens"] = da.from_array(kwargs["cu_seqlens"])
    with (
        dask.config.set(scheduler=forbid_compute),
        pytest.raises(ValueError, match="cu_seqlens is a Dask array"),
    ):
        fastweights.gla(*(lazy(a) for a in args), **kwargs)


@pytest.mark.parametrize("nan_at", [3, 11])  # the first time block, or a scanned one
@pytest.mark.parametrize(
    ("op", "gate"),
    [("gated_delta_rule", "g"), ("simple_gla", "g"), ("gla", "gk"), ("kda", "gk"), ("dplr", "gk")],
)
def test_a_reset_clears_a_nan_from_an_earlier_time_block(op: str, gate: str, nan_at: int) -> None:
    """A ``-inf`` gate zeroes the state exactly, NaN included, in one call; the scan must
    too (a zero transition times a NaN state is NaN in plain arithmetic)."""
    call = random_call(op, seed=19, batch=1, length=32, initial_state=False)
    v, g = call.arrays["v"].copy(), call.arrays[gate].copy()
    v[0, nan_at, 0, 0] = np.nan
    g[0, 20, 0, ...] = -np.inf  # in the third time block
    call = _with(call, v=v, **{gate: g})
    o, S = (to_numpy(x) for x in run_lazy(call, (1, 8, 1), output_final_state=True))
    want_o, want_S = single(call, output_final_state=True)
    for got, want in ((o, want_o), (S, want_S)):
        assert np.array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if op != "dplr":  # dplr's low-rank term still reads the old state through a -inf gk
        assert np.isfinite(o[0, 20:]).all()


# -- validation never computes; value checks run in the graph -----------------------------------


@pytest.mark.parametrize(("op", "gate"), [("gated_delta_rule", "g"), ("gla", "gk"), ("rwkv7", "w")])
def test_the_gate_sign_is_checked_when_the_graph_computes(op: str, gate: str) -> None:
    call = random_call(op, seed=13, length=12)
    bad = call.arrays[gate].copy()
    bad[1, 9, ...] = 0.5  # in the last batch block, the second time block
    call = _with(call, **{gate: bad})
    with dask.config.set(scheduler=forbid_compute):
        o, _ = run_lazy(call)  # shapes are checked, values are not read
    with pytest.raises(ValueError, match=rf"\b{gate}\b is a log-decay"):
        o.compute()


def test_a_positive_argument_is_checked_when_the_graph_computes() -> None:
    call = random_call("mesa_net", seed=14, length=12)
    lamb = call.arrays["lamb"].copy()
    lamb[1, 3] = -0.5
    with dask.config.set(scheduler=forbid_compute):
        o, _ = run_lazy(_with(call, lamb=lamb))
    with pytest.raises(ValueError, match=r"\blamb must be positive"):
        o.compute()


def test_shape_errors_raise_at_the_call() -> None:
    call = random_call("gla", seed=13, length=12)
    q, k, v, gk = (lazy(a) for a in call.arguments()[0])
    with dask.config.set(scheduler=forbid_compute), pytest.raises(ValueError, match=r"\bgk\b"):
        fastweights.gla(q, k, v, gk[..., :-1])


# -- any chunking --------------------------------------------------------------------------------


@given(
    op=st.sampled_from(["gla", "gated_delta_rule", "delta_rule", "dplr"]),
    b=st.integers(1, 3),
    t=st.integers(1, 19),
    h=st.integers(1, 4),
    initial=st.booleans(),
)
def test_any_chunking_equals_one_call(op: str, b: int, t: int, h: int, initial: bool) -> None:
    call = random_call(
        op, seed=b * 100 + t, batch=3, length=19, heads=2, groups=2, initial_state=initial
    )
    assert_same(
        run_lazy(call, (b, t, h), output_final_state=True), single(call, output_final_state=True)
    )


# -- a cluster of two worker processes -----------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Any:
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.mark.slow  # a process cluster, 7-20 s an op; the other tests here use threads
@pytest.mark.parametrize("op", OPS)
def test_a_cluster_of_two_processes_computes_every_op(client: Any, op: str) -> None:
    distributed = pytest.importorskip("distributed")
    call = random_call(op, seed=17, batch=4, length=30, groups=2)
    want = single(call, output_final_state=True)
    for dtype in ("float64", "float32"):
        cast = call.cast(np.dtype(dtype))
        single(cast)  # compiles this process's kernels first: the workers load them from disk
        o, S = run_lazy(cast, output_final_state=True)
        with distributed.get_task_stream(client) as tasks:
            got = client.compute((o, S), sync=True)
        assert_same(tuple(got), want, dtype=dtype)
        workers = {t["worker"] for t in tasks.data}
        assert len(workers) == 2, f"the blocks ran on {len(workers)} worker(s)"
