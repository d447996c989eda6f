"""Screenshots of the MLflow UI as a user sees it after a run: the run list, one job's run, the registered model.

    python scripts/screenshots.py [--store results/mlflow.db] [--out docs/screenshots]

Starts a real ``mlflow server`` on a free loopback port against the workflow's store (read only:
nothing is logged), opens each page in headless Chromium (Debian's ``chromium`` package) and
saves PNGs. Look at them before committing them: a blank or loading page means the pages need
longer to render (``--wait-s``).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(store: Path, artifacts: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store.resolve()}", "--default-artifact-root", str(artifacts.resolve())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: mlflow server on {store} did not start; is it the workflow's store?")
            time.sleep(0.5)  # polling for the port to open
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# The UI's mode: MLflow 3 opens in its GenAI mode (traces, judges) unless told; this workflow's runs
# are model training.
MODE = "?workflowType=machine_learning"
# Run in each page before its screenshot: close the assistant panel MLflow 3.17 opens by itself, and
# expand the workflow's parent runs so the list shows its jobs.
TIDY = """(() => {
  document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]')?.click();
  document.querySelector('button[data-component-id*="runnamecellrenderer"]')?.click();
  return true;
})()"""


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no websocket library needed):
    load a page, let it render, run a script in it, capture it."""

    def __init__(self, chromium: str, profile: str) -> None:
        import os

        self._read_fd, child_write = os.pipe()
        child_read, self._write_fd = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4.
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            # pass_fds keeps 3 and 4 open through the close of inherited fds that follows preexec_fn
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(child_read, 3), os.dup2(child_write, 4)))
        os.close(child_read)
        os.close(child_write)
        self._buffer = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)

    def call(self, method: str, *, session: bool = False, **params):
        import json
        import os

        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read_fd, 1 << 20)
                if not chunk:
                    raise SystemExit("error: chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise SystemExit(f"error: chromium: {method}: {reply['error']}")
                return reply.get("result", {})

    def shoot(self, url: str, out: Path, *, width: int, height: int, wait_s: float) -> None:
        import base64

        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", session=True, url=url)
        time.sleep(wait_s)  # the single-page app renders from API calls: give it time, then tidy
        self.call("Runtime.evaluate", session=True, expression=TIDY)
        time.sleep(4)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        print(f"{out}  <- {url}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("results/mlflow.db"))
    parser.add_argument("--artifacts", type=Path, default=Path("results/mlartifacts"))
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--experiment", default="virtualcell")
    parser.add_argument("--model", default="virtualcell-synthetic")
    parser.add_argument("--wait-s", type=float, default=12, help="seconds each page gets to render")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: chromium not found; install Debian's chromium package (apt-get install chromium)")
    if not args.store.exists():
        raise SystemExit(f"error: {args.store}: no MLflow store; run snakemake first")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{args.store.resolve()}")
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"error: {args.store}: no experiment '{args.experiment}'; pass --experiment")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`virtualcell.rule` = 'evaluate'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(args.store, args.artifacts) as url, tempfile.TemporaryDirectory() as profile:
        eid = experiment.experiment_id
        pages = [(f"{url}/#/experiments/{eid}/runs{MODE}", "mlflow_runs.png", (1600, 1000)),
                 *[(f"{url}/#/experiments/{eid}/runs/{r.info.run_id}{MODE}", "mlflow_run.png", (1600, 1100))
                   for r in runs],
                 (f"{url}/#/models/{args.model}{MODE}", "mlflow_model.png", (1600, 900))]
        browser = Browser(chromium, profile)
        try:
            for page, name, (width, height) in pages:
                browser.shoot(page, args.out / name, width=width, height=height, wait_s=args.wait_s)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
