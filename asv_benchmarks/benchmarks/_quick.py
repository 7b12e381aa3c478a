"""Quick runs: small inputs when the sizes would only slow a check down.

``SMOKE`` is true under ``asv run --quick`` (each benchmark runs once; asv saves no results),
under ``FASTWEIGHTS_ASV_SMOKE=1`` (CI's dry run) and under ``FASTWEIGHTS_ASV_QUICK=1``;
``FASTWEIGHTS_ASV_QUICK=0`` keeps the full sizes under ``--quick``. asv runs every benchmark
in a process of its own and tells it nothing about ``--quick``, so the switch is read from the
environment or, on Linux, from the command line of the ``asv`` process above this one. Then
the long inputs are left out (T = 512 only, K = V = 64 only, B = 1 decoding, one repeat
inside ``track_*``) and the benchmarks that start processes use short runs. A real
``asv run`` keeps every size.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPEAT", "SMOKE"]

_ASV_RUN_COMMANDS = {"run", "continuous", "dev"}


def _asv_quick_above(levels: int = 8) -> bool:
    """Whether an ``asv run --quick`` (or ``-q``) process is an ancestor of this one."""
    pid = os.getppid()
    for _ in range(levels):
        if pid <= 1:
            return False
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # not Linux, or the process is gone
            return False
        is_asv = any(Path(a).name == "asv" for a in args[:3]) or "asv" in args[1:3]
        run = _ASV_RUN_COMMANDS.intersection(args)
        if is_asv and run and {"--quick", "-q"}.intersection(args):
            return True
        # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces.
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _quick() -> bool:
    forced = os.environ.get("FASTWEIGHTS_ASV_QUICK", "").strip().lower()
    if os.environ.get("FASTWEIGHTS_ASV_SMOKE"):
        return True
    if forced:
        return forced not in ("0", "false", "no", "off")
    return _asv_quick_above()


SMOKE = _quick()
"""Small inputs: ``asv run --quick``, ``FASTWEIGHTS_ASV_SMOKE`` or ``FASTWEIGHTS_ASV_QUICK``."""

REPEAT = 1 if SMOKE else 3
"""Calls of the best-of timing inside ``track_*`` benchmarks."""
