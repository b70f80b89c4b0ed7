"""A private `redis-server` process for tests that stop, kill or restart Redis.

It listens on a free port on 127.0.0.1, never on 6379 (the machine's shared Redis),
persists nothing (each start runs in a new empty directory: a replica's full sync writes
an RDB file there, which a later start must not load), and keeps its port across restarts
so clients can reconnect.
Optionally it speaks only TLS (`tls=TLSFiles(...)`) or is a cluster node
(`cluster_dir=`), and `RedisSentinel` runs `redis-server <config> --sentinel`
watching one of them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

DEFAULT_PORT = 6379


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    if port == DEFAULT_PORT:  # practically never: ephemeral ports start far above
        return _free_port()
    return port


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS-only server: its certificate and key, and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


def _answers_ping(port: int, tls: TLSFiles | None = None) -> bool:
    """True once the server replies to PING (+PONG, or -NOAUTH under requirepass)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as raw:
            if tls is None:
                return _ping(raw)
            context = ssl.create_default_context(cafile=str(tls.ca))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                return _ping(sock)
    except OSError:  # ssl.SSLError included
        return False


def _ping(sock: socket.socket) -> bool:
    sock.sendall(b"PING\r\n")
    return sock.recv(16)[:1] in (b"+", b"-")


class RedisServer:
    """`start()`, `stop()` (SIGTERM), `kill()` (SIGKILL), `restart()` on the same port."""

    name = "redis-server"

    def __init__(
        self,
        *,
        password: str | None = None,
        executable: str = "redis-server",
        tls: TLSFiles | None = None,
        cluster_dir: Path | None = None,
        replica_of: RedisServer | None = None,
    ) -> None:
        found = shutil.which(executable)
        if found is None:
            raise RuntimeError(f"{executable} not found on PATH")
        self.executable = found
        self.password = password
        self.tls = tls
        self.cluster_dir = cluster_dir
        """With it, a cluster-enabled node (no slots yet) keeping nodes.conf there."""
        self.replica_of = replica_of
        """With it, a replica of that (plain-TCP) server from the start."""
        self.port = _free_port()
        # Redis puts the cluster bus on port + 10000 unless told, past 65535 for high ports.
        self.cluster_port = _free_port() if cluster_dir is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """redis:// (or, with TLS, rediss:// with the CA as `ssl_ca_certs`) and the password."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        ca = quote(str(self.tls.ca), safe="")
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={ca}"

    def _args(self) -> list[str]:
        """The command line: plain TCP on `port`, or (with TLS) TLS on it and no TCP port."""
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            ports = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        args = [
            self.executable,
            *ports,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            # A replica's first sync starts at once (the default waits 5 s for others).
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
            if self.replica_of.password:
                args += ["--masterauth", self.replica_of.password]
        if self.cluster_dir is None:
            assert self._dir is not None
            args += ["--dir", self._dir.name]
        else:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-port", str(self.cluster_port),
                "--dir", str(self.cluster_dir),
            ]  # fmt: skip
            if self.tls is not None:
                args += ["--tls-cluster", "yes"]
        return args

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it answers PING."""
        if self.running:
            return
        self._forget_dir()
        self._dir = tempfile.TemporaryDirectory(prefix=f"{self.name}-{self.port}-")
        self._process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while not _answers_ping(self.port, self.tls):
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start (port {self.port} taken?)")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} on port {self.port} did not answer PING")
            time.sleep(0.02)
        if self._process.poll() is not None:  # someone else answered on our port
            self._process = None
            raise RuntimeError(f"{self.name} could not bind port {self.port}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: a clean shutdown (of a paused process too)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self.resume()
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._forget_dir()

    def kill(self) -> None:
        """SIGKILL and wait: a crash."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._forget_dir()

    def _forget_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the process answers nothing (nor acknowledges replication) until resumed."""
        assert self._process is not None and self._process.poll() is None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`; harmless on a process that is not paused."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisSentinel(RedisServer):
    """`redis-server <config> --sentinel` monitoring `master` as `service` (quorum 1).

    The config file lives in `directory` (Sentinel rewrites it as it learns). Plain TCP
    only; the master's password, if any, becomes `sentinel auth-pass`. Several sentinels
    with a `quorum` above 1, and a short `down_after_ms` and `failover_timeout_ms`, make
    a failover a test can wait for.
    """

    name = "redis-sentinel"

    def __init__(
        self,
        master: RedisServer,
        directory: Path,
        *,
        service: str = "mymaster",
        executable: str = "redis-server",
        quorum: int = 1,
        down_after_ms: int = 5000,
        failover_timeout_ms: int = 60000,
    ) -> None:
        if master.tls is not None:
            raise ValueError("RedisSentinel watches plain-TCP masters only")
        super().__init__(executable=executable)
        self.master = master
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.config = directory / f"sentinel-{self.port}.conf"

    @property
    def url(self) -> str:
        """The proxy's redis+sentinel:// URL, carrying the master's password if it has one."""
        password = self.master.password
        auth = f":{quote(password, safe='')}@" if password else ""
        return f"redis+sentinel://{auth}127.0.0.1:{self.port}/{self.service}/0"

    def _args(self) -> list[str]:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize no",
            f"dir {self.config.parent}",
            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
        ]
        if self.master.password:
            lines.append(f"sentinel auth-pass {self.service} {self.master.password}")
        self.config.write_text("\n".join(lines) + "\n")
        return [self.executable, str(self.config), "--sentinel"]
