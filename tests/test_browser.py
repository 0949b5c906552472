"""The λ explorer as a person uses it: JupyterLab in headless Chromium, driven by Playwright.

JupyterLab starts from this Python environment on 127.0.0.1 (token off, a free port, its own
config/data/runtime folders); Chromium is Debian's package (no Playwright browser download).
The test opens notebook 06 (parameterised for the smoke run) from the file browser, runs all
cells from the Run menu, moves one component slider with the keyboard, waits for the readouts to
be recomputed (on release), checks they changed, saves a screenshot of the panel (also to
$MMSOUP_SCREENSHOT when set), clicks "reset to λ*" and checks the readouts and sliders came back.
A widget-manager error in the browser console fails the test.

The executed chapters 02 and 07 (notebooks/executed/, as committed) are opened as a reader opens
them, without running a cell: each figure in the file must be drawn on the page (the isolated
config sets the notebook's windowingMode to "none", so every cell is in the DOM) and decoded
(img.naturalWidth > 0), and no output may be a traceback. With $MMSOUP_SCREENSHOT_DIR set they
save notebook_02.png and notebook_07.png there (title down to the first figure). To regenerate
figures/notebook_02.png and figures/notebook_07.png:

    MMSOUP_SCREENSHOT_DIR=figures pytest tests/test_browser.py -k executed
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = (
    os.environ.get("MMSOUP_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
# without the background-networking flags Chromium dials out and a closed network refuses it
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_S = 90  # JupyterLab answering on its port
PAGE_MS = 90_000  # the notebook open and its kernel idle
RUN_MS = 240_000  # run all cells until the panel shows (notebook 06 loads the run's data)
RECOMPUTE_MS = 120_000  # one recomputation of the readouts (~20 s on 2 CPU cores, smoke)
PANEL = ".mmsoup-lambda-explorer"
READOUTS = f"{PANEL} table.mmsoup-readouts"
# console errors that mean the widget front end is broken (version skew, failed model class, ...)
WIDGET_ERROR = re.compile(r"widget|jupyter-widgets|ipywidgets|jupyterlab-manager|\bcomm\b", re.I)

if CHROMIUM is None:
    pytest.skip(
        "Chromium is not installed (apt-get install chromium); skipping the browser test",
        allow_module_level=True,
    )
pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
)


# -- JupyterLab ---------------------------------------------------------------------------------
@dataclass
class Lab:
    """A running JupyterLab: its URL, its root folder and its log file."""

    url: str
    root: Path
    log: Path

    def log_tail(self, n: int = 40) -> str:
        """The last lines of the server log (for failure messages)."""
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, lab: Lab, timeout: float) -> None:
    """Poll the server's status endpoint until it answers; fail if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        try:  # the poll interval doubles as the check that the server is still alive
            proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"JupyterLab exited with code {proc.returncode}:\n{lab.log_tail()}")
    pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s:\n{lab.log_tail()}")


def _shutdown(proc: subprocess.Popen) -> None:
    """Stop the server, which shuts its kernels down (SIGTERM; SIGKILL of its group if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory) -> Iterator[Lab]:
    """JupyterLab from this environment on 127.0.0.1, token off, isolated config; shut down after."""
    root = tmp_path_factory.mktemp("lab_root")
    home = tmp_path_factory.mktemp("lab_home")
    settings = home / "config/lab/user-settings/@jupyterlab/apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    # attach every cell to the page at once: the default windowing leaves off-screen cells (and
    # their figures) out of the DOM, so a long executed notebook could not be checked whole
    tracker = home / "config/lab/user-settings/@jupyterlab/notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
    }
    env.pop("MPLBACKEND", None)  # the kernel must draw inline, into the panel's Output
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    lab = Lab(url, root, home / "jupyterlab.log")
    with lab.log.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
                "--IdentityProvider.token=",
                "--ServerApp.password=",
                f"--ServerApp.root_dir={root}",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabApp.extension_manager=readonly",  # no PyPI queries
                *(["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _wait_until_up(url, proc, lab, SERVER_START_S)
            yield lab
        finally:
            _shutdown(proc)


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    """Debian's headless Chromium, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


# -- the notebooks ----------------------------------------------------------------------------
def _notebook_06(folder: Path, run_dir: Path) -> str:
    """Notebook 06, parameterised by papermill for the smoke run (cells left unexecuted)."""
    import papermill

    name = "06_lambda_explorer.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / name),
        str(folder / name),
        parameters={"profile": "smoke", "run_dir": str(run_dir), "interactive": True},
        prepare_only=True,
        log_output=False,
        progress_bar=False,
    )
    return name


# -- driving the page -----------------------------------------------------------------------
def _readouts(page) -> tuple[str, dict[str, str]]:
    """(update counter, {set: accuracy text}) read atomically from the readout table."""
    update, accs = page.locator(READOUTS).evaluate(
        """t => [t.dataset.update, Object.fromEntries(
            [...t.querySelectorAll('b.mmsoup-acc')].map(b => [b.dataset.set, b.textContent]))]"""
    )
    return update, accs


def _wait_recomputed(page, update: str) -> tuple[str, dict[str, str]]:
    """Wait until the kernel has re-rendered the readouts after `update`; return the new ones."""
    page.wait_for_function(
        "([sel, old]) => { const t = document.querySelector(sel); return t && t.dataset.update !== old; }",
        arg=[READOUTS, update],
        timeout=RECOMPUTE_MS,
    )
    return _readouts(page)


def _wait_kernel_connected(page, lab: Lab, name: str) -> None:
    """Wait until the server holds an idle kernel for `name` with the page's websocket attached.

    The notebook toolbar reads "idle" before its session exists, and a Run All Cells clicked then
    is dropped; the page is the server's only client, so a connection to the kernel is the page's.
    """
    deadline = time.monotonic() + PAGE_MS / 1000
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{lab.url}/api/sessions", timeout=5) as r:
            kernels = [s["kernel"] for s in json.load(r) if s["path"] == name]
        if any(k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels):
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
            return
        page.wait_for_timeout(250)  # poll interval of a bounded wait
    pytest.fail(f"no kernel connected to {name} within {PAGE_MS / 1000:.0f} s:\n{lab.log_tail()}")


def _run_all(page) -> None:
    """Run → Run All Cells from the menu bar."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def _run_notebook(page, lab: Lab, name: str) -> None:
    """Open a notebook, wait for its kernel, Run → Run All Cells, wait for the panel (or an error)."""
    # open it from the file browser, as a person does (/lab/tree/<name> can race the workspace
    # restore on a busy machine and start two kernels, leaving the notebook without one)
    page.goto(f"{lab.url}/lab?reset", wait_until="domcontentloaded", timeout=PAGE_MS)
    page.locator("#jupyterlab-splash").wait_for(state="detached", timeout=PAGE_MS)
    page.locator(".jp-DirListing-item", has_text=name).dblclick()
    _wait_kernel_connected(page, lab, name)
    _run_all(page)
    started = page.locator(".jp-CodeCell .jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    started.or_(dialog).first.wait_for(timeout=30_000)
    if dialog.count():
        pytest.fail(f"JupyterLab dropped Run All Cells and asked for a kernel:\n{lab.log_tail()}")
    failed = page.locator(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error'], "
        ".jp-OutputArea-output[data-mime-type='text/plain']:has-text('VBox('), "
        ".jp-OutputArea-output:has-text('Error displaying widget')"
    )
    page.locator(PANEL).or_(failed).first.wait_for(timeout=RUN_MS)
    if failed.count():
        pytest.fail(f"{name} did not show the λ explorer:\n{failed.first.inner_text()[-3000:]}")


def _slider_values(page) -> list[str]:
    """The λ each slider handle shows (aria-valuenow), in component order."""
    return page.locator(f"{PANEL} .widget-slider .noUi-handle").evaluate_all(
        "hs => hs.map(h => h.getAttribute('aria-valuenow'))"
    )


def _explore(page, lab: Lab, name: str, shot: Path, publish: bool) -> None:
    """The person's session: run, move a slider, see the readouts change, reset, see them back."""
    _run_notebook(page, lab, name)
    panel = page.locator(PANEL)
    handles = panel.locator(".widget-slider .noUi-handle")
    assert handles.count() >= 2, "the panel should have one slider per live component"
    start_values = _slider_values(page)
    update, first = _readouts(page)
    assert first and all(v.endswith("%") for v in first.values()), first

    # move components one at a time (to the far end) until the accuracies move
    now = first
    for i in range(handles.count()):
        handle = handles.nth(i)
        lam = float(handle.get_attribute("aria-valuenow"))
        handle.focus()
        handle.press("Home" if lam >= 0.5 else "End")  # one release: one recomputation
        update, now = _wait_recomputed(page, update)
        if now != first:
            break
    assert now != first, f"moving every slider to an end left the readouts at {first}"
    assert _slider_values(page) != start_values
    panel.screenshot(path=str(shot), animations="disabled")  # a moved slider and its Δ
    if publish and (target := os.environ.get("MMSOUP_SCREENSHOT")):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    panel.get_by_role("button", name="reset to λ*").click()
    update, back = _wait_recomputed(page, update)
    assert back == first, f"reset to λ* gave {back}, expected the first readouts {first}"
    assert _slider_values(page) == start_values


def _in_browser(chromium, lab: Lab, name: str, out: Path, publish: bool = False) -> None:
    """Run `_explore` in a fresh page; on failure keep a full-page screenshot and the server log."""
    context = chromium.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    try:
        _explore(page, lab, name, out / "lambda_explorer.png", publish)
    except BaseException:
        page.screenshot(path=str(out / "failure.png"), full_page=True)
        print(f"browser console errors: {errors}\nfailure screenshot: {out / 'failure.png'}")
        print(f"JupyterLab log:\n{lab.log_tail()}")
        raise
    finally:
        context.close()
    print(f"browser console errors: {errors}")
    broken = [e for e in errors if WIDGET_ERROR.search(e)]
    assert not broken, f"the widget front end logged errors in the browser console: {broken}"


# -- the tests --------------------------------------------------------------------------------
def test_notebook_06_lambda_explorer_in_jupyterlab(
    chromium, jupyterlab: Lab, smoke_run: Path, tmp_path: Path
) -> None:
    """Notebook 06 over the smoke run: the panel renders, a slider moves the readouts, reset restores."""
    name = _notebook_06(jupyterlab.root, smoke_run)
    _in_browser(chromium, jupyterlab, name, tmp_path, publish=True)


# -- the executed chapters, as a reader opens them ------------------------------------------------
EXECUTED = ROOT / "notebooks" / "executed"
OUTPUT_IMG = ".jp-Notebook .jp-OutputArea-output img"
SHOT_MAX_H = 4000  # px: the tallest screenshot viewport
SHOT_BYTES = 600_000  # a larger screenshot PNG is scaled down
TRACEBACK = (
    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error'], "
    ".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']:has-text('Traceback')"
)


def _png_outputs(notebook: Path) -> int:
    """How many image/png outputs the notebook file holds (one <img> each when rendered)."""
    cells = json.loads(notebook.read_text())["cells"]
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))


def _open_notebook(page, lab: Lab, name: str) -> None:
    """Open a notebook from the file browser (no cell run) and wait for its cells to be laid out."""
    page.goto(f"{lab.url}/lab?reset", wait_until="domcontentloaded", timeout=PAGE_MS)
    page.locator("#jupyterlab-splash").wait_for(state="detached", timeout=PAGE_MS)
    page.locator(".jp-DirListing-item", has_text=name).dblclick()
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=PAGE_MS)
    # the file browser closed, as a reader would, to give the notebook the page's width
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").wait_for(state="detached")


def _screenshot(page, target: Path) -> None:
    """The notebook from its title down to its first figure, in one tall viewport, as a PNG.

    The viewport grows (up to SHOT_MAX_H) until the first figure is in it; a PNG over SHOT_BYTES
    is scaled down so the copies in figures/ stay small.
    """
    from PIL import Image

    scroller = page.locator(".jp-NotebookPanel .jp-WindowedPanel-outer")
    scroller.evaluate("el => el.scrollTo(0, 0)")
    bottom = page.locator(OUTPUT_IMG).first.evaluate("i => i.getBoundingClientRect().bottom")
    width = page.viewport_size["width"]
    height = int(min(max(page.viewport_size["height"], bottom + 60), SHOT_MAX_H))
    page.set_viewport_size({"width": width, "height": height})
    scroller.evaluate("el => el.scrollTo(0, 0)")
    page.wait_for_timeout(500)  # a settled repaint after the resize
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), animations="disabled")
    scale = 1.0
    while target.stat().st_size > SHOT_BYTES and scale > 0.3:
        scale *= 0.85
        with Image.open(target) as im:
            small = im.convert("RGB").resize(
                (round(width * scale), round(height * scale)), Image.LANCZOS
            )
        small.save(target, optimize=True)


@pytest.mark.parametrize("name", ["02_soups.ipynb", "07_why_soups_work.ipynb"])
def test_executed_chapter_opens_with_its_figures_drawn(
    chromium, jupyterlab: Lab, name: str, tmp_path: Path
) -> None:
    """A reader opens the committed executed copy: every figure decodes, no output is a traceback.

    With $MMSOUP_SCREENSHOT_DIR set, the view (title and first figure) is saved there as
    notebook_<NN>.png (the copies in figures/ come from this).
    """
    expected = _png_outputs(EXECUTED / name)
    assert expected > 0, f"the executed {name} holds no figure"
    shutil.copyfile(EXECUTED / name, jupyterlab.root / name)
    context = chromium.new_context(viewport={"width": 1400, "height": 2400})
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        _open_notebook(page, jupyterlab, name)
        images = page.locator(OUTPUT_IMG)
        page.wait_for_function(
            "([sel, n]) => document.querySelectorAll(sel).length >= n",
            arg=[OUTPUT_IMG, expected],
            timeout=PAGE_MS,
        )
        assert images.count() == expected, f"{images.count()} figures shown, {expected} in {name}"
        page.wait_for_function(
            "sel => [...document.querySelectorAll(sel)].every(i => i.complete)",
            arg=OUTPUT_IMG,
            timeout=PAGE_MS,
        )
        widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert all(w > 0 for w in widths), f"figures of {name} that did not decode: {widths}"
        errors = page.locator(TRACEBACK)
        assert not errors.count(), f"{name} shows an error:\n{errors.first.inner_text()[-3000:]}"
        if shots := os.environ.get("MMSOUP_SCREENSHOT_DIR"):
            _screenshot(page, Path(shots) / f"notebook_{name[:2]}.png")
    except BaseException:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(
            f"failure screenshot: {tmp_path / 'failure.png'}\nJupyterLab log:\n{jupyterlab.log_tail()}"
        )
        raise
    finally:
        context.close()
