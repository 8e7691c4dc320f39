"""Open a report as a reader would: headless Chromium, a probe of the rendered page, screenshots.

:func:`find_chromium` locates the system's Chromium (Debian package ``chromium``) and, when asked and
allowed (root, ``apt-get`` present), installs it from the system package manager within a time limit.
:func:`probe_page` loads a page offline and returns what the reader's browser saw: errors (uncaught
exceptions, failed resources, ``console.error``), the size of every plotly figure, and whether each
gallery image decoded. :func:`screenshot` writes a PNG. Nothing here is needed to *write* a report.

``python -m analyses.eval.browser runs/demo/report.html docs/report.png`` takes the README's picture.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Executable names tried, in order.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Flags for a headless run on a machine without a display, a sandbox or network.
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--mute-audio",
)
_PROBE_ID = "__flipscope_probe"
_PROBE = (
    """<script>
window.__probeErrors = [];
window.addEventListener('error', function (e) {
  var t = e.target || {};
  window.__probeErrors.push(e.message ? 'uncaught: ' + e.message : 'failed to load: ' + (t.src || t.href || t.tagName));
}, true);
window.addEventListener('unhandledrejection', function (e) { window.__probeErrors.push('unhandled rejection: ' + e.reason); });
(function () { var orig = console.error; console.error = function () {
  window.__probeErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); orig.apply(console, arguments); }; })();
window.addEventListener('load', function () { setTimeout(function () {
  var figs = Array.prototype.map.call(document.querySelectorAll('.plotly-graph-div'), function (d) {
    var r = d.getBoundingClientRect();
    return {id: d.id, height: r.height, width: r.width, rendered: !!d.querySelector('svg.main-svg')}; });
  var imgs = Array.prototype.map.call(document.querySelectorAll('.ex img'), function (i) {
    return {decoded: i.complete && i.naturalWidth > 0, natural_width: i.naturalWidth,
            height: i.getBoundingClientRect().height}; });
  var anchors = {};
  Array.prototype.forEach.call(document.querySelectorAll('h2[id], h3[id]'), function (h) {
    anchors[h.id] = h.getBoundingClientRect().top + window.scrollY; });
  var out = document.createElement('pre'); out.id = '__PROBE_ID__';
  out.textContent = JSON.stringify({errors: window.__probeErrors, figures: figs, images: imgs, anchors: anchors,
    page_height: document.documentElement.scrollHeight, has_plotly: !!window.Plotly});
  document.body.appendChild(out);
}, 300); });
</script>"""
).replace("__PROBE_ID__", _PROBE_ID)


def find_chromium(install: bool = False, timeout_s: float = 600.0) -> tuple[str | None, str]:
    """(path to a Chromium executable or ``None``, what was done or why there is none).

    With ``install``, a missing Chromium is installed with ``apt-get install -y chromium`` (after an
    ``apt-get update`` if the first try fails) when running as root with apt-get available, within
    ``timeout_s`` seconds in all.
    """
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found, f"found {found}"
    if not install:
        return None, f"no Chromium on PATH (tried {', '.join(CHROMIUM_NAMES)})"
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "no Chromium on PATH, and not root with apt-get to install it (apt-get install chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):  # fmt: skip
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s / 3)
        except subprocess.TimeoutExpired:
            log.append(f"{' '.join(cmd)}: timed out after {timeout_s / 3:.0f} s")
            continue
        log.append(f"{' '.join(cmd)}: exit {done.returncode} {done.stderr.strip()[-200:]}")
        found = shutil.which("chromium")
        if found:
            return found, f"installed {found} with apt-get"
    return None, "could not install Chromium with apt-get: " + " | ".join(log)


def _run(chromium: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="flipscope-chromium-") as profile:
        cmd = [chromium, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def probe_page(
    page: str | Path, chromium: str, window: tuple[int, int] = (1400, 2400), timeout_s: float = 120.0
) -> dict[str, Any]:
    """Load ``page`` (a local HTML file) in headless Chromium and return what it rendered.

        Keys: ``errors`` (uncaught exceptions, resources that failed to load, ``console.error`` calls),
        ``figures`` (per plotly div: id, height, width in CSS pixels, whether plotly drew it), ``images``
        (per gallery image: decoded, natural_width, height), ``anchors`` (id of each h2 / h3 heading -> its
    offset from the top of the page, px), ``page_height``, ``has_plotly``. The page is
        read from a copy with a probe script added at the top of its head; nothing is fetched from a network.
    """
    text = Path(page).read_text(encoding="utf-8")
    if "<head>" not in text and "<head " not in text:
        raise ValueError(f"{page} has no <head>: pass a complete HTML document")
    head_end = text.index(">", text.index("<head")) + 1
    # the copy sits beside the page, so files the page loads from its folder (plotly.min.js) are found
    probed = Path(page).with_name(f".probe-{os.getpid()}-{Path(page).name}")
    probed.write_text(text[:head_end] + _PROBE + text[head_end:], encoding="utf-8")
    try:
        args = [f"--window-size={window[0]},{window[1]}", "--virtual-time-budget=15000", "--dump-dom",
                probed.resolve().as_uri()]  # fmt: skip
        done = _run(chromium, args, timeout_s)
    finally:
        probed.unlink(missing_ok=True)
    start = done.stdout.find(f'<pre id="{_PROBE_ID}">')
    if start < 0:
        raise RuntimeError(
            f"the page never finished loading in Chromium (no probe output); exit {done.returncode}, "
            f"stderr: {done.stderr.strip()[-600:]}"
        )
    body = done.stdout[start + len(f'<pre id="{_PROBE_ID}">') :]
    return dict(json.loads(html.unescape(body[: body.index("</pre>")])))


def screenshot(
    page: str | Path,
    png: str | Path,
    chromium: str,
    window: tuple[int, int] = (1400, 1750),
    timeout_s: float = 120.0,
    top: int = 0,
) -> Path:
    """A PNG of ``window`` of ``page`` as headless Chromium renders it, from ``top`` pixels down (the page
    is rendered ``top`` pixels taller and the PNG cropped)."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    args = [f"--window-size={window[0]},{window[1] + top}", "--virtual-time-budget=15000", f"--screenshot={png}",
            Path(page).resolve().as_uri()]  # fmt: skip
    done = _run(chromium, args, timeout_s)
    if not png.is_file():
        raise RuntimeError(
            f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr.strip()[-600:]}"
        )
    if top:
        from PIL import Image

        with Image.open(png) as im:
            cropped = im.crop((0, top, im.width, im.height))
        cropped.save(png)
    return png


def main(argv: list[str] | None = None) -> int:
    """``python -m analyses.eval.browser PAGE[#ANCHOR] PNG [WIDTH HEIGHT]``: probe the page, then screenshot it
    (from the element with id ANCHOR down, when given)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 4):
        print(
            "usage: python -m analyses.eval.browser PAGE.html[#ANCHOR] OUT.png [WIDTH HEIGHT]",
            file=sys.stderr,
        )
        return 2
    chromium, how = find_chromium(install=False)
    if chromium is None:
        print(f"no screenshot: {how}", file=sys.stderr)
        return 1
    window = (int(args[2]), int(args[3])) if len(args) == 4 else (1400, 1750)
    page, _, anchor = args[0].partition("#")
    probe = probe_page(page, chromium)
    if probe["errors"]:
        print("page errors: " + "; ".join(probe["errors"]), file=sys.stderr)
        return 1
    if anchor and anchor not in probe.get("anchors", {}):
        print(
            f"no heading with id {anchor!r}; the page has {sorted(probe.get('anchors', {}))}", file=sys.stderr
        )
        return 2
    top = int(probe["anchors"][anchor]) - 10 if anchor else 0
    print(f"wrote {screenshot(page, args[1], chromium, window, top=top)} ({len(probe['figures'])} figures, "
          f"{len(probe['images'])} images, page {probe['page_height']} px high)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
