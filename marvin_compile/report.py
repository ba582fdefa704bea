"""Reporting helpers: precision plots and tables, and atomic file writes.

Precision histories use one record per layer and decision::

    layers = {"conv1": {"step": [0, 50, 120], "wl": [8, 7, 9], "fl": [4, 4, 6]}, ...}

Record 0 is the layer's start state; every later record is one precision decision (the pair
it left in force from that training step on). ``step`` may be omitted, records are then
numbered 0, 1, 2, ...

Files are written atomically (temporary file in the same directory, fsync, os.replace) so that
a crash or a concurrent reader never sees a half-written plot, cache or checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

from matplotlib import colormaps
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from marvin_compile.kernel_classes import KERNEL_CLASSES

PathLike = str | os.PathLike[str]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented UTF-8 JSON (with a trailing newline)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself; best effort, some platforms cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _history(name: str, record: dict[str, list]) -> tuple[list, list, list]:
    """Return (steps, wl, fl) of one layer, checking that the lists line up."""
    wl, fl = list(record.get("wl", [])), list(record.get("fl", []))
    steps = list(record.get("step", range(len(wl))))
    if not wl or not len(wl) == len(fl) == len(steps):
        raise ValueError(
            f"layer {name!r}: 'wl', 'fl' (and 'step' if given) must be non-empty lists of equal length, "
            f"got {len(wl)}, {len(fl)}, {len(steps)}"
        )
    return steps, wl, fl


def plot_precision(
    layers: dict[str, dict[str, list]], path: PathLike, title: str = "MARViN precision"
) -> None:
    """Write a PNG of each layer's word length (top) and fractional length (bottom, dashed).

    Lines are step plots held until the last recorded step of any layer, because a precision
    stays in force until the next decision. Uses the Agg canvas directly (no pyplot), so it is
    safe in headless and multi-threaded drivers.
    """
    histories = {name: _history(name, record) for name, record in layers.items()}
    fig = Figure(figsize=(11, 7), layout="constrained")
    ax_wl, ax_fl = fig.subplots(2, 1, sharex=True)
    if histories:
        end = max(steps[-1] for steps, _, _ in histories.values())
        cmap = _colormap(len(histories))
        for i, (name, (steps, wl, fl)) in enumerate(histories.items()):
            if steps[-1] < end:  # hold the last pair until the end of training
                steps, wl, fl = steps + [end], wl + wl[-1:], fl + fl[-1:]
            colour = cmap(i)
            ax_wl.plot(steps, wl, drawstyle="steps-post", color=colour, label=name)
            ax_fl.plot(steps, fl, drawstyle="steps-post", color=colour, linestyle="--", label=name)
        ax_wl.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            ncol=1 if len(histories) <= 20 else 2,
            title="layer",
        )
    else:
        ax_wl.text(0.5, 0.5, "no precision records", ha="center", va="center", transform=ax_wl.transAxes)
    for k, above in zip(KERNEL_CLASSES, KERNEL_CLASSES[1:], strict=False):  # where variants swap class
        ax_wl.axhline(k.max_wl + 0.5, color="grey", linestyle=":", linewidth=1)
        label = f"{k.name} \u2264 {k.max_wl} < {above.name} "
        ax_wl.text(
            1.0,
            k.max_wl + 0.5,
            label,
            color="grey",
            fontsize=7,
            ha="right",
            va="bottom",
            transform=ax_wl.get_yaxis_transform(),
        )
    ax_wl.set_ylabel("word length wl (bits)")
    ax_fl.set_ylabel("fractional length fl (bits)")
    ax_fl.set_xlabel("training step")
    for ax in (ax_wl, ax_fl):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # bit counts are whole numbers
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def _colormap(n: int) -> Colormap:
    """Distinct colours for up to 20 layers, a smooth ramp beyond that (e.g. deep ResNets)."""
    if n <= 10:
        return colormaps["tab10"]
    return colormaps["tab20"] if n <= 20 else colormaps["turbo"].resampled(n)


def precision_table(layers: dict[str, dict[str, list]]) -> str:
    """A plain-text summary per layer: start wl/fl, min and max wl, final wl/fl, decision count."""
    header = ("layer", "start", "min wl", "max wl", "final", "decisions")
    rows = [header]
    for name, record in layers.items():
        _, wl, fl = _history(name, record)
        rows.append(
            (name, f"{wl[0]}/{fl[0]}", str(min(wl)), str(max(wl)), f"{wl[-1]}/{fl[-1]}", str(len(wl) - 1))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    lines = [fmt(row) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
