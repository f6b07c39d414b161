"""Attention heatmaps in matplotlib: one head, a layer's heads, before / after, λ (notebook 08).

Explained in ``notebooks/08_attention_visualization.ipynb``; each docstring names its section.
Every function returns a ``matplotlib.figure.Figure`` built without pyplot (``new_figure``), so
a notebook shows each figure exactly once and nothing piles up in pyplot's figure list. Text
in figures is at least 9 pt (``FONT_SIZE``) at the size a function picks. Prefix keys
(P0, P1, ...) come first on the key axis, split from the token keys by a white line.
"""

from __future__ import annotations

import torch

from peftlab.viz.maps import AttentionMaps, aligned, attention_change, prefix_share

__all__ = ["FIGURE_WIDTH", "FONT_SIZE", "TITLE_SIZE", "new_figure", "plot_attention_change",
           "plot_change_by_head", "plot_head", "plot_layer", "plot_prefix_share"]

FONT_SIZE = 9  # pt: the smallest text in any figure here (tick labels, cell values)
TITLE_SIZE = 11  # pt: panel titles
FIGURE_WIDTH = 12.0  # inches (1200 px as a notebook PNG): plot_layer picks its columns to fit
_PER_TOKEN = 0.2  # inches per token along a labelled heatmap axis: 14.4 pt for a 9 pt label
_FIGURE_CLASS = None  # NotebookFigure, defined on first use (matplotlib is imported only then)


def new_figure(width: float, height: float):
    """A constrained-layout ``Figure`` (at most 18 x 18 inches) that a notebook shows as a PNG.

    Made without pyplot, so it is shown once (when it is a cell's value or passed to
    ``display``) and never kept in pyplot's list of open figures.
    """
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        from io import BytesIO

        from matplotlib.figure import Figure

        class NotebookFigure(Figure):
            def _repr_png_(self) -> bytes:
                buffer = BytesIO()
                self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
                return buffer.getvalue()

        _FIGURE_CLASS = NotebookFigure
    return _FIGURE_CLASS(figsize=(min(width, 18), min(height, 18)), layout="constrained")


# -- heatmaps -----------------------------------------------------------------------------
def _label(ax, maps: AttentionMaps, x: bool = True, y: bool = True, fontsize: float = FONT_SIZE) -> None:
    keys, m = maps.key_tokens, maps.prefix_length
    ax.set_xticks(range(len(keys)), keys if x else [], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(maps.tokens)), maps.tokens if y else [], fontsize=fontsize)
    if m:
        ax.axvline(m - 0.5, color="white", lw=1.5)


def _colorbar(fig, im, ax, label: str | None = None, shrink: float = 0.8):
    bar = fig.colorbar(im, ax=ax, shrink=shrink)
    bar.ax.tick_params(labelsize=FONT_SIZE)
    if label:
        bar.set_label(label, fontsize=FONT_SIZE + 1)
    return bar


def plot_head(maps: AttentionMaps, layer: int, head: int, *, ax=None):
    """Heatmap of one head: queries down, keys across, prefix keys P0.. first (section "Heatmaps")."""
    att = maps.head(layer, head)
    if ax is None:
        fig = new_figure(2.5 + 0.32 * att.shape[1], 1.8 + 0.3 * att.shape[0])
        ax = fig.add_subplot()
    fig = ax.figure
    im = ax.imshow(att.numpy(), cmap="viridis", vmin=0.0, vmax=float(att.max()), aspect="auto")
    _label(ax, maps)
    ax.set_xlabel("key (attended to)", fontsize=FONT_SIZE + 1)
    ax.set_ylabel("query", fontsize=FONT_SIZE + 1)
    ax.set_title(f"layer {layer}, head {head}", fontsize=TITLE_SIZE)
    _colorbar(fig, im, ax, "attention")
    return fig


def plot_layer(maps: AttentionMaps, layer: int, *, heads: list[int] | None = None, cols: int | None = None):
    """All heads of one layer as a grid of heatmaps (section "Heatmaps").

    ``cols``: heatmaps per row; by default as many (up to 4) as fit in ``FIGURE_WIDTH``
    inches: a PNG at most 1200 px wide, shown unscaled (labels at 9 pt) in the output area of
    a 1400 px wide JupyterLab with its side bar closed.
    """
    maps.check(layer)
    heads = list(range(maps.num_heads)) if heads is None else list(heads)
    for h in heads:
        maps.check(layer, h)
    k, t = len(maps.key_tokens), len(maps.tokens)
    panel = 0.9 + _PER_TOKEN * k  # inches: a heatmap, its y labels and the gap to the next
    if cols is None:
        cols = min(4, int((FIGURE_WIDTH - 0.8) // panel))
    cols = max(1, min(cols, len(heads)))
    rows = -(-len(heads) // cols)
    fig = new_figure(cols * panel + 0.8, rows * (0.9 + _PER_TOKEN * t) + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(heads):
            ax.set_axis_off()
            continue
        ax.imshow(maps.attentions[layer][heads[i]].numpy(), cmap="viridis", vmin=0, aspect="auto")
        _label(ax, maps, x=i + cols >= len(heads), y=i % cols == 0)
        ax.set_title(f"head {heads[i]}", fontsize=TITLE_SIZE)
    fig.suptitle(f"layer {layer}: every head (rows: queries, columns: keys)", fontsize=TITLE_SIZE + 1)
    return fig


# -- before / after ---------------------------------------------------------------------
def plot_attention_change(base: AttentionMaps, tuned: AttentionMaps, layer: int, head: int, *,
                          names: tuple[str, str] = ("base", "fine-tuned")):
    """One head before, after, and after − before (section "After fine-tuning")."""
    base.check(layer, head)
    a, b, keys = aligned(base, tuned)
    x, y = a[layer][head], b[layer][head]
    diff, top = y - x, float(torch.maximum(x.max(), y.max()))
    lim = max(float(diff.abs().max()), 1e-6)
    fig = new_figure(3 * (1.2 + _PER_TOKEN * x.shape[1]) + 1, 2 + 0.25 * x.shape[0])
    axes = fig.subplots(1, 3)
    panels = ((x, names[0], "viridis", 0, top), (y, names[1], "viridis", 0, top),
              (diff, f"{names[1]} − {names[0]}", "RdBu_r", -lim, lim))
    for i, (ax, (data, title, cmap, lo, hi)) in enumerate(zip(axes, panels)):
        im = ax.imshow(data.numpy(), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        _label(ax, keys, y=i == 0)
        ax.set_title(title, fontsize=TITLE_SIZE)
        if i != 1:
            _colorbar(fig, im, ax, shrink=0.7)
    fig.suptitle(f"layer {layer}, head {head}", fontsize=TITLE_SIZE + 1)
    return fig


def _grid(ax, values: torch.Tensor, cmap: str, label: str, vmax: float | None = None) -> None:
    im = ax.imshow(values.numpy(), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    rows, cols, dark = *values.shape, 0.6 * (vmax or float(values.max()))
    ax.set_xticks(range(cols), [str(j) for j in range(cols)], fontsize=FONT_SIZE)
    ax.set_yticks(range(rows), [str(i) for i in range(rows)], fontsize=FONT_SIZE)
    ax.set_xlabel("head", fontsize=FONT_SIZE + 1)
    ax.set_ylabel("layer", fontsize=FONT_SIZE + 1)
    if rows * cols <= 200:  # cells are 0.55 x 0.45 in: room for "0.00" at 9 pt
        for (i, j), v in zip(torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).tolist(),
                             values.flatten().tolist()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=FONT_SIZE,
                    color="white" if v < dark else "black")
    _colorbar(ax.figure, im, ax, label)


def plot_change_by_head(base: AttentionMaps, tuned: AttentionMaps):
    """Heatmap of :func:`attention_change` for every layer and head (section "After fine-tuning")."""
    change = attention_change(base, tuned)
    fig = new_figure(1.5 + 0.55 * change.shape[1], 1.2 + 0.45 * change.shape[0])
    _grid(fig.add_subplot(), change, "magma", "mean total variation")
    fig.suptitle("how far each head's attention moved", fontsize=TITLE_SIZE + 1)
    return fig


def plot_prefix_share(maps: AttentionMaps):
    """λ per layer and head as a heatmap, and per layer as bars (section "Where the prefix draws attention")."""
    lam = prefix_share(maps)
    fig = new_figure(4 + 0.55 * lam.shape[1], 1.5 + 0.45 * lam.shape[0])
    left, right = fig.subplots(1, 2, width_ratios=[3, 1])
    _grid(left, lam, "viridis", "λ (share on prefix)", vmax=1.0)
    left.set_title(f"share of attention on the {maps.prefix_length} prefix keys", fontsize=TITLE_SIZE)
    right.barh(range(lam.shape[0]), lam.mean(1).numpy(), color="tab:orange")
    right.set(xlim=(0, 1), ylim=(lam.shape[0] - 0.5, -0.5))
    right.set_yticks(range(lam.shape[0]), [str(i) for i in range(lam.shape[0])], fontsize=FONT_SIZE)
    right.tick_params(axis="x", labelsize=FONT_SIZE)
    right.set_xlabel("mean λ", fontsize=FONT_SIZE + 1)
    right.set_title("per layer", fontsize=TITLE_SIZE)
    return fig
