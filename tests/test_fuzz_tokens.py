"""Fuzzing the token answer decoding: whatever the endpoint answers, the result is a
validated TokenResponse or one of the project's TokenEndpointErrors, never anything else.

Deterministic (`derandomize=True`) and bounded, so it runs in the suite in a second or two.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.cloudbeds import TokenResponse, decode_token_response
from proxy.errors import (
    TokenEndpointError,
    TokenEndpointUnavailable,
    TokenEndpointUnrecognised,
    TokenRejected,
)

SECRET = "s3cr3t-client-secret"
FUZZ = settings(
    # FUZZ_EXAMPLES raises the count for a long run by hand; the suite keeps it small.
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["3600", "1e400", "-1", "nan", "Bearer", SECRET, "a\r\nb", "tök"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "access_token": values,
        "expires_in": values,
        "refresh_token": values,
        "token_type": values,
        "error": values,
        "error_description": values,
        "message": values,
        "resources": st.lists(
            st.fixed_dictionaries(
                {}, optional={"type": st.sampled_from(["property", "association", 1]), "id": values}
            )
            | values,
            max_size=4,
        ),
    },
)


def encoded(data: dict[str, Any]) -> bytes:
    return json.dumps(data, allow_nan=True).encode()


bodies = st.one_of(
    fields.map(encoded),
    st.binary(max_size=200),
    values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
)
statuses = st.one_of(
    st.sampled_from([200, 400, 401, 403, 408, 429, 500, 503]), st.integers(100, 599)
)


@FUZZ
@given(status=statuses, body=bodies)
def test_any_answer_decodes_or_raises_the_projects_error(status: int, body: bytes) -> None:
    try:
        response: TokenResponse | TokenEndpointError = decode_token_response(
            status, body, secrets=[SECRET]
        )
    except TokenEndpointError as exc:
        response = exc
    if isinstance(response, TokenEndpointError):
        check_refusal(status, response)
        return
    assert status == 200
    assert 0 < response.expires_in <= 366 * 24 * 3600 and math.isfinite(response.expires_in)
    for token in (response.access_token, response.refresh_token or "x"):
        assert 0 < len(token) <= 4096 and all("!" <= c <= "~" for c in token)
    assert all(0 < len(p) <= 64 and p.isprintable() for p in response.properties)


def check_refusal(status: int, error: TokenEndpointError) -> None:
    assert SECRET not in str(error) and SECRET not in error.reason
    assert error.reason.isprintable()
    if isinstance(error, TokenRejected):
        assert 400 <= status < 500 and status not in (408, 429)
    if isinstance(error, TokenEndpointUnrecognised):
        assert 400 <= status < 500
    if status == 200:
        assert isinstance(error, TokenEndpointUnavailable)
