"""report.html on a planted predictions table (tests/report_data.py): structure, gallery, figures, sections.

Runs everywhere (no browser, no model): the page is parsed as HTML; test_report_browser.py renders it.
"""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from report_data import RULE, predictions, small_world

from analyses.eval.figures import margin_figure
from analyses.eval.localization import flip_position, localization_section, recovery_profile_figure
from analyses.eval.page import MAX_FIGURE_HEIGHT, display_path, redact
from analyses.eval.quadrants import QuadrantRule, least_reliant, quadrants
from analyses.eval.report import summary_table, write_report
from analyses.eval.summary import quadrant_shares, summarize
from interp.patching import PatchingResult
from interp.scores import LayerScores


class _Page(HTMLParser):
    """Tags with their attributes, in document order, and the text of each element with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path, str]:
    world, rows = small_world()
    df = predictions(rows)
    out = tmp_path_factory.mktemp("report")
    meta = {"model": str(out / "models" / "organism"), "architecture": "Gemma3ForConditionalGeneration",
            "n_layers": 6, "dataset_hash": "abc123", "removal": "removed:gray"}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta))
    path = write_report(
        df, out, "eval", n_boot=50, rule=RULE, images=world.image_for, data=f"synthcxr at {out}"
    )
    return df, path, path.read_text()


def test_page_is_offline_with_plotly_once_and_figures_of_fixed_height(
    planted: tuple[pd.DataFrame, Path, str],
) -> None:
    _, _, text = planted
    page = parse(text)
    assert text.count("plotly.js v") == 1, "plotly.js must be embedded exactly once"
    loaded = [a.get("src") or a.get("href") for t, a in page.tags if t in ("script", "link", "img", "iframe")]
    assert all(u is None or u.startswith("data:") for u in loaded), f"resources outside the page: {loaded}"
    assert len(page.find("script")) == 2 + 3  # plotly.js, the page script, one per figure
    # plotly draws into a div of 100% of its wrapper: the wrapper must have a fixed height in pixels
    at = [i for i, (t, a) in enumerate(page.tags) if t == "div" and "plotly-graph-div" in a.get("class", "")]
    assert len(at) == 3  # family bars, margin scatter, quadrant shares
    for i in at:
        tag, wrapper = page.tags[i - 1]
        height = re.search(r"height:\s*(\d+)px", wrapper.get("style", ""))
        assert tag == "div" and height and 100 <= int(height.group(1)) <= MAX_FIGURE_HEIGHT, wrapper
    ids = {a["id"] for a in page.find("h2") if "id" in a}
    assert {"families", "quadrants", "gallery", "tables", "definitions"} <= ids and "localization" not in ids


def test_header_names_the_run_without_machine_paths(planted: tuple[pd.DataFrame, Path, str]) -> None:
    _, path, text = planted
    for field in ("model", "data", "dataset hash", "image removed as", "quadrant rule"):
        assert f"<b>{field}</b>" in text
    assert "abc123" in text and "margin moves by &gt;= 1 logit without the image" in text and "gray" in text
    assert str(path.parent) not in text, "absolute machine paths must be shortened"
    assert "…/models/organism" in text
    assert "A question relies on the image if its margin moves by at least 1 logit when" in text


def test_headline_and_quadrant_numbers_are_the_summary(planted: tuple[pd.DataFrame, Path, str]) -> None:
    df, path, text = planted
    s = summarize(df, RULE, n_boot=50)
    q = s["quadrants"]
    positive = int(q["qid"].map(df.set_index("qid")["ground_truth"].to_dict()).sum())
    # planted: positive images flip (Worst), negative ones are consistent but text-driven (Dangerous)
    assert s["metrics"].loc["flip_rate", "value"] == pytest.approx(positive / len(q))
    counts = s["quadrant_summary"]["count"]
    assert counts["Worst"] == positive and counts["Dangerous"] == len(q) - positive
    assert counts["Ideal"] == counts["Fragile"] == 0
    assert f"{s['metrics'].loc['flip_rate', 'value']:.3f}" in text
    summary = json.loads((path.parent / "summary.json").read_text())
    shares = {r["quadrant"]: r for r in summary["quadrant_shares"]}
    assert shares["Dangerous"]["value"] == pytest.approx((len(q) - positive) / len(q))
    assert summary["data"].startswith("synthcxr at ")


def _cards(text: str, kind: str) -> list[str]:
    return re.findall(rf'<div class="ex" data-kind="{kind}".*?</table></div></div>', text, flags=re.S)


def test_gallery_shows_flips_and_dangerous_samples_with_their_images(
    planted: tuple[pd.DataFrame, Path, str],
) -> None:
    _, _, text = planted
    gallery = text[text.index("id='gallery'") :]
    flips, dangerous = _cards(gallery, "flip"), _cards(gallery, "dangerous")
    assert flips and dangerous
    assert all('data-family="register"' in c for c in flips + dangerous)  # the planted family only
    assert len(flips) <= 4 and len(dangerous) <= 8
    for card in flips:
        answers = re.findall(r'<span class="(yes|no)">', card)
        assert len(answers) == 2 and answers[0] != answers[1], "a flip card shows two different answers"
    for card in dangerous:
        answers = re.findall(r'<span class="(yes|no)">', card)
        assert answers == ["no", "no"] and "same without image" in card
    for card in flips + dangerous:
        uri = re.search(r'<img src="data:image/png;base64,([^"]+)"', card)
        assert uri is not None, "every card shows its image"
        im = Image.open(io.BytesIO(base64.b64decode(uri.group(1))))
        assert im.format == "PNG" and max(im.size) <= 128
    # the glance row repeats one flip and one Dangerous card before the gallery
    assert (
        len(_cards(text, "flip")) == len(flips) + 1 and len(_cards(text, "dangerous")) == len(dangerous) + 1
    )


def test_gallery_without_an_image_source_says_so_and_reads_image_paths(tmp_path: Path) -> None:
    world, rows = small_world()
    df = predictions(rows)
    text = write_report(df, tmp_path / "a", n_boot=20, rule=RULE).read_text()
    assert "no image source passed to the report" in text and '<img src="data:image/png' not in text
    first = sorted(df["image_id"].unique())[0]
    world.image(first).save(tmp_path / "img.png")
    df2 = df.assign(image_path=np.where(df["image_id"] == first, str(tmp_path / "img.png"), ""))
    text2 = write_report(df2, tmp_path / "b", n_boot=20, rule=RULE).read_text()
    assert text2.count('<img src="data:image/png;base64,') == text2.count(f"image <b>{first}</b>") > 0
    assert "no image source passed to the report" in text2  # the other images have no file


def test_report_of_a_run_with_the_image_condition_only(tmp_path: Path) -> None:
    world, rows = small_world()
    df = predictions(rows)
    text = write_report(
        df[df["condition"] == "image"], tmp_path, n_boot=20, images=world.image_for
    ).read_text()
    assert "id='quadrants'" not in text and "Dangerous samples" not in text  # quadrants need 'removed'
    assert text.count('data-kind="flip"') > 0 and 'data-kind="dangerous"' not in text
    assert "no units" in text  # text-only agreement and swap sensitivity have nothing to count
    assert text.count('class="plotly-graph-div"') == 1


@pytest.mark.parametrize(
    "rule",
    [RULE, QuadrantRule(), QuadrantRule(reliance="margin_shift", min_margin_shift=1.0, scope="original")],
)
def test_margin_figure_points_follow_the_rule(rule: QuadrantRule) -> None:
    _, rows = small_world()
    df = predictions(rows)
    q = quadrants(df, rule)
    fig = margin_figure(df, q, rule)
    points = {
        tr.name.split(" ")[0]: (np.asarray(tr.x), np.asarray(tr.y)) for tr in fig.data if tr.mode == "markers"
    }
    assert sum(len(x) for x, _ in points.values()) == len(q)
    for name, (x, y) in points.items():
        if rule.reliance == "margin_shift":
            reliant = np.abs(x - y) >= rule.min_margin_shift
        else:
            reliant = (x > 0) != (y > 0)
        expect = name in ("Ideal", "Fragile")
        assert (reliant == expect).all(), f"{name}: the plotted question decides the sample's reliance"
    assert fig.layout.height <= MAX_FIGURE_HEIGHT


def test_least_reliant_picks_the_text_driven_question() -> None:
    _, rows = small_world()
    df = predictions(rows)
    cluster = least_reliant(df, RULE)
    assert set(cluster["family"]) == {"register"} and not cluster["reliant"].any()
    original = least_reliant(df, QuadrantRule(reliance="margin_shift", scope="original"))
    assert set(original["family"]) == {"original"} and original["reliant"].all()


def test_quadrant_shares_have_intervals_around_the_shares() -> None:
    q = pd.DataFrame({"quadrant": ["Ideal"] * 6 + ["Dangerous"] * 2 + ["Worst"] * 2})
    t = quadrant_shares(q, n_boot=200, seed=1)
    assert list(t.index) == ["Ideal", "Fragile", "Dangerous", "Worst"]
    assert t["value"].tolist() == pytest.approx([0.6, 0.0, 0.2, 0.2])
    assert (t["low"] <= t["value"]).all() and (t["value"] <= t["high"]).all()
    assert t.loc["Fragile", ["low", "high"]].tolist() == [0.0, 0.0]  # never drawn
    assert (t["n"] == 10).all()
    pd.testing.assert_frame_equal(t, quadrant_shares(q, n_boot=200, seed=1))


def test_summary_table_prints_shares_with_intervals() -> None:
    _, rows = small_world()
    text = summary_table(predictions(rows), n_boot=20, rule=RULE)
    assert "share [95% CI]" in text
    assert re.search(r"Dangerous\s+\d+\s+\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", text)


def test_paths_are_shown_relative_or_shortened(tmp_path: Path) -> None:
    assert display_path(tmp_path / "a" / "b.png", root=tmp_path) == "a/b.png"
    assert display_path("/opt/x/y/model", root=tmp_path) == "…/y/model"
    assert display_path("google/medgemma-4b-it") == "google/medgemma-4b-it"
    assert redact({"m": f"world of {tmp_path}/m", "k": ["yes/no", "http://h/p"]}, root=tmp_path) == {
        "m": "world of m",
        "k": ["yes/no", "http://h/p"],
    }


# ------------------------------------------------------------------------------ localization
def _patching(method: str = "activation_patching", scale: float = 1.0) -> PatchingResult:
    """3 layers x 2 positions x 4 pairs; clean 2, corrupt 0: recovery = patched / 2. 'final' carries it."""
    rec = torch.tensor([[0.0, 0.2], [0.1, 0.6], [0.0, 1.0]]) * scale  # (layer, position)
    patched = (rec * 2.0)[:, :, None].expand(3, 2, 4).clone()
    return PatchingResult("attn_out", [0, 1, 2], ["image", "final"], patched, torch.full((4,), 2.0),
                          torch.zeros(4), method=method)  # fmt: skip


def test_localization_section_has_heatmap_profile_and_sae_table() -> None:
    res, approx = _patching(), _patching("attribution_patching", 0.5)
    assert flip_position(res) == "final"
    fig = recovery_profile_figure(res, approx, n_boot=20)
    overlay = next(tr for tr in fig.data if tr.name.startswith("attribution_patching"))
    assert list(overlay.y) == pytest.approx([0.1, 0.3, 0.5])  # the attribution recovery at 'final'
    mean = next(tr for tr in fig.data if tr.name.startswith("activation_patching"))
    assert list(mean.y) == pytest.approx([0.2, 0.6, 1.0])
    scores = LayerScores([0, 1, 2], [0.5, 0.25, 0.0], "attribution_scores")
    assert list(recovery_profile_figure(res, scores, n_boot=20).data[-1].y) == [0.5, 0.25, 0.0]
    feats = pd.DataFrame({"feature": ["resid_post(3)#41", "resid_post(3)#7"], "index": [41, 7],
                          "mean_attribution": [-0.4, 0.1], "mean_aligned": [0.4, 0.1], "mean_abs": [0.4, 0.2],
                          "share": [0.35, 0.05], "act_orig": [0.0, 1.0], "act_para": [2.0, 1.1]})  # fmt: skip
    feats.attrs.update(error_share=0.1, other_share=0.0, method="integrated_gradients", n_pairs=4)
    html = localization_section(res, approx, feats, n_boot=20)
    assert (
        html.count("plotly-graph-div") == 2 and "resid_post(3)#41" in html and "SAE error share 0.100" in html
    )
    assert "No noise floor was recorded" in html
    floored = _patching()
    floored.noise_floor_per_pair, floored.dtype = torch.full((4,), 0.3), "bfloat16"  # 0.15 in recovery
    html = localization_section(floored, approx, n_boot=20)
    assert "moved margins by up to 0.3, i.e. 0.15 in recovery" in html and "in bfloat16" in html
    assert "3 of 6 cells are within it" in html and "--dtype float32" not in html  # 1.0 > 3 floors
    weak = _patching(scale=0.4)
    weak.noise_floor_per_pair, weak.dtype = torch.full((4,), 0.3), "bfloat16"
    assert "<code>--dtype float32</code>" in localization_section(weak, n_boot=20)  # 0.4 <= 3 x 0.15
    with pytest.raises(ValueError, match="no position 'final'"):
        bad = PatchingResult("attn_out", [0, 1, 2], ["image", "question"], res.patched_margins,
                             res.clean_margins, res.corrupt_margins)  # fmt: skip
        recovery_profile_figure(res, bad)


def test_report_carries_localization_when_given_a_patching_result(tmp_path: Path) -> None:
    world, rows = small_world()
    text = write_report(predictions(rows), tmp_path, n_boot=20, rule=RULE, images=world.image_for,
                        patching=_patching(), attribution=_patching("attribution_patching", 0.5)).read_text()  # fmt: skip
    assert "id='localization'" in text and text.count("plotly.js v") == 1
    assert text.count('class="plotly-graph-div"') == 5
