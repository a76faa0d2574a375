"""The web app (sample/app.py) running in a subprocess for the app tests: the embedded demo weights at
128x128 with 2 + 2 steps, on a free localhost port.

One app serves both test modules (test_app.py and test_app_browser.py): starting it and compiling
its first request is most of these tests' time, and a second app would pay it again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sample" / "app.py"
START_TIMEOUT_S = 240
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    def __init__(self, process: subprocess.Popen, url: str, out: Path, log: Path):
        self.process, self.url, self.out, self.log = process, url, out, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_app(folder: Path, *extra: str) -> RunningApp:
    """Start the app and wait until its page answers; fail with the app's log if it does not."""
    port, out, log = free_port(), folder / "results", folder / "app.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(SCRIPT), "--host", "127.0.0.1", "--port", str(port),  # the demo weights
           "--out", str(out), "--size", "128", "--prior-steps", str(STEPS), "--decoder-steps", str(STEPS),
           "--max-upload-mb", "1", *extra]
    with open(log, "wb") as sink:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    app = RunningApp(process, f"http://127.0.0.1:{port}/", out, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{app.log_text()}")
        try:
            with urllib.request.urlopen(app.url, timeout=5) as response:
                if response.status == 200:
                    return app
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    app.stop()
    raise RuntimeError(f"the app did not answer within {START_TIMEOUT_S}s:\n{app.log_text()}")


_SHARED_APP: RunningApp | None = None


def shared_app(request, tmp_path_factory):
    """A module fixture's body: the app shared by consecutive test modules (started on first use), stopped
    after the last module of the run that uses it, so it does not sit in memory for the rest of the suite."""
    global _SHARED_APP
    if _SHARED_APP is None or _SHARED_APP.process.poll() is not None:
        _SHARED_APP = start_app(tmp_path_factory.mktemp("app"))
    yield _SHARED_APP
    items = request.session.items
    last = max((i for i, item in enumerate(items) if item.module is request.module), default=len(items))
    if not any("app" in item.fixturenames for item in items[last + 1:]):
        _SHARED_APP.stop()
