"""bertviz's own head view and model view as self-contained HTML (notebook 08, "bertviz views").

``head_view`` / ``model_view`` return an :class:`OfflineView`: bertviz draws it, with d3 and
jQuery (``peftlab/static/viz``, with their licences) inlined, so nothing is fetched.
``enable_offline_bertviz`` makes bertviz's own functions draw offline too; how that works is
``peftlab.viz.bertviz_offline``. Explained in ``notebooks/08_attention_visualization.ipynb``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftlab.viz import bertviz_offline
from peftlab.viz.maps import AttentionMaps

__all__ = ["OfflineView", "enable_offline_bertviz", "head_view", "model_view"]


def enable_offline_bertviz() -> str:
    """Make bertviz's own ``head_view`` / ``model_view`` draw offline (section "bertviz views").

    Afterwards ``from bertviz import head_view, model_view`` and bertviz's usual calls,
    ``head_view(attention, tokens)``, draw with no network: d3 and jQuery are inlined from
    ``peftlab/static/viz``. Attention with prefix keys (a prefix-tuned model's
    ``outputs.attentions``) is accepted, the keys labelled P0, P1, ...; so is an
    :class:`AttentionMaps`. Idempotent; importing ``peftlab.viz`` already calls it when bertviz
    is installed. Returns bertviz's version. How it works: ``peftlab.viz.bertviz_offline``.
    """
    return bertviz_offline.enable()


class OfflineView:
    """A bertviz view as self-contained HTML: shown by notebooks, ``save(path)`` writes a page."""

    def __init__(self, html: str):
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"<bertviz view, {len(self.html) // 1000} kB of self-contained HTML: display it in a notebook>"

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>bertviz</title>'
                        f"</head><body>{self.html}</body></html>", encoding="utf-8")
        return path


def _bertviz():
    enable_offline_bertviz()
    import bertviz

    return bertviz


def _checked(maps: AttentionMaps, layers, heads) -> tuple[list[int], list[int]]:
    layers = list(range(maps.num_layers)) if layers is None else list(layers)
    heads = list(range(maps.num_heads)) if heads is None else list(heads)
    for layer in layers:
        maps.check(layer)
    for head in heads:
        maps.check(0, head)
    return layers, heads


def _batched(maps: AttentionMaps) -> list[torch.Tensor]:
    """bertviz's input: per layer (1, heads, T, m + T), rounded to 4 decimals (a smaller output)."""
    return [torch.round(a.double(), decimals=4).unsqueeze(0) for a in maps.attentions]


def head_view(maps: AttentionMaps, *, layer: int | None = None, heads: list[int] | None = None,
              layers: list[int] | None = None) -> OfflineView:
    """bertviz's head view, drawn by bertviz itself, offline (section "bertviz views").

    ``layer``: layer selected at first; ``heads``: heads highlighted at first (default all);
    ``layers``: layers offered in the menu (default all; fewer keeps the output small).
    Prefix keys come first on the right, labelled P0, P1, ...
    """
    layers, _ = _checked(maps, layers, heads)
    if layer is not None and layer not in layers:
        maps.check(layer)
        raise IndexError(f"layer {layer} is not among the layers shown, {layers}")
    out = _bertviz().head_view(_batched(maps), list(maps.tokens), prettify_tokens=False, layer=layer,
                               heads=heads, include_layers=layers, html_action="return")
    return OfflineView(out.data)


def model_view(maps: AttentionMaps, *, layers: list[int] | None = None, heads: list[int] | None = None,
               display_mode: str = "light") -> OfflineView:
    """bertviz's model view (every layer x head as a thumbnail), offline (section "bertviz views").

    bertviz draws it 970 px wide whatever the number of heads (a thumbnail is
    (970 - 38) / heads px wide, 7 x 12 / heads px per token high); peftlab's offline script
    scales it down to the output area when that is narrower (see ``peftlab.viz.bertviz_offline``).
    """
    if display_mode not in ("light", "dark"):
        raise ValueError(f'display_mode must be "light" or "dark", got {display_mode!r}')
    layers, heads = _checked(maps, layers, heads)
    out = _bertviz().model_view(_batched(maps), list(maps.tokens), prettify_tokens=False,
                                display_mode=display_mode, include_layers=layers, include_heads=heads,
                                html_action="return")
    return OfflineView(out.data)
