"""``streamer`` commands as child processes, each logging to its own file: workers and stages for the demo,
the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """``streamer worker`` (or another ``streamer`` command) as a child process, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra_args: str, command: str = "worker") -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", command, *extra_args],
            env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code
