"""Run the course notebooks from the command line.

``python -m peftlab.course run [NAME ...]`` executes notebooks in place, in class mode
unless ``PEFTLAB_QUICK=1`` is set, and stores their outputs: this is how the committed
notebooks got theirs. ``python -m peftlab.course list`` prints the notebook map.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def notebooks() -> list[Path]:
    """The course notebooks in teaching order (``00_...`` first)."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def run(paths: list[Path], timeout: int = 3600) -> None:
    """Execute each notebook top to bottom in a fresh kernel and save it with outputs.

    The widgets' state is stored in the notebook (``store_widget_state``), so a reopened
    notebook shows its sliders rather than "model not found", and each written notebook is
    signed (trusted, as ``jupyter trust`` does) so that JupyterLab runs the scripts in its
    outputs (widgets, bertviz views) when it is opened on this machine.
    """
    import nbformat
    from nbclient import NotebookClient

    for path in paths:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
        nbformat.write(nb, path)
        trust(path)
        print(f"{path.name}: ran in {time.perf_counter() - start:.0f} s")


def trust(path: Path) -> None:
    """Sign the notebook at ``path`` as it is on disk (what ``jupyter trust path`` does)."""
    import nbformat
    from nbformat.sign import NotebookNotary

    NotebookNotary().sign(nbformat.read(path, as_version=4))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "list"):
        sys.exit("usage: python -m peftlab.course run [NOTEBOOK ...] | list")
    if argv[0] == "list":
        for path in notebooks():
            print(path.name)
        return
    chosen = [p for p in notebooks() if not argv[1:] or any(a in p.name for a in argv[1:])]
    if not chosen:
        sys.exit(f"no notebook matches {argv[1:]}; see: python -m peftlab.course list")
    run(chosen)


if __name__ == "__main__":
    main()
