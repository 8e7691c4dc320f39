"""Audit stage 6: ``audit.html`` (the eval report, then where the flip happens, the features and the LoRA
recommendation, each with its intervals) and ``audit.json`` (every stage's summary and wall time).

The localization section is :func:`analyses.eval.localization.localization_section` on the component kind
of the strongest flagged site (heatmap with the noise floor greyed, recovery profile with attribution
overlaid); the sections after it are built here from the stages' records.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.data.schema import ImageSource
from analyses.eval.page import esc, fmt_ci, fmt_num, table

if TYPE_CHECKING:
    from analyses.audit.run import AuditConfig, AuditResult
    from analyses.audit.stages import AuditFolder, StageRecord

REPORT_FILE, JSON_FILE = "audit.html", "audit.json"
#: Columns of the arms' table that are counts (means over seeds), shown to one decimal.
COUNTS = ("Dangerous", "into_dangerous")


def _ci(v: Any) -> str:
    if v is None:
        return "—"
    value, low, high = (float(x) for x in v)
    return fmt_ci(value, low, high)


def _floor(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2g}"


def pairs_section(res: AuditResult) -> str:
    s = res.split
    assert s is not None
    rows = [[esc(f), str(s.pairs_by_family.get(f, 0)), str(n), fmt_num(n / max(s.pairs_by_family.get(f, 0), 1))]
            for f, n in s.flips_by_family.items()]  # fmt: skip
    return "\n".join([
        "<h2 id='audit-pairs'>Audit: flip pairs</h2>",
        f"<p class='lead'>Localized family: <b>{esc(s.family)}</b>. Its flip pairs are split by image (seed {s.seed}): "
        f"{len(s.selection)} selection pairs on {len(s.selection_images)} images choose sites and features; "
        f"{len(s.scoring)} scoring pairs on {len(s.scoring_images)} other images score them; {len(s.others)} "
        "pairs of the other families on scoring images measure collateral.</p>",
        table(["family", "pairs", "flip pairs", "share flipped"], rows),
    ])  # fmt: skip


def flagged_section(res: AuditResult) -> str:
    from analyses.audit.localize import RULE_TEXT

    loc = res.localization
    assert loc is not None
    scoring = {(r["site"], r["position"]): r for r in loc.scoring.to_dict("records")}
    rows = []
    for r in loc.flagged.to_dict("records"):
        s = scoring.get((r["site"], r["position"]), {})
        rows.append([esc(r["site"]), esc(r["position"]), fmt_ci(r["recovery"], r["low"], r["high"]),
                     fmt_ci(s.get("recovery", math.nan), s.get("low", math.nan), s.get("high", math.nan)),
                     _floor(s.get("floor", math.nan)), fmt_num(bool(s.get("within_floor", False)))])  # fmt: skip
    resid = scoring.get((str(loc.residual_site), "final"), {})
    agree = "; ".join(
        f"{a['kind']} {a['scope']} Spearman {fmt_num(a['spearman'], 2)}"
        for a in loc.agreement.to_dict("records")
    )
    aligned = next(iter(loc.sweeps.values())).meta.get("aligned_pairs", {}).get("question")
    n_pairs = int(next(iter(loc.sweeps.values())).clean_margins.shape[0])
    weak = ("<p class='note'><b>Weak:</b> no site passed the rule; the top final-position site stands in.</p>"
            if loc.weak else "")  # fmt: skip
    return "\n".join([
        "<h2 id='audit-flagged'>Flagged sites</h2>",
        f"<p class='lead'>Rule (fixed in code): {esc(RULE_TEXT)}. Flagged layers: <b>{esc(loc.layers)}</b>; "
        f"residual site for features: <b>{esc(loc.residual_site)}</b> (scoring recovery at final "
        f"{fmt_ci(resid.get('recovery', math.nan), resid.get('low', math.nan), resid.get('high', math.nan))}).</p>",
        weak,
        table(["site", "position", "recovery, selection pairs (chose it)", "recovery, scoring pairs",
               "noise floor (recovery)", "within floor"], rows),
        f"<p class='note'>Attribution vs exact sweep (rank agreement): {esc(agree) or 'not run'}. Question "
        f"tokens were patched on the {aligned or 0} of {n_pairs} selection pairs whose question has the same "
        "token layout in both wordings (NaN for the others: a paraphrase of another length has no token "
        "correspondence). Image tokens come before the question, so their column is zero by construction "
        "when the image is first.</p>",
    ])  # fmt: skip


def features_section(res: AuditResult) -> str:
    f = res.features
    if f is None:
        return ("<h2 id='audit-features'>Features</h2><p class='note'>Not run (pass <code>--sae FOLDER</code> "
                "or <code>--sae train</code>).</p>")  # fmt: skip
    sae, sc = f.sae, f.score
    trained = (f" trained here on {sae.get('n_activations')} activations: FVU {fmt_num(sae.get('fvu'))}, "
               f"L0 {fmt_num(sae.get('l0'), 1)}, dead share {fmt_num(sae.get('dead_fraction'))}" if sae.get("source") == "trained"
               else f" loaded from a folder ({esc(sae.get('release'))})")  # fmt: skip
    rows = [["rank by attribution (scoring pairs)", str(sc["rank"])],
            ["share of the margin shift", fmt_num(sc["share"])],
            ["patching recovery", _ci(sc["recovery"])],
            ["flips undone, clamped to original value", _ci(sc["undo_original"])],
            ["flips undone, clamped to 0", _ci(sc["undo_zero"])],
            ["other families' predictions changed (original clamp)", _ci(sc["collateral_original"])],
            ["other families' predictions changed (0 clamp)", _ci(sc["collateral_zero"])]]  # fmt: skip
    return "\n".join([
        "<h2 id='audit-features'>Features</h2>",
        f"<p class='lead'>SAE at <b>{esc(sae.get('site'))}</b> (flagged residual site {esc(sae.get('flagged_site'))}), "
        f"{sae.get('width')} features,{trained}. Feature <b>#{f.feature}</b> was chosen on the selection pairs and "
        f"switches {'on' if sc['switches_on'] else 'off'} on the paraphrase ({fmt_num(sc['act_orig'], 2)} -> "
        f"{fmt_num(sc['act_para'], 2)}); scored on {sc['n_pairs']} scoring pairs ({sc['n_flips']} flips) and "
        f"{sc['n_other']} other-family pairs, 95% intervals:</p>",
        table(["measure", "value"], rows),
    ])  # fmt: skip


def lora_section(res: AuditResult) -> str:
    r = res.recommendation
    if r is None:
        return ""
    ev = [[esc(e["site"]), esc(e["position"]), _ci(e["selection"]), _ci(e["scoring"])] for e in r["evidence"]]
    parts = ["<h2 id='audit-lora'>LoRA recommendation</h2>", f"<p class='lead'><b>{esc(r['text'])}</b>.</p>",
             table(["flagged site", "position", "recovery (selection)", "recovery (scoring)"], ev)]  # fmt: skip
    c = res.check
    if c is None:
        parts.append("<p class='note'>Not checked: <code>--lora-check</code> trains targeted vs the same-size "
                     "control vs all layers over seeds and says whether targeted beat the control.</p>")  # fmt: skip
    else:
        fam = c.family
        cols = [f"{fam}_flip", "flip_rate", "text_only_agreement", "accuracy", "Dangerous", "into_dangerous"]
        rows = [[esc(arm), fmt_ci(t[f"{fam}_flip"], t[f"{fam}_flip_low"], t[f"{fam}_flip_high"]),
                 *(fmt_num(t[k], 1 if k in COUNTS else 3) for k in cols[1:])] for arm, t in c.table.iterrows()]  # fmt: skip
        parts += [f"<p class='lead'><b>{esc(c.verdict())}</b>.</p>", table(["arm", *cols], rows)]
    return "\n".join(parts)


def timing_section(records: dict[str, StageRecord]) -> str:
    rows = [[esc(k), fmt_num(r.seconds, 1), esc(r.finished)] for k, r in records.items()]
    return "<h3>Stage wall times</h3>" + table(["stage", "seconds", "finished"], rows)


def audit_payload(res: AuditResult) -> dict[str, Any]:
    return {"stages": {k: {"seconds": r.seconds, "digest": r.digest, "summary": r.summary} for k, r in res.records.items()},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip


def stage_report(
    folder: AuditFolder,
    res: AuditResult,
    cfg: AuditConfig,
    images: ImageSource,
    title: str = "",
    data_name: str | None = None,
) -> tuple[Path, StageRecord]:
    """Stage 6: write ``audit.html`` / ``audit.json`` into the report stage and copy them to the run folder."""
    from analyses.eval.report import write_report

    key = {k: r.digest for k, r in res.records.items()} | {"n_boot": cfg.n_boot, "rule": cfg.rule.__dict__}
    loc = res.localization
    assert loc is not None

    def compute(tmp: Path) -> dict[str, Any]:
        meta = folder.stage_dir("eval") / "meta.json"
        if meta.exists():  # the report's header reads the run's settings from it
            shutil.copy(meta, tmp / "meta.json")
        kind = str(loc.flagged.sort_values("recovery", ascending=False)["kind"].iloc[0])
        extra = [flagged_section(res), features_section(res), lora_section(res), timing_section(res.records)]
        write_report(res.predictions, tmp, title or "flipscope audit", cfg.n_boot, cfg.eval.seed, cfg.rule,
                     images=images, data=data_name, patching=loc.sweeps[kind], attribution=loc.attribution.get(kind),
                     lead_sections=[pairs_section(res)], extra_sections=extra, filename=REPORT_FILE)  # fmt: skip
        (tmp / JSON_FILE).write_text(json.dumps(audit_payload(res), indent=1, default=float))
        return {"kind_shown": kind}

    rec = folder.run("report", key, compute)
    for name in (REPORT_FILE, JSON_FILE):
        shutil.copy(folder.stage_dir("report") / name, folder.path / name)
    return folder.path / REPORT_FILE, rec
