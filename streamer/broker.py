"""The local broker: Apache Kafka (KRaft, single combined node) from Maven Central jars.

The jars are resolved once with Maven into ``<cache>/kafka-<version>/libs`` and reused.
The broker runs as a child JVM with a small heap; :meth:`LocalKafka.stop` (or SIGTERM)
is a controlled shutdown. See README.md, "The local broker".
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from .errors import BrokerError
from .paths import cache_dir

__all__ = ["KAFKA_VERSION", "LocalKafka", "free_port", "free_ports", "kafka_jars"]

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>streamer.local</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
"""

def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(f"{tool} was not found on PATH; {hint}")
    return path

def kafka_jars(version: str = KAFKA_VERSION, root: Path | None = None) -> Path:
    """The folder of broker jars for ``version``, resolved with Maven on first use."""
    libs = (root or cache_dir()) / f"kafka-{version}" / "libs"
    if (libs / ".complete").exists():
        return libs
    mvn = _require("mvn", "install Maven 3.8+ (Debian: apt-get install maven) to fetch the Kafka jars")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=libs.parent) as tmp:
        (Path(tmp) / "pom.xml").write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION))
        staging = Path(tmp) / "libs"
        proc = subprocess.run(
            [mvn, "-q", "-B", "dependency:copy-dependencies", "-DincludeScope=runtime",
             f"-DoutputDirectory={staging}"],
            cwd=tmp, capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise BrokerError(f"Maven could not resolve Kafka {version}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        (staging / ".complete").write_text(version)
        if libs.exists():
            shutil.rmtree(libs)
        staging.rename(libs)
    return libs

def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now. The sockets are held open together until all are picked: ports
    picked one at a time may repeat (the kernel may hand a port just closed out again), and a node given the
    same port for two listeners does not start."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


_JIT = {"full": [], "quick": ["-XX:TieredStopAtLevel=1"]}  # LocalKafka's jit: the JVM options of each


class LocalKafka:
    """One KRaft node acting as broker and controller, on loopback ports.

    ``data_dir`` keeps the data across restarts (formatted on first use only);
    without it a temporary folder is used and removed at :meth:`stop`.

    ``jit``: ``"full"`` (the JVM's default, for a broker that runs a while: its optimising compiler makes the
    fastest code, after it spent a core or so compiling for the first minute of load) or ``"quick"`` (its first
    compiler only, ``-XX:TieredStopAtLevel=1``: for a broker of a few minutes, such as the demo's, which it starts
    with half the CPU and serves at once without a compiling phase; BENCHMARKS.md, "The demo's broker").
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        data_dir: str | Path | None = None,
        heap_mb: int = 384,
        version: str = KAFKA_VERSION,
        extra_properties: dict[str, str] | None = None,
        node_id: int = 1,
        voters: str | None = None,
        cluster_id: str | None = None,
        scram_users: dict[str, str] | None = None,
        ssl_keystore: str | Path | None = None,
        jit: str = "full",
    ) -> None:
        if jit not in _JIT:
            raise ValueError(f"jit must be one of {sorted(_JIT)}, not {jit!r}")
        self.jit = jit
        self.node_id = node_id
        self.voters = voters  # "1@host:port,2@host:port,..." for a multi-node cluster
        self.cluster_id = cluster_id
        # SCRAM-SHA-256 users created at format time; they get a SASL_PLAINTEXT listener of their own.
        self.scram_users = scram_users or {}
        self._keep = data_dir is not None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="streamer-kafka-"))
        # A formatted node keeps its controller endpoint (it is in the voter set), so a restart on
        # the same data directory reuses the ports it was first given unless told otherwise.
        saved = self._saved_ports()
        spare = free_ports(4)  # distinct from each other; a port given by the caller is its to choose
        self.port = port or saved.get("port") or spare[0]
        self.controller_port = controller_port or saved.get("controller_port") or spare[1]
        self.sasl_port = (saved.get("sasl_port") or spare[2]) if self.scram_users else None
        # A PEM file with the broker's private key (PKCS#8, unencrypted) and certificate chain: an SSL listener.
        self.ssl_keystore = Path(ssl_keystore) if ssl_keystore else None
        self.ssl_port = (saved.get("ssl_port") or spare[3]) if self.ssl_keystore else None
        self.heap_mb = heap_mb
        self.version = version
        self.extra = extra_properties or {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def _saved_ports(self) -> dict[str, int]:
        path = self.data_dir / "ports.json"
        if not path.exists():
            return {}
        saved: dict[str, int] = json.loads(path.read_text())
        return saved

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks account its CPU)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def sasl_bootstrap_servers(self) -> str:
        """The SASL_PLAINTEXT (SCRAM-SHA-256) listener, when ``scram_users`` were given."""
        if self.sasl_port is None:
            raise BrokerError("this broker has no SASL listener: give scram_users")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap_servers(self) -> str:
        """The SSL listener, when ``ssl_keystore`` was given."""
        if self.ssl_port is None:
            raise BrokerError("this broker has no SSL listener: give ssl_keystore")
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def _properties(self) -> str:
        replicas = len(self.voters.split(",")) if self.voters else 1
        min_isr = str(min(2, replicas))
        quorum = (
            {"controller.quorum.voters": self.voters}
            if self.voters
            else {"controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}"}
        )
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "log"),
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": min_isr,
            "default.replication.factor": str(replicas),
            "min.insync.replicas": min_isr if replicas > 1 else "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.partitions": "8",
            "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
            "auto.create.topics.enable": "false",  # a request naming a missing reply topic must not create it
        }
        if self.sasl_port is not None:
            props["listeners"] += f",SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            props["advertised.listeners"] += f",SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            props["listener.security.protocol.map"] += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            props["sasl.enabled.mechanisms"] = "SCRAM-SHA-256"
            props["listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            )
        if self.ssl_port is not None:
            props["listeners"] += f",SSL://127.0.0.1:{self.ssl_port}"
            props["advertised.listeners"] += f",SSL://127.0.0.1:{self.ssl_port}"
            props["listener.security.protocol.map"] += ",SSL:SSL"
            props["ssl.keystore.type"] = "PEM"
            props["ssl.keystore.location"] = str(self.ssl_keystore)
        props.update(self.extra)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def jvm_options(self) -> list[str]:
        """The broker JVM's options: heap, collector, and the compilers ``jit`` says."""
        return [*_JIT[self.jit], f"-Xmx{self.heap_mb}m", f"-Xms{self.heap_mb}m", "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]

    def start(self, timeout_s: float = 60.0) -> LocalKafka:
        """Format (first use only), launch, and wait until the broker is serving."""
        self.launch()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Format (first use only) and launch the JVM, without waiting for it to serve."""
        java = _require("java", "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)")
        libs = kafka_jars(self.version)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "server.properties"
        conf.write_text(self._properties())
        (self.data_dir / "ports.json").write_text(
            json.dumps({"port": self.port, "controller_port": self.controller_port, "sasl_port": self.sasl_port,
                        "ssl_port": self.ssl_port})
        )
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.log_file, level="WARN"))
        classpath = f"{libs}/*"
        if not (self.data_dir / "log" / "meta.properties").exists():
            # --standalone makes a one-voter quorum; with a static voter list it is refused.
            standalone = [] if self.voters else ["--standalone"]
            for user, password in self.scram_users.items():
                standalone += ["--add-scram", f"SCRAM-SHA-256=[name={user},password={password}]"]
            fmt = subprocess.run(
                [java, "-cp", classpath, f"-Dlog4j2.configurationFile={log4j}", "kafka.tools.StorageTool",
                 # "--cluster-id=ID" in one word: an id may begin with "-" and must not be read as an option.
                 "format", f"--cluster-id={self.cluster_id or _cluster_id()}", "-c", str(conf), *standalone],
                capture_output=True, text=True, check=False,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"formatting the Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        cmd = [java, *self.jvm_options(), f"-Dkafka.logs.dir={self.data_dir}", f"-Dlog4j2.configurationFile={log4j}",
               "-cp", classpath, "kafka.Kafka", str(conf)]
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        out = (self.data_dir / "broker.out").open("ab")
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerError(f"the Kafka broker exited with code {self._proc.returncode}: {self._why()}")
            if self._started_logged():
                return
            time.sleep(0.2)
        raise BrokerError(f"the Kafka broker did not start within {timeout_s:g} s (log: {self.log_file})")

    def _this_run_log(self) -> str:
        if not self.log_file.exists():
            return ""
        with self.log_file.open("rb") as f:
            f.seek(self._log_offset)  # this run's lines only: the log is kept across restarts
            return f.read().decode(errors="replace")

    def _why(self) -> str:
        """The first error of this run's log with the exception line after it (say, "Socket server failed to bind
        to 127.0.0.1:9092: Address already in use."), else the tail of the JVM's own output."""
        lines = self._this_run_log().splitlines()
        for i, line in enumerate(lines):
            if " ERROR " in line:
                cause = next((x for x in lines[i + 1:i + 3] if "Exception" in x or "Error" in x), "")
                return " ".join((line.split("] ", 1)[-1] + " " + cause.split(": ", 1)[-1]).split())
        out = self.data_dir / "broker.out"
        return " ".join(out.read_text(errors="replace")[-600:].split()) if out.exists() else "(no output)"

    def _started_logged(self) -> bool:
        return "Kafka Server started" in self._this_run_log()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        assert self._proc is not None
        return self._proc.wait()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM), then SIGKILL if it does not exit in ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self._keep:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data directory is kept for a restart."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.stop()

def _cluster_id() -> str:
    """A random cluster id as Kafka makes one (``Uuid.randomUuid``): URL-safe base64 of 16 bytes.

    Like Kafka, never one that begins with "-" (about one in 64 would), which command lines misread.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid
