"""Pictures for people who would rather look than read: the guest's physical memory
coloured by page class, and host memory over time. matplotlib (Agg, no display) is
imported only when a picture is asked for: it costs half a second to load."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from hvkit.errors import HvkitError
from hvkit.introspect.pages import PageClass, PageMap
from hvkit.memory import PAGE_SIZE

CLASS_COLOURS = {
    PageClass.NOT_PRESENT: "#e8e8e8",
    PageClass.FREE: "#7fc97f",
    PageClass.PAGE_TABLE: "#fdc086",
    PageClass.SLAB: "#beaed4",
    PageClass.KERNEL_IMAGE: "#e41a1c",
    PageClass.RESERVED: "#555555",
    PageClass.ANONYMOUS: "#386cb0",
    PageClass.PAGE_CACHE: "#ffd92f",
    PageClass.KERNEL_OTHER: "#bf5b17",
}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise HvkitError("pictures need matplotlib", "run ./setup.sh (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise HvkitError(f"cannot write the picture {path}: {e}", "give a writable .png/.svg/.pdf path") from None
    return path


def page_map_picture(pm: PageMap, path: Path, title: str) -> Path:
    """One pixel per page, a row per 2 MiB (4 MiB above 2 GiB), low addresses on top."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cols = 512 if pm.pages <= (2 << 30) // PAGE_SIZE else 1024
    rows = -(-pm.pages // cols)
    grid = np.full(rows * cols, PageClass.NOT_PRESENT, np.uint8)
    grid[: pm.pages] = pm.classes
    cmap = ListedColormap([CLASS_COLOURS[c] for c in PageClass])
    fig, ax = plt.subplots(figsize=(9, 7))
    ax.imshow(grid.reshape(rows, cols), cmap=cmap, vmin=0, vmax=len(PageClass) - 1,
              aspect="auto", interpolation="nearest")
    mib_per_row = cols * PAGE_SIZE / (1 << 20)
    ticks = np.linspace(0, rows, 9)
    ax.set_yticks(ticks - 0.5, [f"{t * mib_per_row:.0f} MiB" for t in ticks])
    ax.set_xticks([])
    ax.set_xlabel(f"{cols} pages ({mib_per_row:.0f} MiB) per row")
    ax.set_title(title)
    counts = pm.counts()
    ax.legend(handles=[Patch(color=CLASS_COLOURS[c], label=f"{c.label}: {counts[c] * PAGE_SIZE / (1 << 20):.1f} MiB")
                       for c in PageClass if counts[c]],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = _save(fig, path)
    plt.close(fig)
    return path


def timeline_picture(series: dict[str, Sequence[tuple[float, float]]], path: Path, title: str,
                     ylabel: str = "host memory (MiB)") -> Path:
    """Lines of (seconds, value) per name, e.g. host memory of VMs over time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, linewidth=1.6)
    ax.set_xlabel("seconds")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    path = _save(fig, path)
    plt.close(fig)
    return path
