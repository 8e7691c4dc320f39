"""The report as a reader opens it: headless Chromium renders a report of the shipped organism (evaluation
+ localization) and the page must have no errors, figures of bounded height and decoded gallery images.

Chromium comes from the system package manager (Debian's ``chromium``): found on PATH, or installed with
apt-get when running as root; elsewhere these tests are skipped and the reason is printed (``-rs``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analyses.eval.browser import find_chromium, probe_page, screenshot
from analyses.eval.page import MAX_FIGURE_HEIGHT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chromium() -> str:
    path, how = find_chromium(install=True, timeout_s=600)
    print(f"chromium: {how}")
    if path is None:
        pytest.skip(f"no headless browser: {how}")
    return path


@pytest.fixture(scope="module")
def organism_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Evaluate the organism on 4 test images; patch its register flips; write the full report."""
    from analyses.data.resolve import resolve_data, resolve_model
    from analyses.eval.evaluate import EvalConfig, evaluate
    from analyses.eval.pairs import flip_pairs, pair_batches
    from analyses.eval.quadrants import QuadrantRule
    from analyses.eval.report import write_report
    from analyses.organism.sae import SAE_DIR
    from interp import PatchingConfig, attribution_patching, patching_sweep
    from interp.sae import load_sae
    from interp.sae_attr import feature_attribution, top_features

    torch.set_num_threads(1)
    adapter, model_dir = resolve_model("organism")
    data = resolve_data("synthcxr", "test", 4, model_dir)
    out = tmp_path_factory.mktemp("browser") / "run"
    df = evaluate(adapter, data.rows, data.images, out, EvalConfig(batch_size=128), progress=False)
    pairs = flip_pairs(df, data.rows)[:12]
    assert pairs, "the organism flips on these images"
    clean, corrupt = pair_batches(adapter, pairs, data.images)
    cfg = PatchingConfig(site_kind="attn_out", positions=("image", "final"))
    patching = patching_sweep(adapter, clean, corrupt, cfg)
    attribution = attribution_patching(adapter, clean, corrupt, cfg)
    sae = load_sae(SAE_DIR)
    feats = top_features(feature_attribution(adapter, sae, clean, corrupt, method="grad_x_delta"), k=10)
    rule = QuadrantRule(reliance="margin_shift")
    return write_report(df, out, "flipscope eval: organism", n_boot=100, rule=rule, images=data.images,
                        data=data.source, patching=patching, attribution=attribution, sae_features=feats)  # fmt: skip


def test_report_renders_without_errors_with_bounded_figures_and_images(
    chromium: str, organism_report: Path
) -> None:
    seen = probe_page(organism_report, chromium, window=(1400, 2400))
    assert seen["has_plotly"], "plotly.js did not load from the page itself"
    assert seen["errors"] == [], seen["errors"]
    figures = seen["figures"]
    assert len(figures) == 5  # family, margins, quadrant shares, patching heatmap, recovery profile
    for f in figures:
        assert f["rendered"], f"plotly did not draw figure {f['id']}"
        assert 100 <= f["height"] <= MAX_FIGURE_HEIGHT, f"figure {f['id']} is {f['height']} px high"
        assert 0 < f["width"] <= 1400
    images = seen["images"]
    assert images and all(i["decoded"] and i["natural_width"] > 0 for i in images), images
    assert all(0 < i["height"] <= 200 for i in images)
    text = organism_report.read_text()
    assert "id='localization'" in text and "SAE features behind the margin shift" in text


def test_probe_sees_errors_and_unbounded_figures(chromium: str, tmp_path: Path) -> None:
    """The probe is not blind: a script error, a missing image and console.error are all reported."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        "<div class='ex'><img src='missing.png'></div><script>console.error('boom'); notDefined();</script>"
        "</body></html>"
    )
    seen = probe_page(page, chromium, window=(800, 600))
    kinds = " | ".join(seen["errors"])
    assert "console.error: boom" in kinds and "notDefined" in kinds and "missing.png" in kinds, kinds
    assert seen["images"] == [{"decoded": False, "natural_width": 0, "height": seen["images"][0]["height"]}]
    assert not seen["has_plotly"]


def test_screenshot_is_written(chromium: str, organism_report: Path, tmp_path: Path) -> None:
    from PIL import Image

    png = screenshot(organism_report, tmp_path / "shot.png", chromium, window=(1000, 800))
    with Image.open(png) as im:
        assert im.size == (1000, 800)
        assert len(set(im.convert("L").resize((50, 40)).getdata())) > 5, "the screenshot is blank"
