"""Sphinx configuration of the p4opt documentation.

Build: ``python3 -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # document the checkout, not an installed copy

import p4opt  # noqa: E402

project = "p4opt"
author = "p4opt contributors"
copyright = "p4opt contributors"
release = p4opt.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "examples/*.py"]

# Markdown: $...$ and $$...$$ math, ::: fences, heading anchors for cross-page links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference: NumPy-style docstrings, members in source order, signatures short.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autoclass_content = "class"

html_theme = "furo"
html_title = f"p4opt {release}"
html_static_path: list[str] = ["_static"]
pygments_style = "sphinx"


_STAR_SHAPE = re.compile(r"\((\*)(?=[,)])")


def _escape_batch_shapes(app, what, name, obj, options, lines: list[str]) -> None:
    """Escape the star of batch shapes ``(*, n, n)`` so reST does not read it as emphasis."""
    for i, line in enumerate(lines):
        if "(*" in line and not line.lstrip().startswith(">>>"):
            parts = line.split("`")  # even parts lie outside literals and roles
            parts[::2] = [_STAR_SHAPE.sub(r"(\\*", part) for part in parts[::2]]
            lines[i] = "`".join(parts)


def setup(app) -> dict[str, bool]:
    app.connect("autodoc-process-docstring", _escape_batch_shapes, priority=600)  # after napoleon
    return {"parallel_read_safe": True}
