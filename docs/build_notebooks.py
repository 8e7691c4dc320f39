"""Execute notebooks and export them as offline HTML pages with their figures (``make docs``).

The notebooks are committed without outputs (small diffs, nothing stale); this renders what a reader
should see: every cell run on the shipped organism, plotly figures drawn (plotly.js embedded once per
page by plotly's ``notebook`` renderer), nothing loaded from a network (the page template drops
require.js, MathJax and Mermaid; plotly's per-figure MathJax tag is removed). A notebook that fails is
still exported up to the failing cell, and the command exits non-zero naming it.

    python docs/build_notebooks.py notebooks/*.ipynb --out docs/notebooks
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

TEMPLATE = Path(__file__).with_name("notebook_offline.html.j2")
#: Script / stylesheet tags that load from a network (plotly's notebook renderer adds MathJax per figure).
_REMOTE_TAG = re.compile(r"""<script[^>]*\ssrc=["']https?://[^"']*["'][^>]*>\s*</script>""")
_REMOTE_ANY = re.compile(r"""<(?:script|link|img|iframe)[^>]*\s(?:src|href)=["'](?:https?:)?//""")


def offline_html(text: str) -> str:
    """The page with every remote script tag removed; refuses a page that still loads anything remote."""
    text = _REMOTE_TAG.sub("", text)
    left = _REMOTE_ANY.findall(text)
    if left:
        raise ValueError(f"the exported page still loads {len(left)} remote resources, e.g. {left[0]!r}")
    return text


def build(notebook: Path, out_dir: Path, timeout_s: int = 1800) -> tuple[Path, str | None]:
    """Execute ``notebook`` (working folder: its own) and write ``out_dir/<name>.html``.

    Returns (page, error or ``None``). The notebook file itself is not modified.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    os.environ.setdefault("PLOTLY_RENDERER", "notebook")  # the kernel inherits it: plotly.js in the page
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    )
    error = None
    try:
        client.execute()
    except CellExecutionError as err:
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
        error = lines[-1] if lines else type(err).__name__
    exporter = HTMLExporter(template_file=str(TEMPLATE))
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / f"{notebook.stem}.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(offline_html(body), encoding="utf-8")
    tmp.replace(page)
    return page, error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/notebooks"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = p.parse_args(argv)
    failed = []
    for i, nb in enumerate(args.notebooks, 1):
        start = time.time()
        print(f"[{i}/{len(args.notebooks)}] {nb} ...", flush=True)
        page, error = build(nb, args.out, args.timeout)
        status = f"FAILED: {error}" if error else "ok"
        print(
            f"    {page} ({page.stat().st_size / 1e6:.1f} MB, {time.time() - start:.0f} s) {status}",
            flush=True,
        )
        if error:
            failed.append(str(nb))
    if failed:
        print(
            f"notebooks that failed (exported up to the failing cell): {', '.join(failed)}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
