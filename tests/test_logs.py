"""Log redaction: secret-named fields, token patterns and registered secrets, anywhere."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
import structlog

from proxy import logs
from proxy.logs import REDACTED, redact, register_secret

SECRET = "registered-secret-value-1"


def run(**event: Any) -> dict[str, Any]:
    return dict(redact(None, "info", dict(event)))


@pytest.fixture(autouse=True)
def _secret() -> None:
    register_secret(SECRET)


@pytest.mark.parametrize(
    "key",
    [
        "authorization",
        "Authorization",
        "access_token",
        "refresh_token",
        "client_secret",
        "api_key",
        "X-API-KEY",
        "password",
        "code",
        "token",
        "secret",
        "encryption_key",
    ],
)
def test_secret_named_fields_are_masked(key: str) -> None:
    assert run(**{key: "plain-value"})[key] == REDACTED


def test_empty_secret_fields_stay_empty() -> None:
    assert run(refresh_token=None, code="") == {"refresh_token": None, "code": ""}


def test_ordinary_fields_are_kept() -> None:
    event = run(event="request", method="GET", status=200, duration_ms=1.5, ok=True, none=None)
    assert event == {
        "event": "request",
        "method": "GET",
        "status": 200,
        "duration_ms": 1.5,
        "ok": True,
        "none": None,
    }


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("sent Authorization: Bearer abc.def-ghi_123 upstream", "abc.def-ghi_123"),
        ("bearer lowercase-token", "lowercase-token"),
        ('{"Authorization": "Bearer quoted-token"}', "quoted-token"),
        ("x-api-key=cbat_AbC123_-xyz", "cbat_AbC123_-xyz"),
    ],
)
def test_token_patterns_are_masked_in_any_text(text: str, secret: str) -> None:
    cleaned = run(event=text)["event"]
    assert secret not in cleaned
    assert REDACTED in cleaned


def test_registered_secrets_are_masked_nested_in_dicts_and_lists() -> None:
    event = run(
        detail={"nested": [f"a {SECRET} b", ("tuple", SECRET)], "headers": {"token": "t0k3n"}},
        items=[{"deep": {"deeper": [SECRET]}}],
    )
    text = json.dumps(event)
    assert SECRET not in text
    assert "t0k3n" not in text
    assert event["detail"]["headers"]["token"] == REDACTED


def test_secrets_in_exception_objects_are_masked() -> None:
    event = run(error=ValueError(f"refresh failed for {SECRET}"), when={SECRET})
    assert SECRET not in json.dumps(event)
    assert "ValueError" in event["error"]


def test_short_values_are_not_registered() -> None:
    register_secret("abc")
    register_secret(None)
    register_secret("")
    assert run(event="abc")["event"] == "abc"


def test_configured_json_logs_are_redacted_end_to_end(captured_logs: io.StringIO) -> None:
    log = structlog.get_logger("test")
    structlog.contextvars.bind_contextvars(request_id="rid-1")
    try:
        log.info("token.refresh.ok", credential="default", note=f"got {SECRET}")
        try:
            raise RuntimeError(f"boom with Bearer {SECRET}-x and {SECRET}")
        except RuntimeError:
            log.exception("request.crashed")
        log.warning("odd", headers={"Authorization": "Bearer caller-token-9"})
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    logging.getLogger("aiohttp.server").error("library says %s", SECRET)
    lines = captured_logs.getvalue().splitlines()
    assert len(lines) == 4
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events[:3]] == ["token.refresh.ok", "request.crashed", "odd"]
    assert events[0]["request_id"] == "rid-1"
    assert events[0]["level"] == "info"
    assert "RuntimeError" in events[1]["exception"]
    assert events[3]["event"].startswith("library says")
    for line in lines:
        assert SECRET not in line
        assert "caller-token-9" not in line


def test_console_format_is_redacted_too(captured_logs: io.StringIO) -> None:
    stream = io.StringIO()
    logs.configure("console", stream=stream)
    structlog.get_logger("test").info("hello", refresh_token=SECRET, text=f"x {SECRET}")
    out = stream.getvalue()
    assert "hello" in out
    assert SECRET not in out


def test_configured_secrets_outlive_any_number_of_received_tokens() -> None:
    logs.register_secret("configured-client-secret", configured=True)
    for n in range(200):
        logs.register_secret(f"received-access-token-{n:04d}")
    assert "configured-client-secret" not in logs._scrub("x configured-client-secret y")
    assert "received-access-token-0199" not in logs._scrub("received-access-token-0199")


def test_settings_name_every_configured_secret() -> None:
    from cryptography.fernet import Fernet

    from proxy.config import load_settings

    key = Fernet.generate_key().decode()
    settings = load_settings(
        {
            "CBPROXY_CLIENT_ID": "id",
            "CBPROXY_CLIENT_SECRET": "the-client-secret",
            "CBPROXY_REFRESH_TOKEN": "the-refresh-token",
            "CBPROXY_REDIS_URL": "redis://:the-redis-password@127.0.0.1:6379/0",
            "CBPROXY_ENCRYPTION_KEY": key,
        }
    )
    assert set(settings.secrets()) == {
        "the-client-secret",
        "the-refresh-token",
        "the-redis-password",
        key,
    }


def test_every_connections_held_secret_is_redacted_by_lookup() -> None:
    """Refresh tokens and keys of any number of connections, however old: looked up per word,
    and still redacted after they were replaced."""
    from proxy import logs as log_module

    for n in range(2000):
        log_module.hold_secrets(f"conn-{n}", f"held-refresh-{n:05d}-x9")
    line = log_module._scrub("refresh_token=held-refresh-00007-x9&other=held-refresh-01999-x9")
    assert "held-refresh" not in line
    log_module.hold_secrets("conn-7", "held-refresh-new-7-x9")  # its token rotated
    assert "held-refresh-new-7-x9" not in log_module._scrub("got held-refresh-new-7-x9")
    # The replaced one may still work: it stays redacted (for KEEP_UNEXPIRING).
    assert "held-refresh-00007-x9" not in log_module._scrub("old held-refresh-00007-x9")
    for n in range(2000):
        log_module.hold_secrets(f"conn-{n}")
    assert "held-refresh-01999-x9" not in log_module._scrub("old held-refresh-01999-x9")


def test_a_replaced_access_token_stays_redacted_until_it_expires() -> None:
    """Every token that still works is redacted, however many were issued since; one that
    expired is let go, so memory stays a few values per connection."""
    from proxy import logs as log_module

    log_module.hold_secrets("c access", "access-token-gen-1-x9", usable_for=3600)
    for n in range(2, 200):  # far more than any fixed window of recent tokens
        log_module.hold_secrets("c access", f"access-token-gen-{n}-x9", usable_for=3600)
    assert "access-token-gen-1-x9" not in log_module._scrub("got access-token-gen-1-x9")
    assert "access-token-gen-150-x9" not in log_module._scrub("got access-token-gen-150-x9")
    log_module.hold_secrets("d access", "expired-token-x9", usable_for=0)
    log_module.hold_secrets("d access", "next-token-x9", usable_for=3600)
    log_module.hold_secrets("e access", "other-token-x9", usable_for=3600)  # prunes
    assert "expired-token-x9" not in log_module._held_values
    assert "next-token-x9" in log_module._held_values


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "GET", "path": "/api/v1.2/getHotels", "status": 200, "bytes": 571},
        {"path": f'/api/x?token={SECRET}&n=\u00e9"\\', "duration_ms": 1.25, "cut_short": None},
        {"path": "/a?auth=Bearer caller-token-9", "ok": True, "no": False, "n": -3},
        {"code": "plain-value", "authorization": "", "x": f"held {SECRET}-suffix"},
        {"duration_ms": float("inf"), "big": 10**30, "request_id": "given-in-fields"},
    ],
)
def test_flat_line_is_the_chains_line(captured_logs: io.StringIO, fields: dict[str, Any]) -> None:
    """The access line, rendered without the processor chain, is the chain's line exactly."""
    structlog.contextvars.bind_contextvars(request_id="rid-7")
    try:
        structlog.get_logger("proxy.access").info("request", **fields)
        logs.info_flat("request", fields, {"request_id": "rid-7"})
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    chain, flat = captured_logs.getvalue().splitlines()
    assert SECRET not in flat
    assert "caller-token-9" not in flat
    stamp = '"timestamp": '
    assert flat.partition(stamp)[0] == chain.partition(stamp)[0]
    assert json.loads(flat).keys() == json.loads(chain).keys()


def test_flat_line_goes_through_the_chain_when_it_is_not_the_json_one() -> None:
    stream = io.StringIO()
    logs.configure("console", stream=stream)
    try:
        logs.info_flat("request", {"path": f"/x?{SECRET}"}, {"request_id": "rid-8"})
        logs.configure("json", stream=io.StringIO())
        with structlog.testing.capture_logs() as captured:
            logs.info_flat("request", {"path": "/y"}, {"request_id": "rid-9"})
    finally:
        structlog.reset_defaults()
    assert "request" in stream.getvalue()
    assert SECRET not in stream.getvalue()
    assert captured[0]["path"] == "/y"


def test_patterns_are_found_in_any_case() -> None:
    assert logs._scrub("x CBAT_AbC123 y BEARER tok-1") == f"x {REDACTED} y BEARER {REDACTED}"


def test_standard_output_is_written_once_per_loop_turn(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Lines logged during one turn of the loop reach standard output together, in order,
    at the next turn; outside a loop at once."""
    import asyncio

    logs.configure("json")
    try:
        structlog.get_logger("test").info("outside")
        assert '"event": "outside"' in capsys.readouterr().out

        async def turn() -> tuple[str, str]:
            structlog.get_logger("test").info("first")
            logs.info_flat("request", {"path": f"/x?{SECRET}"}, {"request_id": "rid-3"})
            logging.getLogger("aiohttp.server").warning("library line")
            during = capsys.readouterr().out
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return during, capsys.readouterr().out

        during, after = asyncio.run(turn())
        assert during == ""
        lines = [json.loads(line) for line in after.splitlines()]
        assert [line["event"] for line in lines] == ["first", "request", "library line"]
        assert SECRET not in after
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = []


@pytest.mark.parametrize(
    "now", [1764648000.0, 1764648000.5, 1764648000.000001, 1764648000.9999996, 1764648059.123456]
)
def test_iso_now_is_the_iso_stampers_text(now: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The access line's timestamp is the text structlog's ISO stamper writes for that time
    (microseconds rounded as datetime rounds them, none when they are 0)."""
    import datetime

    monkeypatch.setattr(logs.time, "time", lambda: now)
    expected = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat()
    assert logs.iso_now() == expected.replace("+00:00", "Z")


def test_a_held_token_in_a_path_segment_is_redacted() -> None:
    """A token is looked up as a whole word and as each `/` segment of one (a URL path)."""
    from proxy import logs as log_module

    for n in range(1000):  # far more than the newest few searched anywhere
        log_module.hold_secrets(f"p{n} access", f"path-held-token-{n:04d}", usable_for=60)
    line = log_module._scrub("GET /api/path-held-token-0001/x and /y/path-held-token-0002")
    assert "path-held-token" not in line
    assert line == "GET /api/[redacted]/x and /y/[redacted]"
