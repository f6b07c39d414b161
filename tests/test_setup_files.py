"""The setup files agree: pyproject, the pinned constraints, environment.yml, Makefile."""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / ".ci/constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = Version(version)
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_dependency_is_pinned_within_its_range():
    pinned = pins()
    reqs = project()["dependencies"] + project()["optional-dependencies"]["test"]
    for raw in reqs:
        req = Requirement(raw)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not pinned in .ci/constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])


def test_environment_yml_installs_the_same_project():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    assert Requirement(project()["requires-python"].join(["python", ""])).specifier.contains(
        python.split("=")[1] + ".0")
    pip_lines = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "--constraint .ci/constraints.txt" in pip_lines
    assert any(line.startswith("--editable .") for line in pip_lines)
    torch_line = next(line for line in pip_lines if line.startswith("torch=="))
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^TORCH \?= {re.escape(torch_line)}$", makefile, re.M)
    assert Version(torch_line.split("==")[1]) == pins()["torch"]


def test_jupyter_is_quiet_offline():
    cfg = (ROOT / ".jupyter/jupyter_server_config.py").read_text()
    assert 'extension_manager = "readonly"' in cfg and "news_url = None" in cfg
    assert "NeverCheckForUpdate" in cfg
    assert "--allow-root" in (ROOT / "Makefile").read_text()


def test_setup_trusts_the_notebooks():
    """Untrusted, JupyterLab shows a saved widget as ``VBox(children=...)`` text and runs no output script."""
    makefile = (ROOT / "Makefile").read_text()
    setup = re.search(r"^setup: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "jupyter trust notebooks/*.ipynb" in setup
    assert "if ls notebooks/*.ipynb" in setup  # no notebooks: nothing to trust, and no failure


def test_bertviz_is_pinned_and_installed_without_its_deps():
    makefile = (ROOT / "Makefile").read_text()
    from peftlab.viz.bertviz_offline import BERTVIZ_VERSION

    assert pins()["bertviz"] == Version(BERTVIZ_VERSION)
    assert re.search(r"^\t.*pip install -q --no-deps -c \.ci/constraints\.txt bertviz$", makefile, re.M)
    assert "--no-deps -c .ci/constraints.txt bertviz" in (ROOT / "environment.yml").read_text()
    # bertviz declares boto3, whose botocore needs python-dateutil<3: as a declared dependency
    # it would make pip backtrack through every boto3 release against the pinned dateutil
    if pins()["python-dateutil"] >= Version("3"):
        assert "bertviz" not in {Requirement(r).name for r in project()["dependencies"]}


def test_widget_state_is_saved_with_the_notebook():
    import json5

    settings = ROOT / ".jupyter/lab/user-settings/@jupyter-widgets/jupyterlab-manager/plugin.jupyterlab-settings"
    assert json5.loads(settings.read_text()) == {"saveState": True}
    schema = (Path(sys.prefix) / "share/jupyter/labextensions/@jupyter-widgets/jupyterlab-manager/schemas"
              / "@jupyter-widgets/jupyterlab-manager/plugin.json")
    assert json.loads(schema.read_text())["properties"]["saveState"]["type"] == "boolean"
