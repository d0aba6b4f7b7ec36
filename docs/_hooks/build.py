"""MkDocs hooks (mkdocs.yml ``hooks:``).

``on_config`` sets the environment the tutorials execute in, before
mkdocs-jupyter starts their kernels (which inherit it): TensorFlow's C++
log lines off, so that cell outputs show what the tutorial prints
(``tfshard._native_logs``; a value already set wins), and no
``MPLBACKEND=Agg`` (the tests' setting for scripts), which would replace the
kernel's inline backend, the one that puts the plots into the page.
"""

import os
import re


def on_config(config):
    if os.environ.get("MPLBACKEND", "").lower() == "agg":
        del os.environ["MPLBACKEND"]  # Agg would draw the plots into nothing
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return config


# Docstrings use Sphinx roles (:class:`x`); Markdown renders the role's name
# as text before the code. Drop it, keep the code.
_ROLE = re.compile(r":(?:class|meth|func|attr|mod|exc|data|obj|const):(?=<code)")


def on_page_content(html, page, config, files):
    return _ROLE.sub("", html)
