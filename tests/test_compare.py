"""`flipscope compare` / compare_runs on run folders with planted behaviour (tests/report_data.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from report_data import RULE, predictions, small_world, write_run

from analyses.cli import main
from analyses.data.schema import PARAPHRASE_FAMILIES
from analyses.eval.compare import METRICS, compare_runs, differing_settings, run_label
from analyses.eval.quadrants import DEFAULT_RULE, QUADRANTS, QuadrantRule
from analyses.eval.summary import summarize


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """base (planted register shortcut), targeted (fixed), other (half of the rows)."""
    _, rows = small_world()
    root = tmp_path_factory.mktemp("runs")
    base = write_run(root / "base", rows, predictions(rows, planted=True), "organism")
    fixed = write_run(root / "targeted", rows, predictions(rows, planted=False, seed=1), "organism+lora[3,4]")
    keep = sorted({r.image_id for r in rows})[:3]
    half = [r for r in rows if r.image_id in keep]
    other = write_run(root / "other", half, predictions(half), "organism")
    return base, fixed, other


def test_one_row_per_run_with_the_summary_values_and_intervals(runs: tuple[Path, Path, Path]) -> None:
    base, fixed, _ = runs
    comp = compare_runs([base, fixed], rule=RULE, n_boot=50, seed=3)
    t = comp.table
    assert list(t.index) == ["base", "targeted"]
    assert t.loc["base", "arm"] == "base" and t.loc["targeted", "arm"] == "lora[3,4]"
    assert (t["model"] == "organism").all() and (t["removal"] == "gray").all()
    for name in t.index:
        s = summarize(comp.predictions[name], RULE, n_boot=50, seed=3)
        for m in METRICS:
            assert t.loc[name, [m, f"{m}_low", f"{m}_high"]].tolist() == pytest.approx(
                s["metrics"].loc[m, ["value", "low", "high"]].tolist(), nan_ok=True
            )
        for q in QUADRANTS:
            assert t.loc[name, f"share_{q}"] == pytest.approx(s["quadrant_shares"].loc[q, "value"])
            assert (
                t.loc[name, f"share_{q}_low"] <= t.loc[name, f"share_{q}"] <= t.loc[name, f"share_{q}_high"]
            )
    # planted: every negative sample is Dangerous, positive ones flip; the fix makes every sample Ideal
    n = int(t.loc["base", "n_samples"])
    assert t.loc["base", "Dangerous"] + t.loc["base", "Worst"] == n
    assert t.loc["targeted", "Ideal"] == n and t.loc["targeted", "flip_rate"] == 0
    assert t.loc["base", "into_dangerous"] == 0 and t.loc["targeted", "into_dangerous"] == 0
    reverse = compare_runs([base, fixed], rule=RULE, base="targeted", n_boot=20)
    assert reverse.table.loc["base", "into_dangerous"] == t.loc["base", "Dangerous"]  # Ideal -> Dangerous
    assert int(reverse.migrations["base"].loc["Ideal", "Dangerous"]) == t.loc["base", "Dangerous"]
    long = comp.long
    assert set(long["table"]) == {"metrics", "family", "finding", "quadrant_share"}
    reg = long[(long.run == "base") & (long.table == "family") & (long.metric == "flip_rate")]
    assert reg.set_index("group").loc["register", "value"] == pytest.approx(t.loc["base", "flip_rate"])


def test_runs_over_different_rows_are_refused_unless_asked(runs: tuple[Path, Path, Path]) -> None:
    base, fixed, other = runs
    with pytest.raises(ValueError, match=r"different question rows") as err:
        compare_runs([base, fixed, other], n_boot=10)
    text = str(err.value)
    assert (
        "base, targeted: dataset" in text
        and "\n  other: dataset" in text
        and "--allow-different-rows" in text
    )
    comp = compare_runs([base, other], allow_different_rows=True, n_boot=10)
    assert comp.table.loc["other", "n_rows"] < comp.table.loc["base", "n_rows"]


def test_bad_arguments_are_clear(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, fixed, _ = runs
    with pytest.raises(FileNotFoundError, match=r"meta\.json, predictions\.jsonl missing"):
        compare_runs([base, tmp_path])
    with pytest.raises(ValueError, match="1 names for 2 runs"):
        compare_runs([base, fixed], names=["a"])
    with pytest.raises(ValueError, match="base 'x' is not one of"):
        compare_runs([base, fixed], base="x")
    assert run_label({"model": "/m/organism+lora[3,4]"})[1] == "lora[3,4]"
    assert run_label({"model": "google/medgemma-4b-it"}) == ("google/medgemma-4b-it", "base")


def test_save_writes_csv_parquet_and_html(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    comp = compare_runs(runs[:2], names=["b", "t"], rule=RULE, n_boot=20)
    paths = comp.save(tmp_path)
    pd.testing.assert_frame_equal(pd.read_parquet(paths["parquet"]), comp.table)
    assert list(pd.read_csv(paths["csv"], index_col=0).index) == ["b", "t"]
    html = paths["html"].read_text()
    assert "<td>b</td>" in html and "lora[3,4]" in html
    # plotly.js is loaded once, from one file beside the page, not embedded (was 4.8 MB for 2 rows)
    assert html.count('<script src="plotly.min.js">') == 1 and "plotly.js v" not in html
    assert len(html.encode()) < 200_000 and paths["plotly"] == tmp_path / "plotly.min.js"
    assert "plotly.js v" in paths["plotly"].read_text()[:2000]
    fig = comp.figure()
    assert len(fig.data) == 2 * 2 and fig.data[0].error_y.array is not None


def test_cli_prints_and_writes_the_table(
    runs: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, fixed, other = runs
    out = tmp_path / "cmp"
    argv = [
        "compare",
        str(base),
        str(fixed),
        "--out",
        str(out),
        "--n-boot",
        "20",
        "--reliance",
        "margin_shift",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["base", "targeted"]
    assert "flip_rate" in printed and "share_Dangerous" in printed and "lora[3,4]" in printed
    table = pd.read_csv(out / "comparison.csv", index_col=0)
    assert table.loc["targeted", "flip_rate"] == 0 and (out / "comparison.html").is_file()
    assert main(["compare", str(base), str(other), "--out", str(out)]) == 2
    assert "different question rows" in capsys.readouterr().err


def _with_meta(folder: Path, **changes: object) -> Path:
    meta = {**json.loads((folder / "meta.json").read_text()), **changes}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_settings_that_differ_are_shown(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base = runs[0]
    a = _with_meta(shutil.copytree(base, tmp_path / "a"), eval_config={"removal": "gray", "batch_size": 64},
                   forward_path="prefix", runtime={"dtype": "float32"}, started="x")  # fmt: skip
    b = _with_meta(shutil.copytree(base, tmp_path / "b"), eval_config={"removal": "white", "batch_size": 64},
                   forward_path="full", runtime={"dtype": "bfloat16"}, started="y")  # fmt: skip
    comp = compare_runs([a, b], n_boot=10)
    got = comp.settings
    assert list(got.index) == ["eval_config.removal", "forward_path", "runtime.dtype"]  # not started, batch
    assert got.loc["runtime.dtype"].tolist() == ["float32", "bfloat16"]
    html, text = comp.to_html(), comp.to_text()
    assert "Settings that differ" in html and "<code>runtime.dtype</code>" in html and "bfloat16" in html
    assert "runtime.dtype: a float32; b bfloat16" in text
    same = compare_runs([a, a.parent / "a"], names=["x", "y"], n_boot=10)
    assert same.settings.empty and "every run was made the same way" in same.to_html()
    assert differing_settings({"p": {"model": "m1"}, "q": {}}).loc["model"].tolist() == ["m1", "—"]


def test_family_columns_and_the_rule_in_words(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, fixed, _ = runs
    comp = compare_runs([base, fixed], n_boot=20)
    assert comp.rule == DEFAULT_RULE and comp.rule.reliance == "margin_shift"  # the demo's rule by default
    t = comp.table
    s = summarize(comp.predictions["base"], DEFAULT_RULE, n_boot=20)
    reg = s["by_family"].loc[("flip_rate", "register")]
    assert t.loc["base", ["flip_rate_register", "flip_rate_register_low", "flip_rate_register_high"]].tolist() == (
        pytest.approx([reg["value"], reg["low"], reg["high"]])
    )
    assert t.loc["base", "flip_rate_register"] > 0 and "flip_rate_lexical" not in t.columns
    html = comp.to_html()
    assert "flip rate: register" in html and DEFAULT_RULE.in_words("gray") in html.replace("&#x27;", "'")
    assert '"reliance"' not in html and "reliance':" not in comp.to_text()
    every = compare_runs([base, fixed], n_boot=10, families="all")
    assert all(f"flip_rate_{f}" in every.table.columns for f in PARAPHRASE_FAMILIES)
    with pytest.raises(ValueError, match=r"unknown families \['registr'\]: use 'all'"):
        compare_runs([base, fixed], families="registr")
    out = tmp_path / "cmp"
    assert main(["compare", str(base), str(fixed), "--families", "all", "--n-boot", "10", "--out", str(out)]) == 0
    assert "flip_rate_syntactic" in pd.read_csv(out / "comparison.csv", index_col=0).columns
    other = compare_runs([base, fixed], rule=QuadrantRule(reliance="pred_change"), n_boot=10)
    assert "its answer changes when the image is removed" in other.to_text()


def test_compare_page_renders_in_chromium_with_plotly_from_beside_it(
    runs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from analyses.eval.browser import find_chromium, probe_page

    paths = compare_runs(runs[:2], n_boot=20).save(tmp_path)
    assert "image is removed (gray)" in paths["html"].read_text()
    chromium, how = find_chromium()
    if chromium is None:
        pytest.skip(f"page written; not rendered: {how}")
    seen = probe_page(paths["html"], chromium)
    assert seen["errors"] == [] and seen["has_plotly"] and [f["rendered"] for f in seen["figures"]] == [True]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".probe")) == []
