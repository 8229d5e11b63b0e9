"""The lessons as a learner meets them: JupyterLab in a real browser.

A JupyterLab server on loopback (random free port, a token; `--allow-root` when run as root) and
Debian's chromium driven by playwright (the Python package only: `playwright install` is never run,
chromium comes from apt, see `scripts/ensure_chromium.sh`). For each lesson: open it, run all cells,
wait for the kernel, then check that no cell printed a traceback, that the widgets render as widgets
(not as a `VBox(...)` text repr), and that a widget answers a click. The executed course's static site
is opened too. Screenshots go to `runs/browser/` for a human to look at.

Without chromium or playwright the test skips and says why; in CI (`CI=true`) a missing browser is an
error. The server is started in its own session and stopped by its PID.
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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("COGAGENT_NB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO_ROOT / "runs" / "browser"
LAB_SETTINGS = {
    # every cell stays in the page (JupyterLab 4 otherwise renders only the cells in view)
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}
# The lessons whose point in a browser is a widget: the sample browser (01), the mask browser (02), the
# prediction browser (07). Lessons 03-06 train models without a widget: nbval runs them as saved and
# tests/test_notebooks_own_data.py on other data, and running them here would add no browser-specific check.
LESSONS = [
    REPO_ROOT / "notebooks" / name for name in ("01_data_format.ipynb", "02_loss_mask.ipynb", "07_inference.ipynb")
]
# Their training runs short here, where the point is the page and its widgets (nbval runs them as saved):
# lesson 02's mask experiment (~100 s at its default), lesson 07's fine-tuning and learning runs. The server's
# copy gets the values the way a papermill user's run does (an injected-parameters cell after the tagged
# one), which the browser shows.
BROWSER_PARAMETERS = {
    "mask_demo_steps": 10,  # 02
    "train_steps": 4,  # 07
    "eval_limit": 4,  # 07
    "agent_episodes": 1,  # 07
    "learning_minutes": 0.05,  # 07
    "learning_episodes": 1,  # 07
    "rectangle_minutes": 0.05,  # 07
}


def _require_browser():
    """playwright's sync API, or a skip (a failure in CI) that names what is missing."""
    problems = []
    if not CHROMIUM.is_file():
        problems.append(f"chromium not found at {CHROMIUM} (run scripts/ensure_chromium.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problems.append("the playwright package is not installed (pip install -e '.[test]')")
        sync_playwright = None
    if problems:
        if os.environ.get("CI") == "true":
            pytest.fail("browser test in CI: " + "; ".join(problems))
        pytest.skip("; ".join(problems))
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab(NamedTuple):
    url: str  # a format string: {workspace}, {path} (relative to root)
    root: Path  # the folder the server serves (copies of the lessons, links to data/, solutions/, configs/)


def _inject_parameters(notebook: Path, values: dict[str, object]) -> None:
    """Give `notebook` the parameters it declares among `values`, as papermill does (the copy only)."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from cogagent_nb.course import parameters_for

    mine = parameters_for(notebook, values)
    if mine:  # papermill's own loader: it gives every cell the `tags` list that parameterize_notebook reads
        nbformat.write(parameterize_notebook(load_notebook_node(str(notebook)), mine), notebook)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """A JupyterLab server on loopback serving copies of the lessons; yields its URL and its root."""
    _require_browser()
    port, token = _free_port(), uuid.uuid4().hex
    settings = tmp_path_factory.mktemp("lab-settings")
    for plugin, values in LAB_SETTINGS.items():
        file = settings / f"{plugin}.jupyterlab-settings"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(values))
    # the server sees copies of the lessons (a browser session must never write into the repository)
    root = tmp_path_factory.mktemp("lab-root")
    shutil.copytree(REPO_ROOT / "notebooks", root / "notebooks")
    for lesson in LESSONS:
        _inject_parameters(root / "notebooks" / lesson.name, BROWSER_PARAMETERS)
    # what lessons read beside them: configs from lesson 03 on; lesson 04 launches finetune.py
    for name in ("data", "solutions", "configs", "finetune.py"):
        (root / name).symlink_to(REPO_ROOT / name)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), PYTHONPATH=str(REPO_ROOT), MPLBACKEND="")
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("lab-runtime"))
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0",
    ]  # fmt: skip
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = (tmp_path_factory.mktemp("lab-log") / "lab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"JupyterLab did not start: {Path(log.name).read_text()[-2000:]}")
                time.sleep(0.5)
        # one workspace per page, reset: JupyterLab would otherwise restore the previous lesson's tabs
        yield Lab(f"{base}/lab/workspaces/{{workspace}}/tree/{{path}}?token={token}&reset", root)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started, by the server's PID
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _require_browser()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


KERNEL_READY = """async () => {
    const panel = window.jupyterapp.shell.currentWidget;
    await panel.sessionContext.ready;
    const kernel = panel.sessionContext.session.kernel;
    while (kernel.connectionStatus !== "connected") await new Promise(ok => setTimeout(ok, 200));
    await kernel.requestKernelInfo();  // a round trip: the kernel answers on its shell channel
    return kernel.status;
}"""
DONE = """n => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
    return prompts.length === n && prompts.every(t => /\\[\\d+\\]/.test(t));
}"""
# an error output renders as stderr text with the traceback; plain warnings on stderr are fine
ERROR_TEXT = r"Traceback|^\w+Error\b"  # a regular expression that Python and JavaScript read alike
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
FAILED = f"""() => [...document.querySelectorAll("{STDERR}")].some(e => /{ERROR_TEXT}/m.test(e.innerText))"""
STARTED = "() => /\\[\\d+\\]/.test(document.querySelector('.jp-CodeCell .jp-InputPrompt')?.textContent || '')"


def _run_all_cells(page, n_code_cells: int, timeout_s: float = 300) -> None:
    """Run every cell through JupyterLab's own command and wait until each has an execution count.

    The kernel must first answer a kernel-info request (the status bar says "Idle" before the kernel is
    connected). If not even the first cell gets a number within a minute, the kernel is restarted once
    and the run repeated (printed); a second stall fails the test.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("() => window.jupyterapp?.shell?.currentWidget?.sessionContext", timeout=60_000)
    for attempt in (1, 2):
        page.evaluate(f"() => Promise.race([({KERNEL_READY})(), new Promise((_, no) => setTimeout(no, 60000))])")
        # fire and forget: the command's promise settles only when every cell is done, and evaluate() has no timeout
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            page.wait_for_function(STARTED, timeout=60_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                pytest.fail("the first cell never started, twice: the kernel does not answer")
            print("the kernel did not start the first cell within 60 s: restarting it once", flush=True)
            page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart()")
    try:  # every cell numbered, or a cell failed (run-all then stops: the cells after it would never run)
        page.wait_for_function(f"n => ({DONE})(n) || ({FAILED})()", arg=n_code_cells, timeout=timeout_s * 1000)
        if failed := _tracebacks(page):
            pytest.fail(f"a cell failed:\n{failed[0]}")
    except PlaywrightTimeout:
        prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent)")
        pending = [i for i, t in enumerate(prompts) if "*" in t or not any(c.isdigit() for c in t)]
        pytest.fail(f"cells {pending} did not finish within {timeout_s:.0f} s (prompts: {prompts})")


def _tracebacks(page) -> list[str]:
    texts = page.eval_on_selector_all(STDERR, "els => els.map(e => e.innerText)")
    return [t[:2000] for t in texts if re.search(ERROR_TEXT, t, re.MULTILINE)]


def _screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def _code_cells(notebook: Path) -> int:
    return sum(c["cell_type"] == "code" for c in json.loads(notebook.read_text())["cells"])


def _drawn_share(page, selector: str) -> float:
    """The share of a picture's pixels that are not white: ~0 for the blank redraws that a pyplot figure
    in a widget callback can give (cogagent_nb.viz.widget_pictures), most of it for a screenshot."""
    import base64
    import io

    from PIL import Image

    src = page.eval_on_selector(selector, "img => img.src")
    assert src.startswith("data:image/png;base64,"), f"{selector}: not an inline PNG ({src[:40]})"
    grey = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L")
    return 1 - sum(grey.histogram()[245:]) / (grey.width * grey.height)


def _pick_another_screen(page, picker, lesson: str) -> None:
    """Choose the second screen of a dropdown; wait until the kernel has redrawn the widget's picture."""
    output = page.locator(".widget-output").first
    output.scroll_into_view_if_needed()
    before = output.inner_text()
    picker.select_option(index=1)
    page.wait_for_function(
        "b => { const o = document.querySelector('.widget-output'), i = o?.querySelector('img');"
        " return o.innerText !== b && i?.complete && i.naturalWidth > 100; }",
        arg=before,
        timeout=60_000,
    )
    assert output.inner_text() != before, f"{lesson}: the dropdown did not change the answer shown"
    page.wait_for_timeout(1500)
    drawn = _drawn_share(page, ".widget-output img")
    assert drawn > 0.15, f"{lesson}: the redrawn screenshots are blank ({drawn:.0%} of the pixels drawn)"


@pytest.mark.parametrize("notebook", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_in_jupyterlab(notebook: Path, lab: Lab, browser) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(lab.url.format(workspace=notebook.stem, path=f"notebooks/{notebook.name}"), timeout=60_000)
        _run_all_cells(page, _code_cells(lab.root / "notebooks" / notebook.name))
        assert _tracebacks(page) == [], f"{notebook.name}: a cell failed in the browser"
        _screenshot(page, f"{notebook.stem}_after_run_all")

        widgets = page.locator(
            ".jp-OutputArea-output .jupyter-widgets.widget-container, .jp-OutputArea-output .widget-slider"
        )
        reprs = page.locator(".jp-OutputArea-output", has_text="VBox(children=")
        assert widgets.count() > 0, f"{notebook.name}: no widget rendered"
        assert reprs.count() == 0, (
            f"{notebook.name}: a widget shows as its text repr (is jupyterlab_widgets installed?)"
        )

        picker = page.locator(".widget-dropdown select").first
        if picker.count():  # lesson 07's prediction browser: another screen, answered and drawn by the kernel
            _pick_another_screen(page, picker, notebook.name)
            _screenshot(page, f"{notebook.stem}_widget")
        slider = page.locator(".widget-slider").first
        if slider.count():
            slider.scroll_into_view_if_needed()
            readout = page.locator(".widget-slider .widget-readout").first
            before = readout.inner_text()
            forward = page.locator(".jupyter-widgets button", has_text="▶")
            if forward.count():  # lesson 01's sample browser: the ▶ button moves the slider
                forward.first.click()
                page.wait_for_function(
                    "b => document.querySelector('.widget-slider .widget-readout').textContent.trim() !== b",
                    arg=before.strip(),
                    timeout=30_000,
                )
                checkbox = page.locator(".jupyter-widgets input[type=checkbox]")
                if checkbox.count():
                    checkbox.first.check()
                    page.wait_for_timeout(2000)  # the old picture is cleared as the new one is drawn
                # the kernel redraws the screenshot into the widget's picture area
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.widget-hbox .jp-OutputArea-output img')]"
                    ".some(i => i.complete && i.naturalWidth > 100)",
                    timeout=60_000,
                )
                drawn = _drawn_share(page, ".widget-hbox .jp-OutputArea-output img")
                assert drawn > 0.15, f"{notebook.name}: the redrawn screenshot is blank ({drawn:.0%} drawn)"
            else:  # a slider alone: drive it with the keyboard
                page.locator(".widget-slider .ui-slider-handle, .widget-slider .noUi-handle").first.focus()
                page.keyboard.press("ArrowRight")
                page.wait_for_function(
                    "b => document.querySelector('.widget-slider .widget-readout').textContent.trim() !== b",
                    arg=before.strip(),
                    timeout=30_000,
                )
            assert readout.inner_text().strip() != before.strip(), (
                f"{notebook.name}: the widget did not answer the click"
            )
            page.wait_for_timeout(1500)
            _screenshot(page, f"{notebook.stem}_widget")
    finally:
        page.close()


def test_the_launch_lesson_runs_two_processes_from_jupyterlab(lab: Lab, browser) -> None:
    """Lesson 04 starts torchrun from the kernel (2 processes, ZeRO-2 over gloo): the one lesson whose work
    runs outside the kernel. Every cell runs, the loss curve of the launched run is drawn."""
    lesson = "04_deepspeed_launch.ipynb"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(lab.url.format(workspace="launch", path=f"notebooks/{lesson}"), timeout=60_000)
        _run_all_cells(page, _code_cells(lab.root / "notebooks" / lesson))
        assert _tracebacks(page) == [], f"{lesson}: a cell failed in the browser"
        launch = page.locator(".jp-CodeCell", has_text="result.check()").first
        assert "exit status 0" in launch.inner_text(), f"{lesson}: the launch did not succeed in the browser"
        curve = '.jp-CodeCell:has-text("loss_history.json") .jp-OutputArea-output img'
        assert _drawn_share(page, curve) > 0.01, f"{lesson}: the loss curve of the launched run is blank"
        launch.scroll_into_view_if_needed()
        _screenshot(page, "04_deepspeed_launch_after_run_all")
    finally:
        page.close()


def test_course_site_opens(browser, tmp_path: Path) -> None:
    """The executed course as a static site: the index lists the lessons and shows their figures.

    One lesson is enough to check the site (every lesson's run is tested elsewhere: nbval, own data)."""
    out = tmp_path / "course"
    subprocess.run(
        [sys.executable, "-m", "cogagent_nb.cli", "course", "--only", "01", "--out", str(out)],
        cwd=REPO_ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )  # fmt: skip
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    try:
        page.goto((out / "site" / "index.html").as_uri())
        rows = page.locator("#summary tr")
        assert rows.count() == 1 + 1 + 1  # header, the lesson, total
        images = page.locator("#figures img")
        assert images.count() >= 1, "the lesson's `course-figure` pictures (or its last one) are on the index"
        widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert all(w > 0 for w in widths), f"a figure did not load: {widths}"
        _screenshot(page, "site_index")
        page.locator("#summary a").first.click()
        page.wait_for_load_state()
        assert page.locator("h1", has_text="The CogAgent data format").count() == 1, "lesson 01 opens from the index"
        _screenshot(page, "site_lesson01")
    finally:
        page.close()
    shutil.rmtree(out, ignore_errors=True)
