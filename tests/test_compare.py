"""`flipscope compare` / compare_runs on run folders with planted behaviour (tests/report_data.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from report_data import RULE, predictions, small_world, write_run

from analyses.cli import main
from analyses.eval.compare import METRICS, compare_runs, run_label
from analyses.eval.quadrants import QUADRANTS
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
    assert html.count("plotly.js v") == 1 and "<td>b</td>" in html and "lora[3,4]" in html
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
