"""Progress bars: widgets in JupyterLab, a live text bar on a terminal, one line per bar in a
headless notebook.

Under headless papermill (`MMSOUP_PLAIN_PROGRESS` set by `mmsoup.reproduce`) the live bar is
written to the kernel's original stderr, the terminal that launched the run, which ipykernel keeps
as `sys.stderr.fileno()`; what the executed notebook records is one line per finished bar
(e.g. `sweep: 12/12 run in 07:10`), never one line per refresh.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any


def _terminal() -> Any:
    """A text stream on the process's original stderr (not captured into a notebook)."""
    try:
        return open(sys.stderr.fileno(), "w", closefd=False, buffering=1)  # noqa: SIM115
    except (io.UnsupportedOperation, AttributeError, OSError, ValueError):
        return sys.__stderr__


def tqdm(*args: Any, **kwargs: Any):
    """A tqdm bar; headless (MMSOUP_PLAIN_PROGRESS): live on the terminal, one line in the notebook."""
    if not os.environ.get("MMSOUP_PLAIN_PROGRESS"):
        from tqdm.auto import tqdm as bar

        return bar(*args, **kwargs)
    from tqdm.std import tqdm as std

    class Headless(std):
        """Live bar on the terminal; on close, its final state as one line on sys.stderr."""

        def close(self) -> None:
            if self.disable:
                return
            done = not getattr(self, "_mmsoup_reported", False)
            self._mmsoup_reported = True
            super().close()
            if done and sys.stderr is not sys.__stderr__:  # a kernel: the notebook's one line
                print(self.format_meter(**self.format_dict).strip(), file=sys.stderr, flush=True)

    kwargs.setdefault("file", _terminal())
    kwargs.setdefault("mininterval", 2.0)  # a streamed log, not an animation
    return Headless(*args, **kwargs)


def pretrain_lines(step: int, total: int, loss: float) -> None:
    """`prepare`'s on_step in commands: a stderr line every 100 pretraining steps (none if cached)."""
    if step % 100 == 0 or step == total - 1:
        print(f"pretrain step {step + 1}/{total} loss {loss:.3f}", file=sys.stderr, flush=True)


def end_bars() -> None:
    """Close every live progress bar, so that what is printed next starts on a line of its own
    (an error raised mid-loop leaves its bar open, its cursor after the bar's last character)."""
    import contextlib

    from tqdm.std import tqdm as std

    for bar in list(getattr(std, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()
