"""Sphinx configuration of the fastweights documentation.

Build (warnings are errors, as in CI)::

    pip install ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W --keep-going -b doctest docs docs/_build/doctest

Pages are Markdown (MyST). Their examples are ``{doctest}`` blocks, run by the doctest builder
together with every ``>>>`` example of the API reference's docstrings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
exclude_patterns = ["_build", "examples/**/README.md", "examples/**/.pytest_cache"]
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
