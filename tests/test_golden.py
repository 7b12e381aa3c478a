"""Every golden case, through every backend and every form it offers (and auto), in every dtype.

SPEC.md section 4: relative RMS error against the float64 oracle of at most 1e-12 in float64
(1e-10 for ``long_strong`` cases), 1e-5 for the float32 recurrent form, 5e-5 for float32
chunk/parallel, 5e-3 for float16 inputs; a NaN/Inf where the oracle is finite fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from _support import available_backends, implemented_as, namespace

import fastweights
from fastweights.testing import GoldenCase, assert_close, load_golden_cases, naive, to_numpy

CASES = load_golden_cases()
FLOAT16_CASES = (
    "linear_attn_basic",
    "simple_gla_gva",
    "gla_basic",
    "delta_rule_varlen",
    "gated_delta_rule_g1",
    "kda_basic",
    "delta_product_n2_gated",
)


def _params(names: tuple[str, ...] | None = None) -> list[object]:
    out = []
    for case in CASES:
        if names is not None and case.name not in names:
            continue
        for b in available_backends():
            offered = b.ops.get(implemented_as(case.op))
            if offered is None:
                continue
            for form in case.forms(offered):
                # dask builds a graph per case (~1 s): the quick subset keeps its auto form.
                slow = b.name == "dask" and form != "auto"
                out.append(
                    pytest.param(
                        case,
                        b.name,
                        form,
                        id=f"{case.name}-{b.name}-{form}",
                        marks=[pytest.mark.slow] if slow else [],
                    )
                )
    return out


def _run(case: GoldenCase, backend: str, form: str, dtype: str) -> tuple[object, object]:
    call = case.cast(np.dtype(dtype))
    return call.run(
        getattr(fastweights, case.op),
        namespace(backend),
        form=form,
        backend=backend,
        output_final_state=case.has_final_state,
    )


def test_manifest_lists_every_op() -> None:
    # The Recurrent DeltaNet and the SRWM have no peer implementation to take golden values
    # from; their oracles are checked independently in tests/test_naive_primer.py.
    without = {"recurrent_delta_rule", "srwm"}
    assert {c.op for c in CASES} == set(fastweights.testing.OPS) - without
    assert len({c.name for c in CASES}) == len(CASES) == 33 + 8 + 5


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_naive_oracle_reproduces_golden(case: GoldenCase) -> None:
    o, state = case.run(getattr(naive, case.op), output_final_state=True)
    case.check(o, state, dtype="float64", form="recurrent")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("case", "backend", "form"), _params())
def test_golden(case: GoldenCase, backend: str, form: str, dtype: str) -> None:
    o, state = _run(case, backend, form, dtype)
    case.check(o, state, dtype=dtype, form=form)
    assert to_numpy(o).dtype == np.dtype(dtype)
    if case.has_final_state:
        parts = state if isinstance(state, tuple) else (state,)
        assert all(to_numpy(x).dtype == np.dtype(dtype) for x in parts)
    else:
        assert state is None


@pytest.mark.parametrize(("case", "backend", "form"), _params(FLOAT16_CASES))
def test_golden_float16_inputs(case: GoldenCase, backend: str, form: str) -> None:
    # The oracle sees the same float16-rounded inputs, in float64.
    rounded = case.cast(np.float16).cast(np.float64)
    want_o, want_state = rounded.run(getattr(naive, case.op), output_final_state=True)
    o, state = _run(case, backend, form, "float16")
    assert to_numpy(o).dtype == np.float16
    assert_close(o, want_o, dtype="float16", form=form, name=f"{case.name} o")
    if case.has_final_state:
        assert to_numpy(state).dtype == np.float32
        assert_close(state, want_state, dtype="float16", form=form, name=f"{case.name} state")
