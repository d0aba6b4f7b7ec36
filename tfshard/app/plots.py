"""Matplotlib pictures for notebooks: loss curves, per-device memory, and
how an image is tiled across devices.

The numbers come from :mod:`tfshard.report`; this module only draws them.
matplotlib is imported when a function is called (it is in the ``test``
extra, not a dependency of tfshard). Every function draws into ``ax`` if
given (else a new figure) and returns the axes.
"""

from __future__ import annotations

import numpy as np

from tfshard.errors import TfshardError

__all__ = ["loss_curves", "memory_bars", "tiling"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise TfshardError(
            "tfshard.app.plots draws with matplotlib; install it with: pip install matplotlib"
        ) from None
    return plt


def _axes(ax, figsize):
    if ax is None:
        _, ax = _pyplot().subplots(figsize=figsize, layout="tight")
    return ax


def loss_curves(curves, ax=None, *, title=None, ylabel="training loss", first_step=1):
    """One line per run: ``curves`` maps a label to its per-step losses."""
    ax = _axes(ax, (6, 3.5))
    styles = ["-", "--", ":", "-."]
    for i, (label, losses) in enumerate(curves.items()):
        steps = np.arange(first_step, first_step + len(losses))
        ax.plot(steps, losses, styles[i % len(styles)], marker="o" if len(losses) <= 20 else None,
                markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def memory_bars(breakdowns, ax=None, *, title=None, unit="KiB"):
    """Stacked bars of per-device bytes: ``breakdowns`` maps a bar label
    (e.g. a mesh shape) to ``{group: bytes}`` as
    :func:`tfshard.report.per_device_bytes_by_group` returns. The total is
    written on each bar."""
    ax = _axes(ax, (7, 3.5))
    scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    labels = list(breakdowns)
    groups = []
    for parts in breakdowns.values():
        groups += [g for g in parts if g not in groups]
    bottom = np.zeros(len(labels))
    for group in groups:
        values = np.array([breakdowns[label].get(group, 0) / scale for label in labels])
        ax.bar(labels, values, bottom=bottom, label=group)
        bottom += values
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{total:.0f}" if total >= 10 else f"{total:.1f}", ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel(f"{unit} per device")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def tiling(images, spec, mesh, ax=None, *, halo_of=None, halo=1, title=None):
    """Draw a batch of images with the tile every device holds.

    ``images``: ``(B, H, W)`` or ``(B, H, W, C)`` (the first channel is
    shown). ``spec``: the image tensor's 4-entry spec, e.g. ``("batch",
    "model", None, None)``. Each tile is outlined and labelled with the
    devices that hold it (``tfshard.report.device_tiles``). ``halo_of``: a
    device whose convolution window is drawn dashed, ``halo`` rows/columns
    beyond its tile on each split side (what it receives from its
    neighbours for a ``2 * halo + 1`` kernel).
    """
    from tfshard.report import device_tiles

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    shape = images.shape
    tiles = device_tiles(spec, shape, mesh)
    plt = _pyplot()
    ax = _axes(ax, (2.6 * shape[0] + 1, 3.2))
    gap = 1
    colors = plt.get_cmap("tab10")
    # Group devices by the tile they hold (replicas share a tile).
    owners = {}
    for t in tiles:
        key = tuple((s.start, s.stop) for s in t["slices"][:3])
        owners.setdefault(key, []).append(t["device"])
    for b in range(shape[0]):
        x0 = b * (shape[2] + gap)
        ax.imshow(images[b, :, :, 0], cmap="gray_r", extent=(x0, x0 + shape[2], shape[1], 0),
                  interpolation="nearest")
    for n, ((bs, hs, ws), devices) in enumerate(owners.items()):
        color = colors(n % 10)
        for b in range(*bs):
            x0 = b * (shape[2] + gap)
            ax.add_patch(plt.Rectangle((x0 + ws[0], hs[0]), ws[1] - ws[0], hs[1] - hs[0], fill=True,
                                       facecolor=color, alpha=0.25, edgecolor=color, linewidth=2))
            ax.text(x0 + (ws[0] + ws[1]) / 2, (hs[0] + hs[1]) / 2, ",".join(map(str, devices)),
                    ha="center", va="center", fontsize=8, color="black",
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor=color, alpha=0.9))
    if halo_of is not None:
        t = tiles[halo_of]
        (b0, b1), (h0, h1), (w0, w1) = [(s.start, s.stop) for s in t["slices"][:3]]
        if spec[1] is not None:
            h0, h1 = max(0, h0 - halo), min(shape[1], h1 + halo)
        if spec[2] is not None:
            w0, w1 = max(0, w0 - halo), min(shape[2], w1 + halo)
        for b in range(b0, b1):
            x0 = b * (shape[2] + gap)
            ax.add_patch(plt.Rectangle((x0 + w0, h0), w1 - w0, h1 - h0, fill=False, edgecolor="red",
                                       linestyle="--", linewidth=2))
    ax.set_xlim(-0.5, shape[0] * (shape[2] + gap) - gap + 0.5)
    ax.set_ylim(shape[1] + 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"images {tuple(shape)} laid out as {tuple(spec)}:\ndevice ids per tile",
                 fontsize=10)
    return ax
