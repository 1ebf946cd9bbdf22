"""Notebook 07 in a real JupyterLab, driven by headless Chromium through selenium.

The test starts JupyterLab on a free localhost port (a known token, a temporary root folder that
holds a copy of the notebook, so nothing tracked is ever autosaved), opens the notebook, runs all
cells, moves the first weight slider of the composition explorer with the keyboard and checks that
the accuracy readout and the figure change. It saves a screenshot in the test's temporary folder
(and in ``$COMPOLAB_FIGURES_DIR`` as ``07_browser.png`` when that is set).

It skips, saying why, when Chromium, its driver or selenium is missing (Debian:
``apt-get install chromium chromium-driver``; ``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "07_composition_explorer.ipynb"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TOKEN = "compolab-browser-test"

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "Chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, poll: float = 0.5):
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
        except StaleElementReferenceException:  # the widget re-rendered what was being read: read again
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _copy_without_outputs(src: Path, dst: Path) -> None:
    nb = json.loads(src.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"].pop("widgets", None)
    dst.write_text(json.dumps(nb), encoding="utf-8")


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a free port whose root is ``tmp_path/root``; yields its base URL."""
    if reason := _missing():
        pytest.skip(reason)
    root = tmp_path / "root"
    root.mkdir()
    _copy_without_outputs(NOTEBOOK, root / NOTEBOOK.name)
    port = _free_port()
    env = dict(
        os.environ,
        TQDM_DISABLE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    for var, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTERLAB_SETTINGS_DIR", "settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
    ):
        env[var] = str(tmp_path / sub)
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"  # no "Jupyter news?" toast
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    log = open(tmp_path / "jupyterlab.log", "w")  # noqa: SIM115 - closed below
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--ServerApp.token={TOKEN}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        "--ServerApp.allow_root=True",
        "--ServerApp.port_retries=0",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2) as r:
                return r.status == 200
        except OSError:
            assert proc.poll() is None, (tmp_path / "jupyterlab.log").read_text()
            return False

    try:
        _wait(up, 90, "JupyterLab to start")
        yield base
    finally:
        try:  # the server shuts its kernels down with it
            req = urllib.request.Request(f"{base}/api/shutdown?token={TOKEN}", method="POST")
            urllib.request.urlopen(req, timeout=10).close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


STATE_JS = """
const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!panel || !panel.content || !panel.sessionContext || !panel.sessionContext.session) return null;
const kernel = panel.sessionContext.session.kernel;
const cells = panel.content.widgets.filter(c => c.model.type === 'code');
const done = cells.filter(c => c.model.executionCount != null).length;
const errors = [];
for (const c of cells) {
  for (let i = 0; i < c.model.outputs.length; i++) {
    const o = c.model.outputs.get(i).toJSON();
    if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
  }
}
return {status: kernel ? kernel.status : null, done: done, total: cells.length, errors: errors};
"""


def _readout(driver) -> tuple[list[str], str]:
    cells = driver.find_elements("css selector", ".compolab-explorer .compolab-readout td.acc")
    image = driver.find_element("css selector", ".compolab-explorer img")
    return [c.text for c in cells], image.get_attribute("src")


def test_notebook_07_in_jupyterlab_moves_the_bars(jupyterlab, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"{jupyterlab}/lab/tree/{NOTEBOOK.name}?token={TOKEN}")
        _wait(lambda: (s := driver.execute_script(STATE_JS)) and s["status"] == "idle", 120, "the kernel")
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")

        def finished():
            s = driver.execute_script(STATE_JS)
            assert not s["errors"], f"a cell failed: {s['errors']}"
            return s["done"] == s["total"] and s["status"] == "idle" and s

        state = _wait(finished, 420, "the notebook to run")
        assert state["done"] == state["total"]
        explorer = _wait(
            lambda: driver.find_elements("css selector", ".compolab-explorer"), 30, "the explorer"
        )[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", explorer)
        before, image_before = _wait(lambda: (r := _readout(driver))[0] and r, 30, "the readout")
        handle = explorer.find_element("css selector", ".noUi-handle")
        handle.click()
        for _ in range(8):  # w0: 1/3 → ≈ 0.73, one step (0.05) per key press
            handle.send_keys(Keys.ARROW_RIGHT)
        after, image_after = _wait(lambda: (r := _readout(driver))[0] != before and r, 60, "the bars to move")
        assert after != before and len(after) == len(before) == 3
        assert image_after != image_before, "the figure was redrawn"
        value = explorer.find_element("css selector", ".widget-readout").text
        assert float(value) > 0.5, f"the slider moved: w0 = {value}"
        time.sleep(1.0)  # let the image settle before the screenshot
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", explorer)
        shot = tmp_path / "07_browser.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if out := os.environ.get("COMPOLAB_FIGURES_DIR"):
            shutil.copy(shot, Path(out) / "07_browser.png")
    finally:
        driver.quit()
