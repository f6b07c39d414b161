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
