"""``fastweights.fla``: fla's functions, signatures and defaults, computed by fastweights.

Every function of ``fastweights.fla`` runs here on small float64 inputs, called as fla's
documented API is, and is compared with two references: fastweights' own float64 oracle
(``fastweights.testing.naive``, always) and flash-linear-attention's pure-torch naive loops
(``fla.ops.*.naive``, where fla imports; they compute in float32, hence their tolerance).
Where fla and Triton import, fla's real ``fused_recurrent`` kernels also run the same script
through Triton's CPU interpreter in a subprocess. The signatures are checked against fla's
(names, order, defaults), and so are the head-first warning, ``o``'s dtype, the defaults,
``reverse``, ``state_v_first``, ``cu_seqlens`` and the errors. Runs on the reference backend
(no kernel compilation).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
import types
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fastweights as fw
from fastweights import fla as F
from fastweights.testing import naive as N
from fastweights.testing import relative_rms


def _import_fla() -> types.ModuleType | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Triton is not supported on current platform"
            return importlib.import_module("fla.ops")
    except Exception:  # not installed, or broken on this platform
        return None


FLA = _import_fla()
needs_fla = pytest.mark.skipif(FLA is None, reason="flash-linear-attention does not import")


@pytest.fixture(autouse=True)
def _reference_backend():
    with fw.use_backend("reference"):
        yield


# --------------------------------------------------------------------------------------------
# inputs: float64, [B, T, H, ...], K != V so that a transposed state cannot pass

B, T, H, K, V = 2, 12, 2, 8, 6
_rng = np.random.default_rng(17)


def _l2(x: np.ndarray) -> np.ndarray:  # fla's l2norm: x / sqrt(sum(x^2) + 1e-6)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


q, k = _rng.standard_normal((2, B, T, H, K))
qn, kn = _l2(q), _l2(k)
v = _rng.standard_normal((B, T, H, V))
g = np.log(_rng.uniform(0.7, 1.0, (B, T, H)))
gk = np.log(_rng.uniform(0.7, 1.0, (B, T, H, K)))
beta = _rng.uniform(0.2, 0.9, (B, T, H))
h0 = 0.1 * _rng.standard_normal((B, H, K, V))
kk = _l2(_rng.standard_normal((B, T, H, K)))
u = _rng.uniform(0.0, 1.0, (B, T, H, K))  # RWKV-7's own a
a, b = -kk, kk * u  # DPLR's a, b in RWKV-7: a = -kk, b = kk * a
g_raw, beta_raw = _rng.standard_normal((2, B, T, H))
gk_raw = _rng.standard_normal((B, T, H, K))
A_log, dt_bias = _rng.uniform(-1.0, 0.5, H), 0.1 * _rng.standard_normal(H)
dt_bias_k = 0.1 * _rng.standard_normal(H * K)
g_gamma = np.log(1 - 2.0 ** (-3.0 - np.arange(H)))
qp, kp = np.abs(q) + 0.1, np.abs(k) + 0.1  # positive features for the normalised form
z0 = np.abs(_rng.standard_normal((B, H, K)))
lamb = _rng.uniform(0.5, 1.5, (H, K))
vm = _rng.standard_normal((B, T, H, K))  # fla's MesaNet wants V == K
_x = 0.3 * _rng.standard_normal((B, H, K, K))
hkk0, hkv0 = _x @ np.swapaxes(_x, -1, -2), 0.1 * _rng.standard_normal((B, H, K, K))
k2, v2 = _l2(_rng.standard_normal((B, 2 * T, H, K))), _rng.standard_normal((B, 2 * T, H, V))
beta2 = _rng.uniform(0.2, 0.9, (B, 2 * T, H))
ones = np.ones((B, T, H))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


gdn_gate = -np.exp(A_log) * _softplus(g_raw + dt_bias)
kda_gate = -np.exp(A_log)[:, None] * _softplus(gk_raw + dt_bias_k.reshape(H, K))
lightning_g = np.broadcast_to(-(8 / H * (1 - 1 / 4)) * np.arange(H), (B, T, H))


def _flip(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[:, ::-1])


# --------------------------------------------------------------------------------------------
# fla's naive references: torch, [B, T, H, ...] or [B, H, T, ...] depending on the function


def _t(x: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def _hf(x: np.ndarray) -> Any:  # head-first torch tensor
    return _t(np.swapaxes(x, 1, 2))


def _hf32(x: np.ndarray) -> Any:  # dplr/iplr_recurrence mix dtypes in float64
    return _hf(x).float()


def _np(x: Any) -> Any:
    if x is None or isinstance(x, np.ndarray):
        return x
    if isinstance(x, tuple):
        return tuple(_np(y) for y in x)
    return x.detach().cpu().numpy()


def _ohf(res: tuple[Any, Any]) -> tuple[Any, Any]:  # head-first output back to [B, T, H, V]
    o, s = res
    return np.swapaxes(_np(o), 1, 2), _np(s)


class _Ref:
    """Lazy access to fla's naive functions."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        paths = {
            "gdn": "fla.ops.gated_delta_rule.naive:naive_recurrent_gated_delta_rule",
            "gdn_gate": "fla.ops.gated_delta_rule.gate:naive_gdn_gate",
            "kda": "fla.ops.kda.naive:naive_recurrent_kda",
            "kda_gate": "fla.ops.kda.gate:naive_kda_gate",
            "gla": "fla.ops.gla.naive:naive_recurrent_gla",
            "sgla": "fla.ops.simple_gla.naive:naive_recurrent_simple_gla",
            "delta": "fla.ops.delta_rule.naive:delta_rule_recurrence",
            "dplr": "fla.ops.generalized_delta_rule.dplr.naive:dplr_recurrence",
            "iplr": "fla.ops.generalized_delta_rule.iplr.naive:iplr_recurrence",
            "linear": "fla.ops.linear_attn.naive:naive_recurrent_linear_attn",
            "retention": "fla.ops.retention.naive:naive_retention",
            "mesa_cg": "fla.ops.mesa_net.naive:naive_mesa_net_CG",
            "gdp": "fla.ops.gated_delta_product.naive:naive_recurrent_gated_delta_product",
        }
        module, func = paths[name].split(":")
        return getattr(importlib.import_module(module), func)


R = _Ref()


def _mesa_fla() -> tuple[Any, Any]:
    f = lambda x: _t(x).float()  # noqa: E731 -- its chunked CG mixes dtypes in float64
    o, hkk, hkv = R.mesa_cg(
        f(qn), f(kn), f(vm), f(g), f(lamb), f(beta), chunk_size=4,
        h_kk_init=f(hkk0), h_kv_init=f(hkv0),
    )  # fmt: skip
    return _np(o), (_np(hkk), _np(hkv))


def _mesa_ours() -> tuple[Any, Any]:
    o, hkk, hkv = F.chunk_mesa_net(
        q, k, vm, g, beta, lamb, hkk0, hkv0, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    return o, (hkk, hkv)


def _la_fla(**kw: Any) -> tuple[Any, Any]:
    o, s = R.linear(_t(qp), _t(kp), _t(v), **kw)
    return _np(o), _np(s)


def _la_naive(initial: Any = None, normalize: bool = True) -> tuple[Any, Any]:
    o, s = N.linear_attn(
        qp, kp, v, normalize=normalize, initial_state=initial, output_final_state=True
    )
    return (o, (s[0], s[1][:, None])) if normalize else (o, s)


def _retention_fla() -> tuple[Any, Any]:
    return np.swapaxes(_np(R.retention(_hf(q), _hf(k), _hf(v))), 1, 2), None


# name[variant] -> (fastweights.fla call, fla's naive reference, fastweights' float64 oracle);
# each returns (o, final state); a reference's state None is not compared.
_common = {"initial_state": h0, "output_final_state": True}
CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]] = {
    "chunk_gated_delta_rule": (
        lambda: F.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, **_common),
        lambda: _np(
            R.gdn(
                _t(qn),
                _t(kn),
                _t(v),
                _t(beta),
                _t(g),
                initial_state=_t(h0),
                output_final_state=True,
            )
        ),
        lambda: N.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, **_common),
    ),
    "chunk_gated_delta_rule[gate_in_kernel]": (
        lambda: F.chunk_gated_delta_rule(
            qn,
            kn,
            v,
            g_raw,
            beta_raw,
            use_gate_in_kernel=True,
            A_log=A_log,
            dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=True,
            output_final_state=True,
        ),
        lambda: _np(
            R.gdn(
                _t(qn),
                _t(kn),
                _t(v),
                _t(_sigmoid(beta_raw)),
                R.gdn_gate(_t(g_raw), _t(A_log), _t(dt_bias)),
                output_final_state=True,
            )
        ),
        lambda: N.gated_delta_rule(
            qn, kn, v, gdn_gate, _sigmoid(beta_raw), output_final_state=True
        ),
    ),
    "fused_recurrent_gated_delta_rule": (
        lambda: F.fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True, **_common
        ),
        lambda: _np(
            R.gdn(
                _t(qn),
                _t(kn),
                _t(v),
                _t(beta),
                _t(g),
                initial_state=_t(h0),
                output_final_state=True,
            )
        ),
        lambda: N.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, **_common),
    ),
    "fused_recurrent_gated_delta_rule[beta=None]": (
        lambda: F.fused_recurrent_gated_delta_rule(qn, kn, v, g, output_final_state=True),
        lambda: _np(R.gdn(_t(qn), _t(kn), _t(v), _t(ones), _t(g), output_final_state=True)),
        lambda: N.gated_delta_rule(qn, kn, v, g, ones, output_final_state=True),
    ),
    "fused_recurrent_gated_delta_rule[g=None]": (
        lambda: F.fused_recurrent_gated_delta_rule(qn, kn, v, beta=beta, output_final_state=True),
        lambda: _np(R.gdn(_t(qn), _t(kn), _t(v), _t(beta), _t(0 * g), output_final_state=True)),
        lambda: N.delta_rule(qn, kn, v, beta, output_final_state=True),
    ),
    "fused_recurrent_gated_delta_rule[gk]": (
        lambda: F.fused_recurrent_gated_delta_rule(
            qn, kn, v, gk=gk, beta=beta, output_final_state=True
        ),
        lambda: _np(R.kda(_t(qn), _t(kn), _t(v), _t(gk), _t(beta), output_final_state=True)),
        lambda: N.kda(qn, kn, v, gk, beta, output_final_state=True),
    ),
    "chunk_gdn": (  # fla's alias
        lambda: F.chunk_gdn(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, **_common),
        lambda: _np(
            R.gdn(
                _t(qn),
                _t(kn),
                _t(v),
                _t(beta),
                _t(g),
                initial_state=_t(h0),
                output_final_state=True,
            )
        ),
        lambda: N.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, **_common),
    ),
    "fused_recurrent_gdn": (  # fla's alias
        lambda: F.fused_recurrent_gdn(qn, kn, v, g, beta=beta, output_final_state=True),
        lambda: _np(R.gdn(_t(qn), _t(kn), _t(v), _t(beta), _t(g), output_final_state=True)),
        lambda: N.gated_delta_rule(qn, kn, v, g, beta, output_final_state=True),
    ),
    "fused_mul_recurrent_rwkv7": (  # RWKV's (kk, a); scale 1.0 by default
        lambda: F.fused_mul_recurrent_rwkv7(q, gk, k, v, kk, u, **_common),
        lambda: _ohf(
            R.dplr(
                _hf32(q * K**0.5),
                _hf32(k),
                _hf32(v),
                _hf32(a),
                _hf32(b),
                _hf32(gk),
                initial_state=_t(h0).float(),
            )
        ),
        lambda: N.rwkv7(q, k, v, gk, kk, u, scale=1.0, **_common),
    ),
    "chunk_kda": (
        lambda: F.chunk_kda(q, k, v, gk, beta, use_qk_l2norm_in_kernel=True, **_common),
        lambda: _np(
            R.kda(
                _t(qn),
                _t(kn),
                _t(v),
                _t(gk),
                _t(beta),
                initial_state=_t(h0),
                output_final_state=True,
            )
        ),
        lambda: N.kda(q, k, v, gk, beta, use_qk_l2norm=True, **_common),
    ),
    "chunk_kda[gate_in_kernel]": (
        lambda: F.chunk_kda(
            qn,
            kn,
            v,
            gk_raw,
            beta,
            use_gate_in_kernel=True,
            A_log=A_log,
            dt_bias=dt_bias_k,
            output_final_state=True,
        ),
        lambda: _np(
            R.kda(
                _t(qn),
                _t(kn),
                _t(v),
                R.kda_gate(_t(gk_raw), _t(A_log), _t(dt_bias_k)),
                _t(beta),
                output_final_state=True,
            )
        ),
        lambda: N.kda(qn, kn, v, kda_gate, beta, output_final_state=True),
    ),
    "fused_recurrent_kda": (
        lambda: F.fused_recurrent_kda(q, k, v, gk, beta, use_qk_l2norm_in_kernel=True, **_common),
        lambda: _np(
            R.kda(
                _t(qn),
                _t(kn),
                _t(v),
                _t(gk),
                _t(beta),
                initial_state=_t(h0),
                output_final_state=True,
            )
        ),
        lambda: N.kda(q, k, v, gk, beta, use_qk_l2norm=True, **_common),
    ),
    "chunk_gla": (
        lambda: F.chunk_gla(q, k, v, gk, **_common),
        lambda: _np(
            R.gla(_t(q), _t(k), _t(v), _t(gk), initial_state=_t(h0), output_final_state=True)
        ),
        lambda: N.gla(q, k, v, gk, **_common),
    ),
    "fused_recurrent_gla": (
        lambda: F.fused_recurrent_gla(q, k, v, gk=gk, **_common),
        lambda: _np(
            R.gla(_t(q), _t(k), _t(v), _t(gk), initial_state=_t(h0), output_final_state=True)
        ),
        lambda: N.gla(q, k, v, gk, **_common),
    ),
    "fused_recurrent_gla[reverse]": (
        lambda: F.fused_recurrent_gla(q, k, v, gk, reverse=True, **_common),
        lambda: (lambda o, s: (_flip(_np(o)), _np(s)))(
            *R.gla(
                _t(_flip(q)),
                _t(_flip(k)),
                _t(_flip(v)),
                _t(_flip(gk)),
                initial_state=_t(h0),
                output_final_state=True,
            )
        ),
        lambda: (lambda o, s: (_flip(o), s))(
            *N.gla(_flip(q), _flip(k), _flip(v), _flip(gk), **_common)
        ),
    ),
    "chunk_simple_gla": (
        lambda: F.chunk_simple_gla(q, k, v, g, **_common),
        lambda: _np(
            R.sgla(_t(q), _t(k), _t(v), _t(g), initial_state=_t(h0), output_final_state=True)
        ),
        lambda: N.simple_gla(q, k, v, g, **_common),
    ),
    "chunk_simple_gla[g_gamma]": (
        lambda: F.chunk_simple_gla(q, k, v, g, g_gamma=g_gamma, **_common),
        lambda: _np(
            R.sgla(
                _t(q), _t(k), _t(v), _t(g + g_gamma), initial_state=_t(h0), output_final_state=True
            )
        ),
        lambda: N.simple_gla(q, k, v, g + g_gamma, **_common),
    ),
    "fused_recurrent_simple_gla": (
        lambda: F.fused_recurrent_simple_gla(q, k, v, g, **_common),
        lambda: _np(
            R.sgla(_t(q), _t(k), _t(v), _t(g), initial_state=_t(h0), output_final_state=True)
        ),
        lambda: N.simple_gla(q, k, v, g, **_common),
    ),
    "fused_chunk_simple_gla": (
        lambda: F.fused_chunk_simple_gla(q, k, v, g_gamma=g_gamma, **_common),
        lambda: _np(
            R.sgla(
                _t(q),
                _t(k),
                _t(v),
                _t(0 * g + g_gamma),
                initial_state=_t(h0),
                output_final_state=True,
            )
        ),
        lambda: N.simple_gla(q, k, v, 0 * g + g_gamma, **_common),
    ),
    "parallel_simple_gla": (
        lambda: F.parallel_simple_gla(q, k, v, g),
        lambda: (_np(R.sgla(_t(q), _t(k), _t(v), _t(g))[0]), None),
        lambda: N.simple_gla(q, k, v, g),
    ),
    "chunk_delta_rule": (
        lambda: F.chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True, **_common),
        lambda: _ohf(R.delta(_hf(qn), _hf(kn), _hf(v), _hf(beta), initial_state=_t(h0))),
        lambda: N.delta_rule(q, k, v, beta, use_qk_l2norm=True, **_common),
    ),
    "fused_recurrent_delta_rule": (
        lambda: F.fused_recurrent_delta_rule(
            q, k, v, beta, use_qk_l2norm_in_kernel=True, **_common
        ),
        lambda: _ohf(R.delta(_hf(qn), _hf(kn), _hf(v), _hf(beta), initial_state=_t(h0))),
        lambda: N.delta_rule(q, k, v, beta, use_qk_l2norm=True, **_common),
    ),
    "fused_recurrent_delta_rule[beta=None]": (
        lambda: F.fused_recurrent_delta_rule(qn, kn, v, output_final_state=True),
        lambda: _ohf(R.delta(_hf(qn), _hf(kn), _hf(v), _hf(ones))),
        lambda: N.delta_rule(qn, kn, v, ones, output_final_state=True),
    ),
    "chunk_gated_delta_product": (
        lambda: F.chunk_gated_delta_product(qn, k2, v2, g, beta2, 2, **_common),
        lambda: _np(
            R.gdp(
                _t(qn),
                _t(k2),
                _t(v2),
                _t(g),
                _t(beta2),
                scale=K**-0.5,
                initial_state=_t(h0),
                output_final_state=True,
                num_householder=2,
            )
        ),
        lambda: N.delta_product(qn, k2, v2, beta2, g=g, num_householder=2, **_common),
    ),
    "chunk_dplr_delta_rule": (
        lambda: F.chunk_dplr_delta_rule(q, k, v, a, b, gk, **_common),
        lambda: _ohf(
            R.dplr(
                _hf32(q),
                _hf32(k),
                _hf32(v),
                _hf32(a),
                _hf32(b),
                _hf32(gk),
                initial_state=_t(h0).float(),
            )
        ),
        lambda: N.dplr(q, k, v, a, b, gk, **_common),
    ),
    "fused_recurrent_dplr_delta_rule": (
        lambda: F.fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk, **_common),
        lambda: _ohf(
            R.dplr(
                _hf32(q),
                _hf32(k),
                _hf32(v),
                _hf32(a),
                _hf32(b),
                _hf32(gk),
                initial_state=_t(h0).float(),
            )
        ),
        lambda: N.dplr(q, k, v, a, b, gk, **_common),
    ),
    "chunk_iplr_delta_rule": (
        lambda: F.chunk_iplr_delta_rule(q, k, v, a, b, **_common),
        lambda: _ohf(
            R.iplr(_hf32(q), _hf32(k), _hf32(v), _hf32(a), _hf32(b), initial_state=_t(h0).float())
        ),
        lambda: N.iplr(q, k, v, a, b, **_common),
    ),
    "fused_recurrent_iplr_delta_rule": (
        lambda: F.fused_recurrent_iplr_delta_rule(q, k, v, a, b, **_common),
        lambda: _ohf(
            R.iplr(_hf32(q), _hf32(k), _hf32(v), _hf32(a), _hf32(b), initial_state=_t(h0).float())
        ),
        lambda: N.iplr(q, k, v, a, b, **_common),
    ),
    "chunk_rwkv7": (  # fla's default scale here is 1.0; dplr_recurrence hard-codes K**-0.5
        lambda: F.chunk_rwkv7(q, gk, k, v, a, b, **_common),
        lambda: _ohf(
            R.dplr(
                _hf32(q * K**0.5),
                _hf32(k),
                _hf32(v),
                _hf32(a),
                _hf32(b),
                _hf32(gk),
                initial_state=_t(h0).float(),
            )
        ),
        lambda: N.dplr(q, k, v, a, b, gk, scale=1.0, **_common),
    ),
    "fused_recurrent_rwkv7": (  # default output_final_state=True and scale K**-0.5
        lambda: F.fused_recurrent_rwkv7(q, gk, k, v, a, b, initial_state=h0),
        lambda: _ohf(
            R.dplr(
                _hf32(q),
                _hf32(k),
                _hf32(v),
                _hf32(a),
                _hf32(b),
                _hf32(gk),
                initial_state=_t(h0).float(),
            )
        ),
        lambda: N.dplr(q, k, v, a, b, gk, **_common),
    ),
    "chunk_linear_attn": (  # normalize=True by default: state (S, z [N, 1, H, K])
        lambda: F.chunk_linear_attn(qp, kp, v, output_final_state=True),
        lambda: _la_fla(output_final_state=True, normalize=True),
        lambda: _la_naive(),
    ),
    "chunk_linear_attn[initial_state=(S, z)]": (
        lambda: F.chunk_linear_attn(
            qp, kp, v, initial_state=(h0, z0[:, None]), output_final_state=True
        ),
        lambda: _la_fla(
            initial_state=(_t(h0).float(), _t(z0[:, None]).float()),
            output_final_state=True,
            normalize=True,
        ),
        lambda: _la_naive((h0, z0)),
    ),
    "fused_chunk_linear_attn": (
        lambda: F.fused_chunk_linear_attn(qp, kp, v, output_final_state=True),
        lambda: _la_fla(output_final_state=True, normalize=True),
        lambda: _la_naive(),
    ),
    "fused_recurrent_linear_attn": (  # normalize=False by default here
        lambda: F.fused_recurrent_linear_attn(qp, kp, v, **_common),
        lambda: _la_fla(initial_state=_t(h0).float(), output_final_state=True),
        lambda: N.linear_attn(qp, kp, v, **_common),
    ),
    "chunk_retention": (
        lambda: F.chunk_retention(q, k, v, output_final_state=True),
        _retention_fla,
        lambda: N.retention(q, k, v, output_final_state=True),
    ),
    "fused_chunk_retention": (
        lambda: F.fused_chunk_retention(q, k, v, output_final_state=True),
        _retention_fla,
        lambda: N.retention(q, k, v, output_final_state=True),
    ),
    "fused_recurrent_retention": (
        lambda: F.fused_recurrent_retention(q, k, v, output_final_state=True),
        _retention_fla,
        lambda: N.retention(q, k, v, output_final_state=True),
    ),
    "parallel_retention": (
        lambda: F.parallel_retention(q, k, v),
        _retention_fla,
        lambda: N.retention(q, k, v),
    ),
    "chunk_lightning_attn": (
        lambda: F.chunk_lightning_attn(q, k, v, 1, 4, **_common),
        lambda: _np(
            R.sgla(
                _t(q), _t(k), _t(v), _t(lightning_g), initial_state=_t(h0), output_final_state=True
            )
        ),
        lambda: N.simple_gla(q, k, v, lightning_g, **_common),
    ),
    "fused_recurrent_lightning_attn": (
        lambda: F.fused_recurrent_lightning_attn(q, k, v, 1, 4, **_common),
        lambda: _np(
            R.sgla(
                _t(q), _t(k), _t(v), _t(lightning_g), initial_state=_t(h0), output_final_state=True
            )
        ),
        lambda: N.simple_gla(q, k, v, lightning_g, **_common),
    ),
    "chunk_mesa_net": (  # no scale; fla's conjugate gradient
        _mesa_ours,
        _mesa_fla,
        lambda: N.mesa_net(
            q,
            k,
            vm,
            g,
            beta,
            lamb,
            solver="cg",
            scale=1.0,
            use_qk_l2norm=True,
            initial_state=(hkk0, hkv0),
            output_final_state=True,
        ),
    ),
}


def _compare(ours: Any, ref: Any, tol: float, what: str) -> None:
    if ref is None:
        return
    if isinstance(ref, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(ref), what
        for i, (x, y) in enumerate(zip(ours, ref, strict=True)):
            _compare(x, y, tol, f"{what}[{i}]")
        return
    assert ours is not None, f"{what} is None"
    x, y = np.asarray(_np(ours), dtype=np.float64), np.asarray(_np(ref), dtype=np.float64)
    assert x.shape == y.shape, f"{what}: shape {x.shape} != {y.shape}"
    err = relative_rms(x, y)
    assert err < tol, f"{what}: relative RMS error {err:.2e} >= {tol:.0e}"


def test_every_function_has_a_case() -> None:
    assert {name.split("[")[0] for name in CASES} == set(F.__all__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_oracle(name: str) -> None:
    ours, _, oracle = CASES[name]
    o, state = ours()
    ref_o, ref_state = oracle()
    assert o.dtype == np.float64
    _compare(o, ref_o, 1e-10, "o")
    _compare(state, ref_state, 1e-10, "final state")


@needs_fla
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_fla_naive(name: str) -> None:
    """fla's naive loops cast to float32 inside: agreement to float32 precision."""
    ours, fla_ref, _ = CASES[name]
    o, state = ours()
    ref_o, ref_state = fla_ref()
    _compare(o, ref_o, 2e-5, "o")
    _compare(state, ref_state, 2e-5, "final state")


def _fla_function(name: str) -> Callable[..., Any]:
    if name == "chunk_gated_delta_product":
        return importlib.import_module("fla.ops.gated_delta_product").chunk_gated_delta_product
    if name == "fused_mul_recurrent_rwkv7":
        return importlib.import_module("fla.ops.rwkv7").fused_mul_recurrent_rwkv7
    return getattr(FLA, name)


@needs_fla
@pytest.mark.parametrize("name", F.__all__)
def test_signature_matches_fla(name: str) -> None:
    """fla's parameters, in fla's order, with fla's defaults and kinds; ours may add **kwargs."""
    theirs = [
        p
        for p in inspect.signature(_fla_function(name)).parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ]
    ours = list(inspect.signature(getattr(F, name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]


# --------------------------------------------------------------------------------------------
# layout, dtype, defaults, options, errors


def test_head_first_warning() -> None:
    """fla's warning when q looks head-first (T < H), from the chunk functions only (the
    recurrent ones decode one token at a time, T = 1)."""
    qh, kh = _rng.standard_normal((2, 1, 2, 4, K))
    vh, gh, bh = _rng.standard_normal((1, 2, 4, V)), -np.ones((1, 2, 4)), np.ones((1, 2, 4))
    with pytest.warns(UserWarning, match=r"seq_len \(2\) < num_heads \(4\)") as record:
        F.chunk_gated_delta_rule(qh, kh, vh, gh, bh)
    assert record[0].filename == __file__  # points at the caller
    with pytest.warns(UserWarning, match="head-first"):
        F.chunk_simple_gla(qh, kh, vh, gh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.fused_recurrent_gated_delta_rule(qh, kh, vh, gh, beta=bh)
        F.chunk_gated_delta_rule(q, k, v, g, beta)  # T = 12 >= H = 2


def test_head_first_true_transposes() -> None:
    """Earlier fla's head_first=True: [B, H, T, ...] in and out (fla 0.6 removed it)."""
    o, s = F.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    sw = lambda x: np.ascontiguousarray(np.swapaxes(x, 1, 2))  # noqa: E731
    with pytest.warns(DeprecationWarning, match="head_first"):
        oh, sh = F.chunk_gated_delta_rule(
            sw(q), sw(k), sw(v), sw(g), sw(beta), output_final_state=True, head_first=True
        )
    np.testing.assert_allclose(np.swapaxes(oh, 1, 2), o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sh, s, rtol=1e-12, atol=1e-12)
    # head_first=False is accepted everywhere; True where fla's functions once took it
    F.chunk_linear_attn(q, k, v, head_first=False)
    with pytest.raises(ValueError, match="head_first"):
        F.chunk_mesa_net(q, k, vm, g, beta, lamb, head_first=True)


def test_o_has_q_dtype() -> None:
    q32, k32 = q.astype(np.float32), k.astype(np.float32)
    o, s = F.chunk_gla(q32, k32, v, gk, output_final_state=True)  # v float64: computes in f64
    assert o.dtype == np.float32 and s.dtype == np.float64
    o, s = F.fused_recurrent_delta_rule(
        qn.astype(np.float16), kn.astype(np.float16), v.astype(np.float16), output_final_state=True
    )
    assert o.dtype == np.float16 and s.dtype == np.float32
    assert fw.gla(q32, k32, v, gk)[0].dtype == np.float64  # fastweights' own rule: v's dtype


def test_defaults() -> None:
    # scale K ** -0.5 where fla defaults it; rwkv7: 1.0 in the chunk form, K ** -0.5 recurrent
    ref = N.gated_delta_rule(q, k, v, g, beta, scale=K**-0.5)[0]
    _compare(F.chunk_gated_delta_rule(q, k, v, g, beta)[0], ref, 1e-12, "scale")
    assert F.chunk_gated_delta_rule(q, k, v, g, beta)[1] is None
    o1, s1 = F.chunk_rwkv7(q, gk, k, v, a, b)
    o2, s2 = F.fused_recurrent_rwkv7(q, gk, k, v, a, b)
    assert s1 is None and s2 is not None  # fla's recurrent RWKV-7 returns the state by default
    _compare(o1, N.dplr(q, k, v, a, b, gk, scale=1.0)[0], 1e-10, "chunk_rwkv7 scale")
    _compare(o2, N.dplr(q, k, v, a, b, gk)[0], 1e-10, "fused_recurrent_rwkv7 scale")
    # normalize: True in chunk/fused_chunk, False in fused_recurrent; z comes back regardless
    o, (S, z) = F.chunk_linear_attn(qp, kp, v)
    assert S is None and z.shape == (B, 1, H, K)
    o, S = F.fused_recurrent_linear_attn(qp, kp, v)
    assert S is None
    _compare(o, N.linear_attn(qp, kp, v)[0], 1e-10, "not normalised")


def test_state_v_first() -> None:
    o, s = F.chunk_gated_delta_rule(q, k, v, g, beta, **_common)
    ov, sv = F.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=np.swapaxes(h0, -1, -2), output_final_state=True,
        state_v_first=True,
    )  # fmt: skip
    assert sv.shape == (B, H, V, K)
    np.testing.assert_allclose(ov, o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.swapaxes(sv, -1, -2), s, rtol=1e-12, atol=1e-12)
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        F.fused_recurrent_simple_gla(q, k, v, g, transpose_state_layout=True)


def test_packed_sequences_and_reverse() -> None:
    cu = np.array([0, 5, 5, 12])
    qs, ks, vs, gs, bs = (x[:1] for x in (q, k, v, g, beta))
    hs = 0.1 * _rng.standard_normal((3, H, K, V))
    o, s = F.chunk_gated_delta_rule(
        qs, ks, vs, gs, bs, initial_state=hs, output_final_state=True, cu_seqlens=cu,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    ro, rs = N.gated_delta_rule(
        qs, ks, vs, gs, bs, initial_state=hs, output_final_state=True, cu_seqlens=cu,
        use_qk_l2norm=True,
    )  # fmt: skip
    _compare((o, s), (ro, rs), 1e-10, "packed")
    # reverse=True: every sequence runs from its last token to its first, in its own state
    o, s = F.fused_recurrent_simple_gla(
        qs, ks, vs, gs, initial_state=hs, output_final_state=True, reverse=True, cu_seqlens=cu
    )
    for i in range(3):
        sl = slice(cu[i], cu[i + 1])
        ref_o, ref_s = N.simple_gla(
            *(_flip(x[:, sl]) for x in (qs, ks, vs, gs)),
            initial_state=hs[i : i + 1],
            output_final_state=True,
        )
        _compare(s[i : i + 1], ref_s, 1e-10, f"reverse state {i}")
        if cu[i + 1] > cu[i]:
            _compare(o[:, sl], _flip(ref_o), 1e-10, f"reverse o {i}")


def test_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    o, s = F.chunk_gated_delta_rule(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(g),
        torch.from_numpy(beta), initial_state=torch.from_numpy(h0), output_final_state=True,
        use_qk_l2norm_in_kernel=True, cu_seqlens=None,
    )  # fmt: skip
    assert isinstance(o, torch.Tensor) and o.dtype == torch.float64
    ref = N.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, **_common)
    _compare((o, s), ref, 1e-10, "torch")
    o, (_, z) = F.chunk_linear_attn(torch.from_numpy(qp), torch.from_numpy(kp), torch.from_numpy(v))
    assert isinstance(z, torch.Tensor) and z.shape == (B, 1, H, K)


def test_tuning_keywords_are_ignored_and_unknown_ones_refused() -> None:
    o = F.chunk_gated_delta_rule(q, k, v, g, beta)[0]
    o2 = F.chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=32, cu_seqlens_cpu=None, chunk_indices=None
    )[0]
    np.testing.assert_array_equal(o, o2)
    o3 = F.chunk_kda(q, k, v, gk, beta, safe_gate=True, disable_recompute=True, use_graph=True)[0]
    _compare(o3, N.kda(q, k, v, gk, beta)[0], 1e-10, "chunk_kda")
    with pytest.raises(TypeError, match="'no_such_option'"):
        F.chunk_gla(q, k, v, gk, no_such_option=1)
    with pytest.raises(ValueError, match="gv"):
        F.fused_recurrent_gla(q, k, v, gk, gv=np.zeros((B, T, H, V)))
    with pytest.raises(ValueError, match="cp_context"):
        F.chunk_gated_delta_rule(q, k, v, g, beta, cp_context=object())
    with pytest.raises(ValueError, match="output_attentions"):
        F.parallel_simple_gla(q, k, v, g, output_attentions=True)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        F.chunk_gated_delta_rule(q, k, v, g, beta, allow_neg_eigval=True)
    with pytest.raises(ValueError, match="A_log"):
        F.fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="scale"):
        F.fused_recurrent_delta_rule(q, k, v, beta, scale=-1.0)
    # fastweights' own keywords pass through
    with pytest.raises(ValueError, match="parallel"):
        F.chunk_gla(q, k, v, gk, form="parallel")


def test_docstring_examples() -> None:
    result = doctest.testmod(F, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= len(F.__all__) and result.failed == 0


# --------------------------------------------------------------------------------------------
# fla's own kernels, through Triton's CPU interpreter

_SCRIPT = """
import sys
import numpy as np
if sys.argv[1] == "fla":
    import torch
    import triton.runtime.autotuner as autotuner
    _prune = autotuner.Autotuner.prune_configs
    # the interpreter cannot time a kernel's configurations: each kernel runs its first one
    autotuner.Autotuner.prune_configs = lambda self, kwargs: _prune(self, kwargs)[:1]
    import fla.ops as ops
    from fla.ops.rwkv7 import fused_mul_recurrent_rwkv7
    arr, f32 = torch.from_numpy, lambda x: x.float()
else:
    import fastweights.fla as ops
    from fastweights.fla import fused_mul_recurrent_rwkv7
    arr, f32 = np.asarray, lambda x: x.astype(np.float32)
x = {n: arr(a) for n, a in np.load(sys.argv[2]).items()}
globals().update(x)
outs = {}
def put(name, result):
    outs[name + "_o"] = result[0]
    states = result[1] if isinstance(result[1], tuple) else (result[1],)
    for i, s in enumerate(states):
        if s is not None:
            outs[f"{name}_s{i}"] = s
put("gdn", ops.fused_recurrent_gated_delta_rule(
    q, k, v, g, beta=beta, initial_state=h0, output_final_state=True,
    use_qk_l2norm_in_kernel=True))
put("gdn_default_beta", ops.fused_recurrent_gated_delta_rule(
    q, k, v, g, scale=0.5, output_final_state=True, use_qk_l2norm_in_kernel=True))
put("gdn_gk", ops.fused_recurrent_gdn(
    qn, kn, v, gk=gk, beta=beta, output_final_state=True))
put("gdn_gate_in_kernel", ops.fused_recurrent_gated_delta_rule(
    qn, kn, v, g_raw, beta=beta_raw, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
    use_beta_sigmoid_in_kernel=True, output_final_state=True))
put("gdn_packed", ops.fused_recurrent_gated_delta_rule(
    q[:1], k[:1], v[:1], g[:1], beta=beta[:1], initial_state=h0p, output_final_state=True,
    use_qk_l2norm_in_kernel=True, cu_seqlens=cu))
put("kda", ops.fused_recurrent_kda(
    q, k, v, gk, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True))
put("kda_gate_in_kernel", ops.fused_recurrent_kda(
    qn, kn, v, gk_raw, beta, A_log, dt_bias_k, use_gate_in_kernel=True,
    output_final_state=True))
put("delta", ops.fused_recurrent_delta_rule(qn, kn, v, output_final_state=True))
put("gla", ops.fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True))
put("gla_reverse", ops.fused_recurrent_gla(q, k, v, gk, output_final_state=True, reverse=True))
put("simple_gla", ops.fused_recurrent_simple_gla(
    q, k, v, g, initial_state=h0, output_final_state=True))
put("simple_gla_gamma_reverse_packed", ops.fused_recurrent_simple_gla(
    q[:1], k[:1], v[:1], g_gamma=g_gamma, initial_state=h0p, output_final_state=True,
    reverse=True, cu_seqlens=cu))
put("dplr", ops.fused_recurrent_dplr_delta_rule(
    q, k, v, a, b, gk, initial_state=h0, output_final_state=True))
put("iplr", ops.fused_recurrent_iplr_delta_rule(q, k, v, a, b, output_final_state=True))
put("rwkv7", ops.fused_recurrent_rwkv7(q, gk, k, v, a, b, initial_state=h0))
put("rwkv7_mul_reverse", fused_mul_recurrent_rwkv7(
    q, gk, k, v, kk, u, initial_state=h0, output_final_state=True, reverse=True))
put("linear", ops.fused_recurrent_linear_attn(q, k, v, initial_state=h0, output_final_state=True))
put("linear_normalized", ops.fused_recurrent_linear_attn(
    qp, kp, v, output_final_state=True, normalize=True))
put("retention", ops.fused_recurrent_retention(q, k, v, output_final_state=True))
put("lightning", ops.fused_recurrent_lightning_attn(q, k, v, 1, 4, output_final_state=True))
# fla's parallel kernels give non-finite outputs for float64 under the interpreter
put("parallel_simple_gla", ops.parallel_simple_gla(f32(q), f32(k), f32(v), f32(g)))
put("parallel_retention", ops.parallel_retention(f32(q), f32(k), f32(v)))
np.savez(sys.argv[3], **{n: np.asarray(o) for n, o in outs.items()})
"""


@pytest.mark.slow  # ~45 s: fla's Triton kernels in the interpreter
@needs_fla
def test_fla_kernels_under_triton_interpreter(tmp_path: Any) -> None:
    """One script written against fla's API, run by fla's Triton kernels (interpreted on the
    CPU, float64 in, float32 inside) and by fastweights.fla: the same outputs and states.
    It calls every recurrent and parallel function (the chunk kernels do not run under the
    interpreter), with packed sequences, reverse, in-kernel gates and fla's defaults."""
    pytest.importorskip("triton")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    np.savez(
        tmp_path / "in.npz", q=q, k=k, qn=qn, kn=kn, v=v, g=g, gk=gk, beta=beta, h0=h0, a=a, b=b,
        kk=kk, u=u,
        g_raw=g_raw, beta_raw=beta_raw, gk_raw=gk_raw, A_log=A_log, dt_bias=dt_bias,
        dt_bias_k=dt_bias_k, g_gamma=g_gamma, qp=qp, kp=kp, cu=np.array([0, 5, T]),
        h0p=0.1 * np.random.default_rng(3).standard_normal((2, H, K, V)),
    )  # fmt: skip
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    run = subprocess.run(
        [sys.executable, str(script), "fla", str(tmp_path / "in.npz"), str(tmp_path / "fla.npz")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if run.returncode != 0:
        if "active drivers" in run.stderr or "interpret" in run.stderr.lower():
            pytest.skip(
                f"fla's kernels do not run under the Triton interpreter here: {run.stderr[-300:]}"
            )
        raise AssertionError(run.stderr[-3000:])
    argv = sys.argv
    try:  # fastweights' side in this process (on the reference backend: the fixture)
        sys.argv = ["script", "fw", str(tmp_path / "in.npz"), str(tmp_path / "fw.npz")]
        exec(compile(script.read_text(), str(script), "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv
    theirs, ours = np.load(tmp_path / "fla.npz"), np.load(tmp_path / "fw.npz")
    assert set(theirs) == set(ours)
    for name in theirs:
        _compare(ours[name], theirs[name], 2e-5, name)
