"""Sphinx configuration of the fastweights documentation.

Build (warnings are errors, as in CI)::

    pip install ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W --keep-going -b doctest docs docs/_build/doctest

Pages are Markdown (MyST). Their examples are ``{doctest}`` blocks, run by the doctest builder
together with every ``>>>`` example of the API reference's docstrings.

Math works offline. The site must read the same opened from disk with no network (a wheel's
docs, an air-gapped cluster), so the math renderer ships with it instead of coming from a CDN
(Sphinx's default ``mathjax_path`` is ``cdn.jsdelivr.net/npm/mathjax@4``: without a network every
rule page shows raw ``\\[\\begin{split}...``). We use that same MathJax 4, from the npm registry,
pinned with its lock file in ``docs/_mathjax/``, installed once with::

    npm ci --prefix docs/_mathjax

and copied by :func:`_copy_mathjax` into ``_static/mathjax`` of every HTML build, with
``mathjax_path`` pointing there. Why this and not the alternatives:

- the npm package is the very one the CDN serves (and MathJax's own docs install it so for
  offline use), so the pages render exactly as with Sphinx's default, minus the network;
- vendoring MathJax into git: megabytes of minified third-party code in the history, updated by
  hand; the lock file pins the same bytes (with their integrity hashes) in 1 kB;
- ``sphinx-mathjax-offline`` (PyPI): one 2022 release, MathJax 3.2.2, 24 MB unpacked, unmaintained;
  ``sphinxcontrib-katex``: maintained, but loads KaTeX from a CDN too unless its files are fetched
  from npm anyway, and KaTeX renders a subset of LaTeX, while the pages are written and checked
  against MathJax;
- the SVG output (``tex-mml-svg.js``), not the CHTML default: it needs no web fonts, which
  Firefox refuses to load from ``file://`` pages; glyphs come as scripts, which every browser loads.

An HTML build without the npm files runs that command itself (the registry is needed then, as
for ``pip install``) and stops at once, naming it, when npm is missing or fails: it never
falls back to the CDN silently. ``.ci/check-docs-offline`` opens the built pages in
headless Chromium with the network cut and fails on any raw LaTeX left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The docs describe the installed package; from a bare checkout, use the source tree.
try:
    import fastweights
except ImportError:  # pragma: no cover - the docs extra installs the package
    sys.path.insert(0, str(ROOT))
    import fastweights

os.environ.setdefault("MPLBACKEND", "Agg")

project = "fastweights"
author = "the fastweights developers"
copyright = "2026, the fastweights developers"
version = release = fastweights.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_mathjax", "examples/**/README.md", "examples/**/.pytest_cache"]
nitpicky = False

# -- MyST ------------------------------------------------------------------------------------
myst_enable_extensions = ["amsmath", "dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The pages link to files of the repository (benchmarks, kernels): not documents.
myst_url_schemes = ["http", "https", "mailto"]

# -- API reference ---------------------------------------------------------------------------
autosummary_generate = True
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# Every documented object needs an Examples section (EX01) and a docstring (GL08).
numpydoc_validation_checks = {"EX01", "GL08"}
# Members of the documented classes are covered by their class's example.
numpydoc_validation_exclude = {
    r"\.__init__$",
    r"^fastweights\.backends\.(Backend|BackendInfo|Call|Rule|Arg)\.",
    r"^fastweights\.backends\.(RULES|OPS)$",  # data: the Rule example shows them
    r"^fastweights\.testing\.(Call|GoldenCase)\.",
}

# -- doctest builder -------------------------------------------------------------------------
doctest_global_setup = """
import numpy as np
import fastweights
import fastweights as fw
"""
doctest_default_flags = (
    __import__("doctest").ELLIPSIS
    | __import__("doctest").NORMALIZE_WHITESPACE
    | __import__("doctest").DONT_ACCEPT_TRUE_FOR_1
)

# -- plots (the tutorial's figures are computed at build time) -------------------------------
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_pre_code = "import numpy as np\nimport matplotlib.pyplot as plt\nimport fastweights as fw\n"
plot_rcparams = {"figure.figsize": (7.0, 3.2), "figure.dpi": 110}

# -- HTML ------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"fastweights {release}"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_context = {"default_mode": "light"}
html_show_sourcelink = False

# -- math, offline (see the module docstring) ------------------------------------------------
MATHJAX_NPM = Path(__file__).resolve().parent / "_mathjax" / "node_modules"
# What the pages load, relative to the build's _static/: the MathJax component directory, and
# beside it the font package (tex-mml-svg.js looks for it at [mathjax]/../@mathjax by the
# loader path below).
mathjax_path = "mathjax/tex-mml-svg.js"
mathjax4_config = {
    "loader": {"paths": {"fonts": "[mathjax]/../mathjax-fonts"}},
    # The speech and braille generators run in a web worker, which browsers refuse on file://
    # pages; the rendered math, its menu and the assistive MathML stay.
    "options": {"menuOptions": {"settings": {"enrich": False, "speech": False, "braille": False}}},
}
_MATHJAX_COPIES = {  # node_modules path -> _static path
    "mathjax": "mathjax",
    "@mathjax/mathjax-newcm-font": "mathjax-fonts/mathjax-newcm-font",
}
# Parts of the npm packages no page loads (other outputs' bundles, the font's module sources).
_MATHJAX_SKIP = shutil.ignore_patterns(
    "*.md",
    "*.mjs",
    "*.cjs",
    "*.mts",
    "cjs",
    "mjs",
    "tsconfig*",
    "def",
    "examples",
    "chtml",
    "chtml.js",
    "*chtml*.js",
    "mml-svg*.js",
    "tex-svg*.js",
    "tex-mml-svg-*.js",
    "node-main*",
)


def _mathjax_installed() -> bool:
    return (MATHJAX_NPM / "mathjax" / "tex-mml-svg.js").is_file() and (
        MATHJAX_NPM / "@mathjax" / "mathjax-newcm-font" / "svg.js"
    ).is_file()


def _check_mathjax(app: Any) -> None:
    """Before an HTML build: the pinned MathJax is there, or ``npm ci`` installs it, or we stop."""
    if app.builder.format != "html" or _mathjax_installed():
        return
    from sphinx.errors import ConfigError
    from sphinx.util import logging

    command = ["npm", "ci", "--prefix", str(MATHJAX_NPM.parent), "--no-audit", "--no-fund"]
    if shutil.which("npm"):
        logging.getLogger(__name__).info("MathJax missing; running %s", " ".join(command))
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode == 0 and _mathjax_installed():
            return
        detail = f"`{' '.join(command)}` failed ({run.returncode}): {run.stderr[-500:]}"
    else:
        detail = "npm is not installed (Debian: apt-get install npm)"
    raise ConfigError(
        f"MathJax is not installed under {MATHJAX_NPM}: the HTML docs ship it so that math renders "
        f"offline; {detail}. Install it with: npm ci --prefix docs/_mathjax"
    )


def _copy_mathjax(app: Any, exception: BaseException | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    for source, target in _MATHJAX_COPIES.items():
        shutil.copytree(
            MATHJAX_NPM / source, static / target, ignore=_MATHJAX_SKIP, dirs_exist_ok=True
        )


def setup(app: Any) -> dict[str, bool]:
    app.connect("builder-inited", _check_mathjax)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
