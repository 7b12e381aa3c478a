"""Every argument check of API.md, run once before any backend sees a call.

The result is a :class:`Call`: the caller's arrays untouched, plus the sizes, the compute dtype
and host copies of ``cu_seqlens`` / ``state_indices``. Backends may rely on everything a
``Call`` says; they never see unchecked shapes.
"""

from __future__ import annotations

import functools
import numbers
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from ._interop import is_bfloat16
from ._ops import ARG_NAMES, FAMILIES, RULES, Rule
from ._pool import gather_rows
from .rules._rule import dims_of, step_shape

FORM_CHOICES = ("auto", "recurrent", "chunk", "parallel")


@dataclass(frozen=True, kw_only=True)
class Call:
    """One validated op call, as a backend receives it.

    Sequence calls have ``q, k: [B, T, H, K]``, ``v: [B, T*n, HV, V]`` (``n`` is
    ``num_householder``, 1 except for ``delta_product``), gates ``[B, T, HV(, K)]`` and
    ``beta: [B, T*n, HV(, V)]``. Decoding calls (``state_pool`` set) arrive in the same layout
    with ``T == 1``.

    Examples
    --------
    A backend's ``run`` and ``step`` receive one; its fields:

    >>> import dataclasses
    >>> from fastweights.backends import Call
    >>> [f.name for f in dataclasses.fields(Call)][:8]
    ['op', 'spec', 'xp', 'device', 'q', 'k', 'v', 'inputs']
    """

    op: str
    spec: Rule
    xp: ModuleType
    device: Any
    q: Any
    k: Any
    v: Any
    inputs: Mapping[str, Any]
    """The rule's arrays after ``q, k, v`` by name (``spec.args``; None where an optional one
    is not given), also readable as attributes: ``call.gk``, ``call.beta``, ``call.a``."""
    initial_state: Any = None
    """``[N, HV, K, V]``; for ``linear_attn(normalize=True)`` the pair ``(S, z)``."""
    scale: float
    normalize: bool = False
    num_householder: int = 1
    use_qk_l2norm: bool = False
    output_final_state: bool = False
    cu_seqlens: np.ndarray | None = None
    """Host int64 copy of ``cu_seqlens``."""
    form: str = "auto"
    chunk_size: int = 64
    dtype: Any
    """Compute dtype of the namespace: float64 if any floating input is wider than 32 bits
    (float64 in either byte order, ``longdouble``), else float32."""
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int
    state_pool: Any = None
    """Decoding: the pool ``[P, HV, K, V]`` (a pair for normalised linear attention)."""
    state_indices: np.ndarray | None = None
    """Decoding: host int64 rows of the pool, distinct and in range; None means arange(N)."""
    called: str = ""
    """The op the user called, when it is an instance rewritten to ``op`` (``rwkv7``)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The rule's own options beyond ``normalize`` and ``num_householder``, checked, by name
    (``mesa_net``'s ``solver`` and ``max_cg_iterations``); also readable as attributes."""
    pool: Any = None
    """A sequence call into a state pool (``state_pool=``): the pool (a tuple for a pair
    state), whose rows ``pool_indices`` are ``initial_state`` and receive the final states
    (:mod:`fastweights._serving`). Backends never see it set."""
    pool_indices: np.ndarray | None = None
    """Host int64 rows of ``pool``, distinct and in range; None means arange(N)."""
    snapshots: bool = False
    """``output_state_snapshots``: also return the state after each token."""

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: the arrays or options of some rule.
        if name in ARG_NAMES:
            return self.__dict__["inputs"].get(name)
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def out(self) -> Any:
        """The array whose dtype ``o`` takes (``v``; ``srwm``: ``x``)."""
        return self.v if self.spec.out == "v" else self.inputs[self.spec.out]

    @property
    def beta_per_value(self) -> bool:
        beta = self.inputs.get("beta")
        return beta is not None and beta.ndim == 4

    @property
    def gate(self) -> Any:
        """The delta family's log-decay array (``g`` or ``gk``), or None."""
        return None if self.spec.gate is None else self.inputs.get(self.spec.gate)

    @property
    def is_step(self) -> bool:
        return self.state_pool is not None


@functools.cache
def _numpy_namespace() -> ModuleType:
    """The namespace of NumPy arrays, looked up once: a decoding step validates a dozen arrays,
    and ``array_namespace`` costs about a microsecond per array. Not at import, which it would
    slow by about 60 ms."""
    return array_api_compat.array_namespace(np.empty(0))


def _reject_masked(name: str, x: Any, error: type[Exception] = TypeError) -> None:
    """A ``numpy.ma`` masked array: its mask would be ignored, so it is refused."""
    ma = sys.modules.get("numpy.ma")  # no masked array exists before numpy.ma is imported
    if ma is not None and isinstance(x, ma.MaskedArray):
        raise error(
            f"{name} is a numpy.ma masked array, which fastweights does not support (the mask "
            f"would be ignored); pass {name}.filled(value) or a plain array"
        )


def _namespace(name: str, x: Any) -> ModuleType:
    if type(x) is np.ndarray:
        return _numpy_namespace()
    _reject_masked(name, x)
    try:
        return array_api_compat.array_namespace(x)
    except TypeError:
        raise TypeError(
            f"{name} must be an array of an Array API library (NumPy, CuPy, torch, JAX, ...), "
            f"got {type(x).__name__}"
        ) from None


def _dims(name: str, x: Any) -> tuple[int, ...]:
    """The shape of ``x`` as Python ints; an unknown (None, NaN) size is a ValueError."""
    shape = tuple(x.shape)
    if type(x) is np.ndarray or all(type(d) is int for d in shape):  # the fast path
        return shape
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape):
        raise ValueError(f"{name} must have a known integer shape, got {shape}")
    return tuple(int(d) for d in shape)


def _device(x: Any) -> Any:
    return "cpu" if type(x) is np.ndarray else array_api_compat.device(x)


def _is_wide(name: str, x: Any, xp: ModuleType) -> bool:
    """Whether ``x`` (checked to be real floating) needs float64 compute: wider than 32 bits.

    By size and kind, not by dtype equality: big-endian ``'>f8'`` is float64 and
    ``longdouble`` computes in float64 (no backend computes in extended precision).
    bfloat16 (``ml_dtypes`` in NumPy, torch, JAX) computes in float32, as float16 does.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            if is_bfloat16(x.dtype):  # ml_dtypes.bfloat16 (kind 'V')
                return False
            raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
        return x.dtype.itemsize > 4
    if not xp.isdtype(x.dtype, "real floating") and not is_bfloat16(x.dtype):  # Dask of ml_dtypes
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    return bool(x.dtype == xp.float64)


def is_float64_like(x: Any) -> bool:
    """Whether a NumPy-like ``x`` has a real floating dtype wider than 32 bits (any byte order)."""
    dt = getattr(x, "dtype", None)
    try:
        dt = np.dtype(dt)
    except TypeError:  # torch, JAX, ... dtypes
        return str(dt).rsplit(".", 1)[-1] == "float64"
    return dt.kind == "f" and dt.itemsize > 4


def _check_arrays(arrays: dict[str, Any]) -> tuple[ModuleType, Any, Any]:
    """Common namespace, device and compute dtype of the named arrays."""
    first_name, first = next(iter(arrays.items()))
    xp = _namespace(first_name, first)
    dev, dev_name = _device(first), first_name
    wide = False
    for name, x in arrays.items():
        if x is None:
            continue
        other = _namespace(name, x)
        if other is not xp:
            raise TypeError(
                f"{name} is a {other.__name__} array but {first_name} is a {xp.__name__} "
                "array; pass arrays of one library"
            )
        # A JAX tracer (inside jax.jit, vmap or grad) has no device (None): it matches any.
        here = _device(x)
        if dev is None:
            dev, dev_name = here, name
        elif here is not None and here != dev:
            raise TypeError(
                f"{name} is on device {here} but {dev_name} is on {dev}; move the arrays "
                "to one device first"
            )
        wide |= _is_wide(name, x, xp)
    return xp, dev, xp.float64 if wide else xp.float32


def _shape_error(name: str, expected: str, x: Any) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def _check_shape(name: str, x: Any, expected: tuple[int, ...], labels: str) -> None:
    if tuple(x.shape) != expected:
        raise _shape_error(name, f"{labels} = {expected}", x)


def _check_scale(scale: Any, K: int, default: float | None = None) -> float:
    if scale is None and default is not None:
        return default
    if scale is None:
        if K == 0:
            raise ValueError(
                "scale: the default K ** -0.5 is undefined for K = 0 (q.shape[-1]); pass scale"
            )
        return K**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    return float(scale)


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    number = int(value)
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


def _check_flag(name: str, value: Any) -> bool:
    """A bool argument: ``True``/``False`` (or a NumPy bool), nothing merely truthy."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}")
    return bool(value)


MAX_HOUSEHOLDER = 2**31 - 1
"""Largest ``num_householder``: the kernels count a token's delta steps in 32 bits."""


def to_host_ints(name: str, x: Any, error: type[Exception]) -> np.ndarray:
    """An integer array-like of any namespace as a host int64 NumPy array."""
    _reject_masked(name, x, error)
    try:
        if array_api_compat.is_cupy_array(x):
            host = x.get()
        elif array_api_compat.is_torch_array(x):
            host = x.detach().cpu().numpy()
        else:
            try:
                host = np.asarray(x)
            except (TypeError, ValueError, RuntimeError):
                host = np.from_dlpack(x)
    except Exception as exc:
        raise error(f"{name} must be an integer array-like, got {type(x).__name__}") from exc
    if host.dtype == np.bool_ or not np.issubdtype(host.dtype, np.integer):
        raise error(f"{name} must have an integer dtype, got {host.dtype}")
    return host.astype(np.int64)


def _check_cu_seqlens(cu_seqlens: Any, B: int, T: int) -> np.ndarray:
    cu = to_host_ints("cu_seqlens", cu_seqlens, ValueError)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu.shape)}"
        )
    if B != 1:
        raise ValueError(f"cu_seqlens needs B == 1 (sequences packed along T), got B = {B}")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {cu[-1]}")
    if np.any(np.diff(cu) < 0):
        at = int(np.argmax(np.diff(cu) < 0))
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got {cu[at]} then {cu[at + 1]} at index {at}"
        )
    return cu


def _is_traced(x: Any) -> bool:
    """A JAX tracer (inside ``jax.jit``, ``vmap``, ``grad``): its values cannot be read."""
    if not array_api_compat.is_jax_array(x):
        return False
    import jax

    return isinstance(x, jax.core.Tracer)


def _check_gate_sign(name: str, x: Any, xp: ModuleType) -> None:
    # NaN compares False and passes: values are not checked (API.md). Under jax.jit even a
    # concrete gate's comparison is traced and cannot be read: there the sign is a promise.
    if _is_traced(x):
        return
    if array_api_compat.is_numpy_array(x):
        # One pass without a temporary (1.5x faster on large gates); fmax skips NaN.
        positive = np.fmax.reduce(x, axis=None, initial=-np.inf) > 0
    else:
        positive = xp.any(x > 0)
        if _is_traced(positive):
            return
    if bool(positive):
        raise ValueError(f"{name} is a log-decay and must be <= 0 (decay = exp({name}) <= 1)")


def _check_positive(name: str, x: Any, xp: ModuleType) -> None:
    # NaN fails "> 0" and is refused; a traced value is a promise, as for a gate's sign.
    if _is_traced(x):
        return
    if array_api_compat.is_numpy_array(x):
        ok = bool(np.all(x > 0))
    else:
        flag = xp.all(x > 0)
        if _is_traced(flag):
            return
        ok = bool(flag)
    if not ok:
        raise ValueError(f"{name} must be positive (every value > 0), got a value <= 0 or NaN")


def _value_checked_block(name: str, positive: bool, block: Any) -> Any:
    check = _check_positive if positive else _check_gate_sign
    check(name, block, array_api_compat.array_namespace(block))
    return block


def _check_values(rule: Rule, named: dict[str, Any], xp: ModuleType) -> None:
    """The sign of each log-decay of ``rule`` in ``named``, and that each argument that must
    be positive is. A Dask array is not computed: it is replaced by a lazy copy that checks
    each block as the graph computes it (API.md)."""
    checks = [(n, False) for n in rule.log_decays] + [(n, True) for n in rule.positives]
    for name, positive in checks:
        x = named.get(name)
        if x is None:
            continue
        if array_api_compat.is_dask_array(x):
            import dask.array as da

            check = functools.partial(_value_checked_block, name, positive)
            named[name] = da.map_blocks(check, x, dtype=x.dtype, meta=getattr(x, "_meta", None))
        elif positive:
            _check_positive(name, x, xp)
        else:
            _check_gate_sign(name, x, xp)


def _lazy_states(q: Any, state: Any) -> Any:
    """A NumPy (or CuPy) ``initial_state`` of a Dask call, as a Dask array of ``q``'s block
    type (not computed)."""
    if state is None or not array_api_compat.is_dask_array(q):
        return state
    import dask.array as da

    on_gpu = array_api_compat.is_cupy_array(getattr(q, "_meta", None))

    def wrap(x: Any) -> Any:
        if array_api_compat.is_dask_array(x):
            return x
        if on_gpu and isinstance(x, np.ndarray):
            import cupy

            x = cupy.asarray(x)
        return da.from_array(x, chunks=x.shape)

    return tuple(wrap(x) for x in state) if isinstance(state, tuple | list) else wrap(state)


def _check_state(
    name: str,
    state: Any,
    rule: Rule,
    normalize: bool,
    rows: int,
    call_sizes: dict[str, int],
    rows_label: str,
) -> dict[str, Any]:
    """Shapes of a state (or state pool) against the rule's state layout (one array, or a
    tuple such as ``(S, z)``); returns its arrays by name for the dtype check."""
    layout = rule.state_layout(normalize=normalize)
    sizes = {**call_sizes, "N": rows}
    labels = {"N": rows_label}
    if len(layout) > 1:
        names = ", ".join(a.name for a in layout)
        if not isinstance(state, tuple | list) or len(state) != len(layout):
            options = "(normalize=True)" if normalize else ""
            raise TypeError(
                f"{name} of {rule.name}{options} must be the tuple ({names}), "
                f"got {type(state).__name__}"
            )
        out = {}
        for i, (arg, x) in enumerate(zip(layout, state, strict=True)):
            _namespace(f"{name}[{i}]", x)
            _dims(f"{name}[{i}]", x)
            _check_template(f"{name}[{i}]", x, arg.shapes, sizes, labels)
            out[f"{name}[{i}]"] = x
        return out
    if isinstance(state, tuple | list):
        raise TypeError(f"{name} must be an array for {rule.name}, got a {type(state).__name__}")
    if type(state) is not np.ndarray:
        _namespace(name, state)
    _check_template(name, state, layout[0].shapes, sizes, labels)
    return {name: state}


@dataclass(frozen=True)
class _Layout:
    """What validation reads from a rule's description, worked out once per rule."""

    names: frozenset[str]
    step_names: frozenset[str]
    """The arrays the decoding step takes (``srwm``'s step has no ``W0``)."""
    required: tuple[str, ...]
    product: bool
    """Several rows per token (DeltaProduct): ``k, v, beta`` have ``R = T * n`` rows."""
    step_shapes: dict[str, tuple[str, ...]]
    """Each argument's one-token templates."""
    token_axis: frozenset[str]
    """The arrays a step call gets a ``T == 1`` axis inserted into."""


@functools.cache
def _layout(op: str) -> _Layout:
    rule = RULES[op]
    product = "num_householder" in rule.option_names
    token_axis = set()
    for a in rule.arrays:
        dims = dims_of(a.shape)
        if "T" in dims or ("R" in dims and not product):
            token_axis.add(a.name)
    return _Layout(
        frozenset(rule.arg_names),
        frozenset(a.name for a in rule.args if a.step),
        tuple(a.name for a in rule.args if not a.optional),
        product,
        {a.name: tuple(step_shape(t, product) for t in a.shapes) for a in rule.args},
        frozenset(token_axis),
    )


SPECIAL_OPTIONS = frozenset({"normalize", "num_householder"})
"""Options with a field of their own in :class:`Call`; the others go to ``Call.options``."""


def _rule_options(rule: Rule, inputs: dict[str, Any], *, step: bool) -> dict[str, Any]:
    """The rule's own options taken out of ``inputs`` and checked (``solver``, ...)."""
    out = {}
    for o in rule.options:
        if o.name in SPECIAL_OPTIONS:
            continue
        value = inputs.pop(o.name, o.default) if (o.step or not step) else o.default
        if o.annotation == "int":
            value = _check_int(o.name, value, 0 if o.minimum is None else o.minimum)
        elif o.annotation == "str" and not isinstance(value, str):
            raise TypeError(f"{o.name} must be a str, got {type(value).__name__}")
        elif o.annotation == "bool":
            value = _check_flag(o.name, value)
        if o.choices and value not in o.choices:
            raise ValueError(f"{o.name} must be one of {o.choices}, got {value!r}")
        out[o.name] = value
    return out


def _rule_inputs(rule: Rule, inputs: dict[str, Any], *, step: bool = False) -> dict[str, Any]:
    """The rule's arrays after ``q, k, v`` by name; unknown and missing ones raise."""
    layout = _layout(rule.name)
    names = layout.step_names if step else layout.names
    if not names.issuperset(inputs):
        unknown = sorted(set(inputs) - names)
        raise TypeError(f"{rule.name} got unexpected arguments {unknown}")
    for name in layout.required:
        if inputs.get(name) is None and name in names:
            raise TypeError(f"{rule.name} needs {name}, got None")
    return {a.name: inputs.get(a.name) for a in rule.args if a.name in names}


def _check_template(
    name: str, x: Any, templates: tuple[str, ...], sizes: dict[str, int], labels: dict[str, str]
) -> None:
    """``x`` has the shape of one of ``templates``, whose dimensions ``sizes`` gives."""
    shape = tuple(x.shape)
    for template in templates:
        if shape == tuple([sizes[d] for d in dims_of(template)]):
            return
    ranked = [dims_of(t) for t in templates if len(dims_of(t)) == x.ndim]
    shown = " or ".join(
        "[" + ", ".join(labels.get(d, d) for d in dims_of(t)) + "]" for t in templates
    )
    dims = ranked[0] if ranked else dims_of(templates[0])
    expected = tuple(sizes[d] for d in dims)
    if len(templates) == 1:
        raise _shape_error(name, f"{shown} = {expected}", x)
    names = ", ".join(labels.get(d, d) for d in dims)
    raise _shape_error(name, f"{shown} with {names} = {expected}", x)


def _to_parent(rule: Rule, xp: ModuleType, arrays: dict[str, Any]) -> tuple[Rule, dict[str, Any]]:
    """An instance rule's arrays rewritten onto its parent (a chain of parents included)."""
    while rule.parent is not None:
        assert rule.to_parent is not None
        arrays = rule.to_parent(xp, arrays)
        rule = RULES[rule.parent]
    return rule, arrays


def _check_form(rule: Rule, call: Call, form: str) -> None:
    reason = None
    if form not in rule.forms:
        reason = rule.no_form.get(form, f"{rule.name} has no {form} form")
    else:
        reason = FAMILIES[call.spec.family].form_unavailable(call, form)
    if reason:
        raise ValueError(f"form={form!r} is not available for this {rule.name} call: {reason}")


def _is_pool_dtype(pool: Any, xp: ModuleType) -> bool:
    """float32 or float64, in either byte order (a NumPy pool may be big-endian)."""
    if isinstance(pool, np.ndarray):
        return pool.dtype.kind == "f" and pool.dtype.itemsize in (4, 8)
    return pool.dtype in (xp.float32, xp.float64)


def _check_writeable(name: str, pool: Any) -> None:
    """A read-only pool (``writeable=False``, ``np.frombuffer(bytes)``, a read-only memmap)
    cannot be updated in place: refused before anything is written. JAX pools are immutable
    by design and returned new."""
    flags = getattr(pool, "flags", None)
    if flags is not None and getattr(flags, "writeable", True) is False:
        raise ValueError(
            f"{name} is read-only, but the state pool is updated in place; pass a writeable "
            "array (e.g. a copy)"
        )


def _overlap(a: Any, b: Any, *, exact: bool = False) -> bool:
    """Whether two arrays may share memory (NumPy, CuPy, torch); False for other namespaces,
    whose step reads every input before it writes the pool (the reference backend).
    ``exact`` (NumPy) tells interleaved but disjoint views apart, at more cost."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if not _may_share(a, b):
            return False
        return bool(np.shares_memory(a, b)) if exact else True
    if array_api_compat.is_cupy_array(a) and array_api_compat.is_cupy_array(b):
        import cupy

        return bool(cupy.may_share_memory(a, b))
    if array_api_compat.is_torch_array(a) and array_api_compat.is_torch_array(b):
        sa, sb = a.untyped_storage(), b.untyped_storage()
        return bool(sa.data_ptr() == sb.data_ptr() and sa.nbytes() > 0)
    return False


_may_share = np.may_share_memory


def _unaliased(x: Any, pools: tuple[Any, ...]) -> Any:
    """``x``, or a copy of it when it may share memory with a pool the step writes."""
    if len(pools) == 1 and type(x) is np.ndarray and type(pools[0]) is np.ndarray:
        return x.copy() if _may_share(x, pools[0]) else x  # the fast path
    if not any(_overlap(x, p) for p in pools):
        return x
    if array_api_compat.is_torch_array(x):
        return x.clone()
    return x.copy()


def _check_rank(name: str, x: Any, rank: int, labels: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {labels}, got shape {tuple(x.shape)}")


def _qkv_sizes(
    rule: Rule, q: Any, k: Any, v: Any, num_householder: Any
) -> tuple[dict[str, int], dict[str, str], int]:
    """Sizes of a sequence call read from ``q, k, v`` (checked), labels for messages, ``n``."""
    _check_rank("q", q, 4, "[B, T, H, K]")
    B, T, H, K = (int(d) for d in q.shape)
    n = 1
    if "num_householder" in rule.option_names:
        n = _check_int("num_householder", num_householder, 1, MAX_HOUSEHOLDER)
    rows, rows_label = T * n, ("T" if n == 1 else "T * num_householder")
    k_rows = "R" in dims_of(rule.qkv[1].shape)
    k_label = rows_label if k_rows else "T"
    _check_rank("k", k, 4, "[B, T, H, K]")
    _check_shape("k", k, (B, rows if k_rows else T, H, K), f"[B, {k_label}, H, K]")
    _check_rank("v", v, 4, "[B, T, HV, V]")
    if tuple(v.shape[:2]) != (B, rows if k_rows else T):
        raise _shape_error("v", f"[B, {k_label}, HV, V] with B, {k_label} = {B, rows}", v)
    HV, V = int(v.shape[2]), int(v.shape[3])
    _check_heads(rule, H, HV, " (v.shape[2])", " (q.shape[2])")
    sizes = {"B": B, "T": T, "R": rows, "H": H, "HV": HV, "K": K, "V": V}
    return sizes, {"R": rows_label}, n


def _check_heads(rule: Rule, H: int, HV: int, hv_at: str, h_at: str) -> None:
    if HV == 0 or H == 0 or HV % H:
        raise ValueError(
            f"the value heads HV = {HV}{hv_at} must be a positive multiple of the "
            f"query/key heads H = {H}{h_at}"
        )
    if rule.same_heads and HV != H:
        raise ValueError(
            f"{rule.name} needs one value head per query/key head: HV = {HV}{hv_at} must "
            f"equal H = {H}{h_at}"
        )


def _check_min_sizes(rule: Rule, sizes: dict[str, int]) -> None:
    for d, least in rule.min_sizes.items():
        if sizes[d] < least:
            raise ValueError(f"{rule.name} needs {d} >= {least}, got {d} = {sizes[d]}")


def _own_sizes(rule: Rule, named: dict[str, Any], **extra: Any) -> dict[str, int]:
    """Sizes of a call of a rule without ``q, k, v``, from its own ``sizes``."""
    assert rule.sizes is not None
    shapes = {n: tuple(int(d) for d in x.shape) for n, x in named.items() if x is not None}
    shapes.update({n: tuple(int(d) for d in x.shape) for n, x in extra.items()})
    return rule.sizes(shapes)


def validate(
    op: str,
    q: Any = None,
    k: Any = None,
    v: Any = None,
    *,
    scale: Any = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    use_qk_l2norm: bool = False,
    form: str = "auto",
    chunk_size: Any = 64,
    normalize: bool = False,
    num_householder: Any = 1,
    state_pool: Any = None,
    state_indices: Any = None,
    output_state_snapshots: bool = False,
    **inputs: Any,
) -> Call:
    """Check a sequence call of ``op`` against its description (:class:`Rule`) and API.md,
    and describe it as a :class:`Call` of the op a backend runs (an instance's parent).

    With ``state_pool``, the pool's rows ``state_indices`` become ``initial_state`` (gathered,
    a copy) and ``output_final_state`` is set; :mod:`fastweights._serving` writes the final
    states back."""
    rule = RULES[op]
    options = _rule_options(rule, inputs, step=False)
    qkv = {"q": q, "k": k, "v": v} if rule.qkv else {}
    named = {**qkv, **_rule_inputs(rule, inputs)}
    for name, x in named.items():
        if x is not None or name in qkv:
            _namespace(name, x)
            _dims(name, x)
    normalize = _check_flag("normalize", normalize)
    output_final_state = _check_flag("output_final_state", output_final_state)
    use_qk_l2norm = _check_flag("use_qk_l2norm", use_qk_l2norm)
    if rule.qkv:
        sizes, labels, n = _qkv_sizes(rule, q, k, v, num_householder)
    else:
        sizes, labels, n = _own_sizes(rule, named), {}, 1
    _check_min_sizes(rule, sizes)
    B, T, H, HV, K = (sizes[d] for d in ("B", "T", "H", "HV", "K"))
    for arg in rule.args:
        if named[arg.name] is not None:
            _check_template(arg.name, named[arg.name], arg.shapes, sizes, labels)
    if array_api_compat.is_dask_array(cu_seqlens):
        raise ValueError(
            "cu_seqlens is a Dask array: the sequence boundaries shape the task graph, so they "
            "must be known when the op is called; pass them as a NumPy array (or a list)"
        )
    cu = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, B, T)
    N = B if cu is None else int(cu.shape[0]) - 1
    states: dict[str, Any] = {}
    lead = next(iter(named.values()))
    initial_state = _lazy_states(lead, initial_state)
    if initial_state is not None:
        states = _check_state("initial_state", initial_state, rule, normalize, N, sizes, "N")
    snapshots = _check_flag("output_state_snapshots", output_state_snapshots)
    idx = None
    if state_pool is not None:
        if initial_state is not None or output_final_state:
            raise ValueError(
                "state_pool and initial_state/output_final_state are mutually exclusive: a "
                "call into a pool starts from its rows state_indices and writes the final "
                "states back there"
            )
        states = _check_pool_shapes("state_pool", state_pool, rule, normalize, sizes)
        idx = _check_indices(state_indices, N, _pool_rows(state_pool))
    elif state_indices is not None:
        raise ValueError("state_indices needs state_pool (the pool whose rows it names)")
    if not isinstance(form, str) or form not in FORM_CHOICES:
        raise ValueError(f"form must be one of {FORM_CHOICES}, got {form!r}")
    chunk = _check_int("chunk_size", chunk_size, 1)
    scale_value = _check_scale(scale, K, rule.default_scale)
    xp, dev, dtype = _check_arrays(
        {**{n_: x for n_, x in named.items() if x is not None}, **states}
    )
    if form != "auto" and form not in rule.forms:
        reason = rule.no_form.get(form, f"{rule.name} has no {form} form")
        raise ValueError(f"form={form!r} is not available for this {op} call: {reason}")
    if state_pool is not None:
        _check_pool_arrays(states, xp)
        pools = tuple(state_pool) if isinstance(state_pool, tuple | list) else (state_pool,)
        rows = tuple(gather_rows(xp, p, idx) for p in pools)
        initial_state = rows if len(rows) > 1 else rows[0]
        output_final_state = True
    _check_values(rule, named, xp)
    parent, arrays = _to_parent(rule, xp, named)
    call = Call(
        op=parent.name,
        called=op,
        spec=parent,
        xp=xp,
        device=dev,
        q=arrays.get("q"),
        k=arrays.get("k"),
        v=arrays.get("v"),
        inputs={name: arrays.get(name) for name in parent.arg_names},
        options=options,
        initial_state=initial_state,
        scale=scale_value,
        normalize=normalize,
        num_householder=n,
        use_qk_l2norm=use_qk_l2norm,
        output_final_state=output_final_state,
        cu_seqlens=cu,
        form=form,
        chunk_size=chunk,
        dtype=dtype,
        B=B,
        T=T,
        H=H,
        HV=HV,
        K=K,
        V=sizes["V"],
        N=N,
        pool=state_pool,
        pool_indices=idx,
        snapshots=snapshots,
    )
    if form != "auto":
        _check_form(rule, call, form)
    return call


def _pool_rows(pool: Any) -> int:
    first = pool[0] if isinstance(pool, tuple | list) and pool else pool
    return int(first.shape[0]) if getattr(first, "ndim", 0) >= 1 else -1


def _check_pool_shapes(
    name: str, pool: Any, rule: Rule, normalize: bool, sizes: dict[str, int]
) -> dict[str, Any]:
    """A state pool's shapes (``[P, ...]`` of the rule's state layout); its arrays by name."""
    layout = rule.state_layout(normalize=normalize)
    if isinstance(pool, tuple | list) and len(layout) > 1 and len(pool) == len(layout):
        for i, x in enumerate(pool):
            if type(x) is not np.ndarray:
                _namespace(f"{name}[{i}]", x)
                _dims(f"{name}[{i}]", x)
        first, label = pool[0], f"{name}[0]"
    elif not isinstance(pool, tuple | list):
        if type(pool) is not np.ndarray:
            _namespace(name, pool)
            _dims(name, pool)
        first, label = pool, name
    else:
        first = None
    if first is not None:
        dims = dims_of(layout[0].shape)
        _check_rank(label, first, len(dims), "[P, " + ", ".join(dims[1:]) + "]")
    return _check_state(name, pool, rule, normalize, _pool_rows(pool), sizes, "P")


def _check_pool_arrays(states: dict[str, Any], xp: ModuleType, names: str = "") -> None:
    """Each part of a state pool is float32 or float64, writeable, and apart from the others;
    checked before anything is written."""
    for name, pool in states.items():
        if not _is_pool_dtype(pool, xp):
            raise TypeError(f"{name} (the state pool) must be float32 or float64, got {pool.dtype}")
        _check_writeable(name, pool)
    parts = list(states.items())
    for i in range(len(parts)):
        for j in range(i):
            if _overlap(parts[j][1], parts[i][1], exact=True):
                raise ValueError(
                    f"{parts[j][0]} and {parts[i][0]} share memory: the parts of the state"
                    f"{names} must be separate pools"
                )


def _check_indices(
    state_indices: Any, N: int, P: int, pool: str = "the state pool"
) -> np.ndarray | None:
    """``state_indices`` as host int64 ``[N]``, distinct and in ``[0, P)`` (None: ``P == N``)."""
    if state_indices is None:
        if P != N:
            raise ValueError(f"without state_indices {pool} must have N = {N} rows, got P = {P}")
        return None
    idx = to_host_ints("state_indices", state_indices, ValueError)
    if idx.shape != (N,):
        raise ValueError(f"state_indices must have shape (N,) = ({N},), got {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= P):
        raise ValueError(
            f"state_indices must lie in [0, P) = [0, {P}), got values from {idx.min()} "
            f"to {idx.max()}"
        )
    if np.unique(idx).size != idx.size:
        raise ValueError("state_indices must be distinct: two rows would update one state")
    return idx


def _qkv_step_sizes(
    rule: Rule, product: bool, q: Any, k: Any, v: Any
) -> tuple[dict[str, int], int]:
    """Sizes of a decoding call read from ``q, k, v`` (checked), and ``n``."""
    _check_rank("q", q, 3, "[N, H, K]")
    N, H, K = (int(d) for d in q.shape)
    if product:
        _check_rank("k", k, 4, "[N, n, H, K]")
        n = int(k.shape[1])
        if n < 1:
            raise ValueError(f"k must have at least one delta step (k.shape[1]), got {n}")
        _check_shape("k", k, (N, n, H, K), "[N, n, H, K]")
        _check_rank("v", v, 4, "[N, n, HV, V]")
        if tuple(v.shape[:2]) != (N, n):
            raise _shape_error("v", f"[N, n, HV, V] with N, n = {N, n}", v)
        HV, V = int(v.shape[2]), int(v.shape[3])
    else:
        n = 1
        _check_shape("k", k, (N, H, K), "[N, H, K]")
        _check_rank("v", v, 3, "[N, HV, V]")
        if int(v.shape[0]) != N:
            raise _shape_error("v", f"[N, HV, V] with N = {N}", v)
        HV, V = int(v.shape[1]), int(v.shape[2])
    _check_heads(rule, H, HV, "", "")
    return {"N": N, "n": n, "H": H, "HV": HV, "K": K, "V": V}, n


def validate_step(
    op: str,
    q: Any = None,
    k: Any = None,
    v: Any = None,
    state: Any = None,
    *,
    scale: Any = None,
    state_indices: Any = None,
    use_qk_l2norm: bool = False,
    normalize: bool = False,
    **inputs: Any,
) -> Call:
    """Check a one-token decoding call and describe it as a :class:`Call` with ``T == 1``.

    Arrays arrive in the one-token layout of their description (:func:`step_shape`: ``B``
    becomes ``N``, ``T`` is dropped) and leave in the sequence layout with ``T == 1``.
    """
    rule = RULES[op]
    options = _rule_options(rule, inputs, step=True)
    qkv = {"q": q, "k": k, "v": v} if rule.qkv else {}
    named = {**qkv, **_rule_inputs(rule, inputs, step=True)}
    for name, x in named.items():
        if type(x) is not np.ndarray and (x is not None or name in qkv):
            _namespace(name, x)
            _dims(name, x)
    normalize = _check_flag("normalize", normalize)
    use_qk_l2norm = _check_flag("use_qk_l2norm", use_qk_l2norm)
    static = _layout(op)
    if state is None:
        raise TypeError(f"{op} decoding needs the state pool, got None")
    layout = rule.state_layout(normalize=normalize)
    pair = len(layout) > 1
    names = ", ".join(a.name for a in layout)
    if isinstance(state, tuple | list) != pair:
        want = f"the tuple of pools ({names})" if pair else "an array"
        raise TypeError(f"state of {op} must be {want}, got a {type(state).__name__}")
    if pair and len(state) != len(layout):
        raise TypeError(f"state must be the tuple ({names}), got {len(state)} items")
    parts = [(f"state[{i}]", x) for i, x in enumerate(state)] if pair else [("state", state)]
    for name, x in parts:
        if type(x) is not np.ndarray:
            _namespace(name, x)
            _dims(name, x)
    first_name, first = parts[0]
    if rule.qkv:
        sizes, n = _qkv_step_sizes(rule, static.product, q, k, v)
    else:
        sizes, n = _own_sizes(rule, named, state=first), 1
    _check_min_sizes(rule, sizes)
    N, H, HV, K, V = (sizes[d] for d in ("N", "H", "HV", "K", "V"))
    for name, templates in static.step_shapes.items():
        if named.get(name) is not None:
            _check_template(name, named[name], templates, sizes, {})
    _check_rank(first_name, first, 4, "[P, " + ", ".join(dims_of(layout[0].shape)[1:]) + "]")
    P = int(first.shape[0])
    states = _check_state("state", state, rule, normalize, P, sizes, "P")
    scale_value = _check_scale(scale, K, rule.default_scale)
    xp, dev, dtype = _check_arrays(
        {**{n_: x for n_, x in named.items() if x is not None}, **states}
    )
    _check_pool_arrays(states, xp, f" ({names})")
    idx = _check_indices(state_indices, N, P)
    _check_values(rule, named, xp)
    # An input that is a view of the pool would change under the kernel's writes: read it first.
    pools = tuple(states.values())
    for name, x in named.items():
        if x is not None:
            named[name] = _unaliased(x, pools)
    # The sequence layout with T == 1: views, no copies.
    for name in static.token_axis:
        if named.get(name) is not None:
            named[name] = named[name][:, None, ...]
    parent, arrays = _to_parent(rule, xp, named)
    return Call(
        op=parent.name,
        called=op,
        spec=parent,
        xp=xp,
        device=dev,
        q=arrays.get("q"),
        k=arrays.get("k"),
        v=arrays.get("v"),
        inputs={name: arrays.get(name) for name in parent.arg_names},
        options=options,
        scale=scale_value,
        normalize=normalize,
        num_householder=n,
        use_qk_l2norm=use_qk_l2norm,
        output_final_state=True,
        form="recurrent",
        dtype=dtype,
        B=N,
        T=1,
        H=H,
        HV=HV,
        K=K,
        V=V,
        N=N,
        state_pool=state,
        state_indices=idx,
    )


__all__ = ["Call", "to_host_ints", "validate", "validate_step"]
