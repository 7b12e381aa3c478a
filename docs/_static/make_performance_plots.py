"""Draw the performance page's plots from the page's own tables.

Usage (from the repository root; matplotlib needed)::

    python docs/_static/make_performance_plots.py

It draws the two plots and writes their figure blocks, with captions computed from the tables,
into the page between its introduction and its first table (replacing the previous ones).

The one source of the numbers is ``docs/performance.md``: its tables, its matmul and copy
limits and the line naming the machine and commit of the asv run (``asv_benchmarks/report.py``
writes all of them from one results file, then runs this). The plots are
``docs/_static/performance_prefill.png`` and ``docs/_static/performance_decode.png``; their
titles name the run's machine and commit, so a plot never outlives its numbers unnoticed.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent
PAGE = DOCS / "performance.md"
OPS = ("linear_attn", "simple_gla", "retention", "gla", "delta_rule", "gated_delta_rule", "kda",
       "delta_product")  # fmt: skip
MARKERS = {"auto": "o", "recurrent": "s", "chunk": "D"}
SERIES = (  # (backend, form) -> colour: numba dark, reference light, one hue per form
    (("numba", "auto"), "#1f77b4"),
    (("numba", "recurrent"), "#2ca02c"),
    (("numba", "chunk"), "#ff7f0e"),
    (("reference", "auto"), "#aec7e8"),
    (("reference", "recurrent"), "#98df8a"),
    (("reference", "chunk"), "#ffbb78"),
)


def _number(cell: str) -> float:
    cell = cell.replace(",", "").replace("%", "").strip()
    return math.nan if cell in {"", "–", "-"} else float(cell)


def read_page(path: Path = PAGE) -> dict:
    """Sections' tables, the two limits and the run's description, from the page's Markdown."""
    text = path.read_text()
    run = re.search(r"on\s*\n?\*\*(.+?)\*\* \((.+?)\), commit `(\w+)`", text)
    peak = re.search(r"float32 matmul[^*]*\*\*([\d,.]+) GFLOP/s", text)
    copy = re.search(r"memory copy[^*]*\*\*([\d,.]+) GB/s", text)
    if not (run and peak and copy):
        raise SystemExit(
            f"{path}: no run line or no matmul/copy limits; regenerate it with report.py"
        )
    sections: dict[str, list[list[str]]] = defaultdict(list)
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and not line.startswith("|---") and heading:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] != "op":
                sections[heading].append(cells)
    return {
        "cpu": run.group(1),
        "machine": run.group(2),
        "commit": run.group(3),
        "peak_gflops": _number(peak.group(1)),
        "copy_gbs": _number(copy.group(1)),
        "sections": dict(sections),
    }


def _shape(heading: str) -> tuple[int, int, int] | None:
    m = re.match(r"Prefill, B=1, T=(\d+), H=(\d+), K=V=(\d+)", heading)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def prefill_limits(peak_gflops: float, copy_gbs: float, H: int, D: int) -> tuple[float, float]:
    """tokens/s at the matmul rate (6·K·V FLOPs per token and head) and at the copy rate.

    The copy limit streams each token's q, k and v in and o out once, at the copy rate (bytes
    read + written): ``4·H·(2·K + 2·V)`` float32 bytes, ``16·H·D`` for K = V = D (gates ignored).
    """
    matmul = peak_gflops * 1e9 / (6 * D * D * H)
    copy = copy_gbs * 1e9 / (4 * H * 4 * D)
    return matmul, copy


def draw_prefill(data: dict, out: Path) -> None:
    """A dot plot per shape: ops down, tokens/s across (log), one mark per backend and form."""
    import matplotlib.pyplot as plt

    prefill = [(h, _shape(h)) for h in data["sections"] if _shape(h)]
    fig, axes = plt.subplots(len(prefill), 1, figsize=(8.0, 2.9 * len(prefill) + 0.8), sharex=True)
    axes = list(axes) if len(prefill) > 1 else [axes]
    for ax, (heading, (T, H, D)) in zip(axes, prefill, strict=True):
        rows = {(r[0], r[1], r[2]): _number(r[3]) for r in data["sections"][heading]}
        for i, ((backend, form), colour) in enumerate(SERIES):
            ys = [j + (i - (len(SERIES) - 1) / 2) * 0.11 for j in range(len(OPS))]
            xs = [rows.get((op, backend, form), math.nan) for op in OPS]
            ax.scatter(xs, ys, s=30, color=colour, marker=MARKERS[form], edgecolors="k",
                       linewidths=0.4, label=f"{backend}, {form}", zorder=3)  # fmt: skip
        matmul, copy = prefill_limits(data["peak_gflops"], data["copy_gbs"], H, D)
        ax.axvline(matmul, color="k", linestyle="--", linewidth=1.2)
        ax.axvline(copy, color="tab:red", linestyle=":", linewidth=1.5)
        ax.text(matmul, -0.75, "matmul limit ", fontsize=8, ha="right", va="center")
        ax.text(copy, -0.75, " copy limit", fontsize=8, ha="left", va="center", color="tab:red")
        ax.set_yticks(range(len(OPS)), OPS, fontsize=9)
        ax.set_ylim(len(OPS) - 0.5, -1.1)
        ax.set_title(f"T={T}, H={H}, K=V={D}", fontsize=10, loc="left")
        ax.grid(axis="x", which="both", alpha=0.25)
        ax.grid(axis="y", alpha=0.15)
    axes[-1].set_xscale("log")
    axes[-1].set_xlim(2e3, 1.5e7)
    axes[-1].set_xlabel("tokens/s (log scale; more is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(
        f"Prefill, B=1, float32 (asv run on {data['commit'][:10]}, {data['cpu']})", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def draw_decode(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    heading = next(h for h in data["sections"] if h.startswith("Decoding"))
    rows = data["sections"][heading]
    batches = sorted({int(r[2]) for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.9), sharey=True)
    axes = list(axes) if len(batches) > 1 else [axes]
    width = 0.4
    for ax, B in zip(axes, batches, strict=True):
        step = {(r[0], r[1]): _number(r[3]) for r in rows if int(r[2]) == B}
        ratio = {(r[0], r[1]): _number(r[4]) for r in rows if int(r[2]) == B}
        for i, (backend, colour) in enumerate((("numba", "#1f77b4"), ("reference", "#aec7e8"))):
            xs = [j + (i - 0.5) * width for j in range(len(OPS))]
            ax.bar(xs, [step.get((op, backend), math.nan) for op in OPS], width, color=colour,
                   label=backend)  # fmt: skip
        # The time NumPy takes to copy the state pool once (step time x the table's ratio).
        copies = [step[(op, "numba")] * ratio[(op, "numba")] for op in OPS]
        left, right = [j - 0.45 for j in range(len(OPS))], [j + 0.45 for j in range(len(OPS))]
        ax.hlines(copies, left, right, color="tab:red", linestyle=":", linewidth=1.5,
                  label="NumPy copy of the pool")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xticks(range(len(OPS)), OPS, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"B={B}: a pool of {B}×16 states", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.25)
    axes[0].set_ylabel("µs per step (log; less is better)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Decoding one token, H=16, K=V=128, float32 (asv run on {data['commit'][:10]}, "
        f"{data['cpu']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def figures_markdown(data: dict) -> str:
    """The page's two figures with captions whose figures come from ``data`` (the tables)."""
    auto_pct, speedup = [], []
    for heading, (_, _, D) in ((h, _shape(h)) for h in data["sections"] if _shape(h)):
        rows = {(r[0], r[1], r[2]): r for r in data["sections"][heading]}
        for op in OPS:
            if (op, "numba", "auto") not in rows:  # a run without numba: nothing to compare
                continue
            fast = _number(rows[(op, "numba", "auto")][3])
            ref = max(
                _number(rows[(op, "reference", f)][3])
                for f in ("recurrent", "chunk", "auto")
                if (op, "reference", f) in rows
            )
            speedup.append(fast / ref)
            if D == 128:
                auto_pct.append(_number(rows[(op, "numba", "auto")][5]))
    decode = data["sections"][next(h for h in data["sections"] if h.startswith("Decoding"))]
    big = max(int(r[2]) for r in decode)
    ratio_big = [_number(r[4]) for r in decode if r[1] == "numba" and int(r[2]) == big]
    ratio_one = [_number(r[4]) for r in decode if r[1] == "numba" and int(r[2]) == 1]
    run = f"the asv run on commit `{data['commit']}` ({data['cpu']}, {data['machine']})"
    return f"""```{{figure}} _static/performance_prefill.png
:alt: Prefill tokens/s per op, backend and form (log scale), with the matmul and copy limits
:width: 100%

Prefill tokens/s by op, backend and form, for the three shapes of the tables below, from
{run}. Dashed: the **matmul limit**, the tokens/s at which the recurrent pass's `6·K·V` FLOPs
per token and head would run at the float32 matmul rate (half of it for `delta_product`, n = 2
delta steps per token). Dotted: the **copy limit**, streaming each token's `q`, `k`, `v` in and
`o` out once at the copy rate. At K=V=128 the numba backend's `auto` form runs at
{min(auto_pct):.0f}–{max(auto_pct):.0f} % of the matmul rate (the tables' `% of matmul`); over
all shapes it is {min(speedup):.0f}–{max(speedup):.0f}× the reference backend's fastest form.
```

```{{figure}} _static/performance_decode.png
:alt: Microseconds per decoding step per op and backend (log), with the pool-copy time
:width: 100%

One decoding step (one token into a float32 state pool, H=16, K=V=128), same run. Dotted: the
time NumPy takes to copy the whole state pool once. At B={big} the numba step is
{min(ratio_big):.1f}–{max(ratio_big):.1f}× faster than that copy; at B=1 the fixed cost of a call
dominates (the step takes {1 / max(ratio_one):.1f}–{1 / min(ratio_one):.1f}× the copy).
```

The plots are drawn from this page's tables by `docs/_static/make_performance_plots.py`, which
`asv_benchmarks/report.py` runs after writing them. The tables are folded: open one by its
summary line.
"""


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    data = read_page()
    here = Path(__file__).resolve().parent
    draw_prefill(data, here / "performance_prefill.png")
    draw_decode(data, here / "performance_decode.png")
    # The figures and their captions go between the page's introduction and its first table.
    text = PAGE.read_text()
    start = text.find("```{figure} _static/performance_prefill.png")
    end = text.index("\n## ") + 1
    start = end if start < 0 else start
    PAGE.write_text(text[:start] + figures_markdown(data) + "\n" + text[end:])
    print(f"wrote {here / 'performance_prefill.png'}, {here / 'performance_decode.png'}, {PAGE}")


if __name__ == "__main__":
    main()
