"""What a user sees when a command cannot do its job: every command, run as a subprocess, against a cluster that
does not answer or whose name does not resolve, a topic that does not exist, refused credentials and a flag it
does not have. Each answers with one line that names the problem and the setting to change, no traceback and no
aiokafka noise, and exit status 2 (README, "Exit status"). Workers and stages wait for their cluster and topic
(``startup_timeout_s``) and may say so once before that line; nothing else may precede it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streamer.broker import free_port

pytestmark = [pytest.mark.kafka]

# Every command that talks to a cluster, as a user would start it.
COMMANDS: dict[str, tuple[str, ...]] = {
    "topics create": ("topics", "create"),
    "worker": ("worker", "--model", "tiny-mlp"),
    "publish": ("publish", "--model", "tiny-mlp"),
    "results": ("results", "--count", "1", "--timeout-s", "30"),
    "status": ("status", "some-group"),
    "top": ("top", "some-group", "--iterations", "2", "--interval", "0.5"),
    "replay": ("replay", "--topic", "{requests}", "--model", "tiny-mlp", "--sink", "{tmp}/replay.jsonl"),
    "pipeline create": ("pipeline", "create", "minilm-2stage"),
    "stage": ("stage", "minilm-2stage", "--stage", "tokenize"),
    "demo": ("demo", "--workers", "1", "--requests", "10", "--rate", "10", "--rate-seconds", "1", "--no-progress"),
}
# Commands that wait for their cluster and topic, and may say so (once) before the error line.
WAITERS = {"worker", "stage"}
# The topic each command needs to exist, and the setting the message must name (demo creates its topics; topics
# create and pipeline create make them; status reads a group).
MISSING = {
    "worker": ("{requests}", "STREAMER_REQUEST_TOPIC"),
    "publish": ("{requests}", "STREAMER_REQUEST_TOPIC"),
    "results": ("{results}", "STREAMER_RESULTS_TOPIC"),
    "replay": ("{requests}", "--topic"),
    "stage": ("minilm-2stage.requests", "streamer pipeline create minilm-2stage"),
}


@dataclass
class Case:
    name: str
    command: str
    args: tuple[str, ...]
    env: dict[str, str]
    expect: list[str]  # substrings of the error line
    expect_start: str = "streamer: error: "

    def run(self) -> tuple[Case, subprocess.CompletedProcess[str]]:
        out = subprocess.run([sys.executable, "-m", "streamer", *self.args], input="[1.0]\n", capture_output=True,
                             text=True, env={**os.environ, **self.env}, timeout=180, check=False)
        return self, out

    def problems(self, out: subprocess.CompletedProcess[str]) -> list[str]:
        lines = out.stderr.strip().splitlines()
        found = []
        if out.returncode != 2:
            found.append(f"exit status {out.returncode}, not 2")
        if not lines:
            return [*found, "nothing on stderr"]
        last, before = lines[-1], lines[:-1]
        if not last.startswith(self.expect_start):
            found.append(f"last line does not start with {self.expect_start!r}")
        found += [f"{text!r} not in the last line" for text in self.expect if text not in last]
        allowed = re.compile(r".* WARNING streamer: (the cluster at .* does not answer yet|topic .* does not exist "
                             r"yet)")
        for line in before:
            if self.command not in WAITERS or not allowed.match(line):
                found.append(f"extra line {line[:160]!r}")
        if "Traceback" in out.stderr or "Unclosed" in out.stderr:
            found.append("a traceback or an unclosed client")
        return found


def _fill(args: tuple[str, ...], names: dict[str, str]) -> tuple[str, ...]:
    return tuple(a.format(**names) for a in args)


def _cases(live: str, sasl: str, tmp: Path) -> list[Case]:
    tag = uuid.uuid4().hex[:8]
    names = {"requests": f"e-{tag}.requests", "results": f"e-{tag}.results", "tmp": str(tmp)}
    base = {"STREAMER_REQUEST_TOPIC": names["requests"], "STREAMER_RESULTS_TOPIC": names["results"],
            "STREAMER_DEAD_LETTER_TOPIC": f"e-{tag}.dlq", "STREAMER_GROUP_ID": f"e-{tag}",
            "STREAMER_STARTUP_TIMEOUT_S": "1"}
    cases = []
    for command, template in COMMANDS.items():
        args = _fill(template, names)
        dead = f"127.0.0.1:{free_port()}"
        cases.append(Case("no cluster", command, args, {**base, "STREAMER_BOOTSTRAP_SERVERS": dead},
                          [f"cannot reach the cluster at {dead}", "STREAMER_BOOTSTRAP_SERVERS"]))
        wrong = {**base, "STREAMER_BOOTSTRAP_SERVERS": "kafka.invalid:9092"}
        cases.append(Case("wrong bootstrap", command, args, wrong,
                          ["cannot reach the cluster at kafka.invalid:9092", "STREAMER_BOOTSTRAP_SERVERS"]))
        cases.append(Case("refused credentials", command, args, {
            **base, "STREAMER_BOOTSTRAP_SERVERS": sasl, "STREAMER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "STREAMER_SASL_MECHANISM": "SCRAM-SHA-256", "STREAMER_SASL_USERNAME": "alice",
            "STREAMER_SASL_PASSWORD": "not-the-password"},
            ["refused user 'alice'", "invalid credentials", "STREAMER_SASL_PASSWORD"]))
        prog = "streamer " + command
        cases.append(Case("unknown flag", command, (*args, "--no-such-flag"),
                          {**base, "STREAMER_BOOTSTRAP_SERVERS": live},
                          ["unrecognized arguments: --no-such-flag", f"`{prog} --help`"], f"{prog}: error: "))
        if command in MISSING:
            topic, setting = (x.format(**names) for x in MISSING[command])
            cases.append(Case("missing topic", command, args, {**base, "STREAMER_BOOTSTRAP_SERVERS": live},
                              [f"topic {topic!r} does not exist on the cluster at {live}", setting]))
    cases.append(Case("bad value", "worker", ("worker", "--max-batch-size", "lots"),
                      {**base, "STREAMER_BOOTSTRAP_SERVERS": live}, ["max_batch_size", "--max-batch-size",
                                                                      "STREAMER_MAX_BATCH_SIZE"]))
    cases.append(Case("bad value", "broker", ("broker", "--port", "x"), {},
                      ["argument --port: invalid int value: 'x'", "`streamer broker --help`"],
                      "streamer broker: error: "))
    cases.append(Case("unknown flag", "broker", ("broker", "--no-such-flag"), {},
                      ["unrecognized arguments: --no-such-flag"], "streamer broker: error: "))
    cases.append(Case("bad log level", "topics create", ("--log-level", "LOUD", "topics", "create"),
                      {"STREAMER_BOOTSTRAP_SERVERS": live}, ["'LOUD'", "--log-level"]))
    cases.append(Case("no command", "", (), {}, ["required: COMMAND", "`streamer --help`"]))
    return cases


def test_every_command_answers_each_failure_in_one_line(broker: Any, scram_broker: Any, tmp_path: Path) -> None:
    cases = _cases(broker.bootstrap_servers, scram_broker.sasl_bootstrap_servers, tmp_path)
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(Case.run, cases))
    report = []
    for case, out in runs:
        problems = case.problems(out)
        if problems:
            report.append(f"{case.command} / {case.name}: {'; '.join(problems)}\n    stderr: {out.stderr[-600:]!r}")
    assert not report, "\n".join(report)
    assert {c.command for c in cases} >= set(COMMANDS) | {"broker"}


def test_broker_names_a_port_in_use(tmp_path: Path) -> None:
    """A port in use is named with its flag before any JVM starts (the broker's own message is a Java trace)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "streamer", "broker", "--port", str(port)], capture_output=True,
                             text=True, env={**os.environ, "STREAMER_CACHE": str(tmp_path)}, timeout=60, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"streamer: error: port {port} on 127.0.0.1 is in use (--port): choose another, or "
                                  "leave --port out for a free one")


@pytest.mark.parametrize("command", ["worker", "stage", "replay", "pipeline create", "demo"])
def test_a_command_that_cannot_reach_its_cluster_says_so_before_importing_torch(command: str, tmp_path: Path) -> None:
    """README, "Exit status": the cluster is checked before torch and the model load (seconds)."""
    case = next(c for c in _cases("unused:1", "unused:1", tmp_path) if c.command == command and c.name == "no cluster")
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "streamer", *case.args], input="",
                         capture_output=True, text=True, env={**os.environ, **case.env}, timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("streamer: error: cannot reach the cluster at")
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "streamer" in imported and "torch" not in imported

