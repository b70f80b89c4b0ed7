"""Podman for the container tests: private storage, base images built with no registry.

No registry is reachable here, so the base images come from Debian's archive through
mmdebstrap (`bookworm-python` stands in for `python:3.11-slim`, one with Debian's
redis-server for `redis:7-alpine`). Their root filesystems are cached as tarballs
under CACHE_DIR, keyed by the recipe and the apt sources, and imported into a private
`--root`/`--runroot` per test session, so the tests never touch the machine's own
images and containers and remove everything they made.

`python -m tests.containers prepare` fills the cache (what `.ci/run` does); the
session fixture fills it too when it is empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("CBPROXY_CONTAINER_CACHE", "/var/cache/cloudbeds-proxy-containers"))
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# crun refuses this host's mixed cgroup layout; podman's default ulimits are above what
# root may set here; journald is not running.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@dataclass(frozen=True)
class BaseImage:
    """A Debian root filesystem built by mmdebstrap and imported under `tag`."""

    name: str
    tag: str
    packages: tuple[str, ...]
    hooks: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()

    def key(self) -> str:
        """What the cached tarball depends on: the recipe and the apt sources."""
        sources = APT_SOURCES.read_bytes() if APT_SOURCES.exists() else b""
        recipe = json.dumps([self.packages, self.hooks], sort_keys=True).encode()
        return hashlib.sha256(recipe + sources).hexdigest()[:16]

    def tarball(self) -> Path:
        return CACHE_DIR / f"{self.name}-{self.key()}.tar"


PYTHON_BASE = BaseImage(
    name="bookworm-python",
    tag="localhost/bookworm-python",
    packages=("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates"),
    # The image's pip installs system-wide, as python:3.11-slim's does.
    hooks=('rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED',),
)
# The compose file names redis:7-alpine; Debian's redis-server (7.0) stands in for it.
# The official image is built with protected mode off (in a container the clients come
# from other addresses than loopback); Debian's binary has it on, so a wrapper earlier
# on PATH turns it off after any other option.
REDIS_WRAPPER = '#!/bin/sh\nexec /usr/bin/redis-server "$@" --protected-mode no\n'
REDIS_BASE = BaseImage(
    name="bookworm-redis",
    tag="docker.io/library/redis:7-alpine",
    packages=("redis-server",),
    hooks=(
        f"printf '{REDIS_WRAPPER}' > \"$1\"/usr/local/bin/redis-server",
        'chmod 0755 "$1"/usr/local/bin/redis-server',
    ),
    changes=('CMD ["redis-server"]', "WORKDIR /data"),
)
BASES = (PYTHON_BASE, REDIS_BASE)
REQUIRED_TOOLS = ("podman", "runc", "mmdebstrap")


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


def containers_conf() -> Path:
    """The containers.conf every podman call here uses (CONTAINERS_CONF)."""
    path = CACHE_DIR / "containers.conf"
    if not path.exists() or path.read_text(encoding="utf-8") != CONTAINERS_CONF:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{uuid.uuid4().hex}")
        partial.write_text(CONTAINERS_CONF, encoding="utf-8")
        partial.replace(path)
    return path


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One builder of the cache at a time, across sessions and `.ci/run`."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_tarball(base: BaseImage) -> Path:
    """The cached root filesystem of `base`, built with mmdebstrap (~45 s) when absent."""
    target = base.tarball()
    with cache_lock():
        if target.exists():
            return target
        partial = CACHE_DIR / f".{target.stem}.partial-{uuid.uuid4().hex}.tar"
        command = [
            "mmdebstrap",
            "--quiet",
            "--format=tar",
            "--variant=apt",
            f"--include={','.join(base.packages)}",
            *(f"--customize-hook={hook}" for hook in base.hooks),
            "bookworm",
            str(partial),
            str(APT_SOURCES),
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, check=False, timeout=900
            )
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        for stale in CACHE_DIR.glob(f"{base.name}-*.tar"):
            if stale != target:
                stale.unlink(missing_ok=True)
    return target


class PodmanError(AssertionError):
    """A podman command failed; carries its output."""


class Podman:
    """podman with a private storage root under `workdir`; `cleanup()` removes it all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.runroot = workdir / "run"
        self.env = {
            key: value for key, value in os.environ.items() if not key.startswith("CBPROXY_")
        }
        self.env["CONTAINERS_CONF"] = str(containers_conf())
        self.global_args = ["--root", str(self.root), "--runroot", str(self.runroot)]
        self.networks: set[str] = set()

    def command(self, *args: str) -> list[str]:
        return ["podman", *self.global_args, *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=self.env,
            input=None if input is None else input.decode(),
        )
        if check and result.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def import_base(self, base: BaseImage) -> None:
        changes = [arg for change in base.changes for arg in ("--change", change)]
        self.run("import", "--quiet", *changes, str(ensure_tarball(base)), base.tag, timeout=300)

    def build(self, tag: str, *extra_tags: str) -> None:
        """Build the project's Dockerfile on the local Debian base, with no registry.

        pip in the build steps reaches the package index the way this machine does: the
        machine's CA bundle is mounted read-only over the base's own (an existing file,
        so not even an empty mount point is left in a layer), and Debian's pip reads it.
        """
        tags = [arg for name in (tag, *extra_tags) for arg in ("--tag", name)]
        self.run(
            "build",
            "--quiet",
            "--format",
            "docker",  # the OCI format has no HEALTHCHECK
            "--pull=never",
            "--build-arg",
            f"BASE_IMAGE={PYTHON_BASE.tag}",
            "--volume",
            f"{HOST_CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro",
            *tags,
            str(ROOT),
            timeout=600,
        )

    def cleanup(self) -> None:
        """Remove every container, pod, volume, network and image made here, then the root."""
        errors = []
        for args in (
            ("pod", "rm", "--all", "--force"),
            ("rm", "--all", "--force", "--time", "0"),
            ("volume", "rm", "--all", "--force"),
            *(("network", "rm", "--force", name) for name in sorted(self.networks)),
            ("rmi", "--all", "--force"),
        ):
            result = self.run(*args, check=False, timeout=180)
            if result.returncode != 0 and "no such" not in result.stderr.lower():
                errors.append(f"podman {' '.join(args)}: {result.stderr.strip()}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise PodmanError("\n".join(errors))

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"


def prepare(bases: Sequence[BaseImage] = BASES) -> None:
    """Fill the cache: containers.conf and every base image's tarball."""
    containers_conf()
    for base in bases:
        ensure_tarball(base)
        print(f"{base.tag}: {base.tarball()}")


if __name__ == "__main__":
    if sys.argv[1:] != ["prepare"]:
        sys.exit("usage: python -m tests.containers prepare")
    prepare()
