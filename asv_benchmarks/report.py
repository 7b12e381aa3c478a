"""Turn the newest asv results of this machine into ``docs/performance.md`` and its plots.

Usage (from ``asv_benchmarks/``, after a run that saved results)::

    FASTWEIGHTS_ASV_QUICK=0 asv run --python=same --quick --bench "track_|time_step" \
        --set-commit-hash $(git rev-parse HEAD)
    python report.py

(``FASTWEIGHTS_ASV_QUICK=0`` keeps the full sizes: a plain ``--quick`` run uses short inputs
only, see ``benchmarks/_quick.py``.)

Every figure on the page comes from that one results file, so ratios are from one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"


def newest_results(results_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The newest results file (by run start) of the first machine found, and its machine."""
    for machine_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        runs = [p for p in machine_dir.glob("*.json") if p.name != "machine.json"]
        if runs:
            data = max((json.loads(p.read_text()) for p in runs), key=lambda d: d["date"])
            return data, json.loads((machine_dir / "machine.json").read_text())
    raise SystemExit(f"no asv results under {results_dir}; run asv first (see the docstring)")


def table(data: dict[str, Any], name: str) -> dict[tuple[str, ...], float]:
    """``{parameter tuple: value}`` of one benchmark (NaN where skipped)."""
    if name not in data["results"]:
        return {}
    columns = data["result_columns"]
    entry = dict(zip(columns, data["results"][name], strict=False))
    params = entry.get("params") or [[]]
    values = entry["result"]
    out = {}
    for key, value in zip(itertools.product(*params), values, strict=True):
        clean = tuple(str(p).strip("'") for p in key)
        out[clean] = math.nan if value is None else float(value)
    return out


def _fmt(x: float, digits: int = 1) -> str:
    return "–" if math.isnan(x) else f"{x:,.{digits}f}"


def write_page(data: dict[str, Any], machine: dict[str, Any]) -> str:
    peak = table(data, "limits.MachineLimits.track_matmul_gflops").get(("numpy",), math.nan)
    copy = table(data, "limits.MachineLimits.track_copy_gbs").get(("numpy",), math.nan)
    gflops = table(data, "prefill.Prefill.track_gflops")
    tokens = table(data, "prefill.Prefill.track_tokens_per_second")
    loop = table(data, "baseline.NumpyLoop.track_gflops")
    step = table(data, "decode.Decode.time_step")
    step_copy = table(data, "decode.Decode.track_fraction_of_copy")
    lines = [
        "# Performance",
        "",
        "Measured by the asv suite in `asv_benchmarks/`; every number below comes from one run, on",
        f"**{machine.get('cpu', '?')}** ({machine.get('num_cpu', '?')} cores, "
        f"{machine.get('ram', '?')} bytes RAM, {machine.get('os', '?')}), commit "
        f"`{data.get('commit_hash', '?')[:10]}`.",
        "",
        f"- float32 matmul (NumPy, 2048³, all threads): **{_fmt(peak)} GFLOP/s**",
        f"- memory copy (NumPy, 256 MiB, bytes read + written): **{_fmt(copy)} GB/s**",
        "",
        "Rates are effective: the recurrent pass's `6·K·V` FLOPs per token and head (per delta",
        "step for DeltaProduct, n = 2), the least work any form does, over the measured time.",
        "`tokens/s` and `GFLOP/s` are two separate measurements (two asv benchmarks, each the best",
        "of 3 calls in its own process), so their disagreement shows the run-to-run noise on this",
        "shared 2-core machine: about ±20 %; so does `auto` beside the form it picks.",
        "",
    ]
    for T, D in (("8192", "128"), ("8192", "64"), ("512", "128")):
        lines += [
            f"## Prefill, B=1, T={T}, H=4, K=V={D}, float32",
            "",
            "<details>",
            "<summary>Table: every op, backend and form</summary>",
            "",
            "| op | backend | form | tokens/s | GFLOP/s | % of matmul |",
            "|---|---|---|---:|---:|---:|",
        ]
        for (op, backend, form, t, d), rate in gflops.items():
            if (t, d) != (T, D) or math.isnan(rate):
                continue
            tok = tokens.get((op, backend, form, t, d), math.nan)
            lines.append(
                f"| {op} | {backend} | {form} | {_fmt(tok, 0)} | {_fmt(rate, 2)} | "
                f"{_fmt(100 * rate / peak)}% |"
            )
        base = loop.get((T, D), math.nan)
        lines += [
            f"| gated_delta_rule | plain NumPy loop | – | – | {_fmt(base, 2)} | "
            f"{_fmt(100 * base / peak)}% |",
            "",
            "</details>",
            "",
        ]
    if step:
        lines += [
            "## Decoding, one token, H=16, K=V=128, float32 state pool",
            "",
            "<details>",
            "<summary>Table: every op, backend and batch size</summary>",
            "",
            "| op | backend | B | µs per step (one sample) "
            "| NumPy copy of the pool / step (>1: step faster) |",
            "|---|---|---:|---:|---:|",
        ]
        for (op, backend, B), seconds in step.items():
            if math.isnan(seconds):
                continue
            frac = step_copy.get((op, backend, B), math.nan)
            lines.append(f"| {op} | {backend} | {B} | {_fmt(1e6 * seconds)} | {_fmt(frac, 2)} |")
        lines += ["", "</details>", ""]
    lines += [
        "## Reproduce",
        "",
        "```",
        "pip install '.[numba,bench]'",
        "cd asv_benchmarks",
        "asv machine --yes",
        "# FASTWEIGHTS_ASV_QUICK=0: full sizes (a plain --quick run uses short inputs only)",
        'FASTWEIGHTS_ASV_QUICK=0 asv run --python=same --quick --bench "track_|time_step" '
        "--set-commit-hash $(git rev-parse HEAD)",
        "python report.py                 # rewrites this page and its plots",
        "asv run main^!                   # or build a commit in asv's own environment",
        "asv continuous main HEAD         # compare two commits",
        "asv publish && asv preview       # the HTML report",
        "```",
        "",
    ]
    return "\n".join(lines)


def draw() -> None:
    """The page's plots and figure captions, drawn from the tables just written."""
    script = DOCS / "_static" / "make_performance_plots.py"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib missing: the page has no plots; run {script} once it is installed")
        return
    subprocess.run([sys.executable, str(script)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / ".asv" / "results")
    parser.add_argument("--out", type=Path, default=DOCS / "performance.md")
    args = parser.parse_args()
    data, machine = newest_results(args.results)
    args.out.write_text(write_page(data, machine))
    print(f"wrote {args.out}")
    if args.out.resolve() == (DOCS / "performance.md").resolve():
        draw()


if __name__ == "__main__":
    main()
