"""Looking inside a model: attention heatmaps, offline bertviz views, widgets, attributions.

Everything here is explained in ``notebooks/07_attention_visualization.ipynb``; each
docstring names its section. Conventions:

* ``attention_maps`` runs a model once with ``output_attentions=True`` and returns an
  :class:`AttentionMaps`: the query tokens and, per layer, a (heads, T, m + T) tensor.
  ``m`` is 0 for an ordinary model; a prefix-tuned model (``peftlab.prefix``) attends to m
  virtual tokens first, shown as P0, P1, ... on the key axis.
* Plotting functions return a ``matplotlib.figure.Figure`` built without pyplot, so a
  notebook shows each figure exactly once and nothing piles up in pyplot's figure list.
* Text in figures is at least 9 pt (``FONT_SIZE``) at the size a function picks.
* ``head_view`` / ``model_view`` return bertviz's own views (the ``bertviz`` package) as
  self-contained HTML: d3 and jQuery (``peftlab/static/viz``, with their licences) are
  inlined, nothing is fetched. Importing this module also runs :func:`enable_offline_bertviz`,
  so bertviz's own ``from bertviz import head_view; head_view(attention, tokens)`` draws
  offline too (``peftlab/bertviz_offline.py`` says how).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "AttentionMaps", "Attributions", "OfflineView", "attention_change", "attention_explorer",
    "attention_maps", "attribution_html", "enable_offline_bertviz", "head_view", "model_view",
    "new_figure", "plot_attention_change", "plot_attributions", "plot_change_by_head", "plot_head",
    "plot_layer", "plot_prefix_share", "prefix_names", "prefix_share", "token_attributions",
]

# transformers attention kernels that never materialise the probabilities
NO_MAPS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention")
FONT_SIZE = 9  # pt: the smallest text in any figure here (tick labels, cell values)
TITLE_SIZE = 11  # pt: panel titles
FIGURE_WIDTH = 12.0  # inches (1200 px as a notebook PNG): plot_layer picks its columns to fit
_PER_TOKEN = 0.2  # inches per token along a labelled heatmap axis: 14.4 pt for a 9 pt label


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
    left.set_title(f"share of attention on the {maps.prefix_length} prefix keys", fontsize=TITLE_SIZE)
    right.barh(range(lam.shape[0]), lam.mean(1).numpy(), color="tab:orange")
    right.set(xlim=(0, 1), ylim=(lam.shape[0] - 0.5, -0.5))
    right.set_yticks(range(lam.shape[0]), [str(i) for i in range(lam.shape[0])], fontsize=FONT_SIZE)
    right.tick_params(axis="x", labelsize=FONT_SIZE)
    right.set_xlabel("mean λ", fontsize=FONT_SIZE + 1)
    right.set_title("per layer", fontsize=TITLE_SIZE)
    return fig


# -- bertviz ------------------------------------------------------------------------------
def enable_offline_bertviz() -> str:
    """Make bertviz's own ``head_view`` / ``model_view`` draw offline (section "bertviz views").

    Afterwards ``from bertviz import head_view, model_view`` and bertviz's usual calls,
    ``head_view(attention, tokens)``, draw with no network: d3 and jQuery are inlined from
    ``peftlab/static/viz``. Attention with prefix keys (a prefix-tuned model's
    ``outputs.attentions``) is accepted, the keys labelled P0, P1, ...; so is an
    :class:`AttentionMaps`. Idempotent; importing ``peftlab.viz`` already calls it when bertviz
    is installed. Returns bertviz's version. How it works: ``peftlab.bertviz_offline``.
    """
    from . import bertviz_offline

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
    scales it down to the output area when that is narrower (see ``peftlab.bertviz_offline``).
    """
    if display_mode not in ("light", "dark"):
        raise ValueError(f'display_mode must be "light" or "dark", got {display_mode!r}')
    layers, heads = _checked(maps, layers, heads)
    out = _bertviz().model_view(_batched(maps), list(maps.tokens), prettify_tokens=False,
                                display_mode=display_mode, include_layers=layers, include_heads=heads,
                                html_action="return")
    return OfflineView(out.data)


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
    ax.set_xticks(range(len(scores)), attr.tokens, rotation=90, fontsize=FONT_SIZE + 1)
    ax.tick_params(axis="y", labelsize=FONT_SIZE)
    ax.set_ylabel("attribution to the logit", fontsize=FONT_SIZE + 1)
    ax.set_title(f"integrated gradients, class {attr.target} (p = {attr.probability:.2f})", fontsize=TITLE_SIZE)
    return ax.figure


try:  # bertviz's own views draw offline once peftlab.viz is imported (it is a course dependency)
    enable_offline_bertviz()
except ImportError:  # without bertviz the rest of this module works; head_view says how to install it
    pass
