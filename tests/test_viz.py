"""peftlab.viz: heatmaps, offline bertviz views, widgets and attributions (notebook 08)."""

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from matplotlib.figure import Figure

from peftlab import viz

STATIC_SHA256 = {
    "d3.min.js": "bdad5585ef9a965ff25458738309b006058c55f2c78d794d25fbecae35014609",
    "jquery.slim.min.js": "9261efb3407e3a9096e4654750d8eff6b3a663422f48845c7fbcc65034c340cf",
}
# bertviz 1.4.1's own scripts, which peftlab.viz.bertviz_offline rewrites (a new bertviz needs a look)
BERTVIZ_SHA256 = {
    "head_view.js": "32885444af280c1745d0552da79d8dbad6ce52b5a6b4bd1ef5384cc4a917d7c0",
    "model_view.js": "a22b6b559eebfb3898ff9b45930ca7a16f9e5fe9040b968d92e8c10991ea353c",
}
SENTENCE = "A quiet, moving film."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from peftlab.hub import embedded_path

    return AutoTokenizer.from_pretrained(embedded_path("minilm"))


def tiny_bert(tokenizer, attn="eager", positions=64, seed=0):
    import transformers as T

    torch.manual_seed(seed)
    config = T.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=positions,
                          num_labels=2, attn_implementation=attn)
    return T.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_bert(tokenizer)


def fake_maps(tokens=("[CLS]", "good", "</s>", "[SEP]"), layers=2, heads=3, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = len(tokens)
    atts = [torch.rand(heads, t, m + t, generator=g).softmax(-1) for _ in range(layers)]
    return viz.AttentionMaps(list(tokens), atts)


def labels(axis):
    return [t.get_text() for t in axis.get_ticklabels()]


# -- maps ----------------------------------------------------------------------------------
def test_maps_shapes_and_rows(model, tokenizer):
    maps = viz.attention_maps(model, tokenizer, SENTENCE)
    t = len(tokenizer(SENTENCE)["input_ids"])
    assert maps.tokens[0] == "[CLS]" and maps.tokens[-1] == "[SEP]" and len(maps.tokens) == t
    assert (maps.num_layers, maps.num_heads, maps.prefix_length) == (2, 2, 0)
    assert all(a.shape == (2, t, t) for a in maps.attentions)
    assert torch.allclose(torch.stack(maps.attentions).sum(-1), torch.ones(2, 2, t), atol=1e-5)
    assert not model.training and not maps.truncated


def test_prefix_tuned_model_has_prefix_columns(tokenizer):
    import peftlab.prefix  # noqa: F401  (registers the method)
    from peftlab.config import PrefixConfig
    from peftlab.inject import disabled, inject

    model = inject(tiny_bert(tokenizer), PrefixConfig(num_virtual_tokens=3, projection=False))
    maps = viz.attention_maps(model, tokenizer, SENTENCE)
    t = len(maps.tokens)
    assert maps.prefix_length == 3 and maps.key_tokens[:4] == ["P0", "P1", "P2", "[CLS]"]
    assert all(a.shape == (2, t, t + 3) for a in maps.attentions)
    lam = viz.prefix_share(maps)
    assert lam.shape == (2, 2) and bool(((lam > 0) & (lam < 1)).all())
    with disabled(model):
        base = viz.attention_maps(model, tokenizer, SENTENCE)
    change = viz.attention_change(base, maps)
    assert change.shape == (2, 2) and bool((change > 0).all())
    # the base model puts no mass on the prefix, so its share is part of the distance
    assert bool((change >= lam - 1e-6).all())


def test_truncation_is_announced(tokenizer, capsys):
    model = tiny_bert(tokenizer, positions=16)
    maps = viz.attention_maps(model, tokenizer, "word " * 40)
    said = capsys.readouterr().out
    assert "42 tokens long" in said and "at most 16" in said and "truncated" in said
    assert maps.truncated and len(maps.tokens) == 16 and maps.tokens[-1] == "[SEP]"


def test_model_without_maps_says_how_to_fix_it(tokenizer):
    with pytest.raises(RuntimeError, match=r'attn_implementation="eager".*set_attn_implementation\("eager"\)'):
        viz.attention_maps(tiny_bert(tokenizer, attn="sdpa"), tokenizer, SENTENCE)

    class Silent(torch.nn.Module):  # an attention kernel nobody told us about, returning nothing
        config = SimpleNamespace(_attn_implementation="custom", max_position_embeddings=64)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kwargs):
            return SimpleNamespace(attentions=())

    with pytest.raises(RuntimeError, match="'custom', which returns no attention maps"):
        viz.attention_maps(Silent(), tokenizer, SENTENCE)


def test_empty_sentence(model, tokenizer):
    with pytest.raises(ValueError, match="non-empty string"):
        viz.attention_maps(model, tokenizer, "  ")


@pytest.mark.parametrize("call", [
    lambda m: viz.plot_head(m, 2, 0), lambda m: viz.plot_layer(m, -1), lambda m: viz.head_view(m, layer=5),
    lambda m: viz.model_view(m, layers=[0, 2]), lambda m: viz.plot_attention_change(m, m, 9, 0)])
def test_bad_layer(call):
    with pytest.raises(IndexError, match=r"layer .* out of range: this model has 2 layers, numbered 0 to 1"):
        call(fake_maps())


@pytest.mark.parametrize("call", [
    lambda m: viz.plot_head(m, 0, 3), lambda m: viz.plot_layer(m, 1, heads=[0, 7]),
    lambda m: viz.head_view(m, heads=[3]), lambda m: viz.model_view(m, heads=[-1])])
def test_bad_head(call):
    with pytest.raises(IndexError, match=r"head .* out of range: this model has 3 heads, numbered 0 to 2"):
        call(fake_maps())


# -- figures -------------------------------------------------------------------------------
def test_plot_head_labels_prefix_tokens():
    maps = fake_maps(m=2)
    fig = viz.plot_head(maps, 1, 2)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert labels(ax.xaxis) == ["P0", "P1", "[CLS]", "good", "</s>", "[SEP]"]
    assert labels(ax.yaxis) == ["[CLS]", "good", "</s>", "[SEP]"]
    assert ax.images[0].get_array().shape == (4, 6) and ax.get_title() == "layer 1, head 2"


def test_plot_layer_grid():
    maps = fake_maps(heads=5, m=1)
    fig = viz.plot_layer(maps, 0, cols=2)
    with_image = [ax for ax in fig.axes if ax.images]
    assert len(with_image) == 5 and with_image[-1].get_title() == "head 4"
    assert labels(with_image[-1].xaxis)[:2] == ["P0", "[CLS]"]  # bottom row carries the key labels
    assert labels(with_image[0].yaxis)[0] == "[CLS]"


def test_plain_model_has_no_p_labels():
    fig = viz.plot_head(fake_maps(m=0), 0, 0)
    assert not any(t.startswith("P") for t in labels(fig.axes[0].xaxis))


def test_before_after_and_prefix_share():
    tuned = fake_maps(m=2, seed=1)
    base = viz.AttentionMaps(tuned.tokens, [torch.eye(4).expand(3, 4, 4).clone() for _ in range(2)])
    assert torch.equal(viz.attention_change(base, base), torch.zeros(2, 3))
    fig = viz.plot_attention_change(base, tuned, 1, 0)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["base", "fine-tuned", "fine-tuned − base"]
    assert labels(fig.axes[0].xaxis)[:3] == ["P0", "P1", "[CLS]"]
    lam = viz.prefix_share(tuned)
    expected = torch.stack([a[:, :, :2].sum(-1).mean(-1) for a in tuned.attentions])
    assert torch.allclose(lam, expected) and viz.prefix_share(tuned, per_query=True).shape == (2, 3, 4)
    assert isinstance(viz.plot_prefix_share(tuned), Figure)
    assert isinstance(viz.plot_change_by_head(base, tuned), Figure)
    with pytest.raises(ValueError, match="needs a prefix-tuned model"):
        viz.prefix_share(base)
    with pytest.raises(ValueError, match="same sentence"):
        viz.attention_change(base, fake_maps(tokens=("a", "b")))


# -- offline bertviz -----------------------------------------------------------------------
def test_static_files_are_the_published_ones():
    from importlib import resources

    folder = resources.files("peftlab") / "static/viz"
    for name, digest in STATIC_SHA256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    for licence in ("d3.LICENSE", "jquery.LICENSE.txt"):
        assert (folder / licence).read_text().strip()


def test_installed_bertviz_is_the_pinned_one():
    from importlib import metadata, resources

    from peftlab.viz.bertviz_offline import BERTVIZ_VERSION

    assert metadata.version("bertviz") == BERTVIZ_VERSION
    constraints = Path(__file__).resolve().parents[1] / ".ci/constraints.txt"
    pins = dict(line.split("==") for line in constraints.read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["bertviz"] == BERTVIZ_VERSION
    folder = resources.files("bertviz")
    for name, digest in BERTVIZ_SHA256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


def assert_offline(html: str):
    """No <script src>, no require.config, and every http(s) URL is an XML namespace or in a comment."""
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I), "a script is loaded from elsewhere"
    assert not re.search(r"\bsrc\s*=\s*[\"']?(https?:)?//", html, re.I), "something is loaded from elsewhere"
    assert "cdnjs" not in html and "require.config" not in html and "requirejs.config" not in html
    for line in html.splitlines():
        for url in re.findall(r"https?://[^\s\"'<>)]+", line):
            in_comment = line.lstrip().startswith(("*", "//", "/*"))
            assert url.startswith("http://www.w3.org/") or in_comment, f"{url} is referenced in: {line[:120]}"
    assert re.search(r"<script[^>]*>", html) and "d3js.org v5.7.0" in html and "jQuery v3.7.1" in html


def params_of(html: str) -> dict:
    return json.loads(re.search(r"const params = (\{.*?\}); // HACK", html).group(1))


def batched(maps):
    return [a.unsqueeze(0) for a in maps.attentions]


@pytest.mark.parametrize("view", [viz.head_view, viz.model_view])
def test_bertviz_views_are_offline_and_prefix_aware(view, tmp_path):
    maps = fake_maps(m=2)
    out = view(maps)
    assert_offline(out.html)
    assert out._repr_html_() == out.html
    data = params_of(out.html)["attention"][0]
    assert data["right_text"] == ["P0", "P1", "[CLS]", "good", "</s>", "[SEP]"]
    assert data["left_text"] == maps.tokens
    assert len(data["attn"]) == 2 and len(data["attn"][0][0]) == 4 and len(data["attn"][0][0][0]) == 6
    assert "</s>" not in out.html.split("const params")[1].split("\n")[0]  # cannot close the script
    assert out.html.count('"left_text"') == 1  # the data is inlined once, not also into a comment
    page = out.save(tmp_path / "view.html").read_text()
    assert page.startswith("<!doctype html>") and out.html in page


def test_head_view_options():
    maps = fake_maps(layers=3)
    out = viz.head_view(maps, layer=2, heads=[1], layers=[0, 2])
    params = params_of(out.html)
    assert (params["layer"], params["heads"], params["include_layers"]) == (2, [1], [0, 2])
    assert len(params["attention"][0]["attn"]) == 2
    with pytest.raises(IndexError, match=r"not among the layers shown, \[0, 2\]"):
        viz.head_view(maps, layer=1, layers=[0, 2])
    with pytest.raises(ValueError, match="display_mode"):
        viz.model_view(maps, display_mode="blue")


def shown_html(monkeypatch, call) -> list:
    """What a notebook cell calling ``call()`` would display, as HTML strings."""
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    assert call() is None
    return [obj._repr_html_() for obj in shown]


@pytest.mark.parametrize("name", ["head_view", "model_view"])
def test_bertvizs_own_views_draw_offline(name, monkeypatch):
    """``from bertviz import head_view; head_view(attention, tokens)`` as bertviz documents it."""
    import bertviz

    view = getattr(bertviz, name)  # enabled by importing peftlab.viz
    maps = fake_maps(m=0)
    outputs = shown_html(monkeypatch, lambda: view(batched(maps), maps.tokens))
    assert len(outputs) == 2  # the view's <div> (after its note), then its script; no CDN require.js
    div, script = outputs
    assert re.search(r'<div id="bertviz-[0-9a-f]{32}-note"', div) and 'id="vis"' in div.replace("'", '"')
    assert script.startswith('<script type="text/javascript">') and script.count("</script") == 1
    assert_offline("\n".join(outputs))
    data = params_of(script)["attention"][0]
    assert data["left_text"] == data["right_text"] == maps.tokens
    returned = view(batched(maps), maps.tokens, html_action="return").data  # one self-contained HTML
    assert_offline(returned)
    assert len(re.findall(r'<div id="bertviz-[0-9a-f]{32}-note"', returned)) == 1
    assert returned.count('"left_text"') == 1


@pytest.mark.parametrize("name", ["head_view", "model_view"])
def test_bertviz_views_take_prefix_keys(name):
    import bertviz

    maps = fake_maps(m=3)
    keys = ["P0", "P1", "P2", *maps.tokens]
    for args in ((batched(maps), maps.tokens), (maps,)):  # the model's attentions, or AttentionMaps
        html = getattr(bertviz, name)(*args, html_action="return").data
        assert_offline(html)
        data = params_of(html)["attention"][0]
        assert (data["left_text"], data["right_text"]) == (maps.tokens, keys)
        assert len(data["attn"][0][0]) == 4 and len(data["attn"][0][0][0]) == 7
    with pytest.raises(ValueError, match="sentence_b_start cannot be combined with prefix keys"):
        getattr(bertviz, name)(batched(maps), maps.tokens, sentence_b_start=2)


def test_enabling_is_idempotent_and_covers_earlier_imports():
    import bertviz
    import bertviz.head_view  # noqa: F401  (the module; bertviz.head_view the name is the function)

    before = bertviz.head_view
    assert viz.enable_offline_bertviz() == "1.4.1" and viz.enable_offline_bertviz() == "1.4.1"
    assert bertviz.head_view is before
    original = before.__peftlab_original__  # what `from bertviz import head_view` gave before enabling
    maps = fake_maps(m=0)
    assert_offline(original(batched(maps), maps.tokens, html_action="return").data)


def test_a_token_cannot_end_the_script():
    maps = fake_maps(tokens=("[CLS]", "</script>", "<!--", "[SEP]"), m=1)
    html = viz.head_view(maps).html
    assert html.count("</script") == 1 and "</s" not in html.split("const params")[1].split("\n")[0]
    assert params_of(html)["attention"][0]["left_text"] == list(maps.tokens)


def test_model_view_fits_1400_px():
    """bertviz draws the model view DIV_WIDTH px wide whatever the heads; it must fit JupyterLab at 1400 px."""
    from importlib import resources

    js = (resources.files("bertviz") / "model_view.js").read_text()
    const = {k: float(v) for k, v in re.findall(r"const (\w+) = (\d+(?:\.\d+)?);", js)}
    axis = const["HEADING_TEXT_SIZE"] + const["HEADING_PADDING"] + const["TEXT_SIZE"] + const["TEXT_PADDING"]
    layers, heads, tokens = 6, 12, 16  # MiniLM on a one-line sentence
    thumb_w = (const["DIV_WIDTH"] - axis) / heads
    thumb_h = tokens * 7 * (12 / heads) + 2 * const["THUMBNAIL_PADDING"]
    # JupyterLab 4 at 1400 px, sidebars closed: two 33 px tab bars, a 64 px prompt, ~60 px of padding
    area = 1400 - 2 * 33 - 64 - 60
    assert const["DIV_WIDTH"] <= area and thumb_w >= 70 and layers * thumb_h + axis <= 1000
    # narrower (a file browser open): the view scales down instead of overflowing
    html = viz.model_view(fake_maps(tokens=tuple(f"t{i}" for i in range(tokens)), layers=layers, heads=heads)).html
    assert 'setAttribute("viewBox"' in html and 'svg.style.width = "100%"' in html
    assert params_of(html)["total_heads"] == heads


# -- figure text ---------------------------------------------------------------------------
def drawn_text(fig):
    """Each drawn, non-empty text of ``fig`` with its box on a rendered canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for t in fig.findobj(Text):
        ax = t.axes
        if t.get_visible() and t.get_text().strip() and (ax is None or ax.axison) and t.get_alpha() != 0:
            out.append((t, t.get_window_extent(renderer)))
    return out


def minilm_like(m=2):
    return fake_maps(tokens=("[CLS]", "the", "plot", "is", "thin", "but", "the", "acting", "is", "superb",
                             ".", "[SEP]"), layers=6, heads=12, m=m)


FIGURES = {
    "plot_head": lambda m: viz.plot_head(m, 3, 5),
    "plot_layer": lambda m: viz.plot_layer(m, 2),
    "plot_attention_change": lambda m: viz.plot_attention_change(minilm_like(m=0), m, 4, 1),
    "plot_change_by_head": lambda m: viz.plot_change_by_head(minilm_like(m=0), m),
    "plot_prefix_share": lambda m: viz.plot_prefix_share(m),
    "plot_attributions": lambda m: viz.plot_attributions(viz.Attributions(
        m.tokens, torch.linspace(-1, 1, len(m.tokens)), 1, 0.9, 2.0, 0.5, 0.0)),
}


@pytest.mark.parametrize("name", FIGURES)
def test_figure_text_is_readable(name):
    """At the size each function picks: every text >= 9 pt, and no two tick labels (or cell values) overlap."""
    fig = FIGURES[name](minilm_like())
    texts = drawn_text(fig)
    small = [(t.get_text(), t.get_fontsize()) for t, _ in texts if t.get_fontsize() < 9]
    assert not small, f"{name}: text under 9 pt: {small[:8]}"
    for ax in fig.axes:
        if not ax.axison:
            continue
        groups = [ax.xaxis.get_ticklabels(), ax.yaxis.get_ticklabels(), ax.texts]
        for group in groups:
            boxes = [box for t, box in texts if t in group]
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b), f"{name}: two labels overlap in {ax.get_title()!r}"
    assert fig.get_figwidth() <= 18 and fig.get_figheight() <= 18
    if name == "plot_layer":  # 12 heads: columns chosen to keep the PNG within FIGURE_WIDTH
        assert fig.get_figwidth() <= viz.FIGURE_WIDTH


# -- widgets -------------------------------------------------------------------------------
def test_explorer_redraws(model, tokenizer, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    other = tiny_bert(tokenizer, seed=1)
    box = viz.attention_explorer({"base": model, "other": other}, tokenizer, SENTENCE)
    method, view = box.children[0].children
    layer, head = box.children[1].children
    text = box.children[2]
    assert (layer.max, head.max, list(method.options)) == (1, 1, ["base", "other"])
    assert shown[-1].axes[0].get_title() == "layer 0, head 0"
    head.value = 1
    assert shown[-1].axes[0].get_title() == "layer 0, head 1"
    layer.value = 1
    view.value = "all heads"
    assert shown[-1]._suptitle.get_text().startswith("layer 1")
    method.value = "other"
    view.value = "change from base"
    assert [ax.get_title() for ax in shown[-1].axes[:3]] == ["base", "other", "other − base"]
    text.value = "Another sentence entirely."
    assert "entirely" in labels(shown[-1].axes[0].yaxis)
    assert len(shown) == 7


# -- attributions --------------------------------------------------------------------------
def test_integrated_gradients_completeness(model, tokenizer):
    attr = viz.token_attributions(model, tokenizer, SENTENCE, n_steps=64)
    gap = attr.logit - attr.baseline_logit
    assert attr.scores.shape == (len(attr.tokens),) and attr.tokens[0] == "[CLS]"
    assert abs(float(attr.scores.sum()) - gap) <= 1e-3 + 1e-2 * abs(gap)
    assert abs(float(attr.scores.sum()) + attr.delta - gap) < 1e-4
    assert attr.scores[0] == 0 and attr.scores[-1] == 0  # special tokens are their own baseline
    other = viz.token_attributions(model, tokenizer, SENTENCE, target=1 - attr.target, n_steps=8)
    assert other.target == 1 - attr.target
    with pytest.raises(IndexError, match="classes are 0 to 1"):
        viz.token_attributions(model, tokenizer, SENTENCE, target=2)


def test_attribution_rendering():
    attr = viz.Attributions(["[CLS]", "<b>", "bad"], torch.tensor([0.0, 0.5, -1.0]), 1, 0.7, 1.0, 0.5, 0.0)
    html = viz.attribution_html(attr)
    assert "&lt;b&gt;" in html and "rgba(210,40,40,1.00)" in html and "rgba(0,150,60,0.50)" in html
    fig = viz.plot_attributions(attr)
    assert labels(fig.axes[0].xaxis) == ["[CLS]", "<b>", "bad"] and len(fig.axes[0].patches) == 3


# -- the real model ------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_maps_views_and_attributions(minilm):
    model, tokenizer = minilm
    maps = viz.attention_maps(model, tokenizer, "The plot is thin but the acting is superb.")
    assert (maps.num_layers, maps.num_heads, maps.prefix_length) == (6, 12, 0)
    assert_offline(viz.model_view(maps).html)
    attr = viz.token_attributions(model, tokenizer, "The plot is thin but the acting is superb.", n_steps=32)
    assert abs(float(attr.scores.sum()) + attr.delta - (attr.logit - attr.baseline_logit)) < 1e-4


@pytest.mark.slow
def test_minilm_loaded_with_sdpa_is_refused():
    from peftlab import load_model

    model, tokenizer = load_model("minilm", attn_implementation="sdpa")
    with pytest.raises(RuntimeError, match="'sdpa', which returns no attention maps"):
        viz.attention_maps(model, tokenizer, "Hello.")
    model.set_attn_implementation("eager")  # the fix the message names works
    assert viz.attention_maps(model, tokenizer, "Hello.").num_layers == 6


def test_figures_show_as_png_without_pyplot():
    fig = viz.plot_head(fake_maps(), 0, 0)
    assert fig._repr_png_().startswith(b"\x89PNG")
    import matplotlib.pyplot as plt

    assert fig not in [plt.figure(n) for n in plt.get_fignums()]
