"""The real container image, built and run with podman, and the compose stack around it.

Ops run the image as a sidecar, so these tests build it from the Dockerfile (on a local
Debian base, see tests/containers.py: no registry is reachable) and use it as ops would:
as one container next to a fake Cloudbeds on the host, then as the compose stack.
They skip only where the machine cannot run containers at all (the reason is in the
skip); under CI=true that is a failure, because `.ci/run` installs and prepares podman.

Every wait is bounded and generous: a slow machine may make a test take longer, never
fail; speed is measured in bench/, not here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests.containers import (
    HOST_CA_BUNDLE,
    PYTHON_BASE,
    REDIS_BASE,
    ROOT,
    Podman,
    PodmanError,
    missing_tools,
)
from tests.support import fake_env, free_port

pytestmark = pytest.mark.container

IN_CI = os.environ.get("CI") == "true"
IMAGE = "localhost/cloudbeds-proxy:test"
# What docker-compose.yml names; the tests' storage is private, so the tag is too.
COMPOSE_IMAGE = "localhost/cloudbeds-proxy:local"
UID = "10001"
STATE_DIR = "/var/lib/cloudbeds-proxy"
START_TIMEOUT = 60.0


def unavailable(reason: str) -> None:
    """Skip where containers cannot run; under CI=true fail, CI prepares them."""
    if IN_CI:
        pytest.fail(f"CI=true and the container tests cannot run: {reason}")
    pytest.skip(f"cannot run containers here: {reason}")


def wait_for(what: str, probe: Callable[[], Any], timeout: float = START_TIMEOUT) -> Any:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (OSError, ValueError, PodmanError) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> Any:
    status, body = get(url)
    assert status == 200, (url, status, body[:500])
    return json.loads(body)


def post_json(url: str, data: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def ready(url: str) -> bool:
    return get(f"{url}/_proxy/readyz", timeout=3)[0] == 200


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """Private podman storage with both base images imported; removed afterwards."""
    missing = missing_tools()
    if "podman" in missing or "runc" in missing:
        unavailable(f"{', '.join(missing)} not installed (apt-get install podman runc mmdebstrap)")
    if os.geteuid() != 0:
        unavailable("not root: the recipe runs rootful podman (runc, cgroupfs, host ulimits)")
    bases = (PYTHON_BASE, REDIS_BASE)
    if "mmdebstrap" in missing and not all(base.tarball().exists() for base in bases):
        unavailable("no cached base images and no mmdebstrap to build them")
    engine = Podman(tmp_path_factory.mktemp("podman"))
    try:
        for base in bases:
            engine.import_base(base)
        probe = engine.run("run", "--rm", "--network", "host", PYTHON_BASE.tag, "true", check=False)
        if probe.returncode != 0:
            unavailable(f"podman run fails: {probe.stderr.strip()[-800:]}")
        yield engine
    finally:
        engine.cleanup()


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """The project's image, built from the Dockerfile (about 20 s)."""
    podman.build(IMAGE, COMPOSE_IMAGE)
    return IMAGE


class FakeCloudbedsProcess:
    """`cloudbeds-proxy fake-cloudbeds` on a free loopback port of the host."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "fake-cloudbeds", "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("the fake Cloudbeds answers", lambda: self.state() is not None, 30)

    def state(self) -> dict[str, Any]:
        return dict(get_json(f"{self.url}/_fake/state"))

    def control(self, **changes: Any) -> dict[str, Any]:
        return dict(post_json(f"{self.url}/_fake/control", changes))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeCloudbedsProcess]:
    process = FakeCloudbedsProcess(tmp_path / "fake.log")
    try:
        yield process
    finally:
        process.stop()


class Sidecar:
    """One container of the image, as a sidecar: host network, loopback only."""

    def __init__(self, podman: Podman, image: str, fake: FakeCloudbedsProcess, tmp: Path) -> None:
        self.podman = podman
        self.name = podman.unique("cbproxy")
        self.volume = podman.unique("cbproxy-state")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Secrets only this run knows, so a grep of the image or the logs is meaningful.
        self.refresh_token = f"rt-{secrets.token_hex(16)}"
        self.encryption_key = Fernet.generate_key().decode()
        fake.control(add_refresh_token=self.refresh_token)
        secret_file = tmp / "refresh_token"
        secret_file.write_text(self.refresh_token, encoding="utf-8")
        secret_file.chmod(0o644)
        env = {
            **fake_env(fake.url),
            "CBPROXY_HOST": "127.0.0.1",
            "CBPROXY_PORT": str(self.port),
            "CBPROXY_REFRESH_TOKEN_FILE": "/run/secrets/refresh_token",
            "CBPROXY_ENCRYPTION_KEY": self.encryption_key,
        }
        del env["CBPROXY_REFRESH_TOKEN"]
        del env["CBPROXY_STATE_FILE"]  # the image's own: a path on the host means nothing inside
        podman.run(
            "run",
            "--detach",
            "--name",
            self.name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--volume",
            f"{self.volume}:{STATE_DIR}",
            "--volume",
            f"{secret_file}:/run/secrets/refresh_token:ro",
            *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")),
            image,
        )

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.podman.run("exec", self.name, *command, check=check)

    def inspect(self, template: str) -> str:
        return self.podman.run("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = self.podman.run("logs", self.name, check=False)
        return result.stdout + result.stderr


@pytest.fixture
def sidecar(
    podman: Podman, image: str, fake: FakeCloudbedsProcess, tmp_path: Path
) -> Iterator[Sidecar]:
    container = Sidecar(podman, image, fake, tmp_path)
    try:
        try:
            wait_for(
                "the container answers /_proxy/healthz",
                lambda: get(f"{container.url}/_proxy/healthz", timeout=2)[0] == 200,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{container.logs()[-4000:]}") from None
        yield container
    finally:
        podman.run("rm", "--force", "--time", "0", container.name, check=False)
        podman.run("volume", "rm", "--force", container.volume, check=False)


# --------------------------------------------------------------------------- the image


def test_the_container_proxies_to_a_fake_cloudbeds_on_the_host(
    sidecar: Sidecar, fake: FakeCloudbedsProcess
) -> None:
    wait_for("the proxy in the container is ready", lambda: ready(sidecar.url))
    status, body = get(f"{sidecar.url}/api/v1.3/getHotels")
    assert status == 200, body
    assert json.loads(body)["success"] is True
    state = fake.state()
    assert ["GET", "/api/v1.3/getHotels"] in state["requests_seen"]
    assert state["token_calls"] == {"refresh_token": 1}
    assert state["rejected_calls"] == 0, "the request reached Cloudbeds with a valid token"

    logs = sidecar.logs()
    assert "getHotels" in logs, "the access log goes to the container's output"
    for secret in (sidecar.refresh_token, sidecar.encryption_key, "fake-client-secret"):
        assert secret not in logs


def test_the_container_runs_as_a_non_root_user_on_a_read_only_root(sidecar: Sidecar) -> None:
    assert sidecar.inspect("{{.Config.User}}") == f"{UID}:{UID}"
    assert sidecar.exec("id", "-u").stdout.strip() == UID
    uid_line = sidecar.exec("grep", "^Uid:", "/proc/1/status").stdout.split()
    assert uid_line[1:] == [UID] * 4, "the proxy itself (pid 1), not only exec, is non-root"

    assert sidecar.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    denied = sidecar.exec("touch", "/usr/local/probe", check=False)
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr
    # The state directory (CBPROXY_STATE_FILE) is a volume the user owns.
    assert sidecar.exec("printenv", "CBPROXY_STATE_FILE").stdout.strip() == f"{STATE_DIR}/state.db"
    assert sidecar.exec("touch", f"{STATE_DIR}/probe", check=False).returncode == 0


def test_the_image_healthcheck_passes(sidecar: Sidecar) -> None:
    healthcheck = json.loads(sidecar.inspect("{{json .Config.Healthcheck}}"))
    assert healthcheck and "/_proxy/healthz" in " ".join(healthcheck["Test"])
    result = sidecar.podman.run("healthcheck", "run", sidecar.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stop_lets_a_slow_request_finish_and_exits_zero(
    sidecar: Sidecar, fake: FakeCloudbedsProcess
) -> None:
    wait_for("the proxy in the container is ready", lambda: ready(sidecar.url))
    fake.control(api_delay=4.0)
    answer: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            answer["status"], answer["body"] = get(f"{sidecar.url}/api/v1.3/getHotels", 60)
        except OSError as exc:
            answer["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    try:
        wait_for(
            "the slow request reaches the fake",
            lambda: ["GET", "/api/v1.3/getHotels"] in fake.state()["requests_seen"],
            30,
        )
        # Blocks until the container has exited; SIGKILL only after 30 s, well past the
        # 4 s the request needs.
        sidecar.podman.run("stop", "--time", "30", sidecar.name, timeout=90)
    finally:
        thread.join(90)
    assert answer.get("status") == 200, answer
    assert json.loads(answer["body"])["success"] is True
    assert sidecar.inspect("{{.State.Status}}") == "exited"
    assert sidecar.inspect("{{.State.ExitCode}}") == "0", sidecar.logs()[-2000:]


# Paths that must never be in the image: the test suite, the source tree and the build's
# leftovers (the compiler, pip caches, the machine's pip configuration).
FORBIDDEN_NAMES = {"conftest.py", "pip.conf", "pyproject.toml", "Dockerfile", ".dockerignore"}
COMPILERS = {"gcc", "cc", "c++", "g++", "clang", "x86_64-linux-gnu-gcc"}


def forbidden(path: str, test_files: set[str]) -> str | None:
    """Why the layer member `path` must not be in the image, or None."""
    parts = path.lstrip("./").split("/")
    name = parts[-1]
    if name in FORBIDDEN_NAMES or name in test_files:
        return "a test, source or build file"
    in_bin = len(parts) >= 2 and parts[-2] == "bin"
    if in_bin and (name in COMPILERS or name.startswith("x86_64-linux-gnu-gcc")):
        return "a compiler"
    if name in ("cc1", "cc1plus") or parts[:3] == ["usr", "lib", "gcc"]:
        return "the compiler's own files"
    if ".cache" in parts or name == "wheels" or ".git" in parts or ".venv" in parts:
        return "a cache, a wheelhouse or a work tree"
    return None


def test_the_image_holds_no_test_files_no_compiler_and_no_secrets(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    """Every layer, as `podman save` exports it, after a container ran with secrets."""
    test_files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert "test_container.py" in test_files
    host_bundle = hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest()
    needles = [s.encode() for s in (sidecar.refresh_token, sidecar.encryption_key)]

    archive = tmp_path / "image.tar"
    sidecar.podman.run("save", "--format", "docker-archive", "--output", str(archive), IMAGE)
    findings, members = [], 0
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        layers = manifest[0]["Layers"]
        assert len(layers) >= 2
        config = outer.extractfile(manifest[0]["Config"]).read()  # type: ignore[union-attr]
        findings += [f"image config: {n!r}" for n in needles if n in config]
        if str(HOST_CA_BUNDLE).encode() in config:
            findings.append("image config: the build's CA mount is in the history")
        for layer in layers:
            blob = outer.extractfile(layer)
            assert blob is not None
            with tarfile.open(fileobj=io.BytesIO(blob.read())) as inner:
                for member in inner:
                    members += 1
                    reason = forbidden(member.name, test_files)
                    if reason:
                        findings.append(f"{layer}: {member.name}: {reason}")
                    if not member.isfile():
                        continue
                    data = inner.extractfile(member).read()  # type: ignore[union-attr]
                    if any(n in data for n in needles):
                        findings.append(f"{layer}: {member.name}: a run-time secret")
                    if member.size and hashlib.sha256(data).hexdigest() == host_bundle:
                        findings.append(f"{layer}: {member.name}: the build's CA mount")
    assert members > 1000, "the layers were read"
    assert not findings, "\n".join(findings)


# ------------------------------------------------------------------------------ compose

PROXY_SERVICES = ("proxy-a", "proxy-b")


class ComposeStack:
    """docker-compose.yml under podman-compose, on free loopback ports, uniquely named."""

    def __init__(self, podman: Podman, workdir: Path) -> None:
        self.podman = podman
        self.project = podman.unique("cbptest")
        podman.networks.add(f"{self.project}_default")
        self.ports = {name: free_port() for name in (*PROXY_SERVICES, "fake-cloudbeds")}
        self.override = workdir / "compose.override.yml"
        # The fake rotates refresh tokens, as Cloudbeds may: a store that forgot the
        # rotated one could not refresh again. Ports: free ones instead of 8080/8081.
        self.override.write_text(
            f"""\
services:
  proxy-a:
    ports: !override ["127.0.0.1:{self.ports["proxy-a"]}:8080"]
  proxy-b:
    ports: !override ["127.0.0.1:{self.ports["proxy-b"]}:8080"]
  fake-cloudbeds:
    command: ["fake-cloudbeds", "--host", "0.0.0.0", "--port", "9090", "--rotate-refresh-tokens"]
    ports: ["127.0.0.1:{self.ports["fake-cloudbeds"]}:9090"]
""",
            encoding="utf-8",
        )
        self.fake_url = f"http://127.0.0.1:{self.ports['fake-cloudbeds']}"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in self.podman.env.items() if not k.startswith("COMPOSE_")}
        command = [
            str(Path(sys.executable).parent / "podman-compose"),
            "--podman-args",
            " ".join(self.podman.global_args),
            "--in-pod",
            "false",
            "--project-name",
            self.project,
            "--file",
            str(ROOT / "docker-compose.yml"),
            "--file",
            str(self.override),
            "--profile",
            "demo",
            *args,
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=timeout, env=env
        )
        if result.returncode != 0:
            raise PodmanError(
                f"podman-compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def tokens(self, service: str) -> dict[str, Any]:
        return dict(get_json(f"{self.url(service)}/_proxy/tokens")["default"])

    def wait_ready(self, *services: str) -> None:
        for service in services:
            try:
                wait_for(f"{service} is ready", lambda s=service: ready(self.url(s)))
            except AssertionError as exc:
                readyz = get(f"{self.url(service)}/_proxy/readyz", timeout=3)
                raise AssertionError(f"{exc}\n{readyz}\n{self.logs()}") from None

    def redis_cli(self, *args: str) -> str:
        return self.podman.run("exec", self.container("redis"), "redis-cli", *args).stdout.strip()

    def logs(self) -> str:
        out = []
        for service in ("redis", *PROXY_SERVICES, "fake-cloudbeds"):
            result = self.podman.run("logs", "--tail", "40", self.container(service), check=False)
            out.append(f"--- {service}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return "\n".join(out)


@pytest.fixture
def stack(podman: Podman, image: str, tmp_path: Path) -> Iterator[ComposeStack]:
    compose_tool = Path(sys.executable).parent / "podman-compose"
    if not compose_tool.exists():
        unavailable(f"no podman-compose at {compose_tool} (pip install -e '.[dev]')")
    stack = ComposeStack(podman, tmp_path)
    try:
        # Redis first: podman-compose ignores `condition: service_healthy` before podman
        # 4.6 (and podman runs no healthcheck timers without systemd), and replicas that
        # start before Redis answers would each refresh on their own.
        stack.compose("up", "--detach", "redis")
        wait_for("redis answers", lambda: stack.redis_cli("ping") == "PONG", 30)
        stack.compose("up", "--detach")
        yield stack
    finally:
        with contextlib.suppress(PodmanError, subprocess.TimeoutExpired):
            stack.compose("down", "--volumes", "--timeout", "5")


def proxied(url: str) -> dict[str, Any]:
    status, body = get(f"{url}/api/v1.3/getHotels")
    assert status == 200, body
    return dict(json.loads(body))


def test_compose_replicas_share_one_token_and_redis_keeps_it(stack: ComposeStack) -> None:
    stack.wait_ready(*PROXY_SERVICES)
    first = {service: stack.tokens(service) for service in PROXY_SERVICES}
    assert first["proxy-a"]["generation"] == first["proxy-b"]["generation"]
    assert first["proxy-a"]["expires_at"] == first["proxy-b"]["expires_at"]
    for service in PROXY_SERVICES:
        assert proxied(stack.url(service))["success"] is True
    fake = get_json(f"{stack.fake_url}/_fake/state")
    assert fake["token_calls"] == {"refresh_token": 1}, "one token for both replicas"
    assert fake["valid_access_tokens"] == 1
    assert fake["rejected_calls"] == 0

    # A replica restarted keeps serving, with the token it finds in Redis.
    stack.compose("restart", "proxy-a")
    stack.wait_ready("proxy-a")
    assert stack.tokens("proxy-a")["generation"] == first["proxy-a"]["generation"]
    assert proxied(stack.url("proxy-a"))["success"] is True

    # Everything stops (Cloudbeds, outside the stack, does not); Redis comes back first.
    stack.compose("stop", "--timeout", "30", "proxy-a", "proxy-b", "redis")
    stack.compose("start", "redis")
    wait_for("redis answers", lambda: stack.redis_cli("ping") == "PONG", 30)
    assert stack.redis_cli("config", "get", "appendonly").split() == ["appendonly", "yes"]
    assert int(stack.redis_cli("dbsize")) > 0, "Redis kept the proxies' records"
    stack.compose("start", "proxy-a", "proxy-b")
    stack.wait_ready(*PROXY_SERVICES)
    for service in PROXY_SERVICES:
        after = stack.tokens(service)
        assert after["generation"] == first[service]["generation"], after
        assert after["state"] == "ok", after
        assert proxied(stack.url(service))["success"] is True
    fake = get_json(f"{stack.fake_url}/_fake/state")
    assert fake["token_calls"] == {"refresh_token": 1}, "no new authorisation after the restart"
    assert fake["rejected_calls"] == 0
