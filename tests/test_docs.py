"""The documentation site builds (`mkdocs build --strict`: broken links,
references or notebooks fail), with every tutorial executed (small
settings) and its plots in the page, and an API reference of every public
name. With Chromium installed, a tutorial page is rendered to PNG as a
reader sees it.

The build executes the tutorials, so this is also where they are run.
"""

import base64
import glob
import io
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TUTORIALS = sorted(os.path.basename(p)[: -len(".ipynb")] for p in glob.glob(os.path.join(ROOT, "tutorials", "*.ipynb")))
# Tutorials that draw: 02 loss curves and memory bars, 03 tilings and loss
# curves, 04 memory by tensor-parallel size.
PLOTS_AT_LEAST = {"02_mesh_tf_transformer": 2, "03_cnn_splits": 4, "04_checkpoints_and_scaling": 2}
PAGES = [
    "index", "concepts", "plans", "layers", "training", "checkpoints", "multi-process", "cli",
    "performance", "limitations", "design", "tutorials", "op_coverage", "api/index", "api/layers",
    "api/styles", "api/strategy", "api/checkpoint", "api/multi_client", "api/report", "api/errors",
    "api/app",
]
_PNG = re.compile(r'<img[^>]*\ssrc="data:image/png;base64,([^"]+)"')
_NATIVE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ", re.M)


def _require(module):
    """In CI (CI=true) the docs tools are part of the test extra: missing is
    an error there, a skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true"):
        __import__(module)
    return pytest.importorskip(module)


def page_html(site, page):
    # docs/x.md is built as x/index.html, docs/x/index.md as x/index.html too
    path = os.path.join(site, page + ".html" if os.path.basename(page) == "index" else os.path.join(page, "index.html"))
    assert os.path.exists(path), f"{page} was not built"
    with open(path, encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    _require("mkdocs")
    _require("mkdocs_jupyter")
    _require("mkdocstrings_handlers.python")
    out = str(tmp_path_factory.mktemp("site"))
    env = dict(os.environ, TFSHARD_TUTORIAL_SMALL="1", NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    begin = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-f", os.path.join(ROOT, "mkdocs.yml"), "-d", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    print(f"mkdocs build: {time.perf_counter() - begin:.0f} s")
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return out


def test_every_page_is_built(site):
    for page in PAGES + [f"tutorials/{name}" for name in TUTORIALS]:
        assert "<h1" in page_html(site, page), page


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_is_executed_with_clean_output(site, name):
    html = page_html(site, f"tutorials/{name}")
    assert 'class="jp-OutputArea' in html or "output_area" in html, f"{name} shows no outputs"
    assert not _NATIVE.search(html), f"{name} shows TensorFlow C++ log lines"
    assert "Traceback (most recent call last)" not in html


def png_images(html):
    import matplotlib.image

    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png") for data in _PNG.findall(html)]


def drawn_fraction(image):
    """The fraction of pixels that differ from the image's most common colour
    (its background)."""
    pixels = image.reshape(-1, image.shape[-1])[:, :3]
    colours, counts = np.unique(np.round(pixels * 255).astype(np.uint8), axis=0, return_counts=True)
    background = colours[np.argmax(counts)]
    return float(np.mean(np.any(np.abs(np.round(pixels * 255) - background) > 8, axis=1)))


@pytest.mark.parametrize("name", sorted(PLOTS_AT_LEAST))
def test_tutorial_plots_are_in_the_page_and_not_empty(site, name):
    images = png_images(page_html(site, f"tutorials/{name}"))
    assert len(images) >= PLOTS_AT_LEAST[name], f"{name}: {len(images)} plots in the page"
    for image in images:
        assert min(image.shape[:2]) >= 100, image.shape
        assert drawn_fraction(image) > 0.02, f"{name}: a plot is (nearly) empty"


def test_api_reference_covers_every_public_name(site):
    import tfshard

    html = "".join(page_html(site, page) for page in PAGES if page.startswith("api/"))
    anchors = set(re.findall(r'id="(tfshard[\w.]*)"', html))
    missing = []
    for name in (n for n in tfshard.__all__ if not n.startswith("__")):
        if not any(anchor == f"tfshard.{name}" or anchor.endswith(f".{name}") for anchor in anchors):
            missing.append(name)
    assert not missing, f"public names without an API entry: {missing}"


def test_site_loads_nothing_from_a_font_cdn(site):
    html = page_html(site, "index")
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html


def test_rendered_tutorial_page_shows_its_plots(site, tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from _render_page import find_chromium, render

    if find_chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the plots "
                    "are checked in the HTML by test_tutorial_plots_are_in_the_page_and_not_empty")
    import matplotlib.image

    page = os.path.join(site, "tutorials", "03_cnn_splits", "index.html")
    shot = matplotlib.image.imread(render(page, str(tmp_path / "page.png"), height=6000))
    assert drawn_fraction(shot) > 0.05, "the rendered page is (nearly) blank"
    # The tiling pictures are colour images: a page with the plots holds many
    # saturated pixels, where text and code alone are grey, black and the theme's blue.
    rgb = shot[..., :3]
    saturated = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
    assert saturated.mean() > 0.01, f"only {saturated.mean():.4f} of the page is coloured"


def test_readme_links_and_test_command():
    """The README's relative links point at files that exist (the docs pages
    it sends a newcomer to), and its test command is the line .ci/run runs."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    links = [target for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme) if "://" not in target]
    assert links, "the README links to no docs page"
    missing = [target for target in links if not os.path.exists(os.path.join(ROOT, target))]
    assert not missing, f"README links to missing files: {missing}"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        ci_line = [line for line in handle.read().splitlines() if "pytest" in line][0].strip()
    assert f"```bash\n{ci_line}\n```" in readme, "the README's test command differs from .ci/run's"
