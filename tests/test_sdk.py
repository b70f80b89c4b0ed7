"""The official `cloudbeds-pms-v1-3` SDK, given only the proxy's URL, works through it.

The SDK is synchronous (urllib3), so each call runs in a thread while the proxy and the
fake Cloudbeds keep serving on this test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
from typing import Any

import cloudbeds_pms_v1_3 as sdk
from cloudbeds_pms_v1_3.models.post_reservation_request_adults_inner import (
    PostReservationRequestAdultsInner,
)
from cloudbeds_pms_v1_3.models.post_reservation_request_rooms_inner import (
    PostReservationRequestRoomsInner,
)

from proxy.fake_cloudbeds import FakeCloudbeds
from tests.support import settings_for

Fake = tuple[FakeCloudbeds, str]


def client(proxy: str) -> sdk.ApiClient:
    # Exactly what a service does: the host, no access token, no API key.
    return sdk.ApiClient(sdk.Configuration(host=f"{proxy}/api/v1.3"))


async def test_get_hotels_through_the_proxy(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    with client(proxy) as api_client:
        answer = await asyncio.to_thread(sdk.HotelApi(api_client).get_hotels_get)
    assert answer.success is True
    assert [hotel.property_id for hotel in answer.data] == list(state.properties)
    assert answer.data[0].property_name == "Fake Hotel"
    assert state.rejected_calls == 0  # the fake saw a valid Bearer token
    assert state.requests_seen[-1] == ("GET", "/api/v1.3/getHotels")


async def test_post_reservation_through_the_proxy(fake_cloudbeds: Fake, start_proxy: Any) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    with client(proxy) as api_client:
        answer = await asyncio.to_thread(
            sdk.ReservationApi(api_client).post_reservation_post,
            property_id="1001",
            start_date=datetime.date(2024, 2, 1),
            end_date=datetime.date(2024, 2, 3),
            guest_first_name="Zoë",
            guest_last_name="Lovelace",
            guest_country="GB",
            guest_email="ada@example.com",
            payment_method="cash",
            rooms=[PostReservationRequestRoomsInner(roomTypeID="7", quantity=1)],
            adults=[PostReservationRequestAdultsInner(roomTypeID="7", quantity=2)],
        )
    assert answer.success is True
    assert answer.reservation_id.startswith("FAKE")
    assert (answer.guest_first_name, answer.guest_last_name) == ("Zoë", "Lovelace")
    assert answer.start_date == datetime.date(2024, 2, 1)
    assert state.rejected_calls == 0
    assert state.requests_seen[-1] == ("POST", "/api/v1.3/postReservation")


async def test_sdk_sends_no_credential_and_the_proxy_attaches_its_own(
    fake_cloudbeds: Fake, start_proxy: Any
) -> None:
    state, fake_url = fake_cloudbeds
    proxy = await start_proxy(settings_for(fake_url))
    with client(proxy) as api_client:
        method, url, headers, _, _ = api_client.param_serialize(
            method="POST",
            resource_path="/fake/echo",
            post_params=[("propertyID", "1001"), ("note", "a b,c")],
            header_params={"Content-Type": "application/x-www-form-urlencoded"},
            auth_settings=["api_key", "OAuth2"],
        )
        assert not any(name.lower() in ("authorization", "x-api-key") for name in headers)
        response = await asyncio.to_thread(
            api_client.call_api, method, url, headers, post_params=[("propertyID", "1001")]
        )
        seen = json.loads(response.read())
    upstream = {name.lower(): value for name, value in seen["headers"]}
    token = upstream["authorization"].removeprefix("Bearer ")
    assert upstream["authorization"].startswith("Bearer ")
    assert token in state.valid_access_tokens()
    assert base64.b64decode(seen["body_base64"]) == b"propertyID=1001"
