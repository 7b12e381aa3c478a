"""The task graph of a Dask call: its blocks, how time blocks combine, and the lazy results.

Blocks follow the chunks of the caller's arrays: ``B`` and ``T`` as ``q`` is chunked, ``HV``
as ``v`` is chunked rounded up to whole groups of ``G = HV / H`` value heads (a key head and
its value heads stay in one block); ``K`` and ``V`` are whole in every block. Packed sequences
(``cu_seqlens``) keep ``T`` in one block.

Time blocks combine in one of two ways, both exact:

- **scan** (rules with a :attr:`~fastweights.backends.Rule.transition`, without a per-value
  ``beta`` or a normaliser): every time block but the first runs at once from a zero state and
  returns a summary ``(P, S0)`` with the coefficients ``c_t`` of its outputs; a parallel prefix
  scan (Hillis-Steele, ``log2`` of the block count deep) of the summaries gives the state that
  enters each block; each block's outputs are then corrected by ``state^T c_t``, a matrix
  product. The summaries come from one run of the block with ``K`` more value columns (``V +
  K`` instead of ``V``, see :mod:`._blocks`); a ``"diagonal"`` transition keeps only ``P``'s
  diagonal, so its scan composes and sends vectors instead of ``[K, K]`` matrices.
- **state passing** (every other call): block ``t`` starts from block ``t - 1``'s final state,
  so time blocks run one after another while batch and head blocks run in parallel.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any

import array_api_compat

from fastweights.backends import Call, dims_of

from . import _blocks


def block_type(call: Call) -> str | None:
    """``"numpy"`` or ``"cupy"``: the type of the call's blocks (None for any other)."""
    meta = getattr(call.out, "_meta", None)
    if array_api_compat.is_numpy_array(meta):
        return "numpy"
    if array_api_compat.is_cupy_array(meta):
        return "cupy"
    return None


def _positive(chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(c for c in chunks if c > 0) or (0,)


def _whole_groups(chunks: tuple[int, ...], group: int) -> tuple[int, ...]:
    """Chunks along ``HV`` with every boundary moved up to a multiple of ``group``."""
    edges = sorted({-(-e // group) * group for e in itertools.accumulate(chunks) if e > 0})
    return _positive(tuple(b - a for a, b in zip([0, *edges], edges, strict=False)))


@dataclass(frozen=True)
class Blocks:
    """How a Dask call is cut into blocks and how its time blocks combine."""

    call: Call
    chunks: dict[str, tuple[int, ...]]
    """Chunks along each dimension name of the rule's shape templates."""
    time: str
    """``"one block"``, ``"scan"`` or ``"state passing"``."""
    why: str

    @classmethod
    def of(cls, call: Call) -> Blocks:
        G = call.HV // call.H
        n = call.num_householder
        packed = call.cu_seqlens is not None
        lead = call.q if call.q is not None else call.inputs[call.spec.arrays[0].name]
        heads = call.v if call.v is not None else lead  # a rule without v has HV == H
        b = _positive(tuple(lead.chunks[0]))
        t = (call.T,) if packed else _positive(tuple(lead.chunks[1]))
        hv = _whole_groups(tuple(heads.chunks[2]), G)
        chunks = {
            "B": b,
            "N": (call.N,) if packed else b,
            "T": t,
            "R": tuple(c * n for c in t),
            "H": tuple(c // G for c in hv),
            "HV": hv,
            "K": (call.K,),
            "V": (call.V,),
            "W": (call.V + 2 * call.K + 4,),  # srwm's weight columns
        }
        spec = call.spec
        if len(t) == 1:
            time = "one block"
            why = "packed sequences keep T in one block" if packed else "T is one block"
        elif spec.transition is None:
            time, why = "state passing", f"{spec.name}'s state is not an affine map of the last"
        elif call.beta_per_value:
            time, why = "state passing", "a per-value beta gives each value column its own map"
        elif call.normalize:
            time, why = "state passing", "the normaliser divides each output by a state read"
        else:
            time = "scan"
            why = (
                f"each time block's {spec.transition} transition from a run with V + K value "
                "columns, then a prefix scan"
            )
        return cls(call, chunks, time, why)

    @property
    def numblocks(self) -> dict[str, int]:
        return {d: len(self.chunks[d]) for d in ("B", "T", "HV")}

    def plan(self) -> dict[str, Any]:
        form = self.call.form
        return {
            "form": form,
            "why": f"{self.time}: {self.why}; each block's backend runs form={form!r}",
            "blocks": self.numblocks,
            "time_blocks": self.time,
        }

    def grid(self, x: Any, template: str) -> Any:
        """``x`` rechunked to the blocks, as an object array of delayed blocks."""
        dims = dims_of(template)
        return x.rechunk(tuple(self.chunks[d] for d in dims)).to_delayed()

    def template(self, name: str, x: Any) -> str:
        args = {a.name: a for a in self.call.spec.arrays}
        return next(t for t in args[name].shapes if len(dims_of(t)) == x.ndim)


def _at(grid: Any, template: str, b: int, t: int, h: int) -> Any:
    where = {"B": b, "N": b, "T": t, "R": t, "H": h, "HV": h, "K": 0, "V": 0, "W": 0}
    return grid[tuple(where[d] for d in dims_of(template))]


def run(call: Call) -> tuple[Any, Any]:
    """``(o, final_state)`` of a Dask call, as lazy Dask arrays."""
    import dask.array as da

    blocks = Blocks.of(call)
    spec = call.spec
    qkv = {"q": call.q, "k": call.k, "v": call.v} if spec.qkv else {}
    named = {**qkv, **call.inputs}
    templates = {n: blocks.template(n, x) for n, x in named.items() if x is not None}
    grids = {n: blocks.grid(x, templates[n]) for n, x in named.items() if x is not None}
    layout = spec.state_layout(normalize=call.normalize)
    state_grids = None
    if call.initial_state is not None:
        parts = call.initial_state if len(layout) > 1 else (call.initial_state,)
        state_grids = [blocks.grid(x, a.shape) for x, a in zip(parts, layout, strict=True)]
    common = {
        "scale": call.scale,
        "use_qk_l2norm": call.use_qk_l2norm,
        "form": call.form,
        "chunk_size": call.chunk_size,
        "cu_seqlens": call.cu_seqlens,
    }
    options: dict[str, Any] = {
        **{name: value for name, value in common.items() if name in spec.common},
        **{name: getattr(call, name) for name in spec.option_names},
    }
    ch = blocks.chunks
    o_blocks: dict[tuple[int, int, int], Any] = {}
    finals: dict[tuple[int, int], Any] = {}
    for b, h in itertools.product(range(len(ch["B"])), range(len(ch["HV"]))):
        tokens = [
            {n: _at(grids[n], templates[n], b, t, h) if n in grids else None for n in named}
            for t in range(len(ch["T"]))
        ]
        state = None
        if state_grids is not None:
            pieces = [_at(g, a.shape, b, 0, h) for g, a in zip(state_grids, layout, strict=True)]
            state = tuple(pieces) if len(layout) > 1 else pieces[0]
        along_t = _scan if blocks.time == "scan" else _pass_state
        outputs, finals[b, h] = along_t(call, options, tokens, state)
        o_blocks.update({(b, t, h): o for t, o in enumerate(outputs)})

    meta, out_dtype = call.out._meta, call.out.dtype
    o = da.block(
        [
            [
                [
                    [da.from_delayed(o_blocks[b, t, h], (nb, nt, nh, call.V), out_dtype, meta)]
                    for h, nh in enumerate(ch["HV"])
                ]
                for t, nt in enumerate(ch["T"])
            ]
            for b, nb in enumerate(ch["B"])
        ]
    )
    if not call.output_final_state:
        return o, None
    final = tuple(
        _assemble_state(finals, blocks, i, a.shape, call.dtype, meta) for i, a in enumerate(layout)
    )
    return o, (final if len(layout) > 1 else final[0])


def _pass_state(
    call: Call, options: dict[str, Any], tokens: list[dict[str, Any]], state: Any
) -> tuple[list[Any], Any]:
    """Time blocks one after another, each from the last one's final state."""
    import dask

    sequence = dask.delayed(_blocks.sequence, nout=2, pure=True)
    outputs = []
    for arrays in tokens:
        o, state = sequence(call.spec.name, options, arrays, state)
        outputs.append(o)
    return outputs, state


def _scan(
    call: Call, options: dict[str, Any], tokens: list[dict[str, Any]], state: Any
) -> tuple[list[Any], Any]:
    """The first time block from ``state``, the others at once from zero; then the prefix
    scan of their summaries gives the state entering each, which corrects its outputs."""
    import dask

    diagonal = call.spec.transition == "diagonal"
    sequence = dask.delayed(_blocks.sequence, nout=2, pure=True)
    summarize = dask.delayed(_blocks.summary, nout=4, pure=True)
    advance = dask.delayed(_blocks.advance, pure=True)
    correct = dask.delayed(_blocks.correct, pure=True)
    o, first = sequence(call.spec.name, options, tokens[0], state)
    parts = [summarize(call.spec.name, options, a, call.dtype, diagonal) for a in tokens[1:]]
    prefix = _prefix_scan([(p[3], p[2]) for p in parts], diagonal)
    outputs, entering = [o], first
    for part, summary in zip(parts, prefix, strict=True):
        outputs.append(correct(part[0], part[1], entering, call.out.dtype))
        entering = advance(summary, first, diagonal)
    return outputs, entering


def _assemble_state(
    finals: dict[tuple[int, int], Any],
    blocks: Blocks,
    part: int,
    template: str,
    dtype: Any,
    meta: Any,
) -> Any:
    """Part ``part`` of the final state (one array of the state's layout) as a Dask array."""
    import dask
    import dask.array as da

    ch = blocks.chunks
    dims = dims_of(template)
    pair = len(blocks.call.spec.state_layout(normalize=blocks.call.normalize)) > 1

    def piece(b: int, h: int) -> Any:
        value = finals[b, h]
        if pair:
            value = dask.delayed(operator.getitem, pure=True)(value, part)
        sizes = {"N": ch["N"][b], "HV": ch["HV"][h], "H": ch["H"][h], "K": ch["K"][0]}
        sizes.update(V=ch["V"][0], W=ch["W"][0])
        return da.from_delayed(value, tuple(sizes[d] for d in dims), dtype=dtype, meta=meta)

    nested = [[piece(b, h) for h in range(len(ch["HV"]))] for b in range(len(ch["N"]))]
    for _ in dims[2:]:
        nested = [[[x] for x in row] for row in nested]
    return da.block(nested)


def _prefix_scan(summaries: list[tuple[Any, Any]], diagonal: bool) -> list[Any]:
    """Inclusive prefix of the summaries (``P, S0`` pairs, delayed), each the composition of
    itself and every one before it, in ``ceil(log2(n))`` rounds of independent tasks."""
    import dask

    compose = dask.delayed(_blocks.compose, nout=2, pure=True)
    current: list[Any] = list(summaries)
    step = 1
    while step < len(current):
        current = [
            s if i < step else compose(s, current[i - step], diagonal)
            for i, s in enumerate(current)
        ]
        step *= 2
    return current
