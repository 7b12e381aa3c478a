"""The public functions of every rule, generated from its description.

Each op is a real Python function with the rule's signature (so ``help``, ``inspect`` and
Sphinx show it) whose body hands its arguments to validation; its docstring is the rule's
``title``, ``doc`` and ``example`` around a Parameters section generated from the rule's
arrays and options. Like :mod:`dataclasses`, the function is compiled from generated source,
so a call costs no more than a hand-written wrapper.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from .rules._rule import REQUIRED, STATE, Rule, parameters_doc

SEQUENCE_KEYWORDS: tuple[tuple[str, str, Any], ...] = (
    ("scale", "float | None", None),
    ("initial_state", "Any", None),
    ("output_final_state", "bool", False),
    ("state_pool", "Any", None),
    ("state_indices", "Any", None),
    ("output_state_snapshots", "bool", False),
    ("cu_seqlens", "Any", None),
    ("use_qk_l2norm", "bool", False),
    ("form", "str", "auto"),
    ("chunk_size", "int", 64),
    ("backend", "str | None", None),
)
"""Keyword arguments every sequence op takes (API.md), in signature order."""

STEP_KEYWORDS: tuple[tuple[str, str, Any], ...] = (
    ("scale", "float | None", None),
    ("state_indices", "Any", None),
    ("use_qk_l2norm", "bool", False),
    ("backend", "str | None", None),
)
"""Keyword arguments every decoding step takes."""


def _signature(rule: Rule, *, step: bool) -> tuple[list[str], list[tuple[str, str, Any]]]:
    positional = [*rule.step_positional, "state"] if step else list(rule.positional)
    keywords: list[tuple[str, str, Any]] = [
        (a.name, "Any", None) for a in rule.args if a.keyword_only and (a.step or not step)
    ]
    keywords += [(o.name, o.annotation, o.default) for o in rule.options if o.step or not step]
    for name, annotation, default in STEP_KEYWORDS if step else SEQUENCE_KEYWORDS:
        if name == "scale" and rule.default_scale is not None:
            annotation, default = "float", rule.default_scale
        if name in rule.common or name in ("backend", "state_indices"):
            keywords.append((name, annotation, default))
    return positional, keywords


def _common_doc(rule: Rule, common: str, *, step: bool) -> str:
    """The entries of ``common`` for the keywords ``rule`` takes, then its Returns section."""
    text = textwrap.dedent(common).strip("\n")
    params, _, returns = text.partition("\nReturns\n")
    positional, keywords = _signature(rule, step=step)
    taken = {*positional, *(name for name, _, _ in keywords)}
    entries: list[list[str]] = []
    for line in params.splitlines():
        if line and not line[0].isspace():
            entries.append([line])
        else:
            entries[-1].append(line)
    kept = []
    for entry in entries:
        name = entry[0].split(" :", 1)[0]
        if name not in taken:
            continue
        if name == "scale" and rule.default_scale is not None:
            entry = [
                "scale : float",
                f"    Multiplies the read-out; default {rule.default_scale} for this rule.",
            ]
        kept.extend(entry)
    if rule.state != STATE:  # a pair, or another shape: the rule's own layout
        names = ", ".join(a.name for a in rule.state)
        for rows in ("N", "P"):
            shapes = ", ".join(f"``[{rows}{a.shape[2:]}``" for a in rule.state)
            own = f"``({names})``: {shapes}" if len(rule.state) > 1 else shapes
            kept = [line.replace(f"``[{rows}, HV, K, V]``", own) for line in kept]
            returns = returns.replace(f"``[{rows}, HV, K, V]``", own)
    if rule.out != "v":
        returns = returns.replace("the dtype of ``v``", f"the dtype of ``{rule.out}``")
    return "\n".join([*kept, "", "Returns", *returns.splitlines()])


def _docstring(rule: Rule, common: str, *, step: bool) -> str:
    if step:
        default = f"One token of :func:`fastweights.{rule.name}`: ``{rule.update}``."
        title = rule.step_title or default
        parts = [title, inspect.cleandoc(rule.step_doc)]
        example = rule.step_example
    else:
        parts = [rule.title, inspect.cleandoc(rule.doc)]
        example = rule.example
    params = parameters_doc(rule, step=step)
    sections = [p for p in parts if p]
    body = inspect.cleandoc("\n" + params) + "\n" + _common_doc(rule, common, step=step)
    sections.append("Parameters\n----------\n" + body)
    if example:
        sections.append("Examples\n--------\n" + inspect.cleandoc(example))
    return "\n\n".join(sections)


def define(
    rule: Rule, runner: Callable[[str, dict[str, Any]], Any], common: str, *, step: bool
) -> Callable[..., tuple[Any, Any]]:
    """The public function of ``rule`` (its decoding step if ``step``) calling
    ``runner(rule.name, arguments)`` with its arguments by name.

    ``common`` is the numpydoc text of the common keywords and the Returns section.
    """
    positional, keywords = _signature(rule, step=step)
    params = list(positional)
    if keywords:
        params.append("*")
    annotations: dict[str, Any] = {name: "Any" for name in positional}
    defaults: dict[str, Any] = {}
    for name, annotation, default in keywords:
        annotations[name] = annotation
        if default is REQUIRED:
            params.append(name)
        else:
            defaults[f"_default_{name}"] = default
            params.append(f"{name}=_default_{name}")
    names = [*positional, *(k[0] for k in keywords)]
    arguments = ", ".join(f"{n!r}: {n}" for n in names)
    source = (
        f"def {rule.name}({', '.join(params)}):\n"
        f"    return _runner({rule.name!r}, {{{arguments}}})\n"
    )
    namespace: dict[str, Any] = {"_runner": runner, **defaults}
    exec(compile(source, f"<fastweights.{'step.' if step else ''}{rule.name}>", "exec"), namespace)
    func = namespace[rule.name]
    func.__module__ = "fastweights.step" if step else "fastweights"
    func.__qualname__ = rule.name
    func.__annotations__ = {**annotations, "return": "tuple[Any, Any]"}
    func.__doc__ = _docstring(rule, common, step=step)
    return func
