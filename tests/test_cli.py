"""The command line as a user meets it: clear one-line errors, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.support import free_port, fresh_state_file


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env={**os.environ, "CBPROXY_STATE_FILE": fresh_state_file(), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_serve_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "serve",
            CBPROXY_PORT=str(port),
            CBPROXY_API_KEY="cbat_x",
            CBPROXY_RATE_LIMIT="0",
            CBPROXY_STATE_FILE=str(tmp_path / "state.db"),
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "CBPROXY_PORT" in result.stderr.splitlines()[-1]


def test_token_status_without_a_running_proxy_says_so() -> None:
    result = run("token", "status", CBPROXY_PORT=str(free_port()), CBPROXY_API_KEY="cbat_x")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "CBPROXY_PORT" in result.stderr
