"""The notebook tutorials (notebooks/*.ipynb) run top to bottom, headless, on their small defaults.

Each one is executed with nbclient on the environment's ``python3`` kernel in a scratch folder (what a
user gets from "Run all" on a laptop, offline); any error fails the test. The executed copies are kept
in ``test-artifacts/notebooks/`` for inspection. The notebooks are committed without outputs.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
EXPECTED = [
    "01_feature_explorer",
    "02_satellite_domain_adaptation",
    "03_medical_frozen_backbone",
    "04_gram_anchoring_explained",
    "05_distillation",
]
# figures each notebook must draw at least (image/png outputs of the executed notebook)
MIN_FIGURES = {
    "01_feature_explorer": 4,
    "02_satellite_domain_adaptation": 4,
    "03_medical_frozen_backbone": 3,
    "04_gram_anchoring_explained": 3,
    "05_distillation": 2,
}
ARTIFACTS = ROOT / "test-artifacts" / "notebooks"


def _notebooks() -> list[Path]:
    return sorted(NB_DIR.glob("*.ipynb"))


def test_every_tutorial_is_there_and_linked_from_the_readme():
    names = [p.stem for p in _notebooks()]
    assert names == EXPECTED, names
    readme = (ROOT / "README.md").read_text()
    for n in EXPECTED:
        assert f"notebooks/{n}.ipynb" in readme, f"README does not link {n}"


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_without_outputs(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has outputs"
    # the switch to real weights / a GPU / the user's data is one clearly marked cell
    assert any(c.cell_type == "code" and "YOUR SETTINGS" in c.source for c in nb.cells), name
    # thin: library calls and plots; no classes (a small widget callback is fine)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not any(line.startswith("class ") for line in c.source.splitlines()), (name, c.source[:80])


def test_no_helper_is_copied_between_notebooks():
    import re

    nbformat = pytest.importorskip("nbformat")
    seen: dict[str, str] = {}
    for p in _notebooks():
        nb = nbformat.read(p, as_version=4)
        src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        for fn in set(re.findall(r"^def (\w+)\(", src, flags=re.M)):
            assert fn not in seen, f"{fn}() is defined in {seen.get(fn)} and {p.stem}: move it into the library"
            seen[fn] = p.stem


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_headless(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    env_before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the kernel inherits it: never the network
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, ARTIFACTS / f"{name}.ipynb")
    seconds = time.perf_counter() - t0
    figures = sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    )
    print(f"{name}: {seconds:.0f} s, {figures} figures")
    (ARTIFACTS / f"{name}.time.txt").write_text(f"{seconds:.1f}\n")
    assert figures >= MIN_FIGURES[name], f"{name} drew {figures} figures, expected at least {MIN_FIGURES[name]}"
    shutil.rmtree(work, ignore_errors=True)
