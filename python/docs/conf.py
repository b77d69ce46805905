"""Sphinx configuration for the chainrule API reference and tutorial.

Build (chainrule must be installed, the extension included):
    sphinx-build -W --keep-going -b html python/docs build/docs
"""

import chainrule

project = "chainrule"
author = "the chainrule authors"
release = chainrule.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# Types stay text: "ndarray of shape (n, d_in)" must not turn d_in into a link
# (Layer, Dense and Sequential each have a d_in attribute).
napoleon_use_param = False
napoleon_use_ivar = True
# Types are still cross-referenced word by word; an ambiguous word such as
# d_in is text, not an error.
suppress_warnings = ["ref.python"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Signatures and docstrings carry the types; repeating them in the text would
# duplicate every parameter list.
autodoc_typehints = "signature"
autodoc_typehints_format = "short"


def _skip(app, what, name, obj, skip, options):
    # scikit-learn adds set_*_request methods (metadata routing) to every
    # estimator; their docstrings link into scikit-learn's own docs.
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip)

html_theme = "alabaster"
html_title = f"chainrule {release}"
exclude_patterns = ["_build"]
