"""Configuration: every variable parses, bad values name the variable, secrets stay masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from proxy.config import ConfigError, Kind, Settings, load_settings, require_credentials

OAUTH = {
    "CBPROXY_CLIENT_ID": "client-id-1",
    "CBPROXY_CLIENT_SECRET": "client-secret-value-1",
    "CBPROXY_REFRESH_TOKEN": "refresh-token-value-1",
}


def load(**env: str) -> Settings:
    return load_settings({**OAUTH, **env})


def error_for(env: dict[str, str], config_file: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(env, config_file)
    return str(info.value)


def test_defaults_match_design() -> None:
    settings = load()
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.upstream_url == "https://api.cloudbeds.com"
    assert settings.token_url == "https://api.cloudbeds.com/api/v1.3/access_token"
    assert settings.authorize_url == "https://api.cloudbeds.com/api/v1.3/oauth"
    assert settings.redis_url is None
    assert settings.encryption_keys == ()
    assert settings.refresh_leeway == 300
    assert settings.log_format == "json"
    assert (settings.connect_timeout, settings.read_timeout) == (5, 60)
    assert settings.max_body_bytes == 115_343_360
    assert settings.lock_ttl == 30


def test_every_variable_parses() -> None:
    key1, key2 = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings = load(
        CBPROXY_HOST="0.0.0.0",
        CBPROXY_PORT="9001",
        CBPROXY_UPSTREAM_URL="http://upstream.example:8081/",
        CBPROXY_TOKEN_URL="http://upstream.example:8081/api/v1.2/access_token",
        CBPROXY_AUTHORIZE_URL="https://hotels.cloudbeds.com/api/v1.1/oauth",
        CBPROXY_REDIRECT_URI="https://proxy.example/_proxy/oauth/callback",
        CBPROXY_REDIS_URL="rediss://:pw@redis.example:6380/2",
        CBPROXY_ENCRYPTION_KEY=f"{key1}, {key2}",
        CBPROXY_REFRESH_LEEWAY="120.5",
        CBPROXY_LOG_FORMAT="console",
        CBPROXY_CONNECT_TIMEOUT="2.5",
        CBPROXY_READ_TIMEOUT="90",
        CBPROXY_MAX_BODY_BYTES="1000",
        CBPROXY_LOCK_TTL="45",
    )
    assert (settings.host, settings.port) == ("0.0.0.0", 9001)
    assert settings.upstream_url == "http://upstream.example:8081"  # trailing slash dropped
    assert settings.token_url == "http://upstream.example:8081/api/v1.2/access_token"
    assert settings.authorize_url == "https://hotels.cloudbeds.com/api/v1.1/oauth"
    assert settings.redis_url == "rediss://:pw@redis.example:6380/2"
    assert settings.encryption_keys == (key1, key2)
    assert settings.refresh_leeway == 120.5
    assert settings.log_format == "console"
    assert (settings.connect_timeout, settings.read_timeout) == (2.5, 90)
    assert settings.max_body_bytes == 1000
    assert settings.lock_ttl == 45
    [cred] = settings.credentials
    assert cred.name == "default"
    assert cred.kind is Kind.OAUTH
    assert cred.client_id == "client-id-1"
    assert cred.client_secret == "client-secret-value-1"
    assert cred.refresh_token == "refresh-token-value-1"
    assert cred.redirect_uri == "https://proxy.example/_proxy/oauth/callback"


def test_api_key_makes_a_static_credential() -> None:
    settings = load_settings({"CBPROXY_API_KEY": "cbat_abcdef123456"})
    [cred] = settings.credentials
    assert cred.kind is Kind.API_KEY
    assert cred.api_key == "cbat_abcdef123456"


@pytest.mark.parametrize(
    "redis_url",
    [
        "redis://localhost:6379/0",
        "rediss://localhost:6380/0",
        "redis+sentinel://sentinel.example:26379/mymaster",
        "redis+cluster://node.example:7000",
    ],
)
def test_redis_url_forms(redis_url: str) -> None:
    assert load(CBPROXY_REDIS_URL=redis_url).redis_url == redis_url


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CBPROXY_PORT", "abc"),
        ("CBPROXY_PORT", "0"),
        ("CBPROXY_PORT", "70000"),
        ("CBPROXY_CONNECT_TIMEOUT", "-1"),
        ("CBPROXY_READ_TIMEOUT", "-0.5"),
        ("CBPROXY_READ_TIMEOUT", "soon"),
        ("CBPROXY_REFRESH_LEEWAY", "-300"),
        ("CBPROXY_MAX_BODY_BYTES", "-1"),
        ("CBPROXY_MAX_BODY_BYTES", "1.5"),
        ("CBPROXY_UPSTREAM_URL", "api.cloudbeds.com"),
        ("CBPROXY_UPSTREAM_URL", "ftp://api.cloudbeds.com"),
        ("CBPROXY_TOKEN_URL", "https://"),
        ("CBPROXY_AUTHORIZE_URL", "not a url"),
        ("CBPROXY_REDIS_URL", "http://redis.example"),
        ("CBPROXY_LOG_FORMAT", "xml"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str) -> None:
    message = error_for({**OAUTH, variable: value})
    assert message.startswith(f"{variable}:")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_are_refused(value: str) -> None:
    assert error_for({**OAUTH, "CBPROXY_READ_TIMEOUT": value}).startswith("CBPROXY_READ_TIMEOUT:")


@pytest.mark.parametrize(
    "variable",
    [
        "CBPROXY_CONNECT_TIMEOUT",
        "CBPROXY_READ_TIMEOUT",
        "CBPROXY_TOKEN_TIMEOUT",
        "CBPROXY_POLL_INTERVAL",
    ],
)
def test_zero_is_refused_where_it_would_disable_a_bound(variable: str) -> None:
    # aiohttp reads a timeout of 0 as "no timeout"; a poll interval of 0 spins.
    assert error_for({**OAUTH, variable: "0"}).startswith(f"{variable}:")


def test_bad_fernet_key_names_the_variable_but_never_the_key() -> None:
    good = Fernet.generate_key().decode()
    bad = "this-is-not-a-fernet-key-but-a-secret-anyway"
    message = error_for({**OAUTH, "CBPROXY_ENCRYPTION_KEY": f"{good},{bad}"})
    assert message.startswith("CBPROXY_ENCRYPTION_KEY:")
    assert "key 2 of 2" in message
    assert bad not in message
    assert good not in message


@pytest.mark.parametrize("ttl", ["15", "10"])
def test_lock_ttl_must_exceed_token_timeout(ttl: str) -> None:
    message = error_for({**OAUTH, "CBPROXY_LOCK_TTL": ttl, "CBPROXY_TOKEN_TIMEOUT": "15"})
    assert message.startswith("CBPROXY_LOCK_TTL:")
    assert "CBPROXY_TOKEN_TIMEOUT" in message
    assert load(CBPROXY_LOCK_TTL="16", CBPROXY_TOKEN_TIMEOUT="15").lock_ttl == 16


def test_oauth_credential_needs_client_id_and_secret() -> None:
    message = error_for({"CBPROXY_CLIENT_ID": "id", "CBPROXY_REFRESH_TOKEN": "r-token"})
    assert message.startswith("CBPROXY_CLIENT_SECRET:")
    assert error_for({"CBPROXY_CLIENT_SECRET": "s"}).startswith("CBPROXY_CLIENT_ID:")


def test_api_key_must_look_like_one() -> None:
    assert error_for({"CBPROXY_API_KEY": "not-an-api-key"}).startswith("CBPROXY_API_KEY:")


# -- _FILE twins ------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")  # secrets files usually end in a newline
    return str(path)


def test_file_twins_for_every_secret(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    settings = load_settings(
        {
            "CBPROXY_CLIENT_ID": "client-id-1",
            "CBPROXY_CLIENT_SECRET_FILE": write(tmp_path, "secret", "file-secret"),
            "CBPROXY_REFRESH_TOKEN_FILE": write(tmp_path, "refresh", "file-refresh"),
            "CBPROXY_REDIS_URL_FILE": write(tmp_path, "redis", "redis://:pw@r.example:6379/0"),
            "CBPROXY_ENCRYPTION_KEY_FILE": write(tmp_path, "key", key),
        }
    )
    [cred] = settings.credentials
    assert cred.client_secret == "file-secret"
    assert cred.refresh_token == "file-refresh"
    assert settings.redis_url == "redis://:pw@r.example:6379/0"
    assert settings.encryption_keys == (key,)
    api = load_settings({"CBPROXY_API_KEY_FILE": write(tmp_path, "api", "cbat_from_file")})
    assert api.credentials[0].api_key == "cbat_from_file"


def test_file_twin_wins_over_the_variable(tmp_path: Path) -> None:
    settings = load(CBPROXY_CLIENT_SECRET_FILE=write(tmp_path, "s", "from-file"))
    assert settings.credentials[0].client_secret == "from-file"


@pytest.mark.parametrize(
    "variable",
    [
        "CBPROXY_CLIENT_SECRET_FILE",
        "CBPROXY_REFRESH_TOKEN_FILE",
        "CBPROXY_API_KEY_FILE",
        "CBPROXY_REDIS_URL_FILE",
        "CBPROXY_ENCRYPTION_KEY_FILE",
    ],
)
def test_unreadable_file_names_the_variable(tmp_path: Path, variable: str) -> None:
    message = error_for({**OAUTH, variable: str(tmp_path / "missing")})
    assert message.startswith(f"{variable}:")
    assert "cannot read" in message


def test_bad_value_in_a_file_names_the_file_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "redis", "http://not-redis")
    assert error_for({**OAUTH, "CBPROXY_REDIS_URL_FILE": path}).startswith(
        "CBPROXY_REDIS_URL_FILE:"
    )


# -- TOML file --------------------------------------------------------------------------------

TOML = """
[proxy]
port = 9100
upstream_url = "http://file-upstream.example"
read_timeout = 30
refresh_leeway = 200

[credentials.default]
client_id = "file-client"
client_secret = "file-secret"
refresh_token = "file-refresh"
properties = [1001, "1002"]
rate_limit = 5

[credentials.partner]
api_key = "cbat_partner_key"
properties = ["2001"]
rate_limit = 10
rate_burst = 20
"""


def toml(tmp_path: Path, text: str = TOML) -> str:
    return write(tmp_path, "cbproxy.toml", text)


def test_toml_file_with_proxy_and_credentials(tmp_path: Path) -> None:
    settings = load_settings({}, toml(tmp_path))
    assert settings.port == 9100
    assert settings.upstream_url == "http://file-upstream.example"
    assert settings.read_timeout == 30
    assert settings.refresh_leeway == 200
    default, partner = settings.credentials
    assert default.name == "default"
    assert default.kind is Kind.OAUTH
    assert (default.client_id, default.client_secret) == ("file-client", "file-secret")
    assert default.refresh_token == "file-refresh"
    assert default.properties == ("1001", "1002")
    assert default.rate_limit == 5
    assert partner.kind is Kind.API_KEY
    assert partner.api_key == "cbat_partner_key"
    assert partner.properties == ("2001",)
    assert (partner.rate_limit, partner.rate_burst) == (10, 20)


def test_variables_override_the_file(tmp_path: Path) -> None:
    settings = load_settings(
        {"CBPROXY_PORT": "9200", "CBPROXY_CLIENT_SECRET": "env-secret"}, toml(tmp_path)
    )
    assert settings.port == 9200
    assert settings.read_timeout == 30  # not overridden: the file's value stays
    default = settings.credential("default")
    assert default is not None
    assert default.client_secret == "env-secret"
    assert default.client_id == "file-client"


def test_bad_value_in_the_file_names_table_and_key(tmp_path: Path) -> None:
    message = error_for({}, toml(tmp_path, '[proxy]\nport = "abc"\n'))
    assert message.startswith("[proxy].port:")


def test_property_routed_to_two_credentials_is_an_error(tmp_path: Path) -> None:
    text = TOML.replace('properties = ["2001"]', 'properties = ["2001", "1002"]')
    message = error_for({}, toml(tmp_path, text))
    assert "1002" in message
    assert "[credentials.partner].properties" in message


def test_properties_must_be_a_list(tmp_path: Path) -> None:
    text = TOML.replace('properties = ["2001"]', 'properties = "2001"')
    assert error_for({}, toml(tmp_path, text)).startswith("[credentials.partner].properties:")


def test_unreadable_or_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    assert error_for({}, str(tmp_path / "missing.toml")).startswith("--config:")
    assert error_for({}, toml(tmp_path, "[proxy\n")).startswith("--config:")


def test_no_credential_is_an_error_for_serve_pointing_to_demo() -> None:
    settings = load_settings({})
    assert settings.credentials == ()
    with pytest.raises(ConfigError, match="cloudbeds-proxy demo"):
        require_credentials(settings)


# -- describe() and check-config --------------------------------------------------------------

SECRET_VALUES = {
    "CBPROXY_CLIENT_SECRET": "sekret-client-secret-123",
    "CBPROXY_REFRESH_TOKEN": "sekret-refresh-token-456",
    "CBPROXY_REDIS_URL": "redis://:sekret-redis-pw@redis.example:6379/0",
}


def test_describe_masks_every_secret(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    text = TOML.replace("cbat_partner_key", "cbat_sekret_partner_key")
    settings = load_settings(
        {**SECRET_VALUES, "CBPROXY_ENCRYPTION_KEY": key, "CBPROXY_CLIENT_ID": "id"},
        toml(tmp_path, text),
    )
    described = settings.describe()
    dumped = json.dumps(described)
    for secret in [*SECRET_VALUES.values(), "sekret-redis-pw", key, "cbat_sekret_partner_key"]:
        assert secret not in dumped
    assert described["redis_url"] == "<set>"
    assert described["encryption_keys"] == "<set>"
    assert described["credentials"]["default"]["client_secret"] == "<set>"
    assert described["credentials"]["partner"]["api_key"] == "<set>"
    assert described["credentials"]["partner"]["client_secret"] is None
    assert described["port"] == 9100


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CBPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_config_prints_masked_configuration() -> None:
    result = run_cli("check-config", env={**SECRET_VALUES, "CBPROXY_CLIENT_ID": "visible-id"})
    assert result.returncode == 0, result.stderr
    described: dict[str, Any] = json.loads(result.stdout)
    assert described["credentials"]["default"]["client_id"] == "visible-id"
    for secret in [*SECRET_VALUES.values(), "sekret-redis-pw"]:
        assert secret not in result.stdout
        assert secret not in result.stderr


def test_check_config_with_a_bad_variable_prints_one_line_and_exits_2() -> None:
    result = run_cli("check-config", env={**OAUTH, "CBPROXY_PORT": "abc"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "CBPROXY_PORT" in lines[0]
    assert result.stdout == ""


def test_serve_without_a_credential_exits_2_pointing_to_demo() -> None:
    result = run_cli("serve", env={"CBPROXY_PORT": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cloudbeds-proxy demo" in lines[0]


def test_a_malformed_redis_url_never_shows_its_password() -> None:
    env = {
        "CBPROXY_API_KEY": "cbat_x",
        "CBPROXY_REDIS_URL": "redis://:s3cr/etPass@127.0.0.1:6379/0",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value).startswith("CBPROXY_REDIS_URL:")
    assert "s3cr" not in str(info.value)
    assert "etPass" not in str(info.value)


def test_refresh_scheduling_defaults() -> None:
    settings = load()
    assert settings.refresh_idle_after is None  # one lifetime of each connection's token
    assert settings.keepalive_interval == 7 * 24 * 3600


def test_refresh_scheduling_variables() -> None:
    settings = load(CBPROXY_REFRESH_IDLE_AFTER="900", CBPROXY_KEEPALIVE_INTERVAL="86400")
    assert (settings.refresh_idle_after, settings.keepalive_interval) == (900.0, 86400.0)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CBPROXY_REFRESH_IDLE_AFTER", "0", "greater than 0"),
        ("CBPROXY_REFRESH_IDLE_AFTER", "soon", "could not convert"),
        ("CBPROXY_KEEPALIVE_INTERVAL", "0", "greater than 0"),
        ("CBPROXY_KEEPALIVE_INTERVAL", "-5", "greater than 0"),
        ("CBPROXY_KEEPALIVE_INTERVAL", "inf", "finite"),
        ("CBPROXY_KEEPALIVE_INTERVAL", "2592000", "30 days"),
    ],
)
def test_refresh_scheduling_values_are_checked(variable: str, value: str, says: str) -> None:
    message = error_for({**OAUTH, variable: value})
    assert message.startswith(f"{variable}:")
    assert says in message


APP_TOML = """
[apps.partner]
client_id = "partner-client"
client_secret = "partner-secret"
redirect_uri = "https://partner.example/callback"
rate_limit = 10
rate_burst = 10
"""


def test_an_app_reserves_a_token_share_by_default(tmp_path: Path) -> None:
    [app] = load_settings({}, toml(tmp_path, APP_TOML)).apps
    assert app.token_share == 0.2
    assert (app.budget, app.token_budget) == ("app:partner", "app:partner/tokens")
    connection = app.connection("partner.property.1")
    assert (connection.budget, connection.token_budget) == (app.budget, app.token_budget)


def test_a_token_share_of_zero_keeps_one_budget(tmp_path: Path) -> None:
    [app] = load_settings({}, toml(tmp_path, APP_TOML + "token_share = 0\n")).apps
    assert app.token_budget == app.budget == "app:partner"
    assert app.connection("c").token_budget == "app:partner"


def test_a_configured_credential_keeps_one_budget(tmp_path: Path) -> None:
    default, _ = load_settings({}, toml(tmp_path)).credentials
    assert default.token_budget == default.budget == "default"


@pytest.mark.parametrize("share", ["1", "1.5", "-0.1", '"much"', "nan"])
def test_a_token_share_is_a_fraction(tmp_path: Path, share: str) -> None:
    message = error_for({}, toml(tmp_path, APP_TOML + f"token_share = {share}\n"))
    assert message.startswith("[apps.partner].token_share:")


def test_a_split_budget_needs_a_burst_of_two(tmp_path: Path) -> None:
    text = APP_TOML.replace("rate_burst = 10", "rate_burst = 1")
    assert error_for({}, toml(tmp_path, text)).startswith("[apps.partner].rate_burst:")
    settings = load_settings({}, toml(tmp_path, text + "token_share = 0\n"))
    assert settings.apps[0].rate_burst == 1
