"""Render a page of the built documentation site to PNG with headless
Chromium (Debian's ``chromium`` package), as a reader would see it.

    python tests/_render_page.py SITE_DIR/tutorials/02_mesh_tf_transformer/index.html out.png

``tests/test_docs.py`` uses :func:`render` when Chromium is installed.
"""

import os
import shutil
import subprocess
import sys

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium():
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


def render(html_path, png_path, *, width=1280, height=2400, timeout=180):
    """Screenshot ``html_path`` (a file) into ``png_path``; returns the PNG path.

    The site loads nothing from the network: fonts are off in mkdocs.yml, and
    the notebooks' optional CDN scripts (MathJax, require.js) simply fail.
    """
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found; on Debian: apt-get install -y chromium")
    url = "file://" + os.path.abspath(html_path)
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", "--virtual-time-budget=5000",
        f"--window-size={width},{height}", f"--screenshot={os.path.abspath(png_path)}", url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not os.path.exists(png_path):
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return png_path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(render(sys.argv[1], sys.argv[2]))
