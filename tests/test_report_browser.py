"""The report in a real browser: headless Chromium renders the plots, a click shows a recipe.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so the test needs nothing but
Debian's ``chromium`` package — no webdriver, no websockets. The set-up installs it with
``apt-get install -y chromium`` when it is missing and apt is usable; otherwise the test is
skipped with the reason. A screenshot is saved to ``artifacts/report.png`` (git-ignored).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> str:
    """Path to a Chromium binary, installing Debian's package when possible; else skip."""
    path = find_chromium()
    if path:
        return path
    if os.environ.get("EVOMERGE_NO_APT"):
        pytest.skip("chromium is not installed and EVOMERGE_NO_APT is set")
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is not available to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed; installing it needs root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                              capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` timed out")
    path = find_chromium()
    if proc.returncode != 0 or not path:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"chromium is not installed and `apt-get install -y chromium` failed: {tail[0]}")
    return path


class CDPError(RuntimeError):
    pass


class Chromium:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, binary: str, width: int = 1440, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="evomerge-chromium-")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child_fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        args = [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "--force-device-scale-factor=1", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=child_fds, pass_fds=(3, 4))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []
        self.session: str | None = None

    # -- protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError("timed out waiting for Chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                    raise CDPError(f"Chromium closed the pipe: {err}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = "default",
             timeout: float = 30.0) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        sid = self.session if session == "default" else session
        if sid:
            msg["sessionId"] = sid
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, name: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == name:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    # -- page helpers
    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=None)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=None)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", timeout=60)

    def eval(self, expression: str, timeout: float = 30.0):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in res:
            raise CDPError(f"page script failed: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise CDPError(f"timed out waiting for: {expression}")

    def click(self, x: float, y: float) -> None:
        base = {"x": x, "y": y, "button": "left", "clickCount": 1}
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        self.send("Input.dispatchMouseEvent", {"type": "mousePressed", **base})
        self.send("Input.dispatchMouseEvent", {"type": "mouseReleased", **base})

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", params, timeout=60)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=None, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


# Page-side helpers: where a trial's point is on screen, and what the details panel shows.
POINT_XY = """
(function (k) {
  const gd = document.getElementById('pareto');
  const tr = gd._fullData.findIndex(t => t.meta === 'trials');
  const d = gd._fullData[tr];
  const xa = gd._fullLayout[d.xaxis.replace('x', 'xaxis')], ya = gd._fullLayout[d.yaxis.replace('y', 'yaxis')];
  const box = gd.getBoundingClientRect();
  return {x: box.left + xa._offset + xa.d2p(d.x[k]), y: box.top + ya._offset + ya.d2p(d.y[k]),
          id: d.customdata[k][1]};
})(%d)
"""


@pytest.fixture(scope="module")
def chromium():
    binary = ensure_chromium()
    browser = Chromium(binary)
    try:
        yield browser
    finally:
        browser.close()


def test_report_renders_and_click_shows_recipe(chromium, tmp_path):
    from tests.test_report import build_report_data  # the fixture run store's report data

    from evomerge.report import write_report

    data, store_dir = build_report_data(tmp_path)
    data.run.name = "demo <img src=x onerror=window.__pwned=1>"  # the expert is called <script>alert(1)</script>
    out = write_report(data, tmp_path / "report.html")
    evaluated = [t for t in data.trials if t.ok]

    chromium.open(out.resolve().as_uri())
    chromium.wait_for("document.body.getAttribute('data-report-ready') === '1'")
    # the plotly DOM exists and the evaluated trials' trace has one SVG point per evaluated trial
    assert chromium.eval("!!document.querySelector('#pareto .main-svg')")
    assert chromium.eval("!!document.querySelector('#progress .main-svg')")
    n_points = chromium.eval(
        "(() => { const gd = document.getElementById('pareto');"
        " const k = gd._fullData.findIndex(t => t.meta === 'trials');"
        " return document.querySelectorAll('#pareto .scatterlayer .trace')[k].querySelectorAll('path.point').length; })()")
    assert n_points == len(evaluated)

    # click a dominated trial (its point is not under a Pareto ring) and read the panel
    pareto = set(chromium.eval("Object.values(evomergeReport.data.trials).filter(t => t.pareto).map(t => t.id)"))
    k = next(i for i, t in enumerate(evaluated) if t.id not in pareto)
    target = chromium.eval(POINT_XY % k)
    assert target["id"] == evaluated[k].id
    chromium.click(target["x"], target["y"])
    chromium.wait_for(f"document.getElementById('details').getAttribute('data-key') === '{target['id']}'", timeout=10)
    panel = chromium.eval("document.getElementById('details').innerText")
    assert f"Trial {target['id']}" in panel
    assert f"--trial {target['id']}" in panel  # the export command
    recipe = evaluated[k].recipe
    assert recipe["merge_method"] in panel
    assert chromium.eval("!!document.querySelector('#details .heat .main-svg')")  # the parameter heat map
    # names from configs are text: the expert called <script>… shows literally, nothing ran
    assert "<script>alert(1)</script>" in chromium.eval("document.getElementById('details').innerText")
    assert chromium.eval("document.querySelector('header h1').textContent").startswith("demo <img src=x")
    assert chromium.eval("typeof window.__pwned") == "undefined"
    assert not [e for e in chromium.events if e.get("method") == "Page.javascriptDialogOpening"]

    shot = chromium.screenshot(ARTIFACTS / "report.png")
    print(f"\nscreenshot: {shot}  report: {out} ({out.stat().st_size / 1e6:.2f} MB)")
    assert shot.stat().st_size > 10_000
