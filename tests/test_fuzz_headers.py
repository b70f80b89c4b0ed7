"""Fuzzing the header rules (`proxy/headers.py`): the properties the rules state, for any
input. Deterministic (`derandomize=True`) and bounded."""

from __future__ import annotations

import contextlib
import os
from typing import Any
from urllib.parse import unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import (
    CredentialEndpointBlocked,
    ForbiddenTarget,
    InvalidHeaderBytes,
    UpstreamInvalidResponse,
)
from proxy.headers import (
    HOP_BY_HOP,
    check_answer_head,
    check_target,
    decode_raw,
    downstream_headers,
    downstream_headers_of,
    upstream_headers,
    upstream_headers_of,
)

FUZZ = settings(
    # FUZZ_EXAMPLES raises the count for a long run by hand; the suite keeps it small.
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CREDENTIAL = ("x-api-key", "cbat_the_proxys_own")
NAMES = [
    "Connection", "connection", "Keep-Alive", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    "Proxy-Authorization", "proxy-connection", "Host", "Authorization", "X-API-KEY", "Expect",
    "X-Cloudbeds-Credential", "X-Request-ID", "X-PROPERTY-ID", "Content-Type", "Content-Length",
    "X-Custom", "x-custom", "Accept",
]  # fmt: skip
names = st.one_of(
    st.sampled_from(NAMES), st.text("ABCXYZabcxyz0129!#$%&'*+.^_`|~-", min_size=1, max_size=12)
)
header_values = st.one_of(
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
        max_size=20,
    ),
    st.lists(st.sampled_from([*NAMES, "close", "keep-alive", ""]), max_size=3).map(", ".join),
)
headers = st.lists(st.tuples(names, header_values), max_size=12)


def dropped_by(raw: list[tuple[str, str]]) -> set[str]:
    listed = set(HOP_BY_HOP)
    for name, value in raw:
        if name.lower() == "connection":
            listed |= {t.strip().lower() for t in value.split(",") if t.strip()}
    return listed


@FUZZ
@given(raw=headers, request_id=st.text(min_size=1, max_size=10))
def test_upstream_headers_keep_the_callers_end_to_end_headers_and_add_only_two(
    raw: list[tuple[str, str]], request_id: str
) -> None:
    out = list(upstream_headers(raw, CREDENTIAL, request_id).items())
    dropped = dropped_by(raw) | {
        "host", "authorization", "x-api-key", "expect", "x-cloudbeds-credential", "x-request-id"
    }  # fmt: skip
    kept = [
        (n, v) for n, v in raw if n.lower() not in dropped and not n.lower().startswith("proxy-")
    ]
    # The request id takes the caller's header's place, or comes last when it sent none.
    assert [(n, v) for n, v in out if n.lower() == "x-request-id"] == [("X-Request-ID", request_id)]
    rest = [(n, v) for n, v in out if n.lower() != "x-request-id"]
    assert rest == [*kept, CREDENTIAL]  # order, case and values of the rest unchanged


@FUZZ
@given(raw=headers)
def test_downstream_headers_drop_exactly_the_hop_by_hop(raw: list[tuple[str, str]]) -> None:
    out = list(downstream_headers(raw).items())
    dropped = dropped_by(raw)
    assert out == [
        (n, v) for n, v in raw if n.lower() not in dropped and not n.lower().startswith("proxy-")
    ]


targets = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.sampled_from(
            ["/", "api", "v1.3", "..", ".", "%2e%2E", "%2F", "%5c", "\\", "access_token",
             "ACCESS_TOKEN", "oauth", "metadata", "?", "#", "%00", "%0a", "x", "//", "@", ":"]
        ),
        max_size=8,
    ).map(lambda parts: "/" + "/".join(parts)),
)  # fmt: skip


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "CONNECT", "connect", "DELETE"]), target=targets)
def test_a_target_is_refused_with_the_projects_error_or_is_safe(method: str, target: str) -> None:
    try:
        check_target(method, target)
    except (ForbiddenTarget, CredentialEndpointBlocked):
        return
    assert method.upper() != "CONNECT"
    assert target.startswith("/") and not target.startswith("//")
    assert not any(c < " " or c in "\x7f\\#" for c in target)
    path = target.split("?", 1)[0]
    segments = [s for part in path.split("/") for s in unquote(part).split("/")]
    assert not {".", ".."} & set(segments)
    named = [s for s in segments if s]
    assert not named or named[-1].lower() not in ("access_token", "oauth")


@FUZZ
@given(raw=st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=16)), max_size=6))
def test_header_bytes_pass_unchanged_or_are_refused(raw: list[tuple[bytes, bytes]]) -> None:
    try:
        text = decode_raw(raw)
    except InvalidHeaderBytes:
        assert any(_not_utf8(b) for pair in raw for b in pair)
        return
    assert [(n.encode(), v.encode()) for n, v in text] == raw


@FUZZ
@given(
    raw=st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=400)), max_size=30),
    max_bytes=st.integers(1, 5000),
    max_count=st.integers(1, 30),
)
def test_the_answer_head_budget_counts_wire_bytes(
    raw: list[tuple[bytes, bytes]], max_bytes: int, max_count: int
) -> None:
    size = sum(len(n) + len(v) + 4 for n, v in raw)
    try:
        check_answer_head(raw, max_bytes, max_count)
    except UpstreamInvalidResponse:
        assert len(raw) > max_count or size > max_bytes
    else:
        assert len(raw) <= max_count and size <= max_bytes


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _outcome(rule: Any, *args: Any) -> Any:
    try:
        return list(rule(*args).items())
    except InvalidHeaderBytes:
        return InvalidHeaderBytes


raw_headers = st.lists(
    st.one_of(
        st.tuples(names, header_values).map(lambda h: (h[0].encode(), h[1].encode())),
        st.tuples(st.sampled_from(NAMES).map(str.encode), st.binary(max_size=8)),
    ),
    max_size=12,
)


@FUZZ
@given(sets=st.lists(raw_headers, min_size=1, max_size=4), order=st.lists(st.integers(0, 3)))
def test_planned_headers_are_the_rules_headers(
    sets: list[list[tuple[bytes, bytes]]], order: list[int]
) -> None:
    """Planned once per set of names (and Connection values), the same headers as the rules
    give, and the same refusal of bytes that are not UTF-8, however often a set comes back."""
    for n in [*range(len(sets)), *order, *range(len(sets))]:
        raw = tuple(sets[n % len(sets)])
        text: Any = InvalidHeaderBytes
        with contextlib.suppress(InvalidHeaderBytes):
            text = decode_raw(raw)
        up = _outcome(upstream_headers_of, raw, CREDENTIAL, "rid")
        down = _outcome(downstream_headers_of, raw)
        if text is InvalidHeaderBytes:
            assert up is down is InvalidHeaderBytes
        else:
            assert up == list(upstream_headers(text, CREDENTIAL, "rid").items())
            assert down == list(downstream_headers(text).items())
