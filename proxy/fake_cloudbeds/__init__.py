"""A fake Cloudbeds API: a real aiohttp app with the real wire formats and failure switches.

Shared by the tests (in process, state inspected directly), the demo command and the
benchmarks (as its own process, driven through `/_fake/state` and `/_fake/control`).
`state` holds the bookkeeping, `oauth` the token endpoint and authorize page, `api` the
Cloudbeds API, `extras` the fake-only endpoints, `app` the control surface and factory.

Rules it follows, from the Cloudbeds docs (see shared/DESIGN.md for sources):
- token endpoint: form body with client_id/client_secret of a registered app; bad client
  401 invalid_client, bad refresh token 400 invalid_grant, bad code 401 server_error
  (Cloudbeds' documented shape); grants `authorization_code`, `refresh_token`,
  `urn:ietf:params:oauth:grant-type:api-key` (a code for `{"access_token": "cbat_..."}`,
  API-key automatic delivery) and `refresh_token_exchange` (a refresh token for an API key,
  "Migration from OAuth 2.0 to API keys"; a later refresh with that refresh token revokes
  the key, as Cloudbeds says it does);
- an app (client id) may have many authorisations: each code, token and key covers the
  properties of one install, or an association and its properties; the token answer lists
  them in `resources` (`property` entries, or one `association` entry);
- an authorization code lives 10 minutes, is single use and belongs to one app;
- the authorize page approves at once: the app's next queued install, else (default app)
  the fake's `properties`, else a property id never seen before (2001, 2002, ...);
  a Marketplace install ("Flow A") redirects with a code and no state;
- API calls need `Authorization: Bearer <token>` or `x-api-key`; otherwise 401
  `{"error": "access_denied", "message": ...}`;
- a call naming (`X-PROPERTY-ID`, `propertyID`, `propertyIDs`) a property its credential
  does not cover answers `{"success": false, "message": "None of the included property
  id's match ..."}` with HTTP 200, as "Common API errors" documents (`wrong_property_status`
  changes the status); the fake-only `.../fake/` endpoints take any property;
- `postAppState` with `app_state=disabled` disconnects the app from the property
  ("Connecting and disconnecting apps"): its refresh tokens answer 400 `{"error":
  "invalid_request", "message": "The refresh token is invalid."}`, its access tokens and
  API keys 401 access_denied;
- the rate limit is per client id and token calls spend it too (Cloudbeds API intro), so
  calls are counted per client id: token calls by the form's client_id, API calls by the
  app whose credential they present;
- every response carries the fake's own `X-Request-ID`.
Requests under `/_fake/` (the control surface) are not recorded in `requests_seen`.
"""

from proxy.fake_cloudbeds.app import create_fake_app
from proxy.fake_cloudbeds.extras import large_body
from proxy.fake_cloudbeds.installs import App, Grant
from proxy.fake_cloudbeds.state import FAKE_STATE, FakeCloudbeds

__all__ = ["FAKE_STATE", "App", "FakeCloudbeds", "Grant", "create_fake_app", "large_body"]
