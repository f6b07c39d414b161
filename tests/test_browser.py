"""The course in a real browser: JupyterLab in headless Chromium, offline (issue 7).

For each of notebooks 02, 03, 04 and 08 that exists (08 must), the test opens it in JupyterLab,
runs every cell in quick mode, drags its slider (rank in 02/03, prefix length in 04, layer in 08)
and checks that the widget's output changes; in 08 it checks that the bertviz views draw their
SVG. Every request that does not go to 127.0.0.1 is blocked and reported. Screenshots land in
``artifacts/browser/``.

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and the Python package ``playwright`` (its
own browser downloads are never used). Without them the test skips, except under CI
(``CI`` set), where it fails.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "browser"
TOKEN = "peftlab-browser-test"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# notebook -> what its slider's label must match (the slider this test drags)
# The issue asks for "02 or 03": 02 carries the rank slider and runs in a fraction of 03's time,
# so 03 (which trains several ranks) is left to nbval, keeping CI well inside its budget.
SLIDERS = {"02": r"^(r|rank)\b|rank", "04": r"^m$|prefix", "08": r"^layer$"}
RUN_TIMEOUT_S = int(os.environ.get("PEFTLAB_BROWSER_TIMEOUT", "900"))  # per notebook run, seconds
PRESENT = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb") if p.name[:2] in SLIDERS)
DRAGGED: dict[str, str] = {}  # notebook -> label of the slider that was dragged
UNAVAILABLE: list[str] = []  # why the browser runs were skipped (outside CI only)


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it (see .ci/run)")
    UNAVAILABLE.append(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a copy of the notebooks (nothing is written back)."""
    tmp = tmp_path_factory.mktemp("lab")
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    for name in PRESENT:
        shutil.copy(ROOT / "notebooks" / name, notebooks / name)
    settings = tmp / "user-settings"
    shutil.copytree(ROOT / ".jupyter/lab/user-settings", settings)
    for plugin, values in {"docmanager-extension/plugin": {"autosave": False},
                           "notebook-extension/tracker": {"windowingMode": "none"}}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(ROOT / ".jupyter"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), PEFTLAB_QUICK="1",
               PEFTLAB_EXPECT_QUICK="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={TOKEN}", f"--notebook-dir={notebooks}",
           "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=notebooks, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited: {(tmp / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("jupyter lab did not answer within 120 s")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(lab, tmp_path_factory):
    """A fresh headless Chromium profile; every request off 127.0.0.1 is blocked and recorded."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    blocked: list[str] = []

    def route(r):
        url = r.request.url
        if urlparse(url).hostname in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), args=FLAGS,
            headless=True, viewport={"width": 1400, "height": 1000})
        context.route("**/*", route)
        yield context, blocked
        context.close()


STATE = """() => {
  const panel = window.__nb;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const errors = [];
  let done = 0;
  cells.forEach((c, i) => {
    if (c.model.executionCount !== null) done++;
    for (const o of c.model.outputs.toJSON())
      if (o.output_type === 'error') errors.push(`code cell ${i}: ${o.ename}: ${o.evalue}`);
  });
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {done, total: cells.length, status: kernel ? kernel.status : 'none', errors};
}"""


KERNEL_STATUS = "() => window.__nb.sessionContext.session.kernel.status"


def run_all(page, lab: str, name: str) -> float:
    """Open ``name``, clear it, run every cell; return the seconds the run took."""
    page.goto(f"{lab}/lab?reset&token={TOKEN}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started !== undefined", timeout=120_000)
    page.evaluate("""async (path) => {
      const app = window.jupyterapp;
      await app.started; await app.restored;
      const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
      await panel.context.ready; await panel.sessionContext.ready;
      app.shell.activateById(panel.id);
      window.__nb = panel;
    }""", name)
    page.wait_for_function("() => { const k = window.__nb.sessionContext.session && "
                           "window.__nb.sessionContext.session.kernel; return k && k.status === 'idle'; }",
                           timeout=120_000)
    page.evaluate("async () => { await window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs');"
                  " window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    start = time.perf_counter()
    stable = 0
    while time.perf_counter() - start < RUN_TIMEOUT_S:
        state = page.evaluate(STATE)
        assert not state["errors"], f"{name}: a cell failed in the browser: {state['errors']}"
        stable = stable + 1 if state["done"] == state["total"] and state["status"] == "idle" else 0
        if stable >= 2:
            return time.perf_counter() - start
        time.sleep(1)
    page.screenshot(path=str(ARTIFACTS / f"{name[:2]}_timeout.png"))
    pytest.fail(f"{name}: {state['done']} of {state['total']} code cells ran in {RUN_TIMEOUT_S} s")


def drag_slider(page, name: str) -> str:
    """Drag the notebook's slider one step or more and wait for its output to change."""
    pattern = re.compile(SLIDERS[name[:2]], re.I)
    cells = page.locator(".jp-Notebook .jp-Cell").filter(has=page.locator(".widget-slider"))
    found, labels = None, []
    for c in range(cells.count()):
        for k in range(cells.nth(c).locator(".widget-slider").count()):
            label = cells.nth(c).locator(".widget-slider").nth(k).locator(".widget-label").inner_text().strip()
            labels.append(label)
            if found is None and pattern.search(label):
                found = (cells.nth(c), cells.nth(c).locator(".widget-slider").nth(k), label)
    if found is None and name[:2] in ("02", "03"):
        return "none (02 and 03 are alternatives; test_rank_slider_was_dragged checks one has it)"
    assert found, f"{name} has no slider whose label matches {pattern.pattern!r} (sliders: {labels})"
    cell, slider, label = found
    output = cell.locator(".widget-output").first
    slider.scroll_into_view_if_needed()
    output.locator("img, pre, .jp-RenderedText").first.wait_for(timeout=60_000)
    before, readout = output.inner_html(), slider.locator(".widget-readout").inner_text()
    had_image = output.locator("img").count() > 0
    page.screenshot(path=str(ARTIFACTS / f"{name[:2]}_slider_before.png"))
    handle = slider.locator(".noUi-handle")
    for move in (60, -60, "ArrowRight", "ArrowLeft"):  # right first; left when it sits at the maximum
        if isinstance(move, str):  # the keyboard, for a slider too long for 60 px to be a step
            handle.focus()
            page.keyboard.press(move)
        else:
            box = handle.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x + move, y, steps=8)
            page.mouse.up()
        if slider.locator(".widget-readout").inner_text() != readout:
            break
    after_readout = slider.locator(".widget-readout").inner_text()
    assert after_readout != readout, f"{name}: dragging the slider did not move it"
    deadline = time.perf_counter() + 180
    while output.inner_html() == before or not output.locator("img, pre, .jp-RenderedText").count():
        assert time.perf_counter() < deadline, f"{name}: the output did not change after the slider moved"
        time.sleep(0.5)
    idle = 0  # a dragged slider may queue many updates: wait for a quiet kernel and a full redraw
    while idle < 3 or (had_image and not output.locator("img").count()):
        assert time.perf_counter() < deadline, f"{name}: the output did not finish redrawing"
        idle = idle + 1 if page.evaluate(KERNEL_STATUS) == "idle" else 0
        time.sleep(1)
    slider.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / f"{name[:2]}_slider_after.png"))
    DRAGGED[name] = label
    return f"{label}: {readout} -> {after_readout}"


def check_bertviz(page, name: str) -> None:
    views = page.locator("div[id^='bertviz-']:not([id$='-note'])")
    assert views.count() >= 2, f"{name}: expected a head view and a model view, found {views.count()}"
    for i in range(views.count()):
        view = views.nth(i)
        view.scroll_into_view_if_needed()
        assert view.locator("svg").count() >= 1, f"{name}: bertviz view {i} drew no SVG"
        assert view.locator("svg line, svg rect").count() > 10, f"{name}: bertviz view {i} SVG is empty"
        view.screenshot(path=str(ARTIFACTS / f"{name[:2]}_bertviz_{i}.png"))
    notes = page.locator("div[id^='bertviz-'][id$='-note']")
    assert notes.count() == 0, f"{name}: a bertviz view did not draw: {notes.first.inner_text()}"


def test_attention_notebook_is_there():
    assert "08_attention_visualization.ipynb" in PRESENT


@pytest.mark.parametrize("name", PRESENT)
def test_notebook_runs_and_its_widgets_respond(browser, lab, name):
    context, blocked = browser
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        seconds = run_all(page, lab, name)
        page.screenshot(path=str(ARTIFACTS / f"{name[:2]}_after_run.png"))
        moved = drag_slider(page, name)
        if name.startswith("08"):
            check_bertviz(page, name)
        print(f"{name}: ran in {seconds:.0f} s in the browser; slider {moved}")
    finally:
        page.evaluate("async () => { if (window.__nb) await window.__nb.sessionContext.shutdown(); }")
        page.close()
    assert not blocked, f"requests off 127.0.0.1 were attempted (and blocked): {blocked[:10]}"
    assert not [e for e in errors if "bertviz" in e], errors


def test_rank_slider_was_dragged():
    """Notebooks 02 and 03 are listed as alternatives: one of them must carry the rank slider."""
    rank_notebooks = [n for n in PRESENT if n[:2] in ("02", "03")]
    assert rank_notebooks, "notebook 02 (or 03) with the rank slider is missing"
    if UNAVAILABLE and not DRAGGED:  # the runs above skipped (no browser here, outside CI): nothing to check
        pytest.skip(UNAVAILABLE[0])
    assert any(n in DRAGGED for n in rank_notebooks), f"no rank slider was dragged in {rank_notebooks}"
