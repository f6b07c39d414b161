"""bertviz's own ``head_view`` / ``model_view``, drawing offline in JupyterLab.

Stock bertviz 1.4.1 emits ``<script src="https://cdnjs.../require.min.js">`` and a script that
starts with ``require.config({paths: {d3: 'https://cdnjs...', jquery: ...}})``: with no network
the view stays blank. A notebook output cannot load a file from the package folder by URL
(that would need a server extension), so :func:`enable` makes bertviz emit the libraries
inline instead. It replaces the names ``HTML``, ``Javascript`` and ``display`` inside the
modules ``bertviz.head_view`` and ``bertviz.model_view`` (so even a ``head_view`` imported
before :func:`enable` draws offline):

* ``HTML(...)`` drops any ``<script src="http...">`` (the require.js from the CDN) and puts a
  one-line note before the view's ``<div id="bertviz-...">``; the view's script removes the
  note when it has drawn, so the note is what an untrusted notebook shows instead of a view;
* ``Javascript(code)`` becomes a ``<script>`` holding d3 5.7.0 and jQuery 3.7.1 from
  ``peftlab/static/viz`` (licences there) and bertviz's code without its ``require.config``.
  A local ``requirejs`` hands bertviz the two libraries, which were evaluated just before as
  CommonJS modules in the same function: no AMD loader and no page globals are added, so
  nothing can clash with JupyterLab's own scripts. The script waits (up to a minute) for the
  view's ``<div>`` to be in the page, so it also works when the ``<div>`` and the script are
  two outputs (``html_action="view"``) or the cell is rendered before it is attached;
* the attention data is written once (bertviz also pastes it into a comment) with every
  ``<`` escaped, so a token such as ``</script>`` cannot end the script;
* an SVG with a pixel width (the model view's, 970 px) is given a ``viewBox`` and scales
  down to the width of the output area, so it never needs a horizontal scroll bar.

:func:`enable` also wraps ``bertviz.head_view`` / ``bertviz.model_view`` (the names
``from bertviz import head_view`` reads) so they accept attention with prefix keys, as a
prefix-tuned peftlab model returns it: (1, heads, T, m + T) with T tokens. Those m keys are
labelled P0, P1, ... (bertviz shows it like an encoder-decoder's cross attention: queries on
the left, the m + T keys on the right). They also accept a :class:`peftlab.viz.AttentionMaps`
in place of ``attention`` (``tokens`` then defaults to its tokens).

Called through ``peftlab.viz.enable_offline_bertviz``; the views are shown in
``notebooks/08_attention_visualization.ipynb``, section "bertviz views".
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from importlib import resources

from peftlab.viz.maps import prefix_names

__all__ = ["BERTVIZ_VERSION", "LIBRARIES", "enable", "offline_html", "offline_script"]

BERTVIZ_VERSION = "1.4.1"  # the bertviz whose JavaScript layout this module rewrites (.ci/constraints.txt)
VIEWS = ("head_view", "model_view")  # neuron_view needs bertviz's own BERT copy (boto3 etc.): not patched
# module name -> file in peftlab/static/viz, with the banner its first line carries
LIBRARIES = {"d3": ("d3.min.js", "d3js.org v5.7.0"), "jquery": ("jquery.slim.min.js", "jQuery v3.7.1")}
NOTE = ("bertviz view: it draws when this output's script runs. Only this line? Run the cell again "
        "(JupyterLab does not run scripts in saved outputs of an untrusted notebook: "
        "<code>make setup</code> trusts the course notebooks).")

_REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>\s*</script\s*>", re.I)
_ROOT_DIV = re.compile(r"<div id=[\"'](bertviz-[0-9a-f]{32})[\"']")
_REQUIRE_CONFIG = re.compile(r"require\.config\(\{.*?\}\);", re.S)
_PARAMS_START = "const params = "
_PARAMS_END = " is a template marker that is replaced by actual params."
_PARAMS_SEP = "; // HACK: "

_library_js: str | None = None


def _libraries() -> str:
    """d3 and jQuery as CommonJS modules evaluated inside the current function (cached)."""
    global _library_js
    if _library_js is None:
        folder = resources.files("peftlab") / "static/viz"
        parts = []
        for name, (file, banner) in LIBRARIES.items():
            src = (folder / file).read_text(encoding="utf-8")
            if banner not in src.splitlines()[0] or "</script" in src.lower():
                raise RuntimeError(f"peftlab/static/viz/{file} is not {banner} or cannot be inlined")
            parts.append(f"var {name} = load(function (module, exports) {{\n{src}\n}});\n")
        _library_js = "".join(parts)
    return _library_js


def _params_once(code: str) -> str:
    """bertviz pastes the JSON into its ``PYTHON_PARAMS`` comment too: keep it once, ``<`` escaped."""
    lines = code.split("\n")
    for i, line in enumerate(lines):
        start = line.find(_PARAMS_START)
        if start < 0 or not line.endswith(_PARAMS_END):
            continue
        head = line[:start + len(_PARAMS_START)]
        body = line[len(head):-len(_PARAMS_END)]
        n, odd = divmod(len(body) - len(_PARAMS_SEP), 2)
        if odd or body[n:n + len(_PARAMS_SEP)] != _PARAMS_SEP or body[:n] != body[n + len(_PARAMS_SEP):]:
            data = body.split(_PARAMS_SEP, 1)[0]  # not the doubled form: escape what is there
            lines[i] = head + data.replace("<", "\\u003c") + line[len(head) + len(data):]
        else:  # JSON has "<" only inside strings, where \u003c is the same character
            lines[i] = head + body[:n].replace("<", "\\u003c") + _PARAMS_SEP + "PYTHON_PARAMS" + _PARAMS_END
        return "\n".join(lines)
    raise RuntimeError("bertviz's script has no 'const params = ...' line; peftlab.viz.bertviz_offline "
                       f"was written for bertviz {BERTVIZ_VERSION}")


_FIT = r"""function fit(root) {
  function apply() {
    root.querySelectorAll("svg").forEach(function (svg) {
      var w = svg.getAttribute("width"), h = svg.getAttribute("height"), px = /^\d+(\.\d+)?$/;
      if (svg.ownerSVGElement || !px.test(w || "") || !px.test(h || "")) return;
      var box = "0 0 " + w + " " + h;
      if (svg.getAttribute("viewBox") !== box) svg.setAttribute("viewBox", box);
      svg.style.width = "100%"; svg.style.maxWidth = w + "px"; svg.style.height = "auto";
    });
  }
  apply();
  if (window.MutationObserver)
    new MutationObserver(apply).observe(root, {childList: true, subtree: true, attributes: true,
                                               attributeFilter: ["width", "height"]});
}
"""


# bertviz's script runs in start() once the view's <div> is in the page; @...@ are filled in
_WRAPPER = """(function () {
var rootId = "@ROOT@";
@FIT@function start() {
var note = document.getElementById(rootId + "-note");
try {
function load(body) { var module = {exports: {}}; body(module, module.exports); return module.exports; }
@LIBRARIES@var modules = {d3: d3, jquery: jquery};
var requirejs = function (names, done) { done.apply(null, names.map(function (n) { return modules[n]; })); };
@CODE@
var root = document.getElementById(rootId); if (root) fit(root);
if (note) note.remove();
} catch (err) {
if (note) note.textContent = "bertviz view failed: " + err; throw err;
}
}
if (!rootId || document.getElementById(rootId)) { start(); } else {
  var waited = 0, timer = setInterval(function () {
    if (document.getElementById(rootId)) { clearInterval(timer); start(); }
    else if ((waited += 100) > 60000) clearInterval(timer);
  }, 100);
}
})();"""


def offline_script(code: str) -> str:
    """A bertviz view script (``require.config`` + ``requirejs([...], fn)``) that needs no network."""
    code, found = _REQUIRE_CONFIG.subn("", code, count=1)
    if not found or "requirejs(" not in code:
        raise RuntimeError(f"bertviz's script no longer has bertviz {BERTVIZ_VERSION}'s require.config "
                           "block; peftlab.viz.bertviz_offline cannot make it draw offline")
    code = _params_once(code)
    if "</script" in code.lower():
        raise RuntimeError("bertviz's script contains '</script' and cannot be inlined")
    root = re.search(r'"root_div_id":\s*"([^"]+)"', code)
    parts = {"ROOT": root.group(1) if root else "", "FIT": _FIT, "LIBRARIES": _libraries(), "CODE": code}
    return re.sub(r"@(ROOT|FIT|LIBRARIES|CODE)@", lambda m: parts[m.group(1)], _WRAPPER)  # one pass


def offline_html(html: str) -> str:
    """bertviz's HTML without remote scripts, with the "did it draw?" note before the view."""
    html = _REMOTE_SCRIPT.sub("", html or "")

    def note(match):
        root = match.group(1)
        return (f'<div id="{root}-note" style="color:#777;font-size:12px">{NOTE}</div>\n{match.group(0)}'
                if f'id="{root}-note"' not in html else match.group(0))

    return _ROOT_DIV.sub(note, html)


_classes: dict = {}


def _ipython_classes():
    """The three replacements, built on first use (IPython is imported only then)."""
    if not _classes:
        from IPython import display as ipd

        class InlineScript(ipd.HTML):
            """A script shown as ``<script>`` HTML; ``.data`` stays the bare code (bertviz's
            ``html_action="return"`` wraps ``.data`` in ``<script>`` itself)."""

            def _repr_html_(self):
                return f'<script type="text/javascript">\n{self.data}\n</script>\n'

        def HTML(data=None, *args, **kwargs):  # noqa: N802 (stands in for IPython.display.HTML)
            return ipd.HTML(offline_html(data) if isinstance(data, str) else data, *args, **kwargs)

        def Javascript(data=None, *args, **kwargs):  # noqa: N802
            if not isinstance(data, str) or args or kwargs:
                return ipd.Javascript(data, *args, **kwargs)
            return InlineScript(offline_script(data))

        def display(*objs, **kwargs):
            kept = [o for o in objs if not (type(o) is ipd.HTML and isinstance(o.data, str) and not o.data.strip())]
            if kept:
                ipd.display(*kept, **kwargs)  # looked up now, so a test's monkeypatch is seen

        _classes.update(HTML=HTML, Javascript=Javascript, display=display, InlineScript=InlineScript)
    return _classes


def _is_maps(obj) -> bool:
    return all(hasattr(obj, name) for name in ("attentions", "tokens", "key_tokens"))


def _prefix_aware(original):
    """``original`` (bertviz's head_view / model_view), also taking prefix keys and AttentionMaps."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def view(*args, **kwargs):
        args_ = signature.bind(*args, **kwargs).arguments
        attention, tokens = args_.get("attention"), args_.get("tokens")
        if _is_maps(attention):
            tokens = list(attention.tokens) if tokens is None else tokens
            attention = [a.unsqueeze(0) for a in attention.attentions]
            args_.update(attention=attention, tokens=tokens)
        if attention is not None and tokens is not None and len(attention):
            queries, keys = attention[0].shape[-2:]
            m = keys - len(tokens)
            if m > 0 and queries == len(tokens):
                if args_.get("sentence_b_start") is not None:
                    raise ValueError("sentence_b_start cannot be combined with prefix keys: bertviz "
                                     "splits queries and keys at the same position")
                for name in ("attention", "tokens", "sentence_b_start"):
                    args_.pop(name, None)
                args_.update(cross_attention=attention, encoder_tokens=prefix_names(m) + list(tokens),
                             decoder_tokens=list(tokens))
        return original(**args_)

    view.__peftlab_original__ = original
    return view


def enable() -> str:
    """Make bertviz's ``head_view`` / ``model_view`` draw offline and take prefix keys (idempotent).

    Returns the installed bertviz version. Raises ``ImportError`` (saying how to install it)
    when bertviz is missing.
    """
    try:
        import bertviz
    except ImportError as err:
        raise ImportError(f"bertviz is not installed: pip install --no-deps bertviz=={BERTVIZ_VERSION} "
                          "(make setup does this)") from err
    from importlib.metadata import version

    replacements = _ipython_classes()
    for name in VIEWS:
        module = importlib.import_module(f"bertviz.{name}")  # the module, not the function bertviz exports
        for attr in ("HTML", "Javascript", "display"):
            setattr(module, attr, replacements[attr])
        current = getattr(module, name)
        if not hasattr(current, "__peftlab_original__"):
            current = _prefix_aware(current)
            setattr(module, name, current)
        setattr(bertviz, name, current)
    return version("bertviz")
