"""Calls of the public ops as data: golden cases and random inputs with awkward shapes."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, NamedTuple

import numpy as np

from .._ops import RULES
from ..rules._rule import dims_of
from ._tolerance import assert_close, to_namespace, to_numpy, tolerance

#: Positional arguments of every op, in order (from the rule descriptions); other arrays are
#: passed as keywords.
ARG_ORDER: dict[str, tuple[str, ...]] = {name: rule.positional for name, rule in RULES.items()}

OPS: tuple[str, ...] = tuple(ARG_ORDER)

#: Ops without a parallel form (SPEC section 2).
NO_PARALLEL: frozenset[str] = frozenset(
    name for name, rule in RULES.items() if "parallel" not in rule.forms
)

_INT_ARRAYS = frozenset({"cu_seqlens", "state_indices"})


@dataclass(frozen=True)
class Call:
    """One call of a public op, with its inputs held as float64 NumPy arrays.

    Attributes
    ----------
    op : str
        Name of the op (``fastweights.<op>``).
    arrays : dict
        Array arguments under their API names (``q k v g gk beta initial_state cu_seqlens``);
        ``initial_state`` is a pair ``(S, z)`` for ``linear_attn(normalize=True)``.
    kwargs : dict
        Non-array keywords (``scale``, ``normalize``, ``use_qk_l2norm``, ``num_householder``).

    Examples
    --------
    >>> import fastweights
    >>> from fastweights.testing import random_call
    >>> call = random_call("gla", batch=1, length=4)
    >>> sorted(call.arrays), call.op
    (['gk', 'initial_state', 'k', 'q', 'v'], 'gla')
    >>> o, state = call.run(fastweights.gla, output_final_state=True)
    >>> o.shape, state.shape
    ((1, 4, 2, 7), (1, 2, 12, 7))
    """

    op: str
    arrays: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def per_value_beta(self) -> bool:
        """Whether ``beta`` has a value axis (``[B, T, HV, V]``)."""
        beta = self.arrays.get("beta")
        return beta is not None and beta.ndim == 4

    @property
    def varlen(self) -> bool:
        """Whether the call packs sequences with ``cu_seqlens``."""
        return self.arrays.get("cu_seqlens") is not None

    def unavailable_form(self, form: str) -> str | None:
        """Why ``form`` cannot compute this call (API.md), or None when it can."""
        if form == "parallel" and self.op in NO_PARALLEL:
            return f"{self.op} has no parallel form"
        if form == "parallel" and self.varlen:
            return "the parallel form does not take cu_seqlens"
        if form in ("chunk", "parallel") and self.per_value_beta:
            return "per-value beta has no chunk or parallel form"
        return None

    def forms(self, offered: Sequence[str]) -> list[str]:
        """The forms in ``offered`` that can compute this call, then ``"auto"``."""
        usable = [f for f in offered if f != "auto" and self.unavailable_form(f) is None]
        return [*usable, "auto"]

    def cast(self, dtype: Any) -> Call:
        """A copy with every floating array converted to ``dtype`` (a NumPy dtype)."""

        def conv(name: str, x: Any) -> Any:
            if x is None or name in _INT_ARRAYS:
                return x
            if isinstance(x, tuple):
                return tuple(np.asarray(a, dtype=dtype) for a in x)
            return np.asarray(x, dtype=dtype)

        return replace(self, arrays={n: conv(n, x) for n, x in self.arrays.items()})

    @property
    def length(self) -> int:
        """``T``: the tokens of the call (``q``'s, or the first array's, axis 1)."""
        first = RULES[self.op].arrays[0].name
        return int(self.arrays[first].shape[1])

    def arguments(
        self, xp: Any = None, *, step: bool = False
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments for the op (its decoding step if ``step``), as
        arrays of namespace ``xp``."""
        conv = {n: to_namespace(x, xp) for n, x in self.arrays.items() if x is not None}
        order = RULES[self.op].step_positional if step else ARG_ORDER[self.op]
        args = tuple(conv.pop(n) for n in order)
        return args, {**conv, **self.kwargs}

    def run(self, fn: Callable[..., Any], xp: Any = None, **extra: Any) -> tuple[Any, Any]:
        """Call ``fn`` (an op with this call's signature) and return ``(o, final_state)``."""
        args, kwargs = self.arguments(xp)
        return fn(*args, **kwargs, **extra)

    def expected(self) -> tuple[np.ndarray, Any]:
        """``(o, final_state)`` of the naive float64 loop on these inputs."""
        from . import naive

        return self.run(getattr(naive, self.op), output_final_state=True)


@dataclass(frozen=True)
class GoldenCase(Call):
    """A vendored golden case: a :class:`Call` with its float64 expected results.

    Attributes
    ----------
    name : str
        Case name (the ``.npz`` file stem).
    o : numpy.ndarray
        Expected output.
    final_state : numpy.ndarray, tuple or None
        Expected final state (a tuple for a pair state such as MesaNet's ``(H, G)``), when
        the case records one (call with ``output_final_state=True`` then).

    Examples
    --------
    >>> import fastweights
    >>> from fastweights.testing import load_golden_cases
    >>> case = next(c for c in load_golden_cases() if c.name == "gla_basic")
    >>> o, final = case.run(fastweights.gla, output_final_state=case.has_final_state)
    >>> case.check(o, final, dtype="float64", form="recurrent")  # raises if it differs
    """

    name: str = ""
    o: np.ndarray = field(default_factory=lambda: np.zeros(0))
    final_state: Any = None

    @property
    def has_final_state(self) -> bool:
        """Whether the case records a final state."""
        return self.final_state is not None

    def tolerance(self, dtype: Any, form: str) -> float:
        """Relative RMS tolerance of this case for inputs of ``dtype`` and ``form``."""
        return tolerance(dtype, form, name=self.name)

    def check(self, o: Any, final_state: Any, *, dtype: Any, form: str) -> None:
        """Raise AssertionError unless ``o`` (and ``final_state``) match the expectation."""
        assert_close(o, self.o, dtype=dtype, form=form, name=f"{self.name} o")
        if isinstance(self.final_state, tuple):
            assert isinstance(final_state, tuple) and len(final_state) == len(self.final_state)
            for i, (x, ref) in enumerate(zip(final_state, self.final_state, strict=True)):
                assert_close(x, ref, dtype=dtype, form=form, name=f"{self.name} state[{i}]")
        elif self.final_state is not None:
            assert_close(
                final_state, self.final_state, dtype=dtype, form=form, name=f"{self.name} state"
            )


def load_golden_cases() -> list[GoldenCase]:
    """Load the vendored golden cases (float64 inputs and expected outputs).

    The first wave's cases (``golden/``) and the forward cases of the second wave's ops that
    fastweights has (``golden2/``: ``dplr``, ``iplr``, ``rwkv7``, ``mesa_net``).

    Returns
    -------
    list of GoldenCase
        In the order of the manifests.

    Examples
    --------
    >>> from fastweights.testing import load_golden_cases
    >>> cases = load_golden_cases()
    >>> case = next(c for c in cases if c.name == "delta_rule_basic")
    >>> case.op, case.o.shape
    ('delta_rule', (2, 67, 2, 24))
    >>> sorted({c.op for c in cases if c.name.startswith(("dplr", "iplr", "rwkv7"))})
    ['dplr', 'iplr', 'rwkv7']
    """
    cases = []
    for folder in ("golden", "golden2"):
        root = resources.files("fastweights.testing").joinpath(folder)
        manifest = json.loads(root.joinpath("manifest.json").read_text())
        for entry in manifest:
            if entry.get("kind", "forward") != "forward" or entry.get("op", "") not in (
                *RULES,
                "",
            ):
                continue
            with root.joinpath(f"{entry['name']}.npz").open("rb") as fh, np.load(fh) as data:
                meta = json.loads(str(data["meta"]))
                arrays: dict[str, Any] = {n: np.array(data[n]) for n in meta["inputs"]}
                outputs = meta.get("outputs", ())
                final: Any = None
                if "initial_state_kk" in arrays:  # MesaNet's pair (H, G), fla's (h_kk, h_kv)
                    pair = (arrays.pop("initial_state_kk"), arrays.pop("initial_state_kv"))
                    arrays["initial_state"] = pair
                if "final_state_kk" in outputs:
                    final = (np.array(data["final_state_kk"]), np.array(data["final_state_kv"]))
                elif meta.get("has_final_state", "final_state" in outputs):
                    final = np.array(data["final_state"])
                cases.append(
                    GoldenCase(
                        op=meta["op"],
                        arrays=arrays,
                        kwargs=dict(meta["kwargs"]),
                        name=entry["name"],
                        o=np.array(data["o"]),
                        final_state=final,
                    )
                )
    return cases


def random_call(
    op: str,
    *,
    seed: int = 0,
    batch: int = 2,
    length: int = 37,
    heads: int = 2,
    groups: int = 1,
    key_dim: int = 12,
    value_dim: int = 7,
    num_householder: int = 2,
    seqlens: Sequence[int] | None = None,
    initial_state: bool = True,
    gates: str = "normal",
    beta_per_value: bool = False,
    normalize: bool = False,
    use_qk_l2norm: bool = False,
    scale: float | None = None,
) -> Call:
    """Random, well-conditioned inputs for ``op``.

    Keys are unit vectors and ``beta`` lies in ``(0, 1)`` (unless ``use_qk_l2norm``, then keys
    are raw Gaussians), so every delta-rule state stays bounded and float64 forms agree to
    about 1e-13.

    Parameters
    ----------
    op : str
        Op name.
    seed : int
        Seed of :func:`numpy.random.default_rng`.
    batch, length, heads, groups, key_dim, value_dim : int
        ``B, T, H, G (HV = G * H), K, V``; ``groups`` is 1 for a rule that needs ``HV == H``.
    num_householder : int
        ``n`` of ``delta_product``.
    seqlens : sequence of int, optional
        Pack sequences of these lengths (``B = 1``, ``T = sum``, ``cu_seqlens`` set).
    initial_state : bool
        Give a random initial state.
    gates : {"normal", "zero", "strong", "reset", "none"}
        Log-decays in ``[-1, 0]`` with some exact zeros; all zero; in ``[-8, -3]`` (a
        cumulative decay far below -88 within a chunk of 64); normal with ``-inf`` sprinkled;
        ``"none"`` leaves out the optional ``g`` of ``delta_product``.
    beta_per_value : bool
        ``beta`` of shape ``[B, T, HV, V]``.
    normalize, use_qk_l2norm, scale
        Keywords of the op (``normalize`` only for ``linear_attn``).

    Examples
    --------
    Three packed sequences (one of them empty) with two value heads per key head:

    >>> from fastweights.testing import random_call
    >>> call = random_call("gated_delta_rule", seqlens=[5, 0, 3], groups=2)
    >>> call.arrays["cu_seqlens"].tolist(), call.arrays["q"].shape, call.arrays["v"].shape
    ([0, 5, 5, 8], (1, 8, 2, 12), (1, 8, 4, 7))
    """
    rng = np.random.default_rng(seed)
    if seqlens is not None:
        batch, length = 1, int(sum(seqlens))
    if RULES[op].same_heads:
        groups = 1
    hv = heads * groups
    n = num_householder if "num_householder" in RULES[op].option_names else 1
    rows = length * n

    def keys(t: int) -> np.ndarray:
        x = rng.standard_normal((batch, t, heads, key_dim))
        if normalize:
            return rng.uniform(0.05, 1.0, (batch, t, heads, key_dim))
        return x if use_qk_l2norm else x / np.linalg.norm(x, axis=-1, keepdims=True)

    def gate(shape: tuple[int, ...]) -> np.ndarray:
        if gates == "zero":
            return np.zeros(shape)
        if gates == "strong":
            return rng.uniform(-8.0, -3.0, shape)
        g = -(rng.uniform(0.0, 1.0, shape) ** 2)
        g[rng.uniform(size=shape) < 0.15] = 0.0
        if gates == "reset":
            g[rng.uniform(size=shape) < 0.05] = -np.inf
        return g

    rule = RULES[op]
    arrays: dict[str, Any] = {}
    if rule.qkv:
        arrays["q"] = (
            rng.uniform(0.05, 1.0, (batch, length, heads, key_dim))
            if normalize
            else rng.standard_normal((batch, length, heads, key_dim))
        )
        arrays["k"] = keys(rows)
        arrays["v"] = rng.standard_normal((batch, rows, hv, value_dim))
    sizes = {"B": batch, "T": length, "R": rows, "H": heads, "HV": hv, "K": key_dim}
    sizes.update(V=value_dim, W=value_dim + 2 * key_dim + 4)
    # Gates first, then the rest in the description's order (the draws of the first wave's
    # cases stay as they were).
    removal = None
    for arg in sorted(rule.args, key=lambda a: not a.log_decay):
        template = arg.alternatives[-1] if beta_per_value and arg.alternatives else arg.shape
        shape = tuple(sizes[d] for d in dims_of(template))
        if arg.log_decay:
            if not (gates == "none" and arg.optional):
                arrays[arg.name] = gate(shape)
        elif arg.sample == "rate":
            arrays[arg.name] = rng.uniform(0.05, 1.0, shape)
        elif arg.sample == "removal":
            # -beta c with a unit c: reads the state and removes along c.
            removal = rng.standard_normal(shape)
            removal /= np.linalg.norm(removal, axis=-1, keepdims=True)
            arrays[arg.name] = -rng.uniform(0.05, 1.0, (*shape[:-1], 1)) * removal
        elif arg.sample == "positive":
            arrays[arg.name] = rng.uniform(0.25, 1.25, shape)
        elif arg.sample == "small":
            arrays[arg.name] = rng.standard_normal(shape) / np.sqrt(max(shape[-1], 1))
        elif arg.sample == "unit":
            x = rng.standard_normal(shape)
            if removal is not None:
                # Writes close to what the removal read (c . d about 0.9): a DPLR transition
                # that keeps the state bounded (RULES2.md), as in the golden cases.
                x = removal + 0.3 * x / np.sqrt(shape[-1])
            arrays[arg.name] = x / np.linalg.norm(x, axis=-1, keepdims=True)
        else:
            arrays[arg.name] = rng.standard_normal(shape)
    n_states = batch
    if seqlens is not None:
        arrays["cu_seqlens"] = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)
        n_states = len(seqlens)
    layout = rule.state_layout(normalize=normalize)
    if initial_state and len(layout) > 1 and not normalize:
        sizes["N"] = n_states
        arrays["initial_state"] = tuple(
            _draw_state(rng, tuple(sizes[d] for d in dims_of(part.shape)), part.sample)
            for part in layout
        )
    elif initial_state and layout[0].shape != "[N, HV, K, V]":
        sizes["N"] = n_states
        shape = tuple(sizes[d] for d in dims_of(layout[0].shape))
        arrays["initial_state"] = _draw_state(rng, shape, layout[0].sample)
    elif initial_state:
        s0 = 0.3 * rng.standard_normal((n_states, hv, key_dim, value_dim))
        if normalize:
            arrays["initial_state"] = (s0, rng.uniform(0.0, 2.0, (n_states, hv, key_dim)))
        else:
            arrays["initial_state"] = s0
    kwargs: dict[str, Any] = {}
    if "num_householder" in RULES[op].option_names:
        kwargs["num_householder"] = n
    if normalize:
        kwargs["normalize"] = True
    if use_qk_l2norm:
        kwargs["use_qk_l2norm"] = True
    if scale is not None:
        kwargs["scale"] = scale
    return Call(op, arrays, kwargs)


def _draw_state(rng: np.random.Generator, shape: tuple[int, ...], sample: str) -> np.ndarray:
    """A random state part: ``0.3`` times a normal, or for ``"gram"`` a symmetric positive
    semi-definite ``A A^T / K`` over the last two axes (MesaNet's ``H``)."""
    x = rng.standard_normal(shape)
    if sample == "gram":
        return np.matmul(x, np.swapaxes(x, -1, -2)) / max(shape[-1], 1)
    return 0.3 * x


def token_arrays(call: Call, t: int) -> dict[str, Any]:
    """The step arguments of token ``t`` (the token's ``n`` rows of the arrays a rule has
    several rows per token of: ``k, v, beta`` of delta_product)."""
    rule = RULES[call.op]
    n = call.kwargs.get("num_householder", 1)
    several = "num_householder" in rule.option_names
    per_row = {a.name for a in rule.arrays if "R" in dims_of(a.shape)} if several else set()
    per_token = {a.name for a in rule.arrays if {"T", "R"} & set(dims_of(a.shape))}
    stepless = {a.name for a in rule.arrays if not a.step}
    out = {}
    for name, x in call.arrays.items():
        if name in ("initial_state", "cu_seqlens") or name in stepless:
            continue
        if name in per_row:
            out[name] = x[:, t * n : (t + 1) * n]
        else:
            out[name] = x[:, t] if name in per_token else x
    return out


class Decoded(NamedTuple):
    """Result of :func:`run_steps`."""

    o: np.ndarray
    """Outputs of every step stacked along ``T`` (``[B, T, HV, V]``, NumPy)."""
    state: Any
    """The state (pool) the last step returned, in the namespace of the call."""
    in_place: bool
    """Whether every step returned the very pool object it was given."""


def run_steps(
    call: Call,
    state: Any,
    *,
    state_indices: Any = None,
    backend: str | None = None,
    xp: Any = None,
) -> Decoded:
    """Decode ``call`` one token at a time with :mod:`fastweights.step`.

    Parameters
    ----------
    call : Call
        An unpacked call (no ``cu_seqlens``); its ``initial_state`` is ignored.
    state : array or tuple
        The state pool to start from (``(S, z)`` pools for normalised linear attention),
        already in namespace ``xp``.
    state_indices : array_like, optional
        Pool row of each batch row.
    backend : str, optional
        Backend name.
    xp : module, optional
        Namespace to convert the inputs to (default NumPy).

    Returns
    -------
    Decoded

    Examples
    --------
    >>> import numpy as np
    >>> from fastweights.testing import random_call, run_steps
    >>> call = random_call("delta_rule", batch=2, length=3)
    >>> pool = call.arrays["initial_state"].copy()
    >>> run_steps(call, pool).o.shape
    (2, 3, 2, 7)
    """
    import fastweights.step

    keywords = {k: v for k, v in call.kwargs.items() if k != "num_householder"}
    if state_indices is not None:
        keywords["state_indices"] = state_indices
    fn = getattr(fastweights.step, call.op)
    outs = []
    in_place = True
    for t in range(call.length):
        args, kwargs = Call(call.op, token_arrays(call, t), keywords).arguments(xp, step=True)
        o, new = fn(*args, state, **kwargs, backend=backend)
        first_new = new[0] if isinstance(new, tuple) else new
        first_old = state[0] if isinstance(state, tuple) else state
        in_place = in_place and first_new is first_old
        state = new
        outs.append(to_numpy(o))
    return Decoded(np.stack(outs, axis=1), state, in_place)
