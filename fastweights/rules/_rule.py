"""The description of a rule: what validation, the public functions, the registry, the test
kit and the benchmarks read to know an op.

A :class:`Rule` is data. Its arguments carry shape templates over the sizes of a call::

    B, T   batch and tokens         H, HV  query/key heads and value heads (HV = G * H)
    R      the rule's rows along T   K, V   key and value sizes
           (T * num_householder for DeltaProduct, else T)

A rule that is an instance of another (``retention`` of ``simple_gla``, ``iplr`` and ``rwkv7``
of ``dplr``) names its ``parent`` and maps its arguments onto the parent's with ``to_parent``;
validation rewrites the call before any backend sees it, so a backend that runs the parent runs
the instance with no registration of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

FORMS = ("recurrent", "chunk", "parallel")
"""Every form a rule can have; ``"auto"`` lets the backend choose among them."""


@dataclass(frozen=True)
class Arg:
    """One array argument of a rule, after ``q, k, v``.

    ``shape`` is a template such as ``"[B, T, HV, K]"``; ``shapes`` lists alternatives (beta
    per head or per value). A ``log_decay`` argument is a gate: its values must be ``<= 0``.

    Examples
    --------
    >>> from fastweights.backends import RULES
    >>> beta = RULES["gated_delta_rule"].args[1]
    >>> beta.name, beta.shapes, beta.log_decay
    ('beta', ('[B, R, HV]', '[B, R, HV, V]'), False)
    """

    name: str
    shape: str
    doc: str
    log_decay: bool = False
    optional: bool = False
    """None is accepted (the rule then leaves that part out)."""
    alternatives: tuple[str, ...] = ()
    keyword_only: bool = False
    """Passed by keyword in the public functions (after ``*``)."""
    sample: str = "normal"
    """How benchmarks and tests draw it: ``"normal"``, ``"unit"`` (unit vectors along the last
    axis), ``"rate"`` (uniform in (0, 1)), ``"removal"`` (``-rate * unit``: a vector that reads
    and removes), ``"positive"`` (uniform in [0.25, 1.25]), ``"small"`` (normal over the square
    root of the last size: a matrix that maps a bounded vector to a bounded vector) or
    ``"gram"`` (``A A^T / K`` over the last two axes: symmetric positive semi-definite);
    log-decays are drawn as log-decays."""
    positive: bool = False
    """Its values must be ``> 0`` (``mesa_net``'s ``lamb``), checked like a gate's sign."""
    step: bool = True
    """Taken by the decoding step too (``srwm``'s ``W0`` is not: the pool holds the weight)."""

    @property
    def shapes(self) -> tuple[str, ...]:
        return (self.shape, *self.alternatives)


REQUIRED = object()
"""The default of an option that has none (a required keyword argument)."""


@dataclass(frozen=True)
class Option:
    """A keyword option of a rule beyond the common ones (``normalize``, ``num_householder``).

    ``step`` says whether the decoding step takes it too (DeltaProduct's step reads ``n``
    from ``k.shape[1]``).
    """

    name: str
    default: Any
    doc: str
    annotation: str = "bool"
    step: bool = True
    step_doc: str = ""
    state: tuple[Arg, ...] = ()
    """The state when the option is on, if it differs (``normalize``: the pair ``(S, z)``)."""
    choices: tuple[Any, ...] = ()
    """The values it may take (``mesa_net``'s ``solver``); empty: any of its type."""
    minimum: int | None = None
    """For an integer option: its least value."""


STATE = (Arg("S", "[N, HV, K, V]", "the fast weights, key-first."),)
"""The state of most rules: one matrix per sequence and value head (``N`` sequences, or ``P``
rows of a decoding pool)."""

COMMON = (
    "scale",
    "initial_state",
    "output_final_state",
    "cu_seqlens",
    "use_qk_l2norm",
    "form",
    "chunk_size",
    "state_pool",
    "state_indices",
    "output_state_snapshots",
)
"""The keyword arguments every rule of the first wave takes (API.md); a rule may take fewer
(``Rule.common``). ``state_pool``, ``state_indices`` and ``output_state_snapshots`` (serving:
a multi-token call into a decoding pool, the state after each token) work for every rule
(:mod:`fastweights._serving`)."""

SERVING = ("state_pool", "state_indices", "output_state_snapshots")
"""The serving keywords of :data:`COMMON`, for a rule that lists its own ``common``."""

QKV = (
    Arg("q", "[B, T, H, K]", "queries."),
    Arg("k", "[B, T, H, K]", "keys.", sample="unit"),
    Arg("v", "[B, T, HV, V]", "values."),
)
"""The queries, keys and values of a rule with one row per token."""


@dataclass(frozen=True)
class Rule:
    """One update rule: its arguments, state, forms and (for an instance) its parent.

    Attributes
    ----------
    name : str
        The op's name, ``fastweights.<name>`` and ``fastweights.step.<name>``.
    family : str
        The package under :mod:`fastweights.rules` that computes it.
    update : str
        The update, one line in the key-first layout.
    args : tuple of Arg
        Array arguments after ``q, k, v``, in call order.
    forms : tuple of str
        The forms the rule has for some call.
    no_form : mapping
        Form -> why the rule never has it.
    options : tuple of Option
        Keyword options beyond the common ones (``normalize``, ``num_householder``).
    state : tuple of Arg
        The state's arrays with their shape templates: one matrix, or a tuple for a state
        made of several arrays (an option may change it: ``linear_attn(normalize=True)``
        keeps the pair ``(S, z)``).
    transition : str or None
        ``"diagonal"``, ``"matrix"`` or None: how a stretch of tokens maps the state before
        it to the state after it (the Dask backend's scan over time blocks).
    parent, to_parent
        For an instance: the parent op, and ``to_parent(xp, arrays) -> arrays`` mapping the
        instance's arguments (by name, ``q, k, v`` included) onto the parent's.
    grads_from_parent
        For an instance: ``grads_from_parent(xp, arrays, grads) -> grads``, the adjoint of
        ``to_parent`` for :func:`fastweights.vjp`: the instance's raw arguments and the
        parent's gradients by name give the instance's. None: the parent's gradients of the
        instance's own arguments are its gradients (``retention``'s fixed decay and ``iplr``'s
        absent one are dropped).
    params : mapping
        The family's parameters of this rule (e.g. the delta family's ``erase`` and ``gate``).
    qkv : tuple of Arg
        ``q, k, v`` (DeltaProduct's ``k, v`` have ``R`` rows); empty for a rule that has
        none (``srwm``: its own ``sizes`` reads the sizes from its arrays).
    title, doc, example
        The public function's docstring: its first line, the paragraphs after it, and its
        runnable example (the Parameters section is generated from ``args``).
    step_title, step_doc, step_example
        The same for the decoding step (``step_title`` defaults to one built from ``update``).

    Examples
    --------
    >>> from fastweights.backends import RULES
    >>> [(a.name, a.shape) for a in RULES["kda"].args]
    [('gk', '[B, T, HV, K]'), ('beta', '[B, R, HV]')]
    >>> RULES["iplr"].parent
    'dplr'
    """

    name: str
    family: str
    update: str
    args: tuple[Arg, ...]
    forms: tuple[str, ...]
    no_form: Mapping[str, str] = field(default_factory=dict)
    options: tuple[Option, ...] = ()
    state: tuple[Arg, ...] = STATE
    parent: str | None = None
    to_parent: Callable[[ModuleType, dict[str, Any]], dict[str, Any]] | None = None
    grads_from_parent: (
        Callable[[ModuleType, dict[str, Any], dict[str, Any]], dict[str, Any]] | None
    ) = None
    params: Mapping[str, Any] = field(default_factory=dict)
    qkv: tuple[Arg, ...] = QKV
    transition: str | None = None
    """How the state after a stretch of tokens depends on the state before it, for a scan
    over time blocks (the Dask backend): ``"diagonal"`` (``S -> Diag(d) S + S0``, a decay per
    key channel), ``"matrix"`` (``S -> P S + S0`` with a ``[K, K]`` ``P`` that no value
    enters, so every value column evolves alike), or None (neither, or outputs that do not
    read the state linearly: blocks pass the state on). Both kinds need ``o_t = S_t^T q~_t``.
    A call whose options break it (a per-value ``beta``, a normaliser) passes the state."""
    common: tuple[str, ...] = COMMON
    """The common keyword arguments it takes (a rule whose inputs depend on its own past has
    no ``chunk_size``; ``srwm`` has no ``scale``): others are not in its signature."""
    default_scale: float | None = None
    """``scale`` when None is given: ``K ** -0.5`` if this is None."""
    out: str = "v"
    """The array whose dtype ``o`` takes."""
    sizes: Callable[[dict[str, tuple[int, ...]]], dict[str, int]] | None = None
    """For a rule without ``q, k, v``: the sizes ``B T H HV K V`` (and any of its own, such
    as ``srwm``'s ``W``) from its arrays' shapes by name; raises ``ValueError`` naming the
    argument whose shape is wrong. None: read from ``q, k, v``."""
    same_heads: bool = False
    """``HV == H`` is required (no grouped value heads)."""
    min_sizes: Mapping[str, int] = field(default_factory=dict)
    """Least sizes the rule is defined for (a softmax over ``K`` needs ``K >= 1``)."""
    flops: int | Callable[[int, int], int] = 6
    """FLOPs per state element and step of the recurrent pass, the least work any form does
    (the benchmarks' effective rate): ``6 K V`` for the delta family, ``8 K V`` for DPLR; or,
    for a rule whose work is not proportional to ``K V``, a function of ``(K, V)`` giving the
    FLOPs per step and head (MesaNet's solve)."""
    title: str = ""
    doc: str = ""
    example: str = ""
    step_title: str = ""
    step_doc: str = ""
    step_example: str = ""

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def state_layout(self, **options: Any) -> tuple[Arg, ...]:
        """The state's arrays for a call with these option values."""
        for o in self.options:
            if o.state and options.get(o.name):
                return o.state
        return self.state

    @property
    def arrays(self) -> tuple[Arg, ...]:
        """Every array argument, ``q, k, v`` first."""
        return (*self.qkv, *self.args)

    @property
    def positional(self) -> tuple[str, ...]:
        """The public sequence function's positional parameters, in order."""
        return tuple(a.name for a in self.arrays if not a.keyword_only)

    @property
    def step_positional(self) -> tuple[str, ...]:
        """The decoding step's positional parameters before ``state``, in order."""
        return tuple(a.name for a in self.arrays if not a.keyword_only and a.step)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def log_decays(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.log_decay)

    def flops_per_step(self, K: int, V: int) -> int:
        """FLOPs per step (row) and head of the recurrent pass (:attr:`flops`)."""
        return self.flops(K, V) if callable(self.flops) else self.flops * K * V

    @property
    def positives(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.positive)

    # The delta family's parameters (SPEC.md's general rule), read by its forms and kernels.
    @property
    def erase(self) -> bool:
        return bool(self.params.get("erase", False))

    @property
    def gate(self) -> str | None:
        return self.params.get("gate")

    @property
    def gate_optional(self) -> bool:
        return any(a.optional for a in self.args if a.log_decay)

    @property
    def has_beta(self) -> bool:
        return "beta" in self.arg_names


@functools.cache
def step_shape(template: str, rows: bool) -> str:
    """The one-token layout of a sequence template: ``B -> N``, ``T`` dropped, ``R -> n``
    where a token has several rows (DeltaProduct) and dropped otherwise."""
    dims = [d.strip() for d in template.strip("[]").split(",")]
    out = []
    for d in dims:
        if d == "B":
            out.append("N")
        elif d == "T" or (d == "R" and not rows):
            continue
        elif d == "R":
            out.append("n")
        else:
            out.append(d)
    return "[" + ", ".join(out) + "]"


@functools.cache
def dims_of(template: str) -> tuple[str, ...]:
    """The dimension names of a shape template: ``"[B, T, HV]"`` -> ``("B", "T", "HV")``."""
    return tuple(d.strip() for d in template.strip("[]").split(","))


def _param_doc(name: str, shapes: list[str], doc: str) -> str:
    lines = [line.strip() for line in doc.strip().splitlines()] or [""]
    shown = " or ".join(f"``{s}``" for s in shapes)
    return f"    {name} : array\n        {shown} " + "\n        ".join(lines)


def parameters_doc(rule: Rule, *, step: bool) -> str:
    """The numpydoc ``Parameters`` entries of the rule's arrays and options, from the
    description (``R`` shown as ``T``, or ``T * n`` for a rule with several rows per token)."""
    rows = "num_householder" in rule.option_names
    entries = []
    for a in rule.arrays:
        if step and not a.step:
            continue
        if step:
            shapes = [step_shape(s, rows) for s in a.shapes]
        else:
            shapes = [s.replace("R", "T * n" if rows else "T") for s in a.shapes]
        entries.append(_param_doc(a.name, shapes, a.doc))
    for o in rule.options:
        if step and not o.step:
            continue
        text = (o.step_doc or o.doc) if step else o.doc
        body = "\n".join("        " + line.strip() for line in text.strip().splitlines())
        entries.append(f"    {o.name} : {o.annotation}\n{body}")
    return "\n".join(entries)
