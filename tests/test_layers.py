"""fastweights.layers: the short convolution and the gates against float64 plain loops, on the
numba kernels and the Array API code (NumPy, array-api-strict, torch, JAX), and against fla's
torch code where it imports."""

from __future__ import annotations

import doctest
import importlib.util
import math
import warnings

import numpy as np
import pytest

from fastweights import layers

HAS_NUMBA = importlib.util.find_spec("numba") is not None
BACKENDS = [
    pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")),
    "reference",
]


# ------------------------------------------------------------------------- the oracles


def conv_oracle(x, weight, bias=None, silu=False, state=None, cu=None):
    """Plain float64 loops: ``(y [B, T, D], final [N, D, W-1])``."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    B, T, D = x.shape
    W = weight.shape[1]
    seqs = (
        [(b, 0, T) for b in range(B)]
        if cu is None
        else [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    )
    y = np.zeros((B, T, D))
    final = np.zeros((len(seqs), D, W - 1))
    for n, (b, s, e) in enumerate(seqs):

        def inp(t, d, n=n, b=b, s=s):
            if t >= s:
                return x[b, t, d]
            if state is None:
                return 0.0
            return float(state[n, d, t - s + W - 1])

        for d in range(D):
            for t in range(s, e):
                acc = 0.0 if bias is None else float(bias[d])
                for j in range(W):
                    acc += weight[d, j] * inp(t - W + 1 + j, d)
                y[b, t, d] = acc / (1 + math.exp(-acc)) if silu else acc
            for p in range(W - 1):
                final[n, d, p] = inp(e - W + 1 + p, d)
    return y, final


def softplus(z):
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


def sigmoid(z):
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def close(a, b, dtype):
    tol = 1e-12 if np.dtype(dtype) == np.float64 else 2e-6
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max(initial=0))))


def data(seed, *shape, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------- short convolution


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("W", "with_bias", "silu", "with_state"),
    [(1, False, False, False), (2, True, True, True), (3, False, True, True),
     (4, True, False, True), (4, True, True, False), (5, False, False, True)],
)  # fmt: skip
def test_short_conv_matches_loops(backend, dtype, W, with_bias, silu, with_state):
    B, T, D = 2, 70, 5  # more than one task of 64 tokens
    x, weight = data(0, B, T, D, dtype=dtype), data(1, D, W, dtype=dtype)
    bias = data(2, D, dtype=dtype) if with_bias else None
    state = data(3, B, D, W - 1, dtype=dtype) if with_state else None
    act = "silu" if silu else None
    y, final = layers.short_conv(
        x, weight, bias, activation=act, initial_state=state, output_final_state=True,
        backend=backend,
    )  # fmt: skip
    y_ref, final_ref = conv_oracle(x, weight, bias, silu, state)
    assert y.dtype == dtype and final.dtype == dtype and final.shape == (B, D, W - 1)
    close(y, y_ref, dtype)
    close(final, final_ref, dtype)
    y2, none = layers.short_conv(
        x, weight, bias, activation=act, initial_state=state, backend=backend
    )
    assert none is None
    np.testing.assert_array_equal(y2, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W", [1, 4])
def test_short_conv_packed(backend, W):
    # Empty sequences, sequences shorter than W - 1, one longer than a task.
    cu = np.array([0, 0, 2, 3, 3, 80, 81])
    N, T, D = len(cu) - 1, int(cu[-1]), 3
    x, weight, bias = data(0, 1, T, D), data(1, D, W), data(2, D)
    state = data(3, N, D, W - 1)
    y, final = layers.short_conv(
        x, weight, bias, activation="silu", initial_state=state, output_final_state=True,
        cu_seqlens=cu, backend=backend,
    )  # fmt: skip
    y_ref, final_ref = conv_oracle(x, weight, bias, True, state, cu)
    close(y, y_ref, np.float32)
    close(final, final_ref, np.float32)
    # Each sequence alone gives its part of the packed call.
    for n in range(N):
        s, e = cu[n], cu[n + 1]
        yn, fn = layers.short_conv(
            x[:, s:e], weight, bias, activation="silu", initial_state=state[n : n + 1],
            output_final_state=True, backend=backend,
        )  # fmt: skip
        np.testing.assert_array_equal(yn[0], y[0, s:e])
        np.testing.assert_array_equal(fn[0], final[n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_equals_one_call(backend):
    B, T, D, W = 2, 23, 4, 4
    x, weight, bias = data(0, B, T, D), data(1, D, W), data(2, D)
    y, final = layers.short_conv(
        x, weight, bias, activation="silu", output_final_state=True, backend=backend
    )
    state, pieces = None, []
    for s, e in [(0, 1), (1, 1), (1, 3), (3, 10), (10, 23)]:  # an empty piece, pieces < W - 1
        yp, state = layers.short_conv(
            x[:, s:e], weight, bias, activation="silu", initial_state=state,
            output_final_state=True, backend=backend,
        )  # fmt: skip
        pieces.append(yp)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(state, final)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool_dtype", [np.float32, np.float64])
def test_step_equals_prefill(backend, pool_dtype):
    B, T, D, W, P = 3, 12, 5, 4, 7
    x, weight, bias = data(0, B, T, D), data(1, D, W), data(2, D)
    y, final = layers.short_conv(
        x, weight, bias, activation="silu", output_final_state=True, backend=backend
    )
    slots = np.array([6, 0, 3])
    pool = np.full((P, D, W - 1), 7.0, dtype=pool_dtype)
    pool[slots] = 0.0
    prefix = 5  # prefill 5 tokens, then decode the rest
    y0, state = layers.short_conv(
        x[:, :prefix], weight, bias, activation="silu", output_final_state=True, backend=backend
    )
    pool[slots] = state
    outs = [y0]
    for t in range(prefix, T):
        yt, same = layers.short_conv_step(
            x[:, t], weight, pool, bias, activation="silu", state_indices=slots, backend=backend
        )
        assert same is pool and yt.dtype == np.float32
        outs.append(yt[:, None])
    np.testing.assert_allclose(np.concatenate(outs, axis=1), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pool[slots], final, rtol=1e-7)
    untouched = np.setdiff1d(np.arange(P), slots)
    assert np.all(pool[untouched] == 7.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_width_one_and_no_indices(backend):
    x, weight = data(0, 2, 3), data(1, 3, 1)
    pool = np.zeros((2, 3, 0), np.float32)
    y, _ = layers.short_conv_step(x, weight, pool, activation=None, backend=backend)
    np.testing.assert_allclose(y, x * weight[:, 0], rtol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_sizes(backend):
    for B, T, D, W in [(0, 5, 3, 4), (2, 0, 3, 4), (2, 5, 0, 4), (1, 0, 3, 1)]:
        state = data(0, B, D, W - 1)
        y, final = layers.short_conv(
            data(1, B, T, D), data(2, D, W), initial_state=state, output_final_state=True,
            backend=backend,
        )  # fmt: skip
        assert y.shape == (B, T, D) and final.shape == (B, D, W - 1)
        np.testing.assert_array_equal(final, state)  # nothing read: the state passes through
    pool = data(3, 2, 3, 2)
    y, _ = layers.short_conv_step(
        data(4, 0, 3), data(5, 3, 3), pool, state_indices=np.zeros(0, int), backend=backend
    )
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(pool, data(3, 2, 3, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend):
    x16 = data(0, 1, 9, 4).astype(np.float16)
    w = data(1, 4, 3)
    y, final = layers.short_conv(x16, w, output_final_state=True, backend=backend)
    assert y.dtype == np.float16 and final.dtype == np.float32  # computed in float32
    y_ref, final_ref = conv_oracle(x16, w)
    np.testing.assert_allclose(y.astype(np.float64), y_ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(final, final_ref)  # float16 values, exactly
    # A float64 weight makes the compute dtype float64; y keeps x's dtype.
    y, final = layers.short_conv(
        data(0, 1, 9, 4), w.astype(np.float64), output_final_state=True, backend=backend
    )
    assert y.dtype == np.float32 and final.dtype == np.float64
    # Big-endian inputs and pools.
    xbe = data(0, 2, 9, 4).astype(">f8")
    y, _ = layers.short_conv(xbe, w, backend=backend)
    close(y, conv_oracle(xbe, w)[0], np.float64)
    pool = np.zeros((2, 4, 2), dtype=">f4")
    y, _ = layers.short_conv_step(
        xbe[:, 0], w, pool, backend="reference" if backend == "numba" else backend
    )
    close(pool[..., -1], xbe[:, 0], np.float32)
    if backend == "numba":  # the kernel updates native pools only, and says so
        with pytest.raises(TypeError, match="native byte order"):
            layers.short_conv_step(xbe[:, 0], w, pool, backend="numba")
        layers.short_conv_step(xbe[:, 0], w, pool)  # the default falls back to the reference
    for bad in (np.ones((1, 4, 4), np.int32), np.ones((1, 4, 4), np.complex64)):
        with pytest.raises(TypeError, match="x must have a real floating dtype"):
            layers.short_conv(bad, np.ones((4, 2)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_strides(backend):
    B, T, D, W = 2, 11, 6, 3
    fused = data(0, B, 2 * T, 3 * D)
    x = fused[:, ::-2, D : 3 * D : 2]  # a reversed, strided slice of a projection
    weight = np.asfortranarray(data(1, D, W))
    bias = data(2, 2 * D)[::2]
    state = np.transpose(data(3, B, W - 1, D), (0, 2, 1))
    args = dict(activation="silu", initial_state=state, output_final_state=True, backend=backend)
    y, final = layers.short_conv(x, weight, bias, **args)
    y_c, final_c = layers.short_conv(*(np.ascontiguousarray(a) for a in (x, weight, bias)), **args)
    np.testing.assert_array_equal(y, y_c)
    np.testing.assert_array_equal(final, final_c)
    pool = np.zeros((B, W - 1, 2 * D), np.float32)[:, :, ::2].transpose(0, 2, 1)
    pool_c = np.zeros((B, D, W - 1), np.float32)
    for t in range(3):
        y1, _ = layers.short_conv_step(x[:, t], weight, pool, bias, backend=backend)
        y2, _ = layers.short_conv_step(
            np.ascontiguousarray(x[:, t]), weight, pool_c, bias, backend=backend
        )
        np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(pool, pool_c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_unchanged_and_views_of_the_pool(backend):
    x, weight, bias, state = data(0, 1, 8, 4), data(1, 4, 3), data(2, 4), data(3, 3, 4, 2)
    cu = np.array([0, 3, 3, 8])
    before = [a.copy() for a in (x, weight, bias, state, cu)]
    layers.short_conv(
        x,
        weight,
        bias,
        initial_state=state,
        cu_seqlens=cu,
        output_final_state=True,
        backend=backend,
    )
    for a, b in zip((x, weight, bias, state, cu), before, strict=True):
        np.testing.assert_array_equal(a, b)
    # x a view of the pool's rows: read before the pool is written.
    pool = data(4, 2, 4, 2)
    expected_pool = pool.copy()
    xv = pool[:, :, 0][::-1]  # row 0 reads pool[1], row 1 reads pool[0]
    y_ref, _ = layers.short_conv_step(xv.copy(), weight, expected_pool, bias, backend=backend)
    y, _ = layers.short_conv_step(xv, weight, pool, bias, backend=backend)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(pool, expected_pool)


def test_validation():
    x, w, pool = np.ones((1, 5, 4)), np.ones((4, 3)), np.zeros((2, 4, 2))
    bad = [
        (ValueError, "x must have rank 3", lambda: layers.short_conv(np.ones((5, 4)), w)),
        (ValueError, "weight must have shape", lambda: layers.short_conv(x, np.ones((3, 3)))),
        (ValueError, "W >= 1", lambda: layers.short_conv(x, np.ones((4, 0)))),
        (ValueError, "bias must have shape", lambda: layers.short_conv(x, w, np.ones(3))),
        (
            ValueError,
            "initial_state must have shape",
            lambda: layers.short_conv(x, w, initial_state=np.ones((1, 4, 3))),
        ),
        (ValueError, "activation must be", lambda: layers.short_conv(x, w, activation="relu")),
        (TypeError, "activation must be", lambda: layers.short_conv(x, w, activation=1)),
        (
            TypeError,
            "output_final_state must be a bool",
            lambda: layers.short_conv(x, w, output_final_state=1),
        ),
        (
            ValueError,
            "cu_seqlens must end at T",
            lambda: layers.short_conv(x, w, cu_seqlens=[0, 4]),
        ),
        (
            ValueError,
            "cu_seqlens needs B == 1",
            lambda: layers.short_conv(np.ones((2, 5, 4)), w, cu_seqlens=[0, 5]),
        ),
        (
            ValueError,
            "initial_state must have shape",
            lambda: layers.short_conv(x, w, cu_seqlens=[0, 2, 5], initial_state=np.ones((1, 4, 2))),
        ),
        (TypeError, "backend must be", lambda: layers.short_conv(x, w, backend="cupy")),
        (TypeError, "weight must be an array", lambda: layers.short_conv(x, [[1.0]])),
        (ValueError, "x must have rank 2", lambda: layers.short_conv_step(x, w, pool)),
        (
            ValueError,
            "conv_state must have shape",
            lambda: layers.short_conv_step(x[0, :2], w, np.zeros((2, 4, 3))),
        ),
        (ValueError, "without state_indices", lambda: layers.short_conv_step(x[0, :1], w, pool)),
        (
            ValueError,
            "state_indices must lie in",
            lambda: layers.short_conv_step(x[0, :1], w, pool, state_indices=[2]),
        ),
        (
            ValueError,
            "state_indices must be distinct",
            lambda: layers.short_conv_step(x[0, :2], w, pool, state_indices=[1, 1]),
        ),
        (
            ValueError,
            "state_indices must have an integer",
            lambda: layers.short_conv_step(x[0, :2], w, pool, state_indices=[0.0, 1.0]),
        ),
        (
            TypeError,
            "conv_state .* float32 or float64",
            lambda: layers.short_conv_step(x[0, :2], w, pool.astype(np.float16)),
        ),
        (
            ValueError,
            "a must have rank >= 1",
            lambda: layers.gated_delta_gate(np.float64(1.0), np.ones(1)),
        ),
        (
            ValueError,
            "A_log must have shape",
            lambda: layers.gated_delta_gate(np.ones((2, 3)), np.ones(2)),
        ),
        (
            ValueError,
            "dt_bias must have shape",
            lambda: layers.gated_delta_gate(np.ones((2, 3)), np.ones(3), np.ones(2)),
        ),
        (ValueError, "a must have rank >= 2", lambda: layers.kda_gate(np.ones(3), np.ones(3))),
        (
            ValueError,
            "dt_bias must have shape",
            lambda: layers.kda_gate(np.ones((2, 3)), np.ones(2), np.ones(5)),
        ),
        (
            ValueError,
            "lower_bound must be negative",
            lambda: layers.kda_gate(np.ones((2, 3)), np.ones(2), lower_bound=0.0),
        ),
        (
            TypeError,
            "lower_bound must be a real",
            lambda: layers.kda_gate(np.ones((2, 3)), np.ones(2), lower_bound="x"),
        ),
        (
            TypeError,
            "b must have a real floating dtype",
            lambda: layers.sigmoid_beta(np.ones(3, np.int64)),
        ),
        (
            TypeError,
            "allow_neg_eigval must be a bool",
            lambda: layers.sigmoid_beta(np.ones(3), allow_neg_eigval=None),
        ),
        (TypeError, "x must be an array", lambda: layers.rwkv7_decay([1.0])),
    ]
    for error, match, call in bad:
        with pytest.raises(error, match=match):
            call()
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"weight is a .*torch array but x is a"):
        layers.short_conv(x, torch.ones(4, 3, dtype=torch.float64))
    ro = np.zeros((2, 4, 2))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="conv_state is read-only"):
        layers.short_conv_step(x[0, :2], w, ro)


# ------------------------------------------------------------------------------- gates


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gates_match_loops(backend, dtype):
    B, T, H, K = 2, 3, 4, 5
    # Large, tiny and ordinary arguments of the softplus and the sigmoid.
    a = (data(0, B, T, H, dtype=np.float64) * np.array([1.0, 30.0, 300.0, 1e-3])).astype(dtype)
    A_log, dt_bias = data(1, H, dtype=dtype), data(2, H, dtype=dtype)
    g = layers.gated_delta_gate(a, A_log, dt_bias, backend=backend)
    ref = np.vectorize(lambda z, A, b: -math.exp(A) * softplus(float(z) + float(b)))(
        a, A_log, dt_bias
    )
    assert g.dtype == dtype and g.shape == a.shape
    close(g, ref, dtype)

    ak = data(3, B, T, H, K, dtype=np.float64) * 20
    ak = ak.astype(dtype)
    bias_k = data(4, H * K, dtype=dtype)
    gk = layers.kda_gate(ak, A_log, bias_k, backend=backend)
    bias_hk = bias_k.reshape(H, K)
    ref = np.vectorize(lambda z, A, b: -math.exp(A) * softplus(float(z) + float(b)))(
        ak, A_log[:, None], bias_hk
    )
    close(gk, ref, dtype)
    np.testing.assert_array_equal(layers.kda_gate(ak, A_log, bias_hk, backend=backend), gk)
    gl = layers.kda_gate(ak, A_log, bias_hk, lower_bound=-5.0, backend=backend)
    ref = np.vectorize(lambda z, A, b: -5.0 * sigmoid(math.exp(A) * (float(z) + float(b))))(
        ak, A_log[:, None], bias_hk
    )
    close(gl, ref, dtype)

    w = layers.rwkv7_decay(ak, backend=backend)
    close(w, np.vectorize(lambda z: -math.exp(-0.5) * sigmoid(float(z)))(ak), dtype)
    beta = layers.sigmoid_beta(a, backend=backend)
    close(beta, np.vectorize(lambda z: sigmoid(float(z)))(a), dtype)
    close(layers.sigmoid_beta(a, allow_neg_eigval=True, backend=backend), 2 * beta, dtype)
    for out in (gk, gl, w, beta):
        assert out.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_extremes_shapes_and_strides(backend):
    z = np.array([-np.inf, -1e4, -50.0, 0.0, 50.0, 1e4, np.inf, np.nan], np.float32)
    g = layers.gated_delta_gate(z, np.zeros(8, np.float32), backend=backend)
    expected = np.float32([-0.0, -0.0, -math.exp(-50.0), -math.log(2), -50.0, -1e4, -np.inf])
    np.testing.assert_allclose(g[:7], expected, rtol=1e-6)
    assert g[1] == 0 and g[2] < 0 and np.isnan(g[7])  # exp(-50) is not lost to 1 + exp(-50)
    beta = layers.sigmoid_beta(z, backend=backend)
    assert np.array_equal(beta[:7], np.float32([0, 0, sigmoid(-50.0), 0.5, 1, 1, 1]))
    assert np.isnan(beta[7])
    assert layers.rwkv7_decay(np.float32(0.0), backend=backend).shape == ()
    assert layers.sigmoid_beta(np.zeros((0, 3)), backend=backend).shape == (0, 3)
    assert layers.kda_gate(np.zeros((2, 0, 3, 4)), np.zeros(3), backend=backend).shape == (
        2,
        0,
        3,
        4,
    )
    a = data(5, 4, 6, 8)[:, ::-2, 1::2]  # odd strides, unchanged
    before = a.copy()
    np.testing.assert_array_equal(
        layers.kda_gate(a, data(6, 3), data(7, 3, 4), backend=backend),
        layers.kda_gate(before, data(6, 3), data(7, 3, 4), backend=backend),
    )
    np.testing.assert_array_equal(a, before)
    f16 = layers.sigmoid_beta(np.zeros(3, np.float16), backend=backend)
    assert f16.dtype == np.float32


# ------------------------------------------------------------------ other namespaces


def test_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    B, T, D, W = 1, 9, 3, 3
    x, w, b, s = data(0, B, T, D), data(1, D, W), data(2, D), data(3, 2, D, W - 1)
    cu = [0, 4, 9]
    y, final = layers.short_conv(
        xps.asarray(x), xps.asarray(w), xps.asarray(b), activation="silu",
        initial_state=xps.asarray(s), output_final_state=True, cu_seqlens=cu,
    )  # fmt: skip
    y_ref, final_ref = conv_oracle(x, w, b, True, s, np.array(cu))
    assert isinstance(y, type(xps.asarray(1.0))) and y.dtype == xps.float32
    close(np.asarray(y), y_ref, np.float32)
    close(np.asarray(final), final_ref, np.float32)
    pool = xps.zeros((3, D, W - 1), dtype=xps.float64)
    for t in range(T):
        _, pool2 = layers.short_conv_step(
            xps.asarray(x[0, t : t + 1]), xps.asarray(w), pool, state_indices=[2]
        )
        assert pool2 is pool
    np.testing.assert_allclose(np.asarray(pool)[2], conv_oracle(x, w)[1][0], rtol=1e-7)
    a = data(4, 2, 3)
    for fn, args, np_args in [
        (layers.gated_delta_gate, (xps.asarray(a), xps.asarray(data(5, 3))), (a, data(5, 3))),
        (
            layers.kda_gate,
            (xps.asarray(a), xps.asarray(data(5, 2)), xps.asarray(data(6, 6))),
            (a, data(5, 2), data(6, 6)),
        ),
        (layers.rwkv7_decay, (xps.asarray(a),), (a,)),
        (layers.sigmoid_beta, (xps.asarray(a),), (a,)),
    ]:
        out = fn(*args)
        assert out.dtype == xps.float32
        close(np.asarray(out), fn(*np_args), np.float32)


@pytest.mark.slow  # jax compiles (~4 s)
def test_torch_and_jax():
    torch = pytest.importorskip("torch")
    x, w, b = data(0, 2, 6, 3), data(1, 3, 4), data(2, 3)
    y_np, f_np = layers.short_conv(x, w, b, activation="silu", output_final_state=True)
    y, _ = layers.short_conv(
        torch.from_numpy(x),
        torch.from_numpy(w),
        torch.from_numpy(b),
        activation="silu",
        output_final_state=True,
    )
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    close(y.numpy(), y_np, np.float32)
    pool = torch.zeros(2, 3, 3, dtype=torch.float64)
    for t in range(6):
        _, same = layers.short_conv_step(
            torch.from_numpy(x[:, t]), torch.from_numpy(w), pool, torch.from_numpy(b)
        )
        assert same is pool
    close(pool.numpy(), f_np, np.float32)
    jnp = pytest.importorskip("jax.numpy")
    pool = jnp.zeros((2, 3, 3), dtype=jnp.float32)
    for t in range(6):
        yj, pool = layers.short_conv_step(
            jnp.asarray(x[:, t]), jnp.asarray(w), pool, jnp.asarray(b), activation="silu"
        )
    close(np.asarray(yj), y_np[:, -1], np.float32)
    close(np.asarray(pool), f_np, np.float32)


def test_against_fla_torch_code():
    """fla's ShortConvolution is a torch ``Conv1d`` with padding ``W - 1`` (its triton kernels
    need a GPU: its torch convolution is the comparison); its KDA gates have torch versions."""
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():  # fla warns that triton has no GPU here
        warnings.simplefilter("ignore")
        fla_ops = pytest.importorskip("fla.modules")
        gate_mod = pytest.importorskip("fla.ops.kda.gate")
    torch.manual_seed(0)
    D, W, B, T = 6, 4, 2, 13
    conv = fla_ops.ShortConvolution(D, W, bias=True, activation="silu")
    x = torch.randn(B, T, D)
    with torch.no_grad():
        ref = torch.nn.functional.silu(
            torch.nn.Conv1d.forward(conv, x.transpose(1, 2))[..., :T]
        ).transpose(1, 2)
        weight, bias = conv.weight[:, 0, :], conv.bias
        y, _ = layers.short_conv(x.numpy(), weight.numpy(), bias.numpy(), activation="silu")
        close(y, ref.numpy(), np.float32)
        y_t, _ = layers.short_conv(x, weight, bias, activation="silu")
        close(y_t.numpy(), ref.numpy(), np.float32)
    H, K = 3, 4
    g = torch.randn(B, T, H, K) * 10
    A_log, dt_bias = torch.randn(H), torch.randn(H * K)
    ref = gate_mod.naive_kda_gate(g, A_log, dt_bias)
    close(layers.kda_gate(g.numpy(), A_log.numpy(), dt_bias.numpy()), ref.numpy(), np.float32)
    ref = gate_mod.naive_kda_lowerbound_gate(g, A_log, dt_bias, lower_bound=-5.0)
    close(
        layers.kda_gate(g.numpy(), A_log.numpy(), dt_bias.numpy(), lower_bound=-5.0),
        ref.numpy(),
        np.float32,
    )
    # Gated DeltaNet's (fla GatedDeltaNet, transformers Qwen3Next) and RWKV-7's gates in torch.
    a, A_log, dt_bias = torch.randn(B, T, H) * 10, torch.randn(H), torch.randn(H)
    ref = -A_log.float().exp() * torch.nn.functional.softplus(a.float() + dt_bias)
    close(layers.gated_delta_gate(a, A_log, dt_bias).numpy(), ref.numpy(), np.float32)
    close(layers.rwkv7_decay(g.numpy()), (-0.6065306597126334 * g.sigmoid()).numpy(), np.float32)
    close(layers.sigmoid_beta(a.numpy()), a.sigmoid().numpy(), np.float32)


def test_docstring_examples():
    result = doctest.testmod(layers, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10 and result.failed == 0
