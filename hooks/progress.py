"""Progress bars: tqdm's plain text bar in a terminal, none inside a notebook kernel.

``tqdm.auto`` picks a widget bar in a notebook and, without ipywidgets, prints a red "TqdmWarning:
IProgress not found" block; a text bar there is rendered as one line per update in an exported page.
So every bar of the project is this :class:`tqdm`: the text bar, switched off in a kernel (the notebooks
print their results instead).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.std import tqdm as _text_tqdm


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, nbmake, ``make docs``)."""
    return "ipykernel" in sys.modules


class tqdm(_text_tqdm):
    """``tqdm.std.tqdm``, disabled inside a notebook kernel."""

    def __init__(self, *args: Any, disable: bool | None = False, **kwargs: Any) -> None:
        super().__init__(*args, disable=bool(disable) or in_notebook(), **kwargs)
