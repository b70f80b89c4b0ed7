"""A private `redis-server` process for tests that stop, kill or restart Redis.

It listens on a free port on 127.0.0.1, never on 6379 (the machine's shared Redis),
persists nothing, and keeps its port across restarts so clients can reconnect.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

DEFAULT_PORT = 6379


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    if port == DEFAULT_PORT:  # practically never: ephemeral ports start far above
        return _free_port()
    return port


def _answers_ping(port: int) -> bool:
    """True once the server replies to PING (+PONG, or -NOAUTH under requirepass)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16)[:1] in (b"+", b"-")
    except OSError:
        return False


class RedisServer:
    """`start()`, `stop()` (SIGTERM), `kill()` (SIGKILL), `restart()` on the same port."""

    def __init__(self, *, password: str | None = None, executable: str = "redis-server") -> None:
        found = shutil.which(executable)
        if found is None:
            raise RuntimeError(f"{executable} not found on PATH")
        self.executable = found
        self.password = password
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it answers PING."""
        if self.running:
            return
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _answers_ping(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start (port {self.port} taken?)")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)
        if self._process.poll() is not None:  # someone else answered on our port
            self._process = None
            raise RuntimeError(f"redis-server could not bind port {self.port}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: a clean shutdown."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL and wait: a crash."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
