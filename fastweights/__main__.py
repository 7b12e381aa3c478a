"""Command-line entry point: ``python -m fastweights {info,demo,train-demo,bench,gpu-check,...}``.

``info`` prints the versions of fastweights and of the packages it can use, and the registered
backends with the ops and forms each implements. ``demo`` reproduces the fast weight primer's
headline (Hebbian versus delta-rule memory) live and times the backends; see
:mod:`fastweights._demo`. ``train-demo`` trains a DeltaNet on parity with NumPy and
:func:`fastweights.vjp`; see :mod:`fastweights._train_demo`. ``bench`` reads each op's speed
against the machine's limits; see :mod:`fastweights._bench`. ``gpu-check`` runs the ``gpu``
tests and the GPU timings of the ``cupy`` backend on a machine with an NVIDIA GPU, and says why
not elsewhere. ``cache`` shows (or with ``--clear`` empties) the folder of compiled kernels;
``warmup`` fills it, with a progress bar. The library's log records (logger ``fastweights``,
e.g. a kernel's first compilation) are shown on stderr.

Subcommands import their modules lazily, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

__all__ = ["build_parser", "main"]


def _size(text: str) -> tuple[int, int, int, int]:
    """Parse ``B,T,H,D`` for ``--size``."""
    try:
        b, t, h, d = (int(p) for p in text.split(","))
    except ValueError:  # not integers, or not four of them
        b = t = h = d = 0
    if min(b, t, h, d) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive integers B,T,H,D, got {text!r}")
    return b, t, h, d


class _StderrHandler(logging.StreamHandler):
    """Log records on the current ``sys.stderr`` (looked up at each record, as tests and
    notebooks replace it); on a terminal it first clears a progress bar's line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("fastweights: %(message)s"))

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        try:
            tty = sys.stderr.isatty()
        except (AttributeError, ValueError):
            tty = False
        return "\r\x1b[K" + text if tty else text


@contextlib.contextmanager
def _show_logs() -> Iterator[None]:
    """Show the ``fastweights`` logger's INFO records on stderr while the command runs."""
    logger = logging.getLogger("fastweights")
    handler = _StderrHandler()
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _run_cache(clear: bool) -> int:
    from fastweights import _kernel_cache as kc

    if clear:
        files, size = kc.clear_cache()
        print(
            f"removed {files} files, {_mib(size)}, from {kc.cache_root() / 'numba'} "
            f"and {kc.emulator_cache_dir()}"
        )
        return 0
    usage = kc.cache_usage()
    current = usage["current"]
    files, size = usage["builds"].get(current.name, (0, 0))
    total_files = sum(f for f, _ in usage["builds"].values())
    total_size = sum(b for _, b in usage["builds"].values())
    print(f"kernel cache: {usage['root']}  (set {kc.CACHE_ENV} to move it)")
    print(f"this build:   {current}  ({files} files, {_mib(size)})")
    print(
        f"all builds:   {len(usage['builds'])} folders, {total_files} files, "
        f"{_mib(total_size)}  (python -m fastweights cache --clear empties it)"
    )
    em_files, em_size = usage["emulator_usage"]
    print(
        f"CUDA emulator: {usage['emulator']}  ({em_files} files, {_mib(em_size)}; "
        f"set {kc.EMULATOR_CACHE_ENV} to move it)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m fastweights``."""
    parser = argparse.ArgumentParser(
        prog="python -m fastweights",
        description="Fast weight programmers for any Array API library.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("info", help="versions, and the backends with their ops and forms")

    demo = sub.add_parser(
        "demo",
        help="Hebbian vs delta-rule memory, computed live, then backend throughput",
        description=(
            "Store random key-value pairs with linear_attn (Hebbian) and delta_rule "
            "(beta = 1), read them back and compare with theory; then time "
            "gated_delta_rule through every available backend against a per-token NumPy loop."
        ),
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--quick", action="store_true", help="fewer trials and a small throughput problem"
    )
    demo.add_argument(
        "--plot",
        metavar="PATH",
        default="fastweights_demo.png",
        help="figure file, written when matplotlib is installed (default fastweights_demo.png)",
    )
    demo.add_argument("--no-plot", action="store_true", help="do not write a figure")
    demo.add_argument("--no-bench", action="store_true", help="skip the throughput section")
    demo.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="time only this backend (repeatable; default every available backend)",
    )
    demo.add_argument(
        "--size",
        type=_size,
        metavar="B,T,H,D",
        help="throughput problem, K = V = D (default 1,2048,4,128; 1,512,2,64 with --quick)",
    )
    demo.add_argument("--trials", type=int, help="memories averaged per N (default 8; 4 quick)")
    demo.add_argument(
        "--repeats", type=int, default=3, help="timed calls after the warm-up (default 3)"
    )

    bench = sub.add_parser(
        "bench",
        help="each op's rate per backend, median and spread, against this machine's limits",
        description=(
            "Time ops through backends (form='auto', float32): one untimed first call, then "
            "--repeats calls, reported as median and min-max beside the machine's float32 "
            "matmul rate (measured with BLAS's threads idle), its copy bandwidth and a "
            "per-token NumPy loop, with the CPU model, BLAS, the environment variables that "
            "change the figures and the load average before and after. One progress line "
            "per measurement goes to stderr."
        ),
    )
    bench.add_argument(
        "--ops", nargs="+", metavar="OP", help="ops, space- or comma-separated (default every op)"
    )
    bench.add_argument(
        "--backends",
        nargs="+",
        metavar="NAME",
        help="backends, space- or comma-separated (default every available backend)",
    )
    bench.add_argument(
        "--shapes",
        nargs="+",
        type=_plan_size,
        metavar="B,T,H,K[,V]",
        help="problem sizes, V = K unless given (default 1,2048,4,128)",
    )
    bench.add_argument(
        "--repeats", type=int, default=5, help="timed calls per measurement (default 5)"
    )
    bench.add_argument(
        "--max-time",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="fewer timed calls (at least one) once a cell's have taken this long (default 30)",
    )
    bench.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    bench.add_argument(
        "--plot", metavar="FILE", help="also draw the rates (needs matplotlib: the plot extra)"
    )
    bench.add_argument("--length", type=int, help="tokens T of the one shape (default 2048)")
    bench.add_argument("--heads", type=int, help="heads H of the one shape (default 4)")
    bench.add_argument("--dim", type=int, help="K = V of the one shape (default 128)")
    train = sub.add_parser(
        "train-demo",
        help="train a DeltaNet on parity in NumPy: beta in (0, 2) learns it, (0, 1) does not",
        description=(
            "Train a one-layer DeltaNet (fastweights.delta_rule with unit keys) on the parity "
            "of bit strings with NumPy alone: the model's layers by hand, the delta rule's "
            "gradient by fastweights.vjp, Adam. Write strength beta in (0, 2) (negative "
            "eigenvalues of I - beta k k^T) against beta in (0, 1), same model, data and "
            "budget; trained on every length up to L, tested on lengths 2L to 4L (Grazzi et "
            "al., 2024). A progress bar per run goes to stderr."
        ),
    )
    train.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
        help="seeds, one run per setting each (default 0 1 2)",
    )  # fmt: skip
    train.add_argument("--steps", type=int, help="Adam steps per run (default 500; 40 quick)")
    train.add_argument("--length", type=int, help="training length L (default 16; 6 quick)")
    train.add_argument(
        "--hidden", type=int, help="a tanh layer of this width in the readout (default 0: linear)"
    )
    train.add_argument(
        "--out", metavar="FOLDER",
        help="write train_demo.json and (with matplotlib) train_demo.png into this folder",
    )  # fmt: skip
    train.add_argument("--quick", action="store_true", help="a tiny budget, for tests")
    sub.add_parser(
        "gpu-check",
        help="on a machine with an NVIDIA GPU: the gpu tests and a decode/prefill table beside "
        "fla, in under 6 minutes (--out DIR: JSON and Markdown; --small: under the CPU "
        "emulator; gpu-check --help for the options)",
        add_help=False,
    )
    cache = sub.add_parser(
        "cache",
        help="where compiled kernels are cached, and their size",
        description=(
            "Show the per-user folder of compiled numba kernels (FASTWEIGHTS_CACHE_DIR, else "
            "the platform's cache directory) and the CUDA emulator's modules (its cudasim "
            "folder, or CUDASIM_CACHE_DIR), with their sizes, or empty both."
        ),
    )
    cache.add_argument("--clear", action="store_true", help="delete every cached kernel")
    warm = sub.add_parser(
        "warmup",
        help="compile the kernels ahead of use, with a progress bar",
        description=(
            "Compile (or load from the cache) the kernels that calls of the given ops, dtypes "
            "and forms need, so that first calls do not wait for the JIT compiler."
        ),
    )
    warm.add_argument("--ops", nargs="+", metavar="OP", help="ops (default every op)")
    warm.add_argument(
        "--dtypes", nargs="+", metavar="DTYPE", help="float16, float32, float64 (default 32, 64)"
    )
    warm.add_argument(
        "--forms",
        nargs="+",
        metavar="FORM",
        help="recurrent, chunk, parallel, step (default the backend's forms and step)",
    )
    warm.add_argument("--backend", default="numba", help="backend (default numba)")
    plan = sub.add_parser(
        "plan",
        help="which backend, form, chunk size and threads a call would run with, and why",
        description=(
            "Describe, without computing it, how a call of OP on NumPy arrays of the given "
            "sizes would run: the plan fastweights.plan returns and form='auto' follows."
        ),
    )
    plan.add_argument("op", help="the op, e.g. gla, rwkv7 (see `python -m fastweights info`)")
    plan.add_argument(
        "--size", type=_plan_size, default=(1, 2048, 4, 128, 128), metavar="B,T,H,K[,V]",
        help="batch, tokens, heads, key size and value size (default 1,2048,4,128,128)",
    )  # fmt: skip
    plan.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    plan.add_argument("--form", default="auto", help="auto (default), recurrent, chunk, parallel")
    plan.add_argument("--chunk-size", type=int, default=64, help="chunk_size (default 64)")
    plan.add_argument("--backend", help="a backend name (default: the automatic choice)")
    plan.add_argument("--step", action="store_true", help="one decoding step of B sequences")
    return parser


def _plan_size(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,T,H,K[,V], got {text!r}") from None
    if len(sizes) not in (4, 5) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected 4 or 5 positive sizes, got {text!r}")
    return sizes if len(sizes) == 5 else (*sizes, sizes[3])


def _run_plan(args: argparse.Namespace) -> int:
    import numpy as np

    import fastweights
    import fastweights.step
    from fastweights.testing import Call, random_call

    if args.op not in fastweights.backends.RULES:
        known = ", ".join(sorted(fastweights.backends.RULES))
        print(f"plan: unknown op {args.op!r}; known ops: {known}", file=sys.stderr)
        return 2
    B, T, H, K, V = args.size
    call = random_call(
        args.op, batch=B, length=1 if args.step else T, heads=H, key_dim=K, value_dim=V
    ).cast(np.dtype(args.dtype))
    rule = fastweights.backends.RULES[args.op]
    try:
        if args.step:
            from fastweights._bench import step_pool
            from fastweights.testing._cases import token_arrays

            token = Call(args.op, token_arrays(call, 0), {})
            positional, keywords = token.arguments(step=True)
            pool = step_pool(args.op, B, H, K, V)
            pool = (
                tuple(x.astype(args.dtype) for x in pool)
                if isinstance(pool, tuple)
                else (pool.astype(args.dtype))
            )
            keywords = {k: v for k, v in keywords.items() if k in ("scale", "use_qk_l2norm")}
            p = fastweights.plan(
                getattr(fastweights.step, args.op), *positional, pool, **keywords,
                backend=args.backend,
            )  # fmt: skip
        else:
            positional, keywords = call.arguments()
            keywords.pop("initial_state", None)
            if "chunk_size" in rule.common:
                keywords["chunk_size"] = args.chunk_size
            p = fastweights.plan(
                getattr(fastweights, args.op), *positional, **keywords, form=args.form,
                backend=args.backend,
            )  # fmt: skip
    except (TypeError, ValueError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 2
    what = "one step of" if args.step else "a call of"
    print(f"{what} {args.op} (runs as {p.op}), B={B} T={T} H={H} K={K} V={V} {args.dtype}")
    print(f"  backend    {p.backend}")
    for name, why in p.passed_over.items():
        print(f"             not {name}: {why}")
    print(f"  form       {p.form}: {p.why}")
    for name, value in p.params.items():
        print(f"  {name:<10} {value}")
    if p.gradient:
        print(f"  gradient   {p.gradient}")
    return 0


def _names(values: Sequence[str] | None) -> list[str] | None:
    """``["a,b", "c"]`` as ``["a", "b", "c"]``."""
    if values is None:
        return None
    return [n for v in values for n in v.split(",") if n]


def _run_bench(args: argparse.Namespace) -> int:
    import os

    from fastweights import _bench
    from fastweights.backends import list_backends

    def fail(message: str) -> int:
        print(f"bench: {message}", file=sys.stderr)
        return 2

    ops = _names(args.ops) or list(_bench.OPS)
    unknown = [op for op in ops if op not in _bench.OPS]
    if unknown:
        return fail(f"unknown op {unknown[0]!r} in --ops; known ops: {', '.join(_bench.OPS)}")
    registered = [b.name for b in list_backends()]
    backends = _names(args.backends)
    for name in backends or ():
        if name not in registered:
            return fail(f"unknown backend {name!r} in --backends; known: {', '.join(registered)}")
    one = (args.length, args.heads, args.dim)
    if args.shapes is not None and any(x is not None for x in one):
        return fail("give either --shapes or --length/--heads/--dim, not both")
    if any(x is not None and x < 1 for x in one):
        return fail("--length, --heads and --dim must be at least 1")
    length, heads, dim = (d if x is None else x for x, d in zip(one, (2048, 4, 128), strict=True))
    shapes = args.shapes or [(1, length, heads, dim, dim)]
    if args.repeats < 1:
        return fail(f"--repeats must be at least 1, got {args.repeats}")
    if not args.max_time > 0:
        return fail(f"--max-time must be positive, got {args.max_time}")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            return fail(f"{option} {path}: the folder {folder} does not exist")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return fail(
                "--plot needs matplotlib, which is not installed: pip install matplotlib "
                '(or pip install ".[plot]" in a checkout of the repository)'
            )
    return _bench.main(
        ops, backends, shapes, args.repeats, args.json, args.plot, max_time=args.max_time
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "gpu-check":  # gpu-check parses its own options
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with _show_logs():
        return _run(args, extra)


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.command == "cache":
        return _run_cache(args.clear)
    if args.command == "warmup":
        from fastweights._kernel_cache import warmup

        try:
            done = warmup(args.ops, args.dtypes, args.forms, backend=args.backend, progress=True)
        except (TypeError, ValueError) as exc:
            print(f"warmup: {exc}", file=sys.stderr)
            return 2
        print(f"{len(done)} calls, {sum(w.seconds for w in done):.1f} s")
        return 0
    if args.command == "plan":
        return _run_plan(args)
    if args.command == "info":
        from fastweights._cli_info import run_info

        return run_info()
    if args.command == "demo":
        from fastweights._demo import run_demo

        if args.repeats < 1 or (args.trials is not None and args.trials < 1):
            print("--repeats and --trials must be at least 1", file=sys.stderr)
            return 2
        run_demo(
            seed=args.seed,
            quick=args.quick,
            plot=None if args.no_plot else args.plot,
            bench=not args.no_bench,
            trials=args.trials,
            backends=args.backend,
            size=args.size,
            repeats=args.repeats,
        )
        return 0
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "train-demo":
        from fastweights._train_demo import run_train_demo

        for option in ("steps", "length"):
            if getattr(args, option) is not None and getattr(args, option) < 1:
                print(f"train-demo: --{option} must be at least 1", file=sys.stderr)
                return 2
        if args.hidden is not None and args.hidden < 0:
            print("train-demo: --hidden must be at least 0", file=sys.stderr)
            return 2
        run_train_demo(
            seeds=args.seeds, steps=args.steps, length=args.length, hidden=args.hidden,
            out=args.out, quick=args.quick,
        )  # fmt: skip
        return 0
    if args.command == "gpu-check":
        from fastweights.backends.cupy._gpu_check import main as gpu_check

        return gpu_check(extra)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse forbids this


if __name__ == "__main__":
    sys.exit(main())
