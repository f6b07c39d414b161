"""An ipywidgets explorer of attention: layer, head, sentence and method (notebook 08, "Explore").

Explained in ``notebooks/08_attention_visualization.ipynb``, section "Explore". It redraws
the heatmaps of ``peftlab.viz.heatmaps`` into an ``Output`` whenever a control changes.
"""

from __future__ import annotations

from peftlab.viz.heatmaps import plot_attention_change, plot_head, plot_layer
from peftlab.viz.maps import attention_maps

__all__ = ["attention_explorer"]


def attention_explorer(models, tokenizer, sentence: str, *, layer: int = 0, head: int = 0):
    """Layer and head sliders, a sentence box and a method picker over ``models`` (section "Explore").

    ``models``: one model, or a dict such as ``{"base": base, "LoRA": lora_model}``. The view
    shows one head, every head of the layer, or the change from the first model. Returns an
    ``ipywidgets.VBox``; each change redraws into its ``Output``.
    """
    import ipywidgets as W
    from IPython.display import display

    models = models if isinstance(models, dict) else {"model": models}
    names = list(models)
    config = models[names[0]].config
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    method = W.Dropdown(options=names, description="method")
    views = ["one head", "all heads"] + ([f"change from {names[0]}"] if len(names) > 1 else [])
    view = W.ToggleButtons(options=views, description="show")
    layer_s = W.IntSlider(value=min(layer, n_layers - 1), min=0, max=n_layers - 1, description="layer",
                          continuous_update=False)
    head_s = W.IntSlider(value=min(head, n_heads - 1), min=0, max=n_heads - 1, description="head",
                         continuous_update=False)
    text = W.Text(value=sentence, description="sentence", continuous_update=False,
                  layout=W.Layout(width="95%"))
    out = W.Output()
    cache: dict = {}

    def maps_of(name):
        if (name, text.value) not in cache:
            cache[name, text.value] = attention_maps(models[name], tokenizer, text.value)
        return cache[name, text.value]

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            try:
                maps = maps_of(method.value)
                if view.value == "one head":
                    fig = plot_head(maps, layer_s.value, head_s.value)
                elif view.value == "all heads":
                    fig = plot_layer(maps, layer_s.value)
                else:
                    fig = plot_attention_change(maps_of(names[0]), maps, layer_s.value, head_s.value,
                                                names=(names[0], method.value))
                display(fig)
            except (ValueError, IndexError, RuntimeError) as err:
                print(f"✗ {err}")

    for w in (method, view, layer_s, head_s, text):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([method, view]), W.HBox([layer_s, head_s]), text, out])
