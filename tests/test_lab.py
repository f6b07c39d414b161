"""`make lab` serves the course offline: JupyterLab with the repo-local, quiet settings."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab():
    port, token = free_port(), "peftlab-test-token"
    env = dict(os.environ,
               JUPYTER_CONFIG_DIR=str(ROOT / ".jupyter"),
               JUPYTERLAB_SETTINGS_DIR=str(ROOT / ".jupyter/lab/user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(ROOT / ".jupyter/lab/workspaces"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
           "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
           f"--notebook-dir={ROOT / 'notebooks'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("jupyter lab did not answer within 60 s")
    yield base, token
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def test_lab_lists_the_course_notebooks(lab):
    base, token = lab
    listing = json.loads(get(f"{base}/api/contents?token={token}"))
    names = {item["name"] for item in listing["content"]}
    expected = {p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert expected and expected <= names
    nb = json.loads(get(f"{base}/api/contents/00_setup_check.ipynb?token={token}"))
    assert nb["type"] == "notebook" and nb["content"]["cells"]


def test_lab_is_quiet_offline(lab):
    base, token = lab
    page = get(f"{base}/lab?token={token}")
    config = json.loads(re.search(r'id="jupyter-config-data"[^>]*>(.*?)</script>', page, re.S).group(1))
    assert config["news"]["disabled"] is True
    assert config["extensionManager"]["can_install"] is False
    news = json.loads(get(f"{base}/lab/api/news?token={token}"))
    assert news["news"] == []
    settings = json.loads(get(f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={token}"))
    assert settings["settings"]["fetchNews"] == "false"
    assert settings["settings"]["checkForUpdates"] is False


def test_lab_saves_widget_state_with_the_notebook(lab):
    """Reopened, a notebook shows its widgets from the saved state, not "model not found"."""
    base, token = lab
    plugin = json.loads(get(f"{base}/lab/api/settings/@jupyter-widgets/jupyterlab-manager:plugin?token={token}"))
    assert "saveState" in plugin["schema"]["properties"]
    assert plugin["settings"]["saveState"] is True


def test_course_run_stores_widget_state_and_trusts(tmp_path, monkeypatch):
    """``python -m peftlab.course run`` keeps the widget state and signs what it writes (no kernel here)."""
    import nbclient
    import nbformat
    from nbformat.sign import NotebookNotary

    from peftlab import course

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))  # a throwaway signing key and database
    path = tmp_path / "01_example.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("show()")]), path)
    seen = {}

    class Client:  # stands in for nbclient's: "runs" the cell, producing a script output
        def __init__(self, nb, **kwargs):
            self.nb = nb
            seen.update(kwargs)

        def execute(self):
            self.nb.cells[0].outputs = [nbformat.v4.new_output(
                "display_data", {"text/html": "<script>draw()</script>"})]

    monkeypatch.setattr(nbclient, "NotebookClient", Client)
    assert not NotebookNotary().check_signature(nbformat.read(path, as_version=4))
    course.run([path])
    assert seen["store_widget_state"] is True
    written = nbformat.read(path, as_version=4)
    assert written.cells[0].outputs and NotebookNotary().check_signature(written)
