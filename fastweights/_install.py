"""How to install fastweights and its extras, for every hint the library prints.

No release of fastweights is published on PyPI yet, so ``pip install "fastweights[numba]"``
would fail (or install someone else's package of that name): every hint says to install from a
checkout of the repository instead. When a release exists, :data:`PUBLISHED` becomes True (see
docs/guides/releasing.md) and the hints name the published package.
"""

from __future__ import annotations

__all__ = ["PUBLISHED", "install_hint"]

PUBLISHED = False
"""Whether a release of fastweights is on PyPI."""


def install_hint(*extras: str) -> str:
    """The command that installs fastweights with one of ``extras`` (none: the library alone).

    Parameters
    ----------
    *extras : str
        Names of extras in ``pyproject.toml``, alternatives to each other (``"cuda12"``,
        ``"cuda13"``).

    Returns
    -------
    str
        A command for a checkout of the repository while no release is published.

    Examples
    --------
    >>> install_hint("numba")
    'pip install ".[numba]" in a checkout of the repository; fastweights is not on PyPI yet'
    >>> install_hint("cuda12", "cuda13").split(" in a ")[0]
    'pip install ".[cuda12]" or ".[cuda13]"'
    """
    name = "fastweights" if PUBLISHED else "."
    targets = [f'"{name}[{e}]"' for e in extras] or [f'"{name}"']
    command = "pip install " + " or ".join(targets)
    if PUBLISHED:
        return command
    return f"{command} in a checkout of the repository; fastweights is not on PyPI yet"
