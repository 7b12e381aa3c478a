"""RWKV-7 (``fastweights.rwkv7``): an instance of ``dplr``, rewritten before dispatch."""

from __future__ import annotations

import numpy as np
import pytest

import fastweights
from fastweights.testing import random_call


def test_rwkv7_is_dplr_with_its_mapping() -> None:
    call = random_call("rwkv7", batch=1, length=9)
    a = call.arrays
    o, S = fastweights.rwkv7(
        a["q"], a["k"], a["v"], a["w"], a["kk"], a["a"], initial_state=a["initial_state"],
        output_final_state=True, backend="reference",
    )  # fmt: skip
    o2, S2 = fastweights.dplr(
        a["q"], a["k"], a["v"], -a["kk"], a["kk"] * a["a"], a["w"],
        initial_state=a["initial_state"], output_final_state=True, backend="reference",
    )  # fmt: skip
    np.testing.assert_array_equal(o, o2)
    np.testing.assert_array_equal(S, S2)


def test_validation_names_rwkv7_arguments() -> None:
    call = random_call("rwkv7", batch=1, length=4)
    a = call.arrays
    args = [a[n] for n in ("q", "k", "v", "w", "kk", "a")]
    with pytest.raises(ValueError, match=r"^w is a log-decay"):
        fastweights.rwkv7(*args[:3], -args[3], *args[4:])
    with pytest.raises(ValueError, match=r"^kk must have shape \[B, T, HV, K\]"):
        fastweights.rwkv7(*args[:4], args[4][:, :2], args[5])
    with pytest.raises(TypeError, match="rwkv7 needs a, got None"):
        fastweights.rwkv7(*args[:5], None)
    with pytest.raises(ValueError, match="form='parallel' is not available for this rwkv7"):
        fastweights.rwkv7(*args, form="parallel")


def test_rwkv7_plans_as_dplr() -> None:
    call = random_call("rwkv7", batch=1, length=4)
    args, kwargs = call.arguments()
    assert fastweights.plan(fastweights.rwkv7, *args, **kwargs).op == "dplr"
    pool = np.zeros((3, 2, 12, 7))
    token = (x[:, 0] for x in args)
    step = fastweights.plan(fastweights.step.rwkv7, *token, pool, state_indices=[2])
    assert (step.op, step.form) == ("dplr", "recurrent")


def test_rwkv7_decoding_equals_the_sequence_call() -> None:
    call = random_call("rwkv7", batch=2, length=6)
    o, S = call.run(fastweights.rwkv7, output_final_state=True, backend="reference")
    pool = call.arrays["initial_state"].copy()
    for t in range(6):
        token = [call.arrays[n][:, t] for n in ("q", "k", "v", "w", "kk", "a")]
        o_t, pool = fastweights.step.rwkv7(*token, pool, backend="reference")
        np.testing.assert_allclose(o_t, o[:, t], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pool, S, rtol=1e-12, atol=1e-12)
