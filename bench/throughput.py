"""Throughput and CPU per request: the product against a naive aiohttp proxy, same upstream.

Starts, all on 127.0.0.1:
- an upstream faster than either proxy: nginx (Debian's package) if installed, else the
  bundled fake (`cloudbeds-proxy fake-cloudbeds`, itself aiohttp: then the upstream, not
  the proxy, may be what limits the figures);
- the baseline, `bench/naive_proxy.py` (one ClientSession, body read, Authorization set);
- the product, `cloudbeds-proxy serve` with JSON access logs (to a file), metrics, and a
  private `redis-server` as its store; the rate limiter off (`CBPROXY_RATE_LIMIT=0`);
then loads each proxy in turn (wrk if installed, else an aiohttp load generator) in
interleaved rounds: GET /api/v1.2/getHotels and a 2 KB form POST, at each connection count.

Each proxy is pinned to one core and the load generator (with the upstream and Redis) to
the other. CPU per request is the proxy process's utime+stime delta (/proc/PID/stat) over
the requests it answered in that run. Figures are medians over the rounds.

    .venv/bin/python bench/throughput.py [--duration 5] [--rounds 3] [--connections 32,256]
        [--upstream auto|nginx|fake] [--loadgen auto|wrk|aiohttp]
    .venv/bin/python bench/throughput.py [--duration 5] [--rounds 3] workers
        (serve --workers 2 against --workers 1, nginx and wrk, nothing pinned)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.redis_server import RedisServer
from tests.support import fake_env, free_port

BENCH = Path(__file__).resolve().parent

TOKEN_JSON = '{"access_token":"a","token_type":"Bearer","expires_in":3600,"refresh_token":"r"}'
HOTELS = {
    "success": True,
    "data": [
        {
            "propertyID": "1",
            "organizationID": "1",
            "propertyName": "Fake Hotel",
            "propertyImage": "https://example.com/fake-hotel.jpg",
            "propertyDescription": "A hotel that only exists in tests.",
            "propertyTimezone": "America/New_York",
            "propertyCurrency": [
                {"currencyCode": "USD", "currencySymbol": "$", "currencyPosition": "before"}
            ],
        }
    ],
    "count": 1,
    "total": 1,
}
POSTED = '{"success":true,"reservationID":"BENCH1","status":"confirmed"}'
FORM_TYPE = "application/x-www-form-urlencoded"


def form_body(size: int = 2048) -> bytes:
    """A postReservation form of exactly `size` bytes (the notes field pads it)."""
    fields = {
        "propertyID": "1",
        "startDate": "2024-02-01",
        "endDate": "2024-02-03",
        "guestFirstName": "Ada",
        "guestLastName": "Lovelace",
        "guestEmail": "ada@example.com",
        "guestCountry": "GB",
        "paymentMethod": "cash",
        "notes": "",
    }
    head = urllib.parse.urlencode(fields).encode()
    return head + b"x" * (size - len(head))


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    method: str
    path: str
    body: bytes = b""


SCENARIOS = (
    Scenario("GET getHotels", "GET", "/api/v1.2/getHotels"),
    Scenario("POST form 2KB", "POST", "/api/v1.2/postReservation", form_body()),
)


@dataclasses.dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    errors: int  # socket errors and timeouts
    status_errors: int  # answers with status >= 400
    p50_us: float
    p99_us: float
    cpu_seconds: float  # the proxy's utime+stime over the run

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / max(self.requests, 1) * 1e6

    @property
    def core(self) -> float:
        return self.cpu_seconds / self.seconds


# --- processes ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (its threads included), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned(cmd: list[str], core: int | None) -> list[str]:
    """`cmd` under `taskset -c core` (taskset execs it: the pid stays the same)."""
    if core is None or not shutil.which("taskset"):
        return cmd
    return ["taskset", "-c", str(core), *cmd]


def cores() -> tuple[int | None, int | None]:
    """(load generator's core, proxy's core), or Nones on a one-core machine."""
    mine = sorted(os.sched_getaffinity(0))
    return (mine[0], mine[-1]) if len(mine) >= 2 else (None, None)


class Processes:
    """Every process the bench starts, pinned where it can be; all stopped at exit."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        cmd: list[str],
        core: int | None,
        *,
        out: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        with open(out or os.devnull, "ab") as sink:
            process = subprocess.Popen(
                pinned(cmd, core), stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd
            )
        if core is not None and not shutil.which("taskset"):
            os.sched_setaffinity(process.pid, {core})  # before its first thread, nearly
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.started):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    """Poll `url` until it answers 200; fail if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} after {timeout}s")


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    types {{ }}
    default_type application/json;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
        location = /api/v1.2/getHotels {{ }}
        location = /api/v1.2/postReservation {{ return 200 '{posted}'; }}
        location = /api/v1.3/access_token {{ return 200 '{token}'; }}
    }}
}}
"""


def start_nginx(procs: Processes, tmp: Path, core: int | None) -> tuple[str, str]:
    """nginx serving the three targets; returns (base URL, version)."""
    port = free_port()
    (tmp / "www/api/v1.2").mkdir(parents=True)
    (tmp / "www/api/v1.2/getHotels").write_text(json.dumps(HOTELS))
    tmp.chmod(0o755)  # nginx may read its files as nobody
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, posted=POSTED, token=TOKEN_JSON))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    cmd = [nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
    process = procs.start(cmd, core)
    url = f"http://127.0.0.1:{port}"
    wait_for(url + SCENARIOS[0].path, process, "nginx")
    version = subprocess.run([nginx, "-v"], check=False, capture_output=True, text=True)
    version_text = version.stderr.strip()
    return url, version_text.rpartition("/")[2] or "?"


def start_fake(procs: Processes, core: int | None) -> str:
    port = free_port()
    cmd = [sys.executable, "-m", "proxy", "fake-cloudbeds", "--port", str(port)]
    process = procs.start(cmd, core)
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/_fake/state", process, "fake Cloudbeds")
    return url


def fake_access_token(url: str, env: dict[str, str]) -> str:
    """An access token from the fake, for the naive proxy (the fake checks tokens)."""
    form = {
        "grant_type": "refresh_token",
        "client_id": env["CBPROXY_CLIENT_ID"],
        "client_secret": env["CBPROXY_CLIENT_SECRET"],
        "refresh_token": env["CBPROXY_REFRESH_TOKEN"],
    }
    data = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(f"{url}/api/v1.3/access_token", data, timeout=5) as answer:
        return str(json.load(answer)["access_token"])


def product_env(upstream: str, port: int, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBPROXY_")}
    return {
        **env,
        **fake_env(upstream),  # the fake's credential; nginx answers any token call
        "CBPROXY_HOST": "127.0.0.1",
        "CBPROXY_PORT": str(port),
        "CBPROXY_LOG_FORMAT": "json",
        "CBPROXY_REDIS_URL": redis_url,
        "CBPROXY_REDIS_PREFIX": f"bench{os.getpid()}",
        "CBPROXY_RATE_LIMIT": "0",
    }


# --- load --------------------------------------------------------------------------------

WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"us":%d,"errors":%d,"status_errors":%d,"p50":%d,"p99":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_script(tmp: Path, scenario: Scenario) -> Path:
    path = tmp / f"wrk-{scenario.method.lower()}.lua"
    lines = [f'wrk.method = "{scenario.method}"']
    if scenario.body:
        assert b"]]" not in scenario.body
        lines += [
            f"wrk.body = [[{scenario.body.decode()}]]",
            f'wrk.headers["Content-Type"] = "{FORM_TYPE}"',
        ]
    path.write_text("\n".join(lines) + WRK_DONE)
    return path


def wrk_command(tmp: Path, url: str, scenario: Scenario, conns: int, duration: float) -> list[str]:
    return [
        "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
        "-s", str(wrk_script(tmp, scenario)), url + scenario.path,
    ]  # fmt: skip


def aiohttp_command(url: str, scenario: Scenario, conns: int, duration: float) -> list[str]:
    return [
        sys.executable, str(Path(__file__)), "loadgen", url + scenario.path,
        "--method", scenario.method, "--post-bytes", str(len(scenario.body)),
        "--connections", str(conns), "--duration", str(duration),
    ]  # fmt: skip


def run_load(cmd: list[str], core: int | None, pid: int, timeout: float) -> Result:
    """Run one load generator to its end; the proxy's CPU is read around it."""
    cpu_before = cpu_seconds(pid)
    done = subprocess.run(
        pinned(cmd, core), capture_output=True, text=True, timeout=timeout, check=True
    )
    cpu = cpu_seconds(pid) - cpu_before
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    got = json.loads(line)
    return Result(
        got["requests"], got["us"] / 1e6, got["errors"], got["status_errors"],
        got["p50"], got["p99"], cpu,
    )  # fmt: skip


async def aiohttp_load(
    url: str, method: str, body: bytes, conns: int, duration: float
) -> dict[str, int]:
    """The fallback load generator: `conns` keep-alive connections, each request in turn."""
    import aiohttp  # noqa: PLC0415 (only the child process needs it)

    latencies: list[float] = []
    errors = status_errors = 0
    headers = {"Content-Type": FORM_TYPE} if body else {}
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors, status_errors
            while (started := time.perf_counter()) < deadline:
                try:
                    async with session.request(
                        method, url, data=body or None, headers=headers
                    ) as answer:
                        await answer.read()
                        status_errors += answer.status >= 400
                except (aiohttp.ClientError, OSError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(q: float) -> int:
        return int(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6)

    return {
        "requests": len(latencies), "us": int(elapsed * 1e6), "errors": errors,
        "status_errors": status_errors, "p50": pct(0.50), "p99": pct(0.99),
    }  # fmt: skip


# --- the run -----------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    name: str
    url: str
    process: subprocess.Popen[bytes]


def scrape_requests_total(url: str) -> float:
    """The product's own count of answered requests (cbproxy_requests_total, all labels)."""
    with urllib.request.urlopen(f"{url}/_proxy/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("cbproxy_requests_total{")
    )


def median_result(results: list[Result]) -> dict[str, float]:
    def med(attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results)

    return {
        "rps": med("rps"),
        "p50": med("p50_us") / 1000,
        "p99": med("p99_us") / 1000,
        "cpu": med("cpu_us"),
        "core": med("core") * 100,
        "cpu_min": min(r.cpu_us for r in results),
        "cpu_max": max(r.cpu_us for r in results),
        "errors": sum(r.errors + r.status_errors for r in results),
    }


def print_table(results: dict[tuple[str, int, str], list[Result]]) -> None:
    print(
        f"{'scenario':<15} {'conns':>5} {'proxy':<8} {'req/s':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'CPU us/req':>10} {'(min-max)':>11} {'core %':>7} {'errors':>6}"
    )
    keys = sorted({(s, c) for s, c, _ in results}, key=lambda k: (k[0][0], k[1]))
    for scenario, conns in keys:
        naive = median_result(results[scenario, conns, "naive"])
        product = median_result(results[scenario, conns, "product"])
        for name, m in (("naive", naive), ("product", product)):
            print(
                f"{scenario:<15} {conns:>5} {name:<8} {m['rps']:>8.0f} {m['p50']:>8.2f} "
                f"{m['p99']:>8.2f} {m['cpu']:>10.0f} {m['cpu_min']:>5.0f}-{m['cpu_max']:<5.0f} "
                f"{m['core']:>7.0f} {m['errors']:>6.0f}"
            )
        r = {k: product[k] / naive[k] for k in ("rps", "p50", "p99", "cpu")}
        print(
            f"{scenario:<15} {conns:>5} {'ratio':<8} {r['rps']:>7.2f}x {r['p50']:>7.2f}x "
            f"{r['p99']:>7.2f}x {r['cpu']:>9.2f}x"
        )


def choose(wanted: str, tool: str) -> bool:
    """Whether to use the external `tool` (nginx, wrk) for `wanted` (auto, or its name)."""
    if wanted == "auto":
        return shutil.which(tool) is not None or (
            tool == "nginx" and Path("/usr/sbin/nginx").exists()
        )
    if wanted == tool and not choose("auto", tool):
        raise SystemExit(f"{tool} not found (apt-get install {tool})")
    return wanted == tool


def start_proxies(
    procs: Processes,
    tmp: Path,
    redis_url: str,
    use_nginx: bool,
    cores: tuple[int | None, int | None],
) -> tuple[str, Target, Target]:
    """The upstream and both proxies; returns the upstream's name and the two targets."""
    load_core, proxy_core = cores
    if use_nginx:
        upstream, version = start_nginx(procs, tmp, load_core)
        what = f"nginx {version}"
    else:
        upstream, what = start_fake(procs, load_core), "fake Cloudbeds (aiohttp)"
    env = product_env(upstream, free_port(), redis_url)
    token = "Bearer a" if use_nginx else f"Bearer {fake_access_token(upstream, env)}"
    naive_port = free_port()
    naive_cmd = [sys.executable, str(BENCH / "naive_proxy.py"), "--port", str(naive_port)]
    naive_cmd += ["--upstream", upstream, "--authorization", token]
    naive = Target("naive", f"http://127.0.0.1:{naive_port}", procs.start(naive_cmd, proxy_core))
    serve = [sys.executable, "-m", "proxy", "serve"]
    log = tmp / "product.log"
    product_proc = procs.start(serve, proxy_core, out=log, env=env, cwd=tmp)
    product = Target("product", f"http://127.0.0.1:{env['CBPROXY_PORT']}", product_proc)
    wait_for(naive.url + SCENARIOS[0].path, naive.process, "naive proxy")
    wait_for(product.url + "/_proxy/readyz", product.process, "product")
    return what, naive, product


def process_tree_cpu(pid: int) -> float:
    """utime + stime of `pid` and of its children (the workers of `serve --workers N`)."""
    return cpu_seconds(pid) + sum(cpu_seconds(k) for k in children_of(pid))


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(k) for k in children.read().split()]


def bytes_in_per_process(port: int) -> dict[int, int]:
    """Bytes each process has received on its established connections to `port` (ss -tip).

    wrk sends the same request every time, so a worker's bytes over the request's size are
    its requests: how SO_REUSEPORT spread the load. Empty without `ss`."""
    if not shutil.which("ss"):
        return {}
    cmd = ["ss", "-tinpH", "state", "established", f"sport = :{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    got: dict[int, int] = {}
    pid: int | None = None
    for token in out.split():
        if token.startswith("users:"):
            pid = int(token.split("pid=")[1].split(",")[0])
        elif token.startswith("bytes_received:") and pid is not None:
            got[pid] = got.get(pid, 0) + int(token.split(":")[1])
            pid = None
    return got


def snapshot(into: dict[int, int], port: int) -> None:
    into.update(bytes_in_per_process(port))


def request_bytes(scenario: Scenario, host: str) -> int:
    """The size of wrk's request for `scenario` (no body): its head as wrk writes it."""
    return len(f"{scenario.method} {scenario.path} HTTP/1.1\r\nHost: {host}\r\n\r\n")


def run_workers(args: argparse.Namespace) -> None:
    """`serve --workers 1` against `--workers 2`, nothing pinned: the scaling on all cores.

    Both serve at once (each its own port and Redis prefix) and take turns under the same
    load (GET at the last connection count), in interleaved rounds; req/s and CPU per
    request of all the workers together, medians over the rounds.
    """
    conns = int(args.connections.split(",")[-1])
    scenario = SCENARIOS[0]
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="cbproxy-workers-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer()
        try:
            redis.start()
            upstream, version = start_nginx(procs, tmp, None)
            nginx_pid = procs.started[-1].pid
            load_us: dict[int, list[float]] = {1: [], 2: []}
            serving: dict[int, Target] = {}
            for workers in (1, 2):
                env = product_env(upstream, free_port(), redis.url)
                env["CBPROXY_REDIS_PREFIX"] += f"w{workers}"
                cmd = [sys.executable, "-m", "proxy", "serve", "--workers", str(workers)]
                out = tmp / f"workers-{workers}.log"
                process = procs.start(cmd, None, out=out, env=env, cwd=tmp)
                url = f"http://127.0.0.1:{env['CBPROXY_PORT']}"
                wait_for(url + "/_proxy/readyz", process, f"serve --workers {workers}")
                serving[workers] = Target(f"workers={workers}", url, process)
            cores_ = os.cpu_count()
            print(f"upstream: nginx {version}; wrk -t2 -c{conns}, nothing pinned; {cores_} cores")
            results: dict[int, list[Result]] = {1: [], 2: []}
            for round_no in range(args.rounds + 1):  # the first round warms up
                for workers in (1, 2) if round_no % 2 == 0 else (2, 1):
                    target = serving[workers]
                    cmd = wrk_command(tmp, target.url, scenario, conns, args.duration)
                    cmd[1] = "-t2"
                    pids = children_of(target.process.pid) or [target.process.pid]
                    before = {p: cpu_seconds(p) for p in pids}
                    load_before = children_cpu() + cpu_seconds(nginx_pid)
                    port = int(target.url.rpartition(":")[2])
                    # Near the end of the run, while wrk's connections are still open.
                    seen: dict[int, int] = {}
                    timer = threading.Timer(args.duration - 0.3, snapshot, (seen, port))
                    timer.start()
                    got = run_load(cmd, None, target.process.pid, args.duration + 30)
                    timer.join()
                    load_cpu = children_cpu() + cpu_seconds(nginx_pid) - load_before
                    per_cpu = {p: cpu_seconds(p) - before[p] for p in pids}
                    result = dataclasses.replace(got, cpu_seconds=sum(per_cpu.values()))
                    if round_no:
                        results[workers].append(result)
                        load_us[workers].append(load_cpu / max(got.requests, 1) * 1e6)
                    size = request_bytes(scenario, target.url.removeprefix("http://"))
                    split = ", ".join(
                        f"pid {p}: {per_cpu[p]:.2f} s CPU, ~{seen.get(p, 0) // size} req"
                        for p in pids
                    )
                    print(
                        f"  round {round_no} {target.name}: {result.rps:.0f} req/s, "
                        f"{result.cpu_us:.0f} us CPU/req ({split})",
                        flush=True,
                    )
        finally:
            procs.stop_all()
            redis.stop()
    one, two = median_result(results[1]), median_result(results[2])
    print(
        f"{'workers':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10} {'errors':>6}"
    )
    for name, m in (("1", one), ("2", two)):
        print(
            f"{name:<8} {m['rps']:>8.0f} {m['p50']:>8.2f} {m['p99']:>8.2f} {m['cpu']:>10.0f} "
            f"{m['errors']:>6.0f}"
        )
    print(f"{'2 / 1':<8} {two['rps'] / one['rps']:>7.2f}x")
    # wrk and nginx share the cores with the workers: two workers can at most reach the
    # cores' CPU over what a request costs the proxy and the load together.
    load = statistics.median(load_us[2])
    ceiling = (os.cpu_count() or 1) * 1e6 / (two["cpu"] + load)
    print(
        f"wrk and nginx: {load:.0f} us CPU/req; on {os.cpu_count()} cores two workers can reach "
        f"at most {ceiling:.0f} req/s ({ceiling / one['rps']:.2f}x one worker), "
        f"and reached {two['rps'] / ceiling:.0%} of it"
    )


def children_cpu() -> float:
    """utime + stime of this process's finished children (each wrk run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> None:
    load_core, proxy_core = cores()
    use_nginx, use_wrk = choose(args.upstream, "nginx"), choose(args.loadgen, "wrk")
    conn_counts = [int(c) for c in args.connections.split(",")]
    runs = args.rounds * len(SCENARIOS) * len(conn_counts) * 2
    seconds = runs * args.duration + 2 * len(SCENARIOS) * args.warmup + 10
    print(f"load average before: {loadavg()} ({os.cpu_count()} cores); about {seconds:.0f} s")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="cbproxy-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer()  # private, on a free port; the request path never touches it
        try:
            redis.start()
            what, naive, product = start_proxies(
                procs, tmp, redis.url, use_nginx, (load_core, proxy_core)
            )
            print(
                f"upstream: {what}; load: {'wrk -t1' if use_wrk else 'aiohttp client'} on core "
                f"{load_core}; each proxy on core {proxy_core}; {args.rounds} rounds x "
                f"{args.duration:g} s, interleaved",
                flush=True,
            )
            results = measure(args, tmp, conn_counts, use_wrk, load_core, (naive, product))
            counted = scrape_requests_total(product.url)
            logged = (tmp / "product.log").read_bytes()  # before the profile's requests
            lines = logged.count(b"\n")
            if args.profile:
                profile(args, tmp, conn_counts[0], use_wrk, load_core, (naive, product))
        finally:
            procs.stop_all()
            redis.stop()
        print_table(results)
        print(
            f"product: {counted:.0f} requests in cbproxy_requests_total and {lines} log lines "
            f"({len(logged) / max(lines, 1):.0f} bytes each), warm-ups included"
        )
    print(f"load average after: {loadavg()}")


def measure(
    args: argparse.Namespace,
    tmp: Path,
    conn_counts: list[int],
    use_wrk: bool,
    load_core: int | None,
    targets: tuple[Target, Target],
) -> dict[tuple[str, int, str], list[Result]]:
    def one(target: Target, scenario: Scenario, conns: int, duration: float) -> Result:
        if use_wrk:
            cmd = wrk_command(tmp, target.url, scenario, conns, duration)
        else:
            cmd = aiohttp_command(target.url, scenario, conns, duration)
        return run_load(cmd, load_core, target.process.pid, timeout=duration + 30)

    for target in targets:  # warm both: pools filled, code paths hot
        for scenario in SCENARIOS:
            one(target, scenario, conn_counts[-1], args.warmup)
    results: dict[tuple[str, int, str], list[Result]] = {}
    for round_no in range(args.rounds):
        for scenario in SCENARIOS:
            for conns in conn_counts:
                # Alternate who goes first, so a drift in the machine's load hits both.
                order = targets if round_no % 2 == 0 else targets[::-1]
                for target in order:
                    result = one(target, scenario, conns, args.duration)
                    results.setdefault((scenario.name, conns, target.name), []).append(result)
                    print(
                        f"  round {round_no + 1} {scenario.name} c={conns} {target.name}: "
                        f"{result.rps:.0f} req/s, {result.cpu_us:.0f} us CPU/req",
                        flush=True,
                    )
    return results


def profile(
    args: argparse.Namespace,
    tmp: Path,
    conns: int,
    use_wrk: bool,
    load_core: int | None,
    targets: tuple[Target, Target],
) -> None:
    """One more run of each scenario on each proxy under `py-spy record` (raw stacks)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args.profile.mkdir(parents=True, exist_ok=True)
    for scenario in SCENARIOS:
        for target in targets:
            out = args.profile / f"{target.name}-{scenario.method.lower()}-c{conns}.txt"
            result = profile_one(args, tmp, spy, out, target, scenario, conns, use_wrk, load_core)
            print(f"profile of {target.name}, {scenario.name} c={conns}: {result.rps:.0f} req/s")
            summarize(out, result.cpu_us)


def profile_one(
    args: argparse.Namespace,
    tmp: Path,
    spy: str,
    out: Path,
    target: Target,
    scenario: Scenario,
    conns: int,
    use_wrk: bool,
    load_core: int | None,
) -> Result:
    pid = target.process.pid
    # Blocking (py-spy's default): --nonblocking samples torn stacks under this load.
    record = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
    record += ["--duration", str(round(args.profile_seconds)), "-o", str(out)]
    recorder = subprocess.Popen(
        pinned(record, load_core), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)  # py-spy attaches
        seconds = args.profile_seconds - 1
        if use_wrk:
            cmd = wrk_command(tmp, target.url, scenario, conns, seconds)
        else:
            cmd = aiohttp_command(target.url, scenario, conns, seconds)
        result = run_load(cmd, load_core, pid, seconds + 30)
        recorder.wait(30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    return result


# Where a request's time goes: (label, frames any of which puts a sample in). Inclusive and
# overlapping by design (an indented line is part of the line above it).
BUCKETS = (
    (
        "request handler, all (middleware.request_middleware; naive: its handle)",
        ("request_middleware (proxy/", "handle (naive_proxy.py"),
    ),
    ("  access line (middleware._access)", ("_access (proxy/middleware",)),
    ("  metrics (prometheus_client, inc/observe)", ("(prometheus_client/",)),
    ("  target check (headers.check_target)", ("check_target (proxy/headers",)),
    ("  routing (registry.find)", ("Registry.find (proxy/",)),
    ("  token and limiter (header(), admit())", (".header (proxy/", "Limiter.admit (proxy/")),
    (
        "  request body (Forwarder._body; naive: request.read)",
        ("Forwarder._body (proxy/", "BaseRequest.read ("),
    ),
    (
        "  header rules (headers.py: upstream/downstream_headers_of, head check)",
        (
            "upstream_headers_of (proxy/",
            "downstream_headers_of (proxy/",
            "check_answer_head (proxy/",
        ),
    ),
    (
        "  upstream call (upstream.Upstream.send; naive: ClientSession._request)",
        ("Upstream.send (proxy/", "ClientSession._request ("),
    ),
    ("  answer back (Forwarder._relay)", ("Forwarder._relay (proxy/",)),
    (
        "answer's head written (StreamResponse.prepare, in or after the handler)",
        ("Response.prepare (",),
    ),
    ("log lines written (logs.TickWriter.drain, once a loop turn)", ("TickWriter.drain (proxy/",)),
    ("routing, aiohttp URL dispatcher (UrlDispatcher.resolve)", ("UrlDispatcher.resolve (",)),
    ("aiohttp server, request parsing (RequestHandler.data_received)", ("RequestHandler.data_",)),
    ("aiohttp client, answer parsing (ResponseHandler.data_received)", ("ResponseHandler.data_",)),
    ("event loop: select, call_soon/call_later, task steps", ("EpollSelector.select",)),
)


def summarize(path: Path, cpu_us: float | None = None, top: int = 12) -> None:
    """Shares of py-spy's raw stacks (`func (file:line);... count`) per bucket, and self time."""
    samples: list[tuple[frozenset[str], str, int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.rpartition(":")[0] + ")" if ":" in f else f for f in stack.split(";")]
        samples.append((frozenset(frames), frames[-1], int(count)))
    total = sum(n for _, _, n in samples) or 1
    per = f"{'us/req':>7}" if cpu_us else ""
    print(
        f"{path.name}: {total} samples (busy only){'; us = share of CPU us/req' if cpu_us else ''}"
    )
    print(f"  {'share':>6} {per}  where")
    for label, needles in BUCKETS:
        n = sum(c for fs, _, c in samples if any(x in f for f in fs for x in needles))
        us = f"{n / total * cpu_us:>7.0f}" if cpu_us else ""
        print(f"  {100 * n / total:>5.1f}% {us}  {label}")
    leaves: dict[str, int] = {}
    for _, leaf, n in samples:
        leaves[leaf] = leaves.get(leaf, 0) + n
    print("  self time, top functions:")
    for leaf, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * n / total:>5.1f}%  {leaf}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--duration", type=float, default=5, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=1, help="seconds per warm-up run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="32,256")
    parser.add_argument("--upstream", choices=("auto", "nginx", "fake"), default="auto")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument(
        "--profile", type=Path, help="then profile the product with py-spy, stacks into this dir"
    )
    parser.add_argument("--profile-seconds", type=float, default=8)
    load = sub.add_parser("loadgen", help="(internal) the aiohttp load generator")
    load.add_argument("url")
    load.add_argument("--method", default="GET")
    load.add_argument("--post-bytes", type=int, default=0)
    load.add_argument("--connections", type=int, default=32)
    load.add_argument("--duration", type=float, default=5)
    sub.add_parser(
        "workers", help="serve --workers 2 against --workers 1, unpinned (GET, last --connections)"
    )
    summary = sub.add_parser("summarize", help="shares of a profile that --profile wrote")
    summary.add_argument("stacks", type=Path)
    summary.add_argument("--cpu-us", type=float, help="CPU us per request, to convert shares")
    return parser.parse_args(argv)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every process started is stopped."""

    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    args = parse()
    if args.command == "loadgen":
        body = form_body(args.post_bytes) if args.post_bytes else b""
        got = asyncio.run(
            aiohttp_load(args.url, args.method, body, args.connections, args.duration)
        )
        print(json.dumps(got))
        return
    if args.command == "summarize":
        summarize(args.stacks, args.cpu_us)
        return
    if args.command == "workers":
        with stop_on_sigterm():
            run_workers(args)
        return
    with stop_on_sigterm():
        run(args)


if __name__ == "__main__":
    main()
