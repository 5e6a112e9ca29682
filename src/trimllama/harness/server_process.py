"""A server command in a subprocess, for the tests and benchmarks that start `trimllama serve` or SGLang.

The process runs in its own process group with its output in a log file; it is ready when `GET /health` answers
200, and `stop()` ends the whole group (SGLang's launcher has children), SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`command` started on 127.0.0.1:`port`, its stdout and stderr in `log`."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, port: int, headers: dict | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(log)
        self.headers = dict(headers or {})
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, chars: int = 4000) -> str:
        """The last `chars` characters of the server's log."""
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float) -> None:
        """Return once `/health` answers 200; RuntimeError with the log's tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                request = urllib.request.Request(f"{self.url}/health", headers=self.headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):  # not listening yet, or busy starting
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.output()}")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the process group; SIGKILL if it has not ended after `grace` seconds.

        The group is signalled even when the leader has exited already: a launcher that died can leave its
        workers (SGLang's scheduler, TP ranks) running.
        """
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:  # the whole group has ended
            return
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            return
        self.process.wait(10)
