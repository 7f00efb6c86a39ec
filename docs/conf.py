"""Sphinx configuration of the xarray-zcache documentation.

Build with ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``):
warnings are errors.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))

import xarray_zcache  # noqa: E402  (installed editable; the version comes from the package)

project = "xarray-zcache"
author = "xarray-zcache developers"
copyright = "xarray-zcache developers"
release = xarray_zcache.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "zcache_docs",  # docs/_ext/zcache_docs.py: configuration table and CLI --help capture
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints"]

# -- MyST --------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "fieldlist"]
myst_heading_anchors = 3

# -- autodoc / napoleon (the library's docstrings are numpydoc style) -----------------------------
napoleon_google_docstring = False
napoleon_numpy_docstring = True
# render "Attributes" sections as :ivar: fields: DiskTier both annotates its attributes and
# lists them in "Attributes", which would otherwise document each attribute twice
napoleon_use_ivar = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# types of the documented parameters, and return types other than None
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "mixed"
autodoc_default_options = {"show-inheritance": False}
# single backticks in docstrings (`CachedStore`) are cross-references where they resolve
default_role = "py:obj"

# -- HTML --------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"xarray-zcache {release}"
html_static_path = ["_static"]
html_css_files = ["zcache.css"]
html_theme_options = {
    "description": "A persistent, cluster-aware cache for Zarr on object storage",
    "fixed_sidebar": True,
    "page_width": "1240px",
    "sidebar_width": "230px",
}
