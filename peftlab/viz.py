"""Looking inside a model: attention heatmaps, offline bertviz views, widgets, attributions.

Everything here is explained in ``notebooks/07_attention_visualization.ipynb``; each
docstring names its section. Conventions:

* ``attention_maps`` runs a model once with ``output_attentions=True`` and returns an
  :class:`AttentionMaps`: the query tokens and, per layer, a (heads, T, m + T) tensor.
  ``m`` is 0 for an ordinary model; a prefix-tuned model (``peftlab.prefix``) attends to m
  virtual tokens first, shown as P0, P1, ... on the key axis.
* Plotting functions return a ``matplotlib.figure.Figure`` built without pyplot, so a
  notebook shows each figure exactly once and nothing piles up in pyplot's figure list.
* ``head_view`` / ``model_view`` produce bertviz's views as self-contained HTML: d3 and
  jQuery (``peftlab/static/viz``, with their licences) are inlined, nothing is fetched.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "AttentionMaps", "Attributions", "OfflineView", "attention_change", "attention_explorer",
    "attention_maps", "attribution_html", "head_view", "model_view", "new_figure", "plot_attention_change",
    "plot_attributions", "plot_change_by_head", "plot_head", "plot_layer", "plot_prefix_share",
    "prefix_names", "prefix_share", "token_attributions",
]

# transformers attention kernels that never materialise the probabilities
NO_MAPS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention")
_STATIC = "static/viz"


# -- getting the maps ---------------------------------------------------------------------
def prefix_names(m: int) -> list[str]:
    """Labels of m prefix virtual tokens: ``["P0", "P1", ...]``."""
    return [f"P{i}" for i in range(m)]


@dataclass
class AttentionMaps:
    """One sentence's attention probabilities (section "Getting the maps").

    ``attentions[l]`` is (heads, T, m + T): row i is query token i's distribution over the
    m prefix keys (if any) followed by the T token keys; every row sums to 1.
    """

    tokens: list[str]
    attentions: list[torch.Tensor]
    truncated: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.attentions)

    @property
    def num_heads(self) -> int:
        return self.attentions[0].shape[0]

    @property
    def prefix_length(self) -> int:
        return self.attentions[0].shape[-1] - len(self.tokens)

    @property
    def key_tokens(self) -> list[str]:
        return prefix_names(self.prefix_length) + list(self.tokens)

    def check(self, layer: int, head: int | None = None) -> None:
        """Raise ``IndexError`` naming the valid range when ``layer`` or ``head`` is outside it."""
        for what, value, count in (("layer", layer, self.num_layers), ("head", head, self.num_heads)):
            if value is None and what == "head":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
                raise IndexError(f"{what} {value!r} is out of range: this model has {count} {what}s, "
                                 f"numbered 0 to {count - 1}")

    def head(self, layer: int, head: int) -> torch.Tensor:
        """The (T, m + T) map of one head."""
        self.check(layer, head)
        return self.attentions[layer][head]


def _clean(token: str) -> str:
    """A token as a label: byte-level BPE and SentencePiece word markers become a space."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n").strip() or token


def _no_maps(impl) -> RuntimeError:
    return RuntimeError(
        f"this model runs attention with {impl!r}, which returns no attention maps. Load it with "
        'peftlab.load_model(..., attn_implementation="eager") or switch it in place with '
        'model.set_attn_implementation("eager").')


def _length_limit(model, tokenizer, max_length: int | None) -> int:
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None), max_length]
    return min(int(x) for x in limits if x is not None and 0 < x < 1_000_000)


def _encode(model, tokenizer, sentence: str, max_length: int | None):
    """Tokenise one sentence, cutting it (and saying so) where the model's limit demands."""
    if not isinstance(sentence, str) or not sentence.strip():
        raise ValueError(f"sentence must be a non-empty string, got {sentence!r}")
    limit = _length_limit(model, tokenizer, max_length)
    n = len(tokenizer(sentence, verbose=False)["input_ids"])  # verbose=False: we say it ourselves
    if n > limit:
        print(f"peftlab.viz: the sentence is {n} tokens long but the model reads at most {limit}; "
              f"it was truncated to its first {limit} tokens.")
    batch = tokenizer(sentence, return_tensors="pt", truncation=True, max_length=limit)
    return batch, n > limit


def attention_maps(model, tokenizer, sentence: str, *, max_length: int | None = None) -> AttentionMaps:
    """Run ``model`` on ``sentence`` and return its attention maps (section "Getting the maps").

    Too long a sentence is truncated with a printed notice. A model whose attention kernel
    returns no maps (sdpa, flash) raises ``RuntimeError`` saying how to switch to eager.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl in NO_MAPS:
        raise _no_maps(impl)
    batch, truncated = _encode(model, tokenizer, sentence, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in batch.items()}, output_attentions=True)
    finally:
        model.train(was_training)
    found = getattr(out, "attentions", None)
    if not found or any(a is None for a in found):
        raise _no_maps(impl)
    tokens = [_clean(t) for t in tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())]
    return AttentionMaps(tokens, [a[0].detach().float().cpu() for a in found], truncated)


# -- matplotlib ---------------------------------------------------------------------------
_FIGURE_CLASS = None


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


def _label(ax, maps: AttentionMaps, fontsize: float, x: bool = True, y: bool = True) -> None:
    keys, m = maps.key_tokens, maps.prefix_length
    ax.set_xticks(range(len(keys)), keys if x else [], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(maps.tokens)), maps.tokens if y else [], fontsize=fontsize)
    if m:
        ax.axvline(m - 0.5, color="white", lw=1.5)


def plot_head(maps: AttentionMaps, layer: int, head: int, *, ax=None):
    """Heatmap of one head: queries down, keys across, prefix keys P0.. first (section "Heatmaps")."""
    att = maps.head(layer, head)
    if ax is None:
        fig = new_figure(2.5 + 0.32 * att.shape[1], 1.8 + 0.3 * att.shape[0])
        ax = fig.add_subplot()
    fig = ax.figure
    im = ax.imshow(att.numpy(), cmap="viridis", vmin=0.0, vmax=float(att.max()), aspect="auto")
    _label(ax, maps, 8)
    ax.set(xlabel="key (attended to)", ylabel="query", title=f"layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention")
    return fig


def plot_layer(maps: AttentionMaps, layer: int, *, heads: list[int] | None = None, cols: int = 4):
    """All heads of one layer as a grid of heatmaps (section "Heatmaps")."""
    maps.check(layer)
    heads = list(range(maps.num_heads)) if heads is None else list(heads)
    for h in heads:
        maps.check(layer, h)
    cols = max(1, min(cols, len(heads)))
    rows = -(-len(heads) // cols)
    k, t = len(maps.key_tokens), len(maps.tokens)
    fig = new_figure(cols * (0.9 + 0.17 * k) + 0.8, rows * (0.9 + 0.17 * t) + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(heads):
            ax.set_axis_off()
            continue
        ax.imshow(maps.attentions[layer][heads[i]].numpy(), cmap="viridis", vmin=0, aspect="auto")
        _label(ax, maps, 6, x=i + cols >= len(heads), y=i % cols == 0)
        ax.set_title(f"head {heads[i]}", fontsize=9)
    fig.suptitle(f"layer {layer}: every head (rows: queries, columns: keys)")
    return fig


# -- before / after ---------------------------------------------------------------------
def _aligned(base: AttentionMaps, tuned: AttentionMaps) -> tuple[list[torch.Tensor], list[torch.Tensor], AttentionMaps]:
    """Both models' maps over the same keys: the one without a prefix gets zero prefix columns."""
    if base.tokens != tuned.tokens:
        raise ValueError("the two maps are for different token sequences; run both models on the same sentence")
    if (base.num_layers, base.num_heads) != (tuned.num_layers, tuned.num_heads):
        raise ValueError(f"the models differ in shape: {base.num_layers}x{base.num_heads} vs "
                         f"{tuned.num_layers}x{tuned.num_heads} (layers x heads)")
    m = max(base.prefix_length, tuned.prefix_length)

    def pad(maps):
        extra = m - maps.prefix_length
        return [torch.nn.functional.pad(a, (extra, 0)) for a in maps.attentions]

    return pad(base), pad(tuned), (base if base.prefix_length == m else tuned)


def attention_change(base: AttentionMaps, tuned: AttentionMaps) -> torch.Tensor:
    """(layers, heads): mean over queries of the total variation ½·Σ_k |a_k − b_k| (section "After fine-tuning").

    0 means a head attends exactly as before; 1 means every query moved all its attention.
    """
    a, b, _ = _aligned(base, tuned)
    return torch.stack([0.5 * (y - x).abs().sum(-1).mean(-1) for x, y in zip(a, b)])


def plot_attention_change(base: AttentionMaps, tuned: AttentionMaps, layer: int, head: int, *,
                          names: tuple[str, str] = ("base", "fine-tuned")):
    """One head before, after, and after − before (section "After fine-tuning")."""
    base.check(layer, head)
    a, b, keys = _aligned(base, tuned)
    x, y = a[layer][head], b[layer][head]
    diff, top = y - x, float(torch.maximum(x.max(), y.max()))
    lim = max(float(diff.abs().max()), 1e-6)
    fig = new_figure(3 * (1.2 + 0.2 * x.shape[1]) + 1, 2 + 0.25 * x.shape[0])
    axes = fig.subplots(1, 3)
    panels = ((x, names[0], "viridis", 0, top), (y, names[1], "viridis", 0, top),
              (diff, f"{names[1]} − {names[0]}", "RdBu_r", -lim, lim))
    for i, (ax, (data, title, cmap, lo, hi)) in enumerate(zip(axes, panels)):
        im = ax.imshow(data.numpy(), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        _label(ax, keys, 7, y=i == 0)
        ax.set_title(title)
        if i != 1:
            fig.colorbar(im, ax=ax, shrink=0.7)
    fig.suptitle(f"layer {layer}, head {head}")
    return fig


def _grid(ax, values: torch.Tensor, cmap: str, label: str, vmax: float | None = None) -> None:
    im = ax.imshow(values.numpy(), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    rows, cols, dark = *values.shape, 0.6 * (vmax or float(values.max()))
    ax.set(xticks=range(cols), yticks=range(rows), xlabel="head", ylabel="layer")
    if rows * cols <= 200:
        for (i, j), v in zip(torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).tolist(),
                             values.flatten().tolist()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v < dark else "black")
    ax.figure.colorbar(im, ax=ax, shrink=0.8, label=label)


def plot_change_by_head(base: AttentionMaps, tuned: AttentionMaps):
    """Heatmap of :func:`attention_change` for every layer and head (section "After fine-tuning")."""
    change = attention_change(base, tuned)
    fig = new_figure(1.5 + 0.55 * change.shape[1], 1.2 + 0.45 * change.shape[0])
    _grid(fig.add_subplot(), change, "magma", "mean total variation")
    fig.suptitle("how far each head's attention moved")
    return fig


def prefix_share(maps: AttentionMaps, *, per_query: bool = False) -> torch.Tensor:
    """λ, the attention mass on the prefix keys (section "Where the prefix draws attention").

    For query i, λ_i = Σ_{j<m} a_ij. Averaged over queries: (layers, heads); with
    ``per_query=True``: (layers, heads, T).
    """
    m = maps.prefix_length
    if m == 0:
        raise ValueError("these maps have no prefix columns (as many keys as queries): prefix share "
                         "needs a prefix-tuned model (peftlab.PrefixConfig)")
    lam = torch.stack([a[:, :, :m].sum(-1) for a in maps.attentions])  # (L, H, T)
    return lam if per_query else lam.mean(-1)


def plot_prefix_share(maps: AttentionMaps):
    """λ per layer and head as a heatmap, and per layer as bars (section "Where the prefix draws attention")."""
    lam = prefix_share(maps)
    fig = new_figure(4 + 0.55 * lam.shape[1], 1.5 + 0.45 * lam.shape[0])
    left, right = fig.subplots(1, 2, width_ratios=[3, 1])
    _grid(left, lam, "viridis", "λ (share on prefix)", vmax=1.0)
    left.set_title(f"share of attention on the {maps.prefix_length} prefix keys")
    right.barh(range(lam.shape[0]), lam.mean(1).numpy(), color="tab:orange")
    right.set(xlim=(0, 1), ylim=(lam.shape[0] - 0.5, -0.5), yticks=range(lam.shape[0]),
              xlabel="mean λ", title="per layer")
    return fig


# -- offline bertviz ----------------------------------------------------------------------
def _static(name: str) -> str:
    return (resources.files("peftlab") / _STATIC / name).read_text(encoding="utf-8")


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


def _render(script: str, params: dict, controls: str) -> OfflineView:
    vis_id = f"bertviz-{uuid.uuid4().hex}"
    params["root_div_id"] = vis_id
    data = json.dumps(params).replace("</", "<\\/")  # a token such as "</s>" cannot end the script
    code, found = re.subn(r"require\.config\(\{.*?\}\);", "", _static(script), count=1, flags=re.S)
    if not found:
        raise RuntimeError(f"{script} no longer has bertviz 1.4's require.config block")
    code = code.replace("PYTHON_PARAMS", data, 1)  # the marker is also named in a comment
    libs = {name: _static(file) for name, file in (("d3", "d3.min.js"), ("jquery", "jquery.slim.min.js"))}
    if any("</script" in src.lower() for src in libs.values()):
        raise RuntimeError("a bundled library contains '</script' and cannot be inlined")
    loaders = "".join(f"var {name} = load(function (module, exports) {{\n{src}\n}});\n"
                      for name, src in libs.items())
    js = ("(function () {\n"
          "function load(body) { var module = {exports: {}}; body(module, module.exports); return module.exports; }\n"
          f"{loaders}var modules = {{d3: d3, jquery: jquery}};\n"
          "var requirejs = function (names, done) { done.apply(null, names.map(function (n) { return modules[n]; })); };\n"
          "var require = {config: function () {}};\n"
          f'var note = document.getElementById("{vis_id}-note");\n'
          f"try {{\n{code}\nif (note) note.remove();\n}} catch (err) {{\n"
          'if (note) note.textContent = "bertviz view failed: " + err; throw err;\n}\n})();\n')
    html = (f'<div id="{vis_id}-note" style="color:#777;font-size:12px">bertviz view: it draws when '
            "this output's script runs. Only this line? Run the cell again (JupyterLab does not run "
            "scripts in saved outputs of an untrusted notebook).</div>\n"
            f'<div id="{vis_id}" style="font-family:\'Helvetica Neue\', Helvetica, Arial, sans-serif;">'
            f'<span style="user-select:none">{controls}</span><div id="vis"></div></div>\n'
            f'<script type="text/javascript">\n{js}</script>\n')
    return OfflineView(html)


def _bertviz_data(maps: AttentionMaps, layers, heads) -> tuple[list[int], list[int], dict]:
    layers = list(range(maps.num_layers)) if layers is None else list(layers)
    heads = list(range(maps.num_heads)) if heads is None else list(heads)
    for layer in layers:
        maps.check(layer)
    for head in heads:
        maps.check(0, head)
    attn = torch.stack([maps.attentions[l][heads] for l in layers])  # (layers, heads, T, m + T)
    rounded = [[[[round(v, 4) for v in row] for row in head] for head in layer] for layer in attn.tolist()]
    # bertviz draws queries on the left and keys on the right, so a longer key side (the
    # prefix P0.. first) is accepted as for its encoder-decoder "cross" attention
    return layers, heads, {"name": None, "attn": rounded, "left_text": list(maps.tokens),
                           "right_text": maps.key_tokens}


def head_view(maps: AttentionMaps, *, layer: int | None = None, heads: list[int] | None = None,
              layers: list[int] | None = None) -> OfflineView:
    """bertviz's head view, working offline (section "bertviz views").

    ``layer``: layer selected at first; ``heads``: heads highlighted at first (default all);
    ``layers``: layers offered in the menu (default all; fewer keeps the output small).
    """
    layers, _, data = _bertviz_data(maps, layers, None)
    if layer is not None and layer not in layers:
        maps.check(layer)
        raise IndexError(f"layer {layer} is not among the layers shown, {layers}")
    for head in heads or []:
        maps.check(layers[0], head)
    params = {"attention": [data], "default_filter": "0", "layer": layer, "heads": heads,
              "include_layers": layers}
    return _render("bertviz_head_view.js", params, 'Layer: <select id="layer"></select>')


def model_view(maps: AttentionMaps, *, layers: list[int] | None = None, heads: list[int] | None = None,
               display_mode: str = "light") -> OfflineView:
    """bertviz's model view (every layer x head as a thumbnail), offline (section "bertviz views")."""
    if display_mode not in ("light", "dark"):
        raise ValueError(f'display_mode must be "light" or "dark", got {display_mode!r}')
    layers, heads, data = _bertviz_data(maps, layers, heads)
    params = {"attention": [data], "default_filter": "0", "display_mode": display_mode,
              "include_layers": layers, "include_heads": heads, "total_heads": maps.num_heads}
    return _render("bertviz_model_view.js", params, "")


# -- widgets ------------------------------------------------------------------------------
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


# -- attributions (Captum) ----------------------------------------------------------------
@dataclass
class Attributions:
    """Integrated-gradients attribution of a classifier's logit to each token (section "Attributions").

    ``scores.sum() + delta == logit - baseline_logit`` (completeness).
    """

    tokens: list[str]
    scores: torch.Tensor  # (T,)
    target: int
    probability: float
    logit: float
    baseline_logit: float
    delta: float


def token_attributions(model, tokenizer, sentence: str, *, target: int | None = None, n_steps: int = 50,
                       max_length: int | None = None, internal_batch_size: int | None = None) -> Attributions:
    """Layer integrated gradients on the input embeddings, summed over the embedding width.

    Baseline: the same sentence with every non-special token replaced by padding. ``target``
    defaults to the predicted class. Explained in section "Attributions next to attention".
    """
    from captum.attr import LayerIntegratedGradients

    batch, _ = _encode(model, tokenizer, sentence, max_length)
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    special = torch.tensor(tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True),
                           dtype=torch.bool, device=device)
    baseline = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))

    def logits(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out, base = logits(ids, mask), logits(baseline, mask)
        if out.dim() != 2:
            raise ValueError(f"token_attributions explains a sequence classifier (logits of shape (batch, "
                             f"classes)); this model returns logits of shape {tuple(out.shape)}")
        target = int(out.argmax(-1)) if target is None else target
        if not 0 <= target < out.shape[-1]:
            raise IndexError(f"target {target} is out of range: classes are 0 to {out.shape[-1] - 1}")
        lig = LayerIntegratedGradients(logits, model.get_input_embeddings())
        attr, delta = lig.attribute(ids, baselines=baseline, additional_forward_args=(mask,), target=target,
                                    n_steps=n_steps, internal_batch_size=internal_batch_size,
                                    return_convergence_delta=True)
    finally:
        model.train(was_training)
    tokens = [_clean(t) for t in tokenizer.convert_ids_to_tokens(ids[0].tolist())]
    return Attributions(tokens, attr.sum(-1)[0].detach().float().cpu(), target,
                        float(out.softmax(-1)[0, target]), float(out[0, target]), float(base[0, target]),
                        float(delta))


def attribution_html(attr: Attributions) -> str:
    """Tokens on coloured backgrounds: green pushes towards the target class, red away."""
    import html

    top = max(float(attr.scores.abs().max()), 1e-12)
    spans = []
    for token, score in zip(attr.tokens, attr.scores.tolist()):
        rgb = "0,150,60" if score >= 0 else "210,40,40"
        spans.append(f'<span title="{score:+.3f}" style="background:rgba({rgb},{abs(score) / top:.2f});'
                     f'padding:1px 3px;margin:1px;border-radius:3px">{html.escape(token)}</span>')
    return (f'<div style="line-height:1.9">{" ".join(spans)}<br><small>class {attr.target}, '
            f"p = {attr.probability:.2f}; green: evidence for it, red: against</small></div>")


def plot_attributions(attr: Attributions, *, ax=None):
    """Bar plot of the per-token attributions (section "Attributions next to attention")."""
    if ax is None:
        ax = new_figure(1.5 + 0.4 * len(attr.tokens), 3).add_subplot()
    scores = attr.scores.numpy()
    ax.bar(range(len(scores)), scores, color=["tab:green" if s >= 0 else "tab:red" for s in scores])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(scores)), attr.tokens, rotation=90)
    ax.set(ylabel="attribution to the logit", title=f"integrated gradients, class {attr.target} "
           f"(p = {attr.probability:.2f})")
    return ax.figure
