"""Sphinx configuration of the fusedloss documentation (``make docs``)."""

import os
import sys

# autodoc imports fusedloss from the source tree (the package is also installed editable in .venv, with its
# compiled extension next to the sources).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import fusedloss  # noqa: E402

project = "fusedloss"
author = "the fusedloss authors"
copyright = "the fusedloss authors"
version = release = fusedloss.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style docstrings, as in the code
    "myst_parser",  # docs/BACKENDS.md, the op contract, stays Markdown (C++ sources cite it by that path)
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"  # the Args sections say the types in words
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"fusedloss {release}"
html_theme_options = {"description": "Fused loss kernels for PyTorch", "page_width": "1200px", "body_max_width": "none"}
