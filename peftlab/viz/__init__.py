"""Looking inside a model: attention heatmaps, offline bertviz views, widgets, attributions.

Everything here is explained in ``notebooks/08_attention_visualization.ipynb``; each
docstring names its section. One module per concern:

* ``maps``: ``attention_maps`` runs a model once with ``output_attentions=True`` and returns
  an :class:`AttentionMaps`: the query tokens and, per layer, a (heads, T, m + T) tensor.
  ``m`` is 0 for an ordinary model; a prefix-tuned model (``peftlab.prefix``) attends to m
  virtual tokens first, shown as P0, P1, ... on the key axis. ``attention_change`` and
  ``prefix_share`` measure them;
* ``heatmaps``: plotting functions that return a ``matplotlib.figure.Figure`` built without
  pyplot, so a notebook shows each figure exactly once and nothing piles up in pyplot's
  figure list. Text in figures is at least 9 pt (``FONT_SIZE``) at the size a function picks;
* ``bertviz_views``: ``head_view`` / ``model_view`` return bertviz's own views (the
  ``bertviz`` package) as self-contained HTML: d3 and jQuery (``peftlab/static/viz``, with
  their licences) are inlined, nothing is fetched; ``bertviz_offline`` says how;
* ``widgets``: ``attention_explorer``, sliders and pickers over the heatmaps;
* ``attributions``: integrated-gradients token attributions (Captum).

The names below are the public API: use them as ``peftlab.viz.<name>``. Importing this
package also runs :func:`enable_offline_bertviz`, so bertviz's own
``from bertviz import head_view; head_view(attention, tokens)`` draws offline too.
"""

from peftlab.viz.attributions import Attributions, attribution_html, plot_attributions, token_attributions
from peftlab.viz.bertviz_views import OfflineView, enable_offline_bertviz, head_view, model_view
from peftlab.viz.heatmaps import (FIGURE_WIDTH, FONT_SIZE, TITLE_SIZE, new_figure, plot_attention_change,
                                  plot_change_by_head, plot_head, plot_layer, plot_prefix_share)
from peftlab.viz.maps import (NO_MAPS, AttentionMaps, attention_change, attention_maps, prefix_names,
                              prefix_share)
from peftlab.viz.widgets import attention_explorer

__all__ = [
    "FIGURE_WIDTH", "FONT_SIZE", "NO_MAPS", "TITLE_SIZE",
    "AttentionMaps", "Attributions", "OfflineView", "attention_change", "attention_explorer",
    "attention_maps", "attribution_html", "enable_offline_bertviz", "head_view", "model_view",
    "new_figure", "plot_attention_change", "plot_attributions", "plot_change_by_head", "plot_head",
    "plot_layer", "plot_prefix_share", "prefix_names", "prefix_share", "token_attributions",
]

try:  # bertviz's own views draw offline once peftlab.viz is imported (it is a course dependency)
    enable_offline_bertviz()
except ImportError:  # without bertviz the rest of this package works; head_view says how to install it
    pass
