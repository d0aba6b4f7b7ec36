"""Every tutorial notebook matches its plain-text twin (jupytext percent
format) and is committed without outputs. The notebooks are executed (with
small settings, TFSHARD_TUTORIAL_SMALL=1) by the documentation build in
tests/test_docs.py, which fails on any cell error and checks their plots:
running them here as well would double their share of CI's time."""

import glob
import os

import pytest

jupytext = pytest.importorskip("jupytext")

TUTORIALS = os.path.join(os.path.dirname(__file__), "..", "tutorials")
NOTEBOOKS = sorted(glob.glob(os.path.join(TUTORIALS, "*.ipynb")))


def _sources(notebook):
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_matches_its_text_twin(path):
    text = path[: -len(".ipynb")] + ".py"
    assert os.path.exists(text), f"{path} has no jupytext .py twin"
    assert _sources(jupytext.read(path)) == _sources(jupytext.read(text)), (
        f"{path} and {text} differ; run: jupytext --sync {text}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_has_no_outputs_committed(path):
    notebook = jupytext.read(path)
    assert all(not getattr(c, "outputs", None) for c in notebook.cells), (
        f"{path} carries outputs; clear them before committing"
    )
