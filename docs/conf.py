"""Sphinx configuration of the curvlinops documentation (``make docs``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "curvlinops"
author = "the curvlinops developers"
copyright = "2026, the curvlinops developers"  # noqa: A001
release = "3.0.1.post1"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "examples", "README.md", "differences.md"]
source_suffix = {".rst": "restructuredtext"}
html_theme = "alabaster"
html_static_path = ["_static"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
