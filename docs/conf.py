"""Sphinx configuration of the curvlinops documentation (``make docs``).

Only Sphinx's built-in extensions and the built-in ``alabaster`` theme are used, so building
needs nothing beyond ``sphinx`` itself. ``make docs`` runs with ``-W``: every warning is an
error.
"""

import argparse
import os
import sys
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

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
# The example scripts are shown with literalinclude, not built as pages.
exclude_patterns = ["_build", "examples", "**/README*", "README*", "*.md"]
source_suffix = {".rst": "restructuredtext"}
html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {"page_width": "1100px", "sidebar_width": "240px"}
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False


class CommandHelp(SphinxDirective):
    """``.. command-help:: report``: the ``--help`` text of a ``curvlinops`` sub-command.

    The text is generated from the installed parser at build time, so the page cannot drift
    from the command.
    """

    required_arguments = 1

    def run(self):
        """Return the help text as a literal block."""
        from curvlinops.cli import build_parser

        old_columns = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "90"  # argparse wraps to the terminal width
        try:
            parser = build_parser()
            text = parser.format_help()
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    text = action.choices[self.arguments[0]].format_help()
        finally:
            if old_columns is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = old_columns
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app):
    """Register the ``command-help`` directive."""
    app.add_directive("command-help", CommandHelp)
    return {"parallel_read_safe": True}
