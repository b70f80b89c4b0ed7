"""Header and target rules: what may be forwarded, and how headers change on the way."""

from __future__ import annotations

import pytest

from proxy.errors import CredentialEndpointBlocked, ForbiddenTarget, InvalidHeaderBytes
from proxy.headers import check_target, decode_raw, downstream_headers, upstream_headers

CREDENTIAL = ("Authorization", "Bearer proxy-token")


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/api/v1.3/getHotels",
        "/api/v1.3/getReservations?propertyIDs=1%2C2",
        "/api/v1.3/getGuestList?q=a+b&empty=",
        "/api/v1.3/postReservation?rooms[0][roomTypeID]=1&rooms[0][quantity]=2",
        "/api/v1.3/fake/echo/a%2Fb",
        "/api/v1.3/fake/echo/a%2Cb;v=1",
        "/api/v1.3/getHotels?x=%E2%82%AC&y=%20",
        "/api/v1.3/getHotels?next=../../admin&url=//evil.example",
        "/api/v1.3/file.v2..txt/...",
        "/api/v1.3/oauth/metadata",
        "/api/v1.3/oauth/metadata/",
        "/api/v1.3/getHotels?access_token=not-a-path",
        "/api/v2/properties/1001/reservations",
        # encoded control characters and backslashes are data in a query
        "/api/v1.3/postReservationNote?note=line%0Aline&x=%0d%0aHost:%20evil&p=a%5Cb",
    ],
)
def test_odd_but_legal_targets_pass(target: str) -> None:
    check_target("GET", target)


@pytest.mark.parametrize(
    "target",
    [
        # absolute-form and authority-form: the proxy only talks to its upstream
        "http://169.254.169.254/latest/meta-data/",
        "https://api.cloudbeds.com/api/v1.3/getHotels",
        "evil.example:443",
        "*",
        "",
        # a path that a client would read as a network path
        "//evil.example/api/v1.3/getHotels",
        "///evil.example",
        # dot segments, raw and encoded
        "/api/v1.3/../../admin",
        "/api/v1.3/..",
        "/api/v1.3/./getHotels",
        "/api/v1.3/%2e%2e/admin",
        "/api/v1.3/%2E%2E/admin",
        "/api/v1.3/.%2e/admin",
        "/api/v1.3/%2e/getHotels",
        "/api/v1.3/x%2F..%2F..%2Fadmin",
        "/api/v1.3/getHotels/..?x=1",
        # backslashes, raw and encoded
        "/api/v1.3\\..\\admin",
        "/api/v1.3/%5c..%5cadmin",
        "/api/v1.3/%5C",
        # control characters, raw and encoded, in path or query
        "/api/v1.3/get\x00Hotels",
        "/api/v1.3/get\r\nHotels",
        "/api/v1.3/get\tHotels",
        "/api/v1.3/get Hotels",
        "/api/v1.3/get\x7fHotels",
        "/api/v1.3/get%00Hotels",
        "/api/v1.3/get%0d%0aHotels",
        "/api/v1.3/get%0AHotels",
        "/api/v1.3/get%7FHotels",
    ],
)
def test_ssrf_forms_are_refused(target: str) -> None:
    with pytest.raises(ForbiddenTarget):
        check_target("GET", target)


@pytest.mark.parametrize("method", ["CONNECT", "connect"])
def test_connect_is_refused(method: str) -> None:
    with pytest.raises(ForbiddenTarget):
        check_target(method, "/api/v1.3/getHotels")


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1.3/access_token",
        "/api/v1.2/access_token",
        "/api/v1.1/access_token/",
        "/api/v1.3/ACCESS_TOKEN",
        "/api/v1.3/access_token?grant_type=refresh_token",
        "/api/v1.3/oauth",
        "/api/v1.3/oauth/",
        "/api/v1.3/OAuth",
        "/api/v1.1/OAUTH/?client_id=x",
        "/api/v1.3/access%5Ftoken",
        "/api/v1.3/x%2Faccess_token",
        "/api/v1.3/access_token%2F",
    ],
)
def test_credential_endpoints_are_blocked(target: str) -> None:
    with pytest.raises(CredentialEndpointBlocked):
        check_target("POST", target)


def test_errors_carry_their_status_and_code() -> None:
    with pytest.raises(ForbiddenTarget) as refused:
        check_target("GET", "//evil")
    assert (refused.value.status, refused.value.code) == (400, "forbidden_target")
    with pytest.raises(CredentialEndpointBlocked) as blocked:
        check_target("GET", "/api/v1.3/oauth")
    assert (blocked.value.status, blocked.value.code) == (403, "credential_endpoint_blocked")


# -- upstream headers -------------------------------------------------------------------------


def test_upstream_drops_hop_by_hop_and_the_names_connection_lists() -> None:
    raw = [
        ("Connection", "keep-alive, X-Private-Hop"),
        ("connection", "X-Other-Hop"),
        ("X-Private-Hop", "a"),
        ("x-other-hop", "b"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic abc"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Kept", "yes"),
    ]
    out = upstream_headers(raw, CREDENTIAL, "rid-1")
    assert list(out.items()) == [
        ("X-Kept", "yes"),
        ("Authorization", "Bearer proxy-token"),
        ("X-Request-ID", "rid-1"),
    ]


def test_upstream_replaces_caller_credentials_and_drops_host_and_selector() -> None:
    raw = [
        ("Host", "proxy.local:8080"),
        ("Authorization", "Bearer caller-token"),
        ("AUTHORIZATION", "Basic second"),
        ("x-api-key", "cbat_caller"),
        ("X-API-KEY", "cbat_caller2"),
        ("X-Cloudbeds-Credential", "partner"),
        ("X-PROPERTY-ID", "1001"),
    ]
    out = upstream_headers(raw, ("x-api-key", "cbat_proxy"), "rid")
    assert out.getall("x-api-key") == ["cbat_proxy"]
    assert "Authorization" not in out
    assert "Host" not in out  # aiohttp sets the upstream's own Host
    assert "X-Cloudbeds-Credential" not in out
    assert out["X-PROPERTY-ID"] == "1001"


def test_upstream_keeps_order_case_and_duplicates_of_the_rest() -> None:
    raw = [
        ("Accept", "application/json"),
        ("x-dup", "1"),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-Dup", "2"),
        ("Cookie", "a=b"),
        ("x-dup", "3"),
    ]
    out = upstream_headers(raw, CREDENTIAL, "rid")
    assert list(out.items())[:6] == raw
    assert out.getall("X-DUP") == ["1", "2", "3"]


def test_request_id_is_the_requests_own() -> None:
    # The app passes the caller's id when it is usable, a new one otherwise.
    assert upstream_headers([], CREDENTIAL, "generated")["X-Request-ID"] == "generated"
    out = upstream_headers([("x-request-id", "x" * 500)], CREDENTIAL, "generated")
    assert out.getall("X-Request-ID") == ["generated"]


def test_expect_is_not_forwarded() -> None:
    out = upstream_headers([("Expect", "100-continue"), ("X-A", "1")], CREDENTIAL, "rid")
    assert "Expect" not in out
    assert out["X-A"] == "1"


def test_fragment_marker_is_refused() -> None:
    for target in ("/api/v1.3/access_token#", "/api/v1.3/oauth#x?client_id=1", "/a?b=1#c"):
        with pytest.raises(ForbiddenTarget):
            check_target("POST", target)


def test_upstream_headers_are_a_fresh_copy() -> None:
    raw = [("X-A", "1")]
    upstream_headers(raw, CREDENTIAL, "rid")
    assert raw == [("X-A", "1")]


# -- downstream headers -----------------------------------------------------------------------


def test_downstream_drops_hop_by_hop_and_keeps_the_rest_in_order() -> None:
    raw = [
        ("Content-Type", "application/json"),
        ("Connection", "keep-alive, X-Backend-Hop"),
        ("X-Backend-Hop", "node-7"),
        ("Keep-Alive", "timeout=60"),
        ("Transfer-Encoding", "chunked"),
        ("Proxy-Authenticate", "Basic"),
        ("Set-Cookie", "a=1"),
        ("X-Request-ID", "cloudbeds-id"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
        ("Upgrade", "websocket"),
    ]
    out = downstream_headers(raw)
    assert list(out.items()) == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("X-Request-ID", "cloudbeds-id"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
    ]


def test_decode_raw_keeps_case_order_and_utf8() -> None:
    raw = [
        (b"X-Name", "café".encode()),
        (b"x-name", b"2"),
        (b"Content-Disposition", 'attachment; filename="Müller.pdf"'.encode()),
    ]
    assert decode_raw(raw) == [
        ("X-Name", "café"),
        ("x-name", "2"),
        ("Content-Disposition", 'attachment; filename="Müller.pdf"'),
    ]


@pytest.mark.parametrize(
    "raw", [[(b"X-L", b"caf\xe9")], [(b"X-\xe9", b"v")], [(b"X", b"\xff\xfe")]]
)
def test_decode_raw_refuses_bytes_that_are_not_utf8(raw: list[tuple[bytes, bytes]]) -> None:
    # Written out by aiohttp as UTF-8, they would arrive re-encoded (e9 as c3 a9).
    with pytest.raises(InvalidHeaderBytes):
        decode_raw(raw)
