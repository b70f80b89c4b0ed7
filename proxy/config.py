"""Configuration: one frozen object, built once, from the environment and a TOML file.

This is the only module that reads `os.environ`. A variable overrides the file; every
secret has a `_FILE` twin that reads it from a file (Docker and Kubernetes secrets).
A bad value raises `ConfigError` naming the variable, and start-up stops with that line.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.connection

from proxy.crypto import TokenCipher
from proxy.redis_store import parse_redis_url
from proxy.tokens import Kind

__all__ = ["Kind"]

DEFAULT_CREDENTIAL = "default"
PREFIX = "CBPROXY_"
SECRETS = frozenset(
    {
        "client_secret",
        "refresh_token",
        "api_key",
        "encryption_key",
        "redis_url",
        "admin_token",
        "events_secret",
        "token",
        "marketplace_state",
    }
)
"""Settings that are masked by `check-config` and have a `_FILE` twin."""

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing or wrong. The message names it and says what to do."""


CONNECTION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""Connection ids, app names and caller names: safe in a URL path, a key and a log line."""


@dataclasses.dataclass(frozen=True)
class CredentialSettings:
    name: str
    kind: Kind
    client_id: str | None = None
    client_secret: str | None = dataclasses.field(default=None, repr=False)
    redirect_uri: str | None = None
    refresh_token: str | None = dataclasses.field(default=None, repr=False)
    api_key: str | None = dataclasses.field(default=None, repr=False)
    properties: tuple[str, ...] = ()
    rate_limit: float = 5.0
    rate_burst: int = 5
    app: str | None = None
    """Set for a connection of an app: its client, and the app's shared rate budget."""
    token_share: float = 0.0
    """The app's share of its rate reserved for token calls; 0: they share `budget`."""

    @property
    def budget(self) -> str:
        """The rate limiter's bucket and the metrics' label: the app's (Cloudbeds counts per
        client id), or the credential's own."""
        return f"app:{self.app}" if self.app else self.name

    @property
    def token_budget(self) -> str:
        """The bucket token calls take their slot from: the app's reserved share, or the
        same as requests (a configured credential, or an app with no share)."""
        return f"{self.budget}/tokens" if self.app and self.token_share > 0 else self.budget


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """A Cloudbeds app (one client id) whose connections are made at run time."""

    name: str
    client_id: str
    client_secret: str = dataclasses.field(repr=False)
    redirect_uri: str
    delivery: Kind = Kind.OAUTH
    rate_limit: float = 5.0
    rate_burst: int = 5
    token_share: float = 0.2
    """The share of the rate and burst reserved for token calls (0 < share < 1), the
    rest for requests; 0 puts both in one budget."""
    post_app_state_on_delete: bool = True
    marketplace_state: str | None = dataclasses.field(default=None, repr=False)

    @property
    def budget(self) -> str:
        """The app's request budget (and its metrics' label)."""
        return f"app:{self.name}"

    @property
    def token_budget(self) -> str:
        """The budget of the app's token calls: its reserved share, or the request budget."""
        return f"{self.budget}/tokens" if self.token_share > 0 else self.budget

    def connection(self, connection_id: str) -> CredentialSettings:
        """The settings a connection of this app runs with."""
        return CredentialSettings(
            name=connection_id,
            kind=self.delivery,
            client_id=self.client_id,
            client_secret=self.client_secret,
            redirect_uri=self.redirect_uri,
            rate_limit=self.rate_limit,
            rate_burst=self.rate_burst,
            app=self.name,
            token_share=self.token_share,
        )


@dataclasses.dataclass(frozen=True)
class CallerSettings:
    """A service allowed to use the proxy, and the connections it may use."""

    name: str
    token: str = dataclasses.field(repr=False)
    connections: tuple[str, ...] = ()
    apps: tuple[str, ...] = ()

    def may_use(self, connection_id: str, app: str | None) -> bool:
        """True when a `connections` or `apps` pattern (names or *-globs) matches."""
        if any(fnmatch.fnmatchcase(connection_id, p) for p in self.connections):
            return True
        return app is not None and any(fnmatch.fnmatchcase(app, p) for p in self.apps)


@dataclasses.dataclass(frozen=True)
class Settings:
    credentials: tuple[CredentialSettings, ...]
    apps: tuple[AppSettings, ...] = ()
    callers: tuple[CallerSettings, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    upstream_url: str = "https://api.cloudbeds.com"
    token_url: str = "https://api.cloudbeds.com/api/v1.3/access_token"
    authorize_url: str = "https://api.cloudbeds.com/api/v1.3/oauth"
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    redis_prefix: str = "cbproxy"
    replica_wait: float = 1.0
    """Seconds a record write waits for a Redis replica to acknowledge it (`WAIT`)."""
    redis_pool_timeout: float = 2.0
    """Seconds a Redis command waits for a free pooled connection before StoreBusy."""
    encryption_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    refresh_leeway: float = 300.0
    refresh_idle_after: float | None = None
    """Seconds without a request after which a connection of an app is no longer refreshed
    ahead; None: one lifetime of its token (`expires_at - refreshed_at`)."""
    keepalive_interval: float = 604_800.0
    """An idle connection is refreshed (OAuth) or called (API key) at least this often."""
    log_format: str = "json"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    token_timeout: float = 15.0
    max_body_bytes: int = 115_343_360
    replay_body_bytes: int = 1_048_576
    lock_ttl: float = 30.0
    shutdown_grace: float = 25.0
    rate_max_wait: float = 2.0
    wait_for_token: float = 10.0
    poll_interval: float = 10.0
    heartbeat_interval: float = 5.0
    state_file: str = "cloudbeds-proxy.db"
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    public_host: str | None = None
    public_port: int | None = None
    events_url: str | None = None
    events_secret: str | None = dataclasses.field(default=None, repr=False)
    head_timeout: float = 15.0
    max_response_header_bytes: int = 65_536
    max_response_headers: int = 100

    def secrets(self) -> list[str]:
        """Every secret in the configuration, for the log redaction to know."""
        found = [*self.encryption_keys]
        if self.redis_url:
            found.append(urlsplit(self.redis_url).password or "")
        for cred in self.credentials:
            found += [cred.client_secret or "", cred.refresh_token or "", cred.api_key or ""]
        found += [app.client_secret for app in self.apps]
        found += [app.marketplace_state or "" for app in self.apps]
        found += [caller.token for caller in self.callers]
        found += [self.admin_token or "", self.events_secret or ""]
        return [secret for secret in found if secret]

    def credential(self, name: str) -> CredentialSettings | None:
        return next((c for c in self.credentials if c.name == name), None)

    def app(self, name: str) -> AppSettings | None:
        return next((a for a in self.apps if a.name == name), None)

    def describe(self) -> dict[str, Any]:
        """The resolved configuration with every secret masked (for `check-config`)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name not in ("credentials", "apps", "callers"):
                out[field.name] = _mask(field.name, getattr(self, field.name))
        for group in ("credentials", "apps", "callers"):
            out[group] = {
                c.name: {f.name: _mask(f.name, getattr(c, f.name)) for f in dataclasses.fields(c)}
                for c in getattr(self, group)
            }
        return out


def _mask(name: str, value: Any) -> Any:
    if name in SECRETS or name == "encryption_keys":
        return "<set>" if value else None
    if isinstance(value, enum.Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


# Process-wide settings: (field, parser). Variable name is CBPROXY_ + field upper-cased.
def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.rstrip("/")


def _redis_url(value: str) -> str:
    # Checked here, at start, with the parsers the store will use, so that a bad URL is
    # one line naming the variable; their messages can quote the URL (and its password),
    # so only our own words are shown.
    try:
        target = parse_redis_url(value)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("CBPROXY_REDIS_URL: ")) from None
    try:
        if target.url is not None:
            redis.connection.parse_url(target.url)  # type: ignore[no-untyped-call]
    except ValueError:
        raise ValueError(
            "is not a valid Redis URL: check the host, port and database, and percent-encode "
            "special characters in the password (/ is %2F, # is %23, @ is %40)"
        ) from None
    return value


def _replica_wait(value: str) -> float:
    seconds = _bound(value)  # WAIT with a timeout of 0 would block for ever
    if seconds > 1.0:
        raise ValueError("must be at most 1 (seconds): half the Redis socket timeout of 2 s")
    return seconds


def _prefix(value: str) -> str:
    if not value or any(c in value for c in "{}: \t"):
        raise ValueError("must be a non-empty key prefix without spaces, ':' or braces")
    return value


def _positive(parse: Callable[[str], T], *, zero: bool = True) -> Callable[[str], T]:
    def check(value: str) -> T:
        number = parse(value)
        if not math.isfinite(number):  # type: ignore[arg-type]
            raise ValueError("must be a finite number")
        if number < 0 or (number == 0 and not zero):  # type: ignore[operator]
            raise ValueError("must not be negative" if zero else "must be greater than 0")
        return number

    return check


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number < 1:
        raise ValueError("must be a fraction from 0 up to (not including) 1, like 0.2")
    return number


# aiohttp reads a timeout of 0 as "no timeout", and a poll interval of 0 would spin.
_bound = _positive(float, zero=False)


API_KEY_EXPIRY = 30 * 24 * 3600
"""Cloudbeds expires an API key unused for 30 days."""


def _keepalive(value: str) -> float:
    seconds = _bound(value)
    if seconds >= API_KEY_EXPIRY:
        raise ValueError(
            f"must be less than {API_KEY_EXPIRY} (30 days, after which Cloudbeds expires an "
            "unused API key)"
        )
    return seconds


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError("must be a port number between 1 and 65535")
    return port


def _log_format(value: str) -> str:
    if value not in ("json", "console"):
        raise ValueError("must be json or console")
    return value


def _fernet_keys(value: str) -> tuple[str, ...]:
    TokenCipher.from_value(value)  # ValueError names a bad key by position, never the key
    return tuple(k.strip() for k in value.split(","))


PROXY_FIELDS: dict[str, Callable[[str], Any]] = {
    "host": str,
    "port": _port,
    "upstream_url": _url,
    "token_url": _url,
    "authorize_url": _url,
    "redis_url": _redis_url,
    "redis_prefix": _prefix,
    "replica_wait": _replica_wait,
    "redis_pool_timeout": _bound,
    "encryption_key": _fernet_keys,
    "refresh_leeway": _positive(float),
    "refresh_idle_after": _bound,
    "keepalive_interval": _keepalive,
    "log_format": _log_format,
    "connect_timeout": _bound,
    "read_timeout": _bound,
    "token_timeout": _bound,
    "max_body_bytes": _positive(int),
    "replay_body_bytes": _positive(int),
    "lock_ttl": _positive(float),
    "shutdown_grace": _positive(float),
    "rate_max_wait": _positive(float),
    "wait_for_token": _positive(float),
    "poll_interval": _bound,
    "heartbeat_interval": _bound,
    "state_file": str,
    "admin_token": str,
    "public_host": str,
    "public_port": _port,
    "events_url": _url,
    "events_secret": str,
    "head_timeout": _bound,
    "max_response_header_bytes": _positive(int, zero=False),
    "max_response_headers": _positive(int, zero=False),
}
CREDENTIAL_FIELDS: dict[str, Callable[[str], Any]] = {
    "client_id": str,
    "client_secret": str,
    "redirect_uri": str,
    "refresh_token": str,
    "api_key": str,
    "rate_limit": _positive(float),
    "rate_burst": _positive(int),
}
# Variables for the default credential: CBPROXY_RATE_LIMIT etc. apply to every credential
# that does not set its own in the file.
GLOBAL_CREDENTIAL_DEFAULTS = ("rate_limit", "rate_burst")


class _Source:
    """Looks a setting up in the environment (with `_FILE` twins), then in a TOML table."""

    def __init__(self, environ: Mapping[str, str], table: Mapping[str, Any], where: str) -> None:
        self.environ, self.table, self.where = environ, table, where

    def get(self, name: str, parse: Callable[[str], T], *, env: bool = True) -> T | None:
        var = PREFIX + name.upper()
        raw, origin = None, var
        if env:
            raw, origin = self._from_env(var, secret=name in SECRETS)
        if raw is None:
            raw, origin = self._from_table(name)
        if raw is None:
            return None
        try:
            return parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None

    def _from_env(self, var: str, *, secret: bool) -> tuple[str | None, str]:
        if secret and f"{var}_FILE" in self.environ:
            return _read_secret_file(self.environ[f"{var}_FILE"], f"{var}_FILE"), f"{var}_FILE"
        value = self.environ.get(var)
        return (value if value != "" else None), var

    def _from_table(self, name: str) -> tuple[str | None, str]:
        origin = f"{self.where}.{name}"
        if f"{name}_file" in self.table:
            return _read_secret_file(str(self.table[f"{name}_file"]), f"{origin}_file"), origin
        value = self.table.get(name)
        if value is None:
            return None, origin
        if isinstance(value, list):
            return ",".join(str(v) for v in value), origin
        return str(value), origin


def _read_secret_file(path: str, origin: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read {path} ({exc.strerror})") from None


def load_settings(environ: Mapping[str, str], config_file: str | None = None) -> Settings:
    """Build the settings from `environ` and the optional TOML file; raise ConfigError."""
    document = _read_toml(config_file) if config_file else {}
    proxy_table = document.get("proxy", {})
    source = _Source(environ, proxy_table, "[proxy]")
    values: dict[str, Any] = {}
    for name, parse in PROXY_FIELDS.items():
        value = source.get(name, parse)
        if value is not None:
            values["encryption_keys" if name == "encryption_key" else name] = value
    defaults = {n: source.get(n, CREDENTIAL_FIELDS[n]) for n in GLOBAL_CREDENTIAL_DEFAULTS}
    credentials = _credentials(environ, document.get("credentials", {}), defaults)
    apps = _apps(document.get("apps", {}))
    callers = _callers(document.get("callers", {}))
    settings = Settings(credentials=credentials, apps=apps, callers=callers, **values)
    _check(settings)
    return settings


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML ({exc})") from None


def _credentials(
    environ: Mapping[str, str], tables: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[CredentialSettings, ...]:
    names = list(tables)
    if DEFAULT_CREDENTIAL not in names and _env_defines_credential(environ):
        names.insert(0, DEFAULT_CREDENTIAL)
    result = []
    for name in names:
        table = tables.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[credentials.{name}]: must be a table")
        # Variables describe the default credential only.
        source = _Source(environ, table, f"[credentials.{name}]")
        env = name == DEFAULT_CREDENTIAL
        values = {f: source.get(f, p, env=env) for f, p in CREDENTIAL_FIELDS.items()}
        for field in GLOBAL_CREDENTIAL_DEFAULTS:
            if values[field] is None:
                values[field] = defaults[field]
        props = table.get("properties", [])
        if not isinstance(props, list):
            raise ConfigError(
                f'[credentials.{name}].properties: must be a list of property ids, like ["1001"]'
            )
        result.append(_credential(name, values, tuple(str(p) for p in props)))
    return tuple(result)


APP_FIELDS: dict[str, Callable[[str], Any]] = {
    "client_id": str,
    "client_secret": str,
    "redirect_uri": str,
    "delivery": Kind,
    "rate_limit": _positive(float),
    "rate_burst": _positive(int),
    "token_share": _fraction,
    "marketplace_state": str,
}


def _tables(document: Any, group: str) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(document, dict):
        raise ConfigError(f"[{group}]: must be a table of [{group}.NAME] tables")
    for name, table in document.items():
        if not CONNECTION_ID.fullmatch(name):
            raise ConfigError(f"[{group}.{name[:64]}]: names use only A-Z a-z 0-9 . _ -")
        if not isinstance(table, dict):
            raise ConfigError(f"[{group}.{name}]: must be a table")
    return document


def _apps(document: Any) -> tuple[AppSettings, ...]:
    result = []
    for name, table in _tables(document, "apps").items():
        where = f"[apps.{name}]"
        source = _Source({}, table, where)
        try:
            values = {f: source.get(f, p, env=False) for f, p in APP_FIELDS.items()}
        except ConfigError as exc:
            if "delivery" in str(exc):
                raise ConfigError(f"{where}.delivery: must be oauth or api_key") from None
            raise
        for needed in ("client_id", "client_secret", "redirect_uri"):
            if not values[needed]:
                raise ConfigError(f"{where}.{needed}: required for an app")
        on_delete = table.get("post_app_state_on_delete", True)
        if not isinstance(on_delete, bool):
            raise ConfigError(f"{where}.post_app_state_on_delete: must be true or false")
        present = {k: v for k, v in values.items() if v is not None}
        app = AppSettings(name=name, post_app_state_on_delete=on_delete, **present)
        if app.token_share > 0 and app.rate_limit > 0 and app.rate_burst < 2:
            raise ConfigError(
                f"{where}.rate_burst: must be at least 2 with a token_share (requests and "
                "token calls each need 1 of the burst), or set token_share = 0"
            )
        result.append(app)
    return tuple(result)


def _callers(document: Any) -> tuple[CallerSettings, ...]:
    result = []
    for name, table in _tables(document, "callers").items():
        where = f"[callers.{name}]"
        token = _Source({}, table, where).get("token", str, env=False)
        if not token:
            raise ConfigError(f"{where}.token: required (or token_file)")
        lists = {}
        for field in ("connections", "apps"):
            value = table.get(field, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f'{where}.{field}: must be a list of names or globs, like ["*"]')
            lists[field] = tuple(value)
        result.append(CallerSettings(name=name, token=token, **lists))
    return tuple(result)


def _env_defines_credential(environ: Mapping[str, str]) -> bool:
    keys = ("CLIENT_ID", "CLIENT_SECRET", "API_KEY", "REFRESH_TOKEN")
    return any(environ.get(PREFIX + k) or environ.get(PREFIX + k + "_FILE") for k in keys)


def _credential(
    name: str, values: dict[str, Any], properties: tuple[str, ...]
) -> CredentialSettings:
    where = "CBPROXY_" if name == DEFAULT_CREDENTIAL else f"[credentials.{name}]."
    present = {k: v for k, v in values.items() if v is not None}
    rate = present.pop("rate_limit", 5.0)
    burst = present.pop("rate_burst", None)
    burst = int(burst) if burst is not None else max(1, round(rate))
    if present.get("api_key"):
        if not present["api_key"].startswith("cbat_"):
            raise ConfigError(f"{where}API_KEY: a Cloudbeds API key starts with cbat_")
        kind = Kind.API_KEY
    else:
        for needed in ("client_id", "client_secret"):
            if not present.get(needed):
                raise ConfigError(
                    f"{where}{needed.upper()}: required for an OAuth credential "
                    f"(or set {where}API_KEY for an API key credential)"
                )
        kind = Kind.OAUTH
    return CredentialSettings(
        name=name, kind=kind, properties=properties, rate_limit=rate, rate_burst=burst, **present
    )


def _check(settings: Settings) -> None:
    if settings.public_port is not None and settings.public_port == settings.port:
        raise ConfigError(
            "CBPROXY_PUBLIC_PORT: must differ from CBPROXY_PORT (the public listener serves "
            "only installs and callbacks)"
        )
    if settings.events_url and not settings.events_secret:
        raise ConfigError(
            "CBPROXY_EVENTS_SECRET: required with CBPROXY_EVENTS_URL (it signs events)"
        )
    tokens = [c.token for c in settings.callers]
    if len(set(tokens)) != len(tokens):
        raise ConfigError("[callers]: two callers have the same token; give each its own")
    if settings.token_timeout >= settings.lock_ttl:
        raise ConfigError(
            "CBPROXY_LOCK_TTL: must exceed CBPROXY_TOKEN_TIMEOUT, or a slow refresh "
            "outlives its lock and another replica refreshes too"
        )
    seen: dict[str, str] = {}
    for cred in settings.credentials:
        for prop in cred.properties:
            if prop in seen:
                raise ConfigError(
                    f"[credentials.{cred.name}].properties: property {prop} is already "
                    f"routed to credential {seen[prop]}"
                )
            seen[prop] = cred.name


def require_credentials(settings: Settings) -> None:
    """`serve` needs at least one credential or app; say how to give one."""
    if not settings.credentials and not settings.apps:
        raise ConfigError(
            "CBPROXY_CLIENT_ID: no credential configured. Set CBPROXY_CLIENT_ID and "
            "CBPROXY_CLIENT_SECRET (OAuth) or CBPROXY_API_KEY, or [credentials.NAME] tables "
            "in --config. To try the proxy without a Cloudbeds account: cloudbeds-proxy demo"
        )
