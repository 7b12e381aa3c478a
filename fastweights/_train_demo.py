"""``python -m fastweights train-demo``: train a DeltaNet on parity with NumPy alone.

A one-layer DeltaNet learns the parity of a bit string when its write strength may reach 2
(``beta`` in ``(0, 2)``: the state transition ``I - beta k k^T`` of a unit key has the
eigenvalue ``1 - beta`` in ``(-1, 1)`` along ``k``, a reflection at ``beta = 2``), and does not
when ``beta`` stays in ``(0, 1)`` (eigenvalues in ``(0, 1)``), as Grazzi et al. (2024),
"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues", predict. Everything is
NumPy: the model's own layers have hand-written backward passes, the delta rule's comes from
:func:`fastweights.vjp`, and the optimiser is a few lines of Adam. No autodiff framework.

The model (per token ``t``, bits ``x_t`` in ``{0, 1}``)::

    q_t, k_t, v_t, z_t = Wq[x_t], Wk[x_t], Wv[x_t], wb[x_t]   # linear maps of a one-hot bit
    beta_t = beta_max * sigmoid(z_t)                          # beta_max = 2 or 1
    o = fastweights.delta_rule(q, k, v, beta, scale=1, use_qk_l2norm=True, initial_state=S0)
    logit_t = w . o_t + b     # parity of x_1 .. x_t (hidden > 0: w . tanh(W1 o_t + b1) + b)

trained with the logistic loss (labels smoothed to 0.05 and 0.95) on the parity of every
prefix of strings of length ``L`` (so every length up to ``L``), and tested on the parity of
whole strings of lengths ``2L`` to ``4L``. Both settings get the same model, data and budget.
See docs/guides/training-in-numpy.md for the math and the measured result.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TextIO

import numpy as np

import fastweights

__all__ = [
    "Config",
    "RunResult",
    "TrainDemoResult",
    "init_params",
    "loss_and_grads",
    "parity_batch",
    "plot_results",
    "predict",
    "run_train_demo",
    "train",
]

Params = dict[str, np.ndarray]

#: The two settings: beta = BETA_MAX * sigmoid(...), so beta in (0, 2) and in (0, 1).
BETA_MAX = (2.0, 1.0)


@dataclass(frozen=True)
class Config:
    """Model size and training budget (the same for both settings of ``beta_max``)."""

    length: int = 16  #: training strings have this length: prefixes give every length up to it
    steps: int = 500  #: Adam steps
    batch: int = 32  #: strings per step
    heads: int = 1  #: heads of the delta rule
    dim: int = 8  #: K = V
    hidden: int = 0  #: units of a tanh hidden layer in the readout (0: a linear readout)
    lr: float = 0.02  #: Adam's step size (cosine decay to a tenth of it)
    clip: float = 1.0  #: the gradient's global norm is clipped to this
    smoothing: float = 0.1  #: label smoothing: targets smoothing / 2 and 1 - smoothing / 2
    test_strings: int = 512  #: test strings, lengths 2L to 4L
    eval_every: int = 20  #: test accuracy is recorded this often (steps)


@dataclass
class RunResult:
    """One training run: a setting of ``beta_max`` and a seed."""

    beta_max: float
    seed: int
    test_accuracy: float  #: whole-string parity, lengths 2L .. 4L, after the last step
    train_accuracy: float  #: prefix parity on fresh strings of length L, after the last step
    seconds: float
    losses: list[float] = field(default_factory=list)  #: training loss per step
    curve: list[tuple[int, float]] = field(default_factory=list)  #: (step, test accuracy)
    beta_one: float = float("nan")  #: learnt beta on a 1 bit (head 0)
    beta_zero: float = float("nan")  #: learnt beta on a 0 bit (head 0)
    by_length: list[float] = field(default_factory=list)  #: accuracy at lengths 1 .. 4L
    params: dict[str, Any] = field(default_factory=dict)  #: the trained parameters, as lists


@dataclass
class TrainDemoResult:
    """Every run, with the configuration and the machine."""

    config: Config
    runs: list[RunResult]
    machine: str
    seconds: float

    def accuracies(self, beta_max: float) -> list[float]:
        return [r.test_accuracy for r in self.runs if r.beta_max == beta_max]

    def claim(self) -> bool:
        """Whether the claim reproduces: every beta_max = 2 run >= 95 % test accuracy and
        every beta_max = 1 run <= 60 %."""
        two, one = self.accuracies(2.0), self.accuracies(1.0)
        return bool(two and one and min(two) >= 0.95 and max(one) <= 0.60)

    def to_json(self) -> dict[str, Any]:
        return {
            "task": "parity",
            "config": asdict(self.config),
            "machine": self.machine,
            "seconds": self.seconds,
            "claim_reproduced": self.claim(),
            "runs": [asdict(r) for r in self.runs],
        }


# ---------------------------------------------------------------------------------------------
# data


def parity_batch(rng: np.random.Generator, batch: int, length: int) -> tuple[np.ndarray, ...]:
    """Random bit strings ``[batch, length]`` (int64) and the parity of every prefix."""
    bits = rng.integers(0, 2, size=(batch, length))
    return bits, np.cumsum(bits, axis=1) % 2


# ---------------------------------------------------------------------------------------------
# model


def init_params(rng: np.random.Generator, config: Config) -> Params:
    """Random parameters: per bit value, the rows of ``q``, ``k``, ``v`` and the write logit
    (``Wq, Wk, Wv: [2, H, D]``, ``wb: [2, H]``, i.e. linear maps of a one-hot bit), the initial
    state ``S0: [H, D, D]`` and the readout (``w``, ``b``; with ``hidden > 0`` also ``W1``,
    ``b1`` of a tanh layer before it)."""
    H, D, M = config.heads, config.dim, config.hidden
    params = {
        "Wq": rng.standard_normal((2, H, D)),
        "Wk": rng.standard_normal((2, H, D)),
        "Wv": rng.standard_normal((2, H, D)),
        "wb": np.zeros((2, H)),  # beta = beta_max / 2 on both bits at first
        "S0": np.zeros((H, D, D)),
    }
    if M:
        params["W1"] = rng.standard_normal((H * D, M)) / np.sqrt(H * D)
        params["b1"] = np.zeros(M)
    width = M or H * D
    params["w"] = rng.standard_normal(width) / np.sqrt(width)
    params["b"] = np.zeros(())
    return params


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _delta_inputs(params: Params, bits: np.ndarray, beta_max: float) -> tuple[np.ndarray, ...]:
    """``q, k, v [B, T, H, D]``, ``beta [B, T, H]``, ``sigmoid(z)`` and ``S0 [B, H, D, D]``."""
    q, k, v = params["Wq"][bits], params["Wk"][bits], params["Wv"][bits]
    s = _sigmoid(params["wb"][bits])
    S0 = np.broadcast_to(params["S0"], (bits.shape[0], *params["S0"].shape))
    return q, k, v, beta_max * s, s, np.ascontiguousarray(S0)


def _readout(params: Params, o: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The readout's input ``x [B, T, H V]``, its last hidden layer ``h`` and the logits."""
    x = o.reshape(*o.shape[:2], -1)
    h = np.tanh(x @ params["W1"] + params["b1"]) if "W1" in params else x
    return x, h, h @ params["w"] + params["b"]


def predict(params: Params, bits: np.ndarray, beta_max: float) -> np.ndarray:
    """The logits of "``x_1 .. x_t`` has odd parity", ``[B, T]``, for bits ``[B, T]``."""
    q, k, v, beta, _, S0 = _delta_inputs(params, bits, beta_max)
    o, _ = fastweights.delta_rule(q, k, v, beta, scale=1.0, use_qk_l2norm=True, initial_state=S0)
    return _readout(params, o)[2]


def loss_and_grads(
    params: Params, bits: np.ndarray, parity: np.ndarray, beta_max: float, smoothing: float = 0.0
) -> tuple[float, Params, np.ndarray]:
    """The mean logistic loss over every position (labels ``parity`` in ``{0, 1}``, smoothed
    to ``smoothing / 2`` and ``1 - smoothing / 2``), its gradient with respect to every
    parameter (the readout and the tables by hand, the delta rule by :func:`fastweights.vjp`)
    and the logits."""
    B, T = bits.shape
    q, k, v, beta, s, S0 = _delta_inputs(params, bits, beta_max)
    o, _, pullback = fastweights.vjp(
        fastweights.delta_rule, q, k, v, beta, scale=1.0, use_qk_l2norm=True, initial_state=S0
    )
    x, h, logit = _readout(params, o)
    y = smoothing / 2 + (1.0 - smoothing) * parity
    loss = float(np.mean(np.logaddexp(0.0, logit) - y * logit))  # softplus(l) - y l
    dlogit = (_sigmoid(logit) - y) / (B * T)
    grads: Params = {"w": np.einsum("btm,bt->m", h, dlogit), "b": np.asarray(dlogit.sum())}
    dh = dlogit[..., None] * params["w"]
    if "W1" in params:
        da = dh * (1.0 - h * h)  # through tanh
        grads["W1"] = np.einsum("btd,btm->dm", x, da)
        grads["b1"] = da.sum(axis=(0, 1))
        dh = da @ params["W1"].T
    g = pullback(dh.reshape(o.shape), None)  # the delta rule's backward
    onehot = np.stack([bits == 0, bits == 1], axis=-1).astype(o.dtype)  # [B, T, 2]
    for name in ("q", "k", "v"):  # the adjoint of a table lookup: a sum per bit value
        grads["W" + name] = np.einsum("btc,bthd->chd", onehot, g[name])
    grads["wb"] = np.einsum("btc,bth->ch", onehot, g["beta"] * beta_max * s * (1.0 - s))
    grads["S0"] = g["initial_state"].sum(axis=0)  # S0 is shared by the batch
    return loss, grads, logit


class Adam:
    """Adam (Kingma and Ba) with global-norm clipping, on a dict of NumPy arrays."""

    def __init__(
        self, params: Params, lr: float, clip: float, b1: float = 0.9, b2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:  # fmt: skip
        self.lr, self.clip, self.b1, self.b2, self.eps = lr, clip, b1, b2, eps
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}
        self.t = 0

    def step(self, params: Params, grads: Params, lr: float | None = None) -> Params:
        lr = self.lr if lr is None else lr
        norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
        c = min(1.0, self.clip / (norm + 1e-12))
        self.t += 1
        out: Params = {}
        for n, p in params.items():
            g = grads[n] * c
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * g
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * g * g
            mh = self.m[n] / (1 - self.b1**self.t)
            vh = self.v[n] / (1 - self.b2**self.t)
            out[n] = p - lr * mh / (np.sqrt(vh) + self.eps)
        return out


# ---------------------------------------------------------------------------------------------
# training


def _accuracy(params: Params, bits: np.ndarray, parity: np.ndarray, beta_max: float, lo: int):
    """Accuracy of the parity of the prefixes of lengths ``lo + 1 .. T``: a causal model's
    prediction at position ``n - 1`` of a longer string is its prediction for the string of
    its first ``n`` bits, so this is the whole-string accuracy over those lengths."""
    logit = predict(params, bits, beta_max)[:, lo:]
    return float(np.mean((logit > 0) == (parity[:, lo:] == 1)))


def train(
    config: Config,
    beta_max: float,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train one model with ``beta`` in ``(0, beta_max)``; ``progress(step, loss)`` is called
    after each step. The training strings, the test strings and the initial parameters
    depend on ``seed`` only: both settings of a seed see the same data from the same start."""
    L = config.length
    params = init_params(np.random.default_rng([seed, 0]), config)
    data = np.random.default_rng([seed, 1])
    test_bits, test_parity = parity_batch(
        np.random.default_rng([seed, 2]), config.test_strings, 4 * L
    )
    opt = Adam(params, config.lr, config.clip)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        bits, parity = parity_batch(data, config.batch, L)
        loss, grads, _ = loss_and_grads(params, bits, parity, beta_max, config.smoothing)
        # cosine decay from lr to lr / 10
        lr = config.lr * (0.55 + 0.45 * np.cos(np.pi * (step - 1) / config.steps))
        params = opt.step(params, grads, lr)
        losses.append(loss)
        if step % config.eval_every == 0 or step == config.steps:
            curve.append((step, _accuracy(params, test_bits, test_parity, beta_max, 2 * L - 1)))
        if progress is not None:
            progress(step, loss)
    seconds = time.perf_counter() - start
    bits, parity = parity_batch(np.random.default_rng([seed, 3]), config.test_strings, L)
    betas = beta_max * _sigmoid(params["wb"][:, 0])
    logit = predict(params, test_bits, beta_max)
    return RunResult(
        beta_max=beta_max,
        seed=seed,
        test_accuracy=curve[-1][1],
        train_accuracy=_accuracy(params, bits, parity, beta_max, 0),
        seconds=seconds,
        losses=losses,
        curve=curve,
        beta_zero=float(betas[0]),
        beta_one=float(betas[1]),
        by_length=[float(a) for a in np.mean((logit > 0) == (test_parity == 1), axis=0)],
        params={n: p.tolist() for n, p in params.items()},
    )


class _Bar:
    """A progress bar on a stream: redrawn in place on a terminal, a line per quarter
    elsewhere (logs)."""

    WIDTH = 24

    def __init__(self, total: int, label: str, stream: TextIO) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.start = time.perf_counter()
        self.shown = -1
        try:
            self.tty = bool(stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False

    def __call__(self, done: int, loss: float) -> None:
        quarter = 4 * done // max(self.total, 1)
        if not self.tty and quarter == self.shown:
            return
        self.shown = quarter
        fill = self.WIDTH * done // max(self.total, 1)
        bar = "#" * fill + "-" * (self.WIDTH - fill)
        elapsed = time.perf_counter() - self.start
        text = f"{self.label} [{bar}] {done}/{self.total} loss {loss:.3f} {elapsed:.0f} s"
        end = "\n" if done == self.total or not self.tty else ""
        self.stream.write(("\r" + text + "\x1b[K" if self.tty else text) + end)
        self.stream.flush()


def _machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def run_train_demo(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    length: int | None = None,
    hidden: int | None = None,
    out: str | None = None,
    quick: bool = False,
    stream: TextIO | None = None,
    progress: bool = True,
) -> TrainDemoResult:
    """Train ``beta`` in ``(0, 2)`` and in ``(0, 1)`` for every seed, print what each run
    reached and whether the claim reproduces, and write ``train_demo.json`` (and
    ``train_demo.png`` when matplotlib is installed) into the folder ``out`` if given.

    ``quick`` is a tiny budget for tests (strings of 6 bits, 40 steps); ``steps``, ``length``
    and ``hidden`` override the budget's. A progress bar per run goes to stderr.
    """
    out_stream = sys.stdout if stream is None else stream
    base = Config(steps=40, length=6, test_strings=64, eval_every=10) if quick else Config()
    changes = {"steps": steps, "length": length, "hidden": hidden}
    config = replace(base, **{n: x for n, x in changes.items() if x is not None})
    L = config.length
    readout = f"a tanh layer of {config.hidden}" if config.hidden else "linear"
    print(
        f"parity: train on every length up to {L}, test on lengths {2 * L} to {4 * L}; "
        f"per setting and seed {config.steps} Adam steps of {config.batch} strings; "
        f"delta rule K = V = {config.dim}, {config.heads} head(s), readout {readout}",
        file=out_stream,
    )
    runs = []
    start = time.perf_counter()
    for beta_max in BETA_MAX:
        for seed in seeds:
            label = f"beta in (0, {beta_max:g}), seed {seed}"
            bar = _Bar(config.steps, label, sys.stderr) if progress else None
            run = train(config, beta_max, seed, progress=bar)
            runs.append(run)
            print(
                f"{label}: test accuracy {run.test_accuracy:.1%}, train {run.train_accuracy:.1%}; "
                f"learnt beta {run.beta_zero:.3f} on a 0 bit, {run.beta_one:.3f} on a 1 bit; "
                f"{run.seconds:.1f} s",
                file=out_stream,
            )
    result = TrainDemoResult(config, runs, _machine(), time.perf_counter() - start)
    for beta_max in BETA_MAX:
        accs = ", ".join(f"{a:.1%}" for a in result.accuracies(beta_max))
        print(f"beta in (0, {beta_max:g}): test accuracy per seed {accs}", file=out_stream)
    verdict = "reproduces" if result.claim() else "does NOT reproduce"
    print(
        f"the claim (beta in (0, 2) >= 95 % and beta in (0, 1) <= 60 % on every seed) "
        f"{verdict}; {result.seconds:.1f} s in all on {result.machine}",
        file=out_stream,
    )
    if out is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "train_demo.json")
        with open(path, "w") as f:
            json.dump(result.to_json(), f, indent=1)
        print(f"wrote {path}", file=out_stream)
        png = plot_results(result, os.path.join(out, "train_demo.png"))
        if png is None:
            print("no plot: matplotlib is not installed (pip install matplotlib)", file=out_stream)
        else:
            print(f"wrote {png}", file=out_stream)
    return result


def plot_results(result: TrainDemoResult, path: str) -> str | None:
    """Draw test accuracy against training steps and, after training, accuracy against the
    string's length, one line per run, into ``path`` (no pyplot, no display needed).
    Returns ``path``, or None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    L = result.config.length
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    curve, length = fig.subplots(1, 2)
    colours = {2.0: "#1f77b4", 1.0: "#d62728"}
    seen: set[float] = set()
    for run in result.runs:
        label = None if run.beta_max in seen else f"beta in (0, {run.beta_max:g})"
        seen.add(run.beta_max)
        colour = colours.get(run.beta_max, "k")
        steps, acc = zip(*run.curve, strict=True)
        curve.plot(steps, acc, color=colour, alpha=0.8, label=label)
        n = np.arange(1, len(run.by_length) + 1)
        length.plot(n, run.by_length, color=colour, alpha=0.8, label=label)
    curve.set_xlabel("Adam step")
    curve.set_ylabel(f"test accuracy, lengths {2 * L} to {4 * L}")
    length.axvspan(0.5, L + 0.5, color="0.9", lw=0)
    length.text(L / 2 + 0.5, 0.33, "trained", ha="center", color="0.4")
    length.axvspan(2 * L - 0.5, 4 * L + 0.5, color="#fff3d6", lw=0)
    length.text(3 * L, 0.33, "tested", ha="center", color="0.4")
    length.set_xlabel("length of the bit string")
    length.set_ylabel("accuracy after training")
    for ax in (curve, length):
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0.28, 1.03)
        ax.legend(loc="center right", fontsize="small")
    seeds = len({r.seed for r in result.runs})
    fig.suptitle(
        f"One-layer DeltaNet on parity (unit keys), {seeds} seeds per setting", fontsize="medium"
    )
    fig.savefig(path, dpi=90)
    return path
