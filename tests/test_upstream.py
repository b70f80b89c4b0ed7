"""The upstream request class: aiohttp's automatic headers, by aiohttp's own rule."""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.upstream import VerbatimRequest

SKIPS = [
    None,
    set(),
    {"Accept", "Accept-Encoding", "User-Agent", "Content-Type"},
    {"accept"},
    {"User-Agent"},
]
GIVEN = [
    [],
    [("Accept", "text/html"), ("Content-Type", "application/json")],
    [("user-agent", "sdk/1"), ("X-Custom", "1")],
]


@pytest.mark.parametrize("skip", SKIPS)
@pytest.mark.parametrize("given", GIVEN)
async def test_automatic_headers_are_aiohttps(
    skip: set[str] | None, given: list[tuple[str, str]]
) -> None:
    url = URL("http://127.0.0.1:9/api/v1.3/getHotels")
    for _ in range(2):  # the second time from the kept skip table
        ours = VerbatimRequest("GET", url, headers=CIMultiDict(given), skip_auto_headers=skip)
        theirs = aiohttp.ClientRequest(
            "GET", url, headers=CIMultiDict(given), skip_auto_headers=skip
        )
        assert list(ours.headers.items()) == list(theirs.headers.items())
        assert list(ours.skip_auto_headers) == list(theirs.skip_auto_headers)
