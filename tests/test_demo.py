"""`cloudbeds-proxy demo`, the README's first command, as a user runs it: a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.support import free_port

pytestmark = pytest.mark.slow


def start_demo(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("CBPROXY_")},
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_proxy/readyz", timeout=1):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"demo not ready:\n{log.read_text()}")


async def test_demo_installs_a_property_and_routes_to_it(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "demo.log"
    process = start_demo(port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/api/v1.3/getHotels") as response:
                assert response.status == 200
            # The install link, followed as a browser or `curl -L` would.
            headers = {"Accept": "application/json"}
            async with session.get(f"{base}/_proxy/apps/demo/install", headers=headers) as response:
                assert response.status == 200, await response.text()
                connection = (await response.json())["connection"]
            assert connection["id"] == "demo.property.2001"
            routed = {"X-PROPERTY-ID": "2001"}
            async with session.get(f"{base}/api/v1.3/getHotels", headers=routed) as response:
                assert response.status == 200
                assert (await response.json())["data"][0]["propertyID"] == "2001"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(20)
    printed = log.read_text()
    assert f"curl -sL -H 'Accept: application/json' {base}/_proxy/apps/demo/install" in printed
    assert "X-PROPERTY-ID: 2001" in printed
