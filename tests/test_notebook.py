"""``notebooks/dashboard.ipynb`` runs top to bottom, and is kept in git without outputs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "dashboard.ipynb"
KERNEL = "xarray-zcache-test"


def test_notebook_is_saved_without_outputs() -> None:
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], cell["source"]
            assert cell["execution_count"] is None, cell["source"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_notebook_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # a kernel spec of this very interpreter (the venv), whatever "python3" means elsewhere
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": KERNEL,
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=240,  # per cell
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on any error

    outputs: list[dict[str, Any]] = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs
    ]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    assert "cluster hit rate:" in text
    assert re.search(r"\| decoded [\d.]+ \w+ of 128\.00 MiB \(hit rate [\d.]+%\)", text), text
    assert "/zcache" in text
    html = "\n".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "xarray-zcache cluster" in html  # the per-worker table
    bokeh_outputs = [
        o for o in outputs if "application/vnd.bokehjs_exec.v0+json" in o.get("data", {})
    ]
    assert len(bokeh_outputs) >= 7  # every figure was shown
