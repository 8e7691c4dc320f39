"""The package layout holds: imports point one way, one definition per concept, interp imports lazily,
the evaluator stays readable, and docstrings cite files that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hooks", "interp", "analyses", "lora_targeted")
#: Layers, lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS: tuple[str, ...] = (
    "hooks",
    "interp",
    "analyses.data",
    "analyses.synthcxr",
    "analyses.eval",
    "analyses.organism",
    "lora_targeted",
    "analyses.options",
    "analyses.audit",
    "analyses.cli",
)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _layer(module: str) -> int | None:
    best = None
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            best = i if best is None or len(prefix) > len(LAYERS[best]) else best
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every project module imported anywhere in the file (top level, in functions, under TYPE_CHECKING)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(n, m) for n, m in found if m.split(".")[0] in PACKAGES]


def test_every_module_has_a_layer() -> None:
    assert [m for m in _modules() if m not in PACKAGES and _layer(m) is None] == []


def test_imports_point_one_way() -> None:
    upward = []
    for module, path in _modules().items():
        own = _layer(module)
        if own is None:  # a package's own __init__ (analyses, docstring only)
            continue
        for line, target in _imports(path):
            other = _layer(target)
            if other is not None and other > own:
                upward.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYERS[own]}) imports {target} ({LAYERS[other]})"
                )
    assert upward == [], "imports against the layer order:\n" + "\n".join(upward)


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize(
    "name",
    ["Box", "ImageSource", "CONDITIONS", "SPLITS", "BOX_COLUMNS", "VINDR_CLASS_NAMES", "QUADRANTS",
     "REMOVALS", "answer_loss", "ratio_bootstrap", "bootstrap_ci", "first_images", "resolve_data"],
)  # fmt: skip
def test_one_definition_per_concept(name: str) -> None:
    where = [str(p.relative_to(ROOT)) for p in _modules().values() if name in _top_level_names(p)]
    assert len(where) == 1, f"{name} is defined in {where}"


def test_interp_imports_lazily() -> None:
    code = (
        "import sys\nfrom interp.patching import patching_sweep\nimport interp\n"
        "heavy = [m for m in ('plotly', 'sae_lens', 'interp.figures', 'interp.sae') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "interp.recovery_line\nassert 'plotly' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_interp_exports_resolve_and_do_not_shadow_submodules() -> None:
    import importlib

    import interp

    submodules = {p.stem for p in (ROOT / "interp").glob("*.py")}
    assert sorted(interp.EXPORTS) == interp.__all__
    assert submodules & set(interp.EXPORTS) == set(), "a name equal to a submodule is shadowed on import"
    for name, module in interp.EXPORTS.items():
        assert hasattr(importlib.import_module(f"interp.{module}"), name), f"interp.{module} lacks {name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        interp.nope  # noqa: B018


def test_evaluator_functions_are_short() -> None:
    for path in (ROOT / "analyses" / "eval").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 60, f"{path.name}:{node.lineno} {node.name} is {length} lines"


def test_cited_files_exist() -> None:
    cited = set()
    for path in [*_modules().values(), *ROOT.glob("notebooks/*.ipynb"), ROOT / "README.md"]:
        text = path.read_text()
        assert "DESIGN.md" not in text, (
            f"{path.relative_to(ROOT)} cites DESIGN.md, which is not in the repository"
        )
        cited |= set(re.findall(r"\bdocs/[\w./-]+\.(?:md|png|html)", text))
    # docs/notebooks/<name>.html are generated by `make docs` from notebooks/<name>.ipynb
    generated = {c for c in cited if re.fullmatch(r"docs/notebooks/[\w-]+\.html", c)}
    missing = sorted(c for c in cited - generated if not (ROOT / c).exists())
    no_source = sorted(c for c in generated if not (ROOT / "notebooks" / (Path(c).stem + ".ipynb")).exists())
    assert cited and missing == [], f"cited but missing: {missing}"
    assert no_source == [], f"cited notebook pages without a notebook to build them from: {no_source}"


def _tracked() -> set[str]:
    import subprocess

    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def test_readme_links_work_on_a_fresh_clone() -> None:
    """Every relative link of the README points at a committed file (docs/notebooks/ is generated)."""
    text = (ROOT / "README.md").read_text()
    links = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    tracked = _tracked()
    dead = [t for t in links if t and t not in tracked and not any(f.startswith(t.rstrip("/") + "/") for f in tracked)]
    assert links and dead == [], f"README links to files a fresh clone lacks: {dead}"
    assert "make docs" in text and "docs/notebooks/" in text  # the command that makes the pages is named


def _reader_facing() -> list[Path]:
    return [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("organism/*.md"), *ROOT.glob("notebooks/*.ipynb")]


def test_reader_facing_text_has_no_issue_numbers() -> None:
    found = [
        f"{p.relative_to(ROOT)}: {m.group(0)!r}"
        for p in _reader_facing()
        for m in re.finditer(r"\(issue\b[^)]*\)|\bissues? #?\d+", p.read_text(), flags=re.IGNORECASE)
    ]
    assert found == []


def test_quickstart_scores_a_few_images_and_says_how_to_run_the_split() -> None:
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    n = re.search(r"first_images\(rows, (\d+)\)", snippet)
    assert n and int(n.group(1)) <= 8, "the quickstart must run on a few images"
    assert snippet.index("first_images(rows") < snippet.index("evaluate(")
    assert "whole split" in snippet and "from analyses.data.schema import first_images" in snippet


def test_notebook_04_intro_does_not_promise_an_assert_its_results_report_as_missed() -> None:
    import json

    cells = json.loads((ROOT / "notebooks" / "04_targeted_lora.ipynb").read_text())["cells"]
    intro = "".join(cells[0]["source"])
    bar = intro[intro.index("targeted.high < control.low") - 400 : intro.index("targeted.high < control.low") + 400]
    assert "not asserted" in bar and "one assert" not in intro
    section5 = next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("## 5."))
    assert "not asserted" in section5  # the two say the same
