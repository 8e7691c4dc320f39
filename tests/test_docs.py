"""`make docs`: a notebook is executed and exported as an offline HTML page that shows its figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

from analyses.eval.browser import find_chromium, probe_page

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _builder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "docs" / "build_notebooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# a notebook"), *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_notebook_page_is_offline_and_shows_its_figures(tmp_path: Path) -> None:
    build = _builder()
    nb = _notebook(tmp_path / "figs.ipynb", [
        "import plotly.graph_objects as go\ngo.Figure(go.Bar(x=['a', 'b'], y=[1, 2]))",
        "print('between')",
        "go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))",
    ])  # fmt: skip
    page, error = build.build(nb, tmp_path / "out")
    assert error is None and page == tmp_path / "out" / "figs.html"
    text = page.read_text()
    assert text.count("plotly.js v") == 1 and text.count('class="plotly-graph-div"') == 2
    assert "between" in text and "cdnjs" not in text
    assert nbformat.read(nb, as_version=4).cells[1].outputs == [], "the notebook file stays bare"
    chromium, how = find_chromium()
    if chromium is None:
        pytest.skip(f"page written; not rendered: {how}")
    seen = probe_page(page, chromium)
    assert seen["errors"] == [] and [f["rendered"] for f in seen["figures"]] == [True, True]


def test_a_failing_notebook_is_exported_up_to_the_error(tmp_path: Path) -> None:
    build = _builder()
    nb = _notebook(
        tmp_path / "bad.ipynb", ["print('ran')", "raise RuntimeError('planted failure')", "print('never')"]
    )
    page, error = build.build(nb, tmp_path / "out")
    assert error == "RuntimeError: planted failure"
    text = page.read_text()
    assert "planted failure" in text and text.count("never") == 1  # the cell's source; it never ran
    assert build.main([str(nb), "--out", str(tmp_path / "o2")]) == 1


def test_remote_resources_are_refused() -> None:
    build = _builder()
    assert build.offline_html('<p>x</p><script src="https://cdn/x.js"></script>') == "<p>x</p>"
    with pytest.raises(ValueError, match="remote resources"):
        build.offline_html('<link rel="stylesheet" href="https://cdn/x.css">')


def test_a_notebook_using_the_project_renders_without_warnings_or_bars(tmp_path: Path) -> None:
    """Loading the organism, evaluating, wrapping LoRA and patching in a kernel: no TqdmWarning block,
    no FutureWarning, no progress-bar lines in the page."""
    build = _builder()
    nb = _notebook(tmp_path / "clean.ipynb", [
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from analyses.data.schema import first_images\nfrom analyses.eval.evaluate import EvalConfig, evaluate\n"
        "from analyses.organism.model import load_organism, organism_rows\nfrom lora_targeted.train import wrap_lora",
        "adapter = load_organism()\nworld, rows = organism_rows('test')\nrows = first_images(rows, 1)\n"
        f"df = evaluate(adapter, rows, world.image_for, {str(tmp_path / 'run')!r}, EvalConfig(batch_size=64))\n"
        "print('rows', len(df))",
        "peft_model, lora = wrap_lora(adapter, [3])\nprint('wrapped', lora.name)",
    ])  # fmt: skip
    page, error = build.build(nb, tmp_path / "out")
    assert error is None
    outputs = [o for c in nbformat.read(nb, as_version=4).cells for o in c.get("outputs", [])]
    assert outputs == []  # the notebook file stays bare; read the page instead
    text = page.read_text()
    assert "rows " in text and "+lora[3]" in text
    for bad in ("TqdmWarning", "IProgress", "FutureWarning", "it/s]", "Loading weights"):
        assert bad not in text, bad
