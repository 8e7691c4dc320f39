"""Building blocks of the offline HTML pages (the evaluation report, the run comparison).

One page = :func:`page` around sections: plotly.js is embedded once in the head (no CDN, the page works
offline), every figure is a div of fixed pixel height (:func:`figure_div`), tables are plain HTML
(:func:`table`; ``sortable`` ones sort on a header click), images are inline PNG thumbnails
(:func:`thumbnail_uri`) and absolute machine paths are shown relative to the working folder or
shortened (:func:`redact`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

#: Colours of the quadrants (Ideal, Fragile, Dangerous, Worst), shared by every figure and badge.
QUADRANT_COLORS = {"Ideal": "#2ca02c", "Fragile": "#ff7f0e", "Dangerous": "#d62728", "Worst": "#343a40"}
#: Palette for runs / series.
PALETTE = ("#4c6ef5", "#e8590c", "#2b8a3e", "#ae3ec9", "#1098ad", "#f59f00", "#868e96")
#: Largest figure height any page uses (the browser test checks every figure stays within it).
MAX_FIGURE_HEIGHT = 700

_ABS_PATH = re.compile(r"(?<![\w.~/:\\-])(/[^\s'\"<>,;()\[\]{}]+)")

CSS = """
*{box-sizing:border-box}
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#212529;margin:0;
 background:#f8f9fa;font-size:14px;line-height:1.45}
main{max-width:1320px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:24px;margin:4px 0 6px}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #dee2e6;
 padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}
p.lead{color:#495057;margin:2px 0 10px;max-width:1100px}
.runinfo{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:2px 18px;
 background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:8px 12px;font-size:13px}
.runinfo div b{color:#495057;font-weight:600;margin-right:4px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:10px 12px}
.card .v{font-size:26px;font-weight:650}.card .ci{color:#495057;font-size:13px}
.card .d{color:#6c757d;font-size:12px;margin-top:4px}
.row{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:16px;align-items:start}
@media (max-width:900px){.row{grid-template-columns:minmax(0,1fr)}}
.fig{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:4px;overflow:hidden}
table.t{border-collapse:collapse;background:#fff;font-size:13px;margin:4px 0 8px}
table.t th,table.t td{border:1px solid #dee2e6;padding:3px 7px;text-align:right;white-space:nowrap}
table.t th{background:#f1f3f5;font-weight:600;white-space:normal;vertical-align:bottom}table.t td:first-child,table.t th:first-child{text-align:left}
table.t .ci{color:#6c757d;font-size:12px}table.t td .meaning{display:block;text-align:left;white-space:normal;min-width:170px}table.sortable th{cursor:pointer}
.note{color:#6c757d;font-size:12px;max-width:1100px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(430px,1fr));gap:10px}
.ex{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:8px;display:flex;gap:10px}
.ex img{width:112px;height:112px;image-rendering:pixelated;border-radius:4px;flex:none;background:#000}
.ex .noimg{width:112px;height:112px;flex:none;background:#e9ecef;color:#6c757d;font-size:11px;
 display:flex;align-items:center;justify-content:center;text-align:center;border-radius:4px}
.ex .body{flex:1;min-width:0}.ex .m{color:#6c757d;font-size:12px;margin-bottom:3px}
table.qa{border-collapse:collapse;width:100%;font-size:12.5px}
table.qa td,table.qa th{padding:2px 4px;border-bottom:1px solid #f1f3f5;text-align:right;vertical-align:top}
table.qa th{color:#6c757d;font-weight:500;font-size:11.5px;white-space:nowrap}
table.qa td.q{text-align:left;white-space:normal}table.qa td.f{text-align:left;color:#495057}
.yes{color:#1864ab;font-weight:650}.no{color:#c92a2a;font-weight:650}
.badge{display:inline-block;border-radius:3px;padding:0 5px;color:#fff;font-size:11.5px;font-weight:600}
.textonly{background:#fff3bf;color:#5c3c00;border-radius:3px;padding:0 3px;font-size:11px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
pre{background:#fff;border:1px solid #dee2e6;padding:8px;overflow:auto;font-size:12px}
dl.defs{display:grid;grid-template-columns:max-content 1fr;gap:3px 12px;font-size:13px;max-width:1150px}
dl.defs dt{font-weight:600}dl.defs dd{margin:0;color:#343a40}
"""

SORT_JS = """
window.addEventListener('load',function(){if(window.Plotly){document.querySelectorAll('.plotly-graph-div')
  .forEach(function(d){Plotly.Plots.resize(d);});}});
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var body=t.tBodies[0],rows=Array.from(body.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
    rows.sort(function(a,b){var x=a.cells[i].dataset.v||a.cells[i].textContent,
      y=b.cells[i].dataset.v||b.cells[i].textContent,nx=parseFloat(x),ny=parseFloat(y);
      var c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});});});});
"""


def esc(value: Any) -> str:
    """HTML-escaped text of a value."""
    return html.escape(str(value))


def display_path(path: str | Path, root: Path | None = None) -> str:
    """A path as a reader may see it: relative to ``root`` (default: the working folder) when inside it,
    ``~/...`` under the home folder, else ``.../parent/name``; a relative path is returned as is."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    for base, prefix in ((root or Path.cwd(), ""), (Path.home(), "~/")):
        try:
            rel = p.resolve().relative_to(base.resolve())
        except (ValueError, OSError):
            continue
        if str(rel) != "." and (prefix or base != Path("/")):
            return prefix + str(rel)
    tail = p.parts[-2:] if len(p.parts) > 2 else p.parts[1:]
    return "…/" + "/".join(tail)


def redact(obj: Any, root: Path | None = None) -> Any:
    """``obj`` with every absolute path in its strings shown by :func:`display_path` (dicts and lists
    are walked)."""
    if isinstance(obj, str):
        return _ABS_PATH.sub(lambda m: display_path(m.group(1), root), obj)
    if isinstance(obj, dict):
        return {k: redact(v, root) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, root) for v in obj]
    return obj


def plotly_js() -> str:
    """The plotly.js bundle in a script tag (about 4.6 MB; embedded once per page)."""
    from plotly.offline import get_plotlyjs

    return f'<script type="text/javascript">{get_plotlyjs()}</script>'


def figure_div(fig: go.Figure, height: int, div_id: str | None = None) -> str:
    """The figure as a div of exactly ``height`` pixels (full width), plotly.js not included."""
    if not 100 <= height <= MAX_FIGURE_HEIGHT:
        raise ValueError(
            f"figure height {height} px: use 100..{MAX_FIGURE_HEIGHT} px so the page stays readable"
        )
    fig = go.Figure(fig)
    fig.update_layout(height=height, autosize=True)
    body = fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        default_height=f"{height}px",
        default_width="100%",
        div_id=div_id,
        config={"displaylogo": False, "responsive": True, "displayModeBar": False},
    )
    return f'<div class="fig">{body}</div>'


def fmt_num(value: Any, digits: int = 3, signed: bool = False) -> str:
    """A number for a table cell ("—" for missing / NaN)."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        return "—"
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def fmt_ci(value: float, low: float, high: float, digits: int = 3, stacked: bool = False) -> str:
    """``value [low, high]`` as HTML (the interval in small grey text, under the value if ``stacked``);
    "—" when ``value`` is missing."""
    if value is None or not math.isfinite(value):
        return "—"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.{digits}f}"
    sep = "<br>" if stacked else " "
    return f'{value:.{digits}f}{sep}<span class="ci">[{low:.{digits}f}, {high:.{digits}f}]</span>'


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], sortable: bool = False, sort_values: Any = None
) -> str:
    """An HTML table; ``header`` is escaped, cells are HTML already. ``sort_values[i][j]`` (optional)
    is the value a sortable column sorts cell (i, j) by."""
    cls = "t sortable" if sortable else "t"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for j, c in enumerate(r):
            v = None if sort_values is None else sort_values[i][j]
            attr = (
                "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f' data-v="{esc(v)}"'
            )
            cells.append(f"<td{attr}>{c}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def thumbnail_uri(image: Image.Image, max_px: int = 128) -> str:
    """A ``data:image/png;base64,...`` URI of the image shrunk to at most ``max_px`` on its long side
    (grayscale when the image is; small images are kept as they are and scaled by the browser)."""
    im = image.convert("RGB")
    r, g, b = im.split()
    if r.tobytes() == g.tobytes() == b.tobytes():
        im = r
    if max(im.size) > max_px:
        im = im.copy()
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def page(title: str, sections: Sequence[str], with_plotly: bool = True) -> str:
    """A complete offline HTML document: CSS, plotly.js once (if ``with_plotly``), the sections."""
    head = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style>",
        plotly_js() if with_plotly else "",
        "</head><body><main>",
    ]
    tail = [f"</main><script>{SORT_JS}</script></body></html>"]
    return "\n".join([*head, *sections, *tail])


def write_page(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file, so a crash never leaves half a page."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
