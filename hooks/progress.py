"""Progress bars: tqdm's plain text bar in a terminal, none inside a notebook kernel.

``tqdm.auto`` picks a widget bar in a notebook and, without ipywidgets, prints a red "TqdmWarning:
IProgress not found" block (transformers imports ``tqdm.auto`` and warns so on import); a text bar there
is rendered as one line per update in an exported page. So every bar of the project is this
:class:`tqdm`: the text bar, switched off in a kernel (the notebooks print their results instead). In a
kernel, importing any project package (each ``__init__`` imports this module) also silences that
warning and switches off the Hugging Face bars ("Loading weights"): :func:`quiet_in_notebook`.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from tqdm.std import TqdmWarning
from tqdm.std import tqdm as _text_tqdm


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, nbmake, ``make docs``)."""
    return "ipykernel" in sys.modules


class tqdm(_text_tqdm):  # (tqdm's own name, so call sites read the same)
    """``tqdm.std.tqdm``, disabled inside a notebook kernel."""

    def __init__(self, *args: Any, disable: bool | None = False, **kwargs: Any) -> None:
        super().__init__(*args, disable=bool(disable) or in_notebook(), **kwargs)


def quiet_in_notebook() -> None:
    """In a notebook kernel: no "IProgress not found" warning, no Hugging Face / transformers bars."""
    if not in_notebook():
        return
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    if "transformers" in sys.modules:  # imported already: switch its bars off directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


quiet_in_notebook()
