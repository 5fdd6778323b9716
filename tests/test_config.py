"""Settings from flags and STREAMER_* variables; bad configuration names the setting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamer import ConfigError, WorkerSettings, load_settings
from streamer.kafka import client_kwargs


def test_environment_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_BOOTSTRAP_SERVERS", "10.0.0.1:9092")
    monkeypatch.setenv("STREAMER_MAX_BATCH_SIZE", "64")
    s = load_settings(WorkerSettings, max_wait_ms=2.5)
    assert s.bootstrap_servers == "10.0.0.1:9092"
    assert s.max_batch_size == 64
    assert s.max_wait_ms == 2.5
    assert load_settings(WorkerSettings, max_batch_size=8).max_batch_size == 8  # flags win


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_MAX_BATCH_SIZE", "lots")
    with pytest.raises(ConfigError, match=r"max_batch_size \(--max-batch-size or STREAMER_MAX_BATCH_SIZE\)"):
        load_settings(WorkerSettings)
    monkeypatch.delenv("STREAMER_MAX_BATCH_SIZE")
    with pytest.raises(ConfigError, match="max_wait_ms"):
        load_settings(WorkerSettings, max_wait_ms=-1)


def test_sasl_needs_credentials_and_reaches_the_clients() -> None:
    with pytest.raises(ConfigError, match="sasl_mechanism, sasl_username and sasl_password"):
        load_settings(WorkerSettings, security_protocol="SASL_PLAINTEXT")
    s = load_settings(WorkerSettings, security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                      sasl_username="alice", sasl_password="secret")
    kw = client_kwargs(s)
    assert kw["sasl_mechanism"] == "SCRAM-SHA-256"
    assert kw["sasl_plain_username"] == "alice"
    assert kw["sasl_plain_password"] == "secret"
    assert "secret" not in repr(s)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, check=False)


@pytest.mark.parametrize(
    "command",
    [[], ["broker"], ["topics"], ["topics", "create"], ["worker"], ["publish"], ["results"], ["demo"],
     ["pipeline"], ["pipeline", "show"], ["pipeline", "create"], ["stage"]],
)
def test_every_command_has_help(command: list[str]) -> None:
    out = _cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: streamer" in out.stdout


def test_bad_configuration_fails_at_start_naming_the_setting() -> None:
    out = _cli("worker", env={"STREAMER_MAX_WAIT_MS": "soon"})
    assert out.returncode == 2
    assert "invalid setting max_wait_ms" in out.stderr
    assert "STREAMER_MAX_WAIT_MS" in out.stderr
    out = _cli("worker", "--model", "nope")
    assert out.returncode == 2
    assert "unknown model 'nope'" in out.stderr
