"""100 MB up and down through a real proxy process, its memory growth measured."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.fake_cloudbeds import FakeCloudbeds, large_body
from tests.support import ProxyProcess, fake_env

SIZE = 100 * 1024 * 1024
CHUNK = 256 * 1024
# A streaming proxy holds a few chunks per request; a buffering one holds the whole body.
MAX_GROWTH = 32 * 1024 * 1024

pytestmark = pytest.mark.slow


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def pattern(index: int) -> bytes:
    return bytes((index + i) % 256 for i in range(CHUNK))


async def upload_parts(boundary: str, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="scan.pdf"\r\nContent-Type: application/pdf\r\n\r\n'
    ).encode()
    for index in range(SIZE // CHUNK):
        chunk = pattern(index % 256)
        digest.update(chunk)
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.fixture
async def proxy(
    fake_cloudbeds: tuple[FakeCloudbeds, str], tmp_path: Path
) -> AsyncIterator[ProxyProcess]:
    _, url = fake_cloudbeds
    process = ProxyProcess(fake_env(url), tmp_path / "proxy.log")
    await asyncio.to_thread(process.start)
    yield process
    await process.astop()


async def test_100mb_upload_streams_with_bounded_memory(
    fake_cloudbeds: tuple[FakeCloudbeds, str], proxy: ProxyProcess
) -> None:
    assert proxy.process is not None
    before = peak_rss(proxy.process.pid)
    digest = hashlib.sha256()
    boundary = "cbproxy-upload-boundary"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{proxy.url}/api/v1.3/postGuestDocument",
            data=upload_parts(boundary, digest),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            timeout=aiohttp.ClientTimeout(total=120),
        ) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
    assert answer["data"]["bytes"] == SIZE
    assert answer["data"]["sha256"] == digest.hexdigest()
    growth = peak_rss(proxy.process.pid) - before
    print(f"proxy peak memory growth for a 100 MB upload: {growth / 2**20:.1f} MiB")
    assert growth < MAX_GROWTH


async def test_100mb_download_streams_with_bounded_memory(proxy: ProxyProcess) -> None:
    assert proxy.process is not None
    before = peak_rss(proxy.process.pid)
    digest, received = hashlib.sha256(), 0
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{proxy.url}/api/v1.3/fake/large?bytes={SIZE}",
            timeout=aiohttp.ClientTimeout(total=120),
        ) as response:
            assert response.status == 200
            assert int(response.headers["Content-Length"]) == SIZE
            async for chunk in response.content.iter_chunked(CHUNK):
                received += len(chunk)
                digest.update(chunk)
    assert received == SIZE
    assert digest.hexdigest() == hashlib.sha256(large_body(SIZE)).hexdigest()
    growth = peak_rss(proxy.process.pid) - before
    print(f"proxy peak memory growth for a 100 MB download: {growth / 2**20:.1f} MiB")
    assert growth < MAX_GROWTH
