"""Real servers for tests: the fake Cloudbeds and the proxy, in-process or as processes."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.config import Settings, load_settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve `app` on a free loopback port; returns the runner (for cleanup) and base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def wait_ready(url: str, timeout: float = 10.0) -> None:
    """Poll /_proxy/readyz until it answers 200 (every credential has a token)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{url}/_proxy/readyz") as response:
                if response.status == 200:
                    return
                body = await response.text()
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{url} not ready after {timeout}s: {body}")
            await asyncio.sleep(0.02)


_STATE_DIR = tempfile.mkdtemp(prefix="cbproxy-test-state-")
atexit.register(shutil.rmtree, _STATE_DIR, ignore_errors=True)


def fresh_state_file() -> str:
    """A SQLite state file no other test uses (the default lives in the working directory,
    where every test without Redis would share it and see the others' tokens)."""
    return str(Path(_STATE_DIR) / f"{uuid.uuid4().hex}.db")


def fake_env(fake_url: str) -> dict[str, str]:
    """Variables that point a proxy at the fake Cloudbeds with its default credential,
    with a state file of its own (the default store without Redis)."""
    return {
        "CBPROXY_STATE_FILE": fresh_state_file(),
        "CBPROXY_UPSTREAM_URL": fake_url,
        "CBPROXY_TOKEN_URL": f"{fake_url}/api/v1.3/access_token",
        "CBPROXY_AUTHORIZE_URL": f"{fake_url}/api/v1.3/oauth",
        "CBPROXY_CLIENT_ID": "fake-client-id",
        "CBPROXY_CLIENT_SECRET": "fake-client-secret",
        "CBPROXY_REFRESH_TOKEN": "fake-refresh-token",
        "CBPROXY_REDIRECT_URI": "https://localhost/callback",
        "CBPROXY_RATE_LIMIT": "0",
    }


def settings_for(fake_url: str, **overrides: str) -> Settings:
    return load_settings({**fake_env(fake_url), **overrides})


class ProxyProcess:
    """`cloudbeds-proxy serve` as a real process, its JSON log captured to a file."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, *, args: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "CBPROXY_PORT": str(self.port),
            "CBPROXY_LOG_FORMAT": "json",
            # Its own store when it has no Redis (a test's own value wins).
            "CBPROXY_STATE_FILE": str(log_path.with_suffix(".db")),
            **env,
        }
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        """Start it and wait until it answers healthz itself (its own pid): a free port can be
        taken by another process before the proxy binds it, so a lost race is run again on
        another port, up to three times."""
        for _ in range(3):
            if self._start_once(timeout):
                return self
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.env["CBPROXY_PORT"] = str(self.port)
        raise RuntimeError(f"proxy found no free port:\n{self.log_path.read_text()}")

    def _start_once(self, timeout: float) -> bool:
        """True once started; False when the port was taken; raises on any other failure."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                text = self.log_path.read_text()
                if "address already in use" in text.splitlines()[-1]:
                    return False
                raise RuntimeError(f"proxy exited early:\n{text}")
            try:
                with urllib.request.urlopen(f"{self.url}/_proxy/healthz", timeout=1) as answer:
                    if self._ours(json.load(answer).get("pid")):
                        return True
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        self.process.kill()  # never left running behind a failed test
        self.process.wait()
        raise RuntimeError(f"proxy did not start:\n{self.log_path.read_text()}")

    def _ours(self, pid: object) -> bool:
        """The answering process is this proxy, or one of its `--workers`."""
        assert self.process is not None
        if pid == self.process.pid:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[1] == str(self.process.pid)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def astop(self) -> None:
        """`stop()` off the event loop, so an in-process fake can answer the draining proxy."""
        await asyncio.to_thread(self.stop)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
