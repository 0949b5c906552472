"""Progress bars: widgets in JupyterLab, a live text bar on a terminal, one line per bar in a
headless notebook.

Under headless papermill (`MMSOUP_PLAIN_PROGRESS` set by `mmsoup.reproduce`) the live bar is
written to the kernel's original stderr, the terminal that launched the run, which ipykernel keeps
as `sys.stderr.fileno()`; what the executed notebook records is one line per finished bar
(e.g. `sweep: 100%|██████████| 12/12, best model_3 val_acc=0.9480`), never one line per refresh, and
without its elapsed time or rate: an executed notebook must not depend on the clock (the committed
copies are compared byte for byte with a reader's run).
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
                print(final_line(self.format_dict), file=sys.stderr, flush=True)

    kwargs.setdefault("file", _terminal())
    kwargs.setdefault("mininterval", 2.0)  # a streamed log, not an animation
    return Headless(*args, **kwargs)


# A finished bar without its clock: description, bar, count and postfix (no elapsed time or rate).
FINAL_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}"


def final_line(format_dict: dict[str, Any]) -> str:
    """The one line a headless notebook keeps of a finished bar (tqdm's meter, clock left out)."""
    from tqdm.std import tqdm as std

    return std.format_meter(**{**format_dict, "bar_format": FINAL_FORMAT}).strip()


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
