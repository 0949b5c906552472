"""Progress bars: widgets in JupyterLab, plain text on a terminal and under headless papermill."""

from __future__ import annotations

import os
import sys
from typing import Any


def tqdm(*args: Any, **kwargs: Any):
    """A tqdm bar; plain text on stderr when MMSOUP_PLAIN_PROGRESS is set (headless notebooks)."""
    if os.environ.get("MMSOUP_PLAIN_PROGRESS"):
        from tqdm.std import tqdm as bar

        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("mininterval", 2.0)  # a streamed log, not an animation
    else:
        from tqdm.auto import tqdm as bar
    return bar(*args, **kwargs)
