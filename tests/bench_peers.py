#!/usr/bin/env python3
"""tests/bench_peers.py: proxypal.py against peer LLM proxies, same machine, same run.

Every server talks to the same mock upstream (tests/bench.py's) under the same load client
(bench.run_load), one server after another within each run:
    direct     the load client calls the mock itself: the reference
    proxypal   proxypal.py (--proxy FILE, default the repository's)
    litellm    LiteLLM proxy (PyPI litellm[proxy]), provider openai: OpenAI and Anthropic
    ccr        claude-code-router (npm @musistudio/claude-code-router): Anthropic only
    portkey    Portkey AI gateway (npm @portkey-ai/gateway): OpenAI only

Rows, for each server that speaks the client's API; every stream is the mock's 200-event
stream written at once ("burst"); a translated row's direct is the mock's OpenAI stream:
    non-stream openai->openai, c=16     requests/s, CPU us/request, p50 added over direct
    stream openai->openai, c=32         upstream events/s, CPU us per upstream event
    stream anthropic->openai, c=32      the same, the client speaking Anthropic Messages
    first event, c=1, both APIs         p50 time to the first SSE event, and added over
                                        direct (bench.py's paced "sent alone" mode can't be
                                        used: ccr and portkey drop the mock's pacing field)
    idle RSS MB; start s                after the first requests; spawn to first answers

CPU and RSS are of the server's process tree (it and its descendants, from /proc; RSS
counts shared pages once per process); the load client and the mock are not counted.
Cells are min/median/max over --runs; "x" is peer / proxypal, medians. Every answer under
load is checked (status 200, the mock's content, a stream ending in [DONE] or
message_stop) and once a run one answer per API and mode is parsed whole
(bench.shape_problem); failures are counted and printed per server, never averaged in.

Peers are installed on first use, pinned, under ~/.cache/proxypal-bench/<peer> (a venv,
or an npm folder; never into the repository) and run with HOME=~/.cache/proxypal-bench/
home-<peer>, so the user's own files are untouched. A peer that fails to install or to
start is skipped, the reason printed.

    python3 tests/bench_peers.py                  # 3 runs, all peers: ~3 min (+1 to install)
    python3 tests/bench_peers.py --runs 1 --peers litellm,ccr
    python3 tests/bench_peers.py --proxy /tmp/other/proxypal.py --no-install
Standard library only; loopback only (Portkey's gateway has no option for its listening
address and listens on all). Exits 0 unless the bench itself broke.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (tests/bench.py: mock, load client, /proc readings)

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "proxypal-bench")
START_TIMEOUT = 120.0              # a peer's spawn to its first good answers
INSTALL_TIMEOUT = 900.0
HOST = bench.HOST
bench.TIMEOUT = 30.0               # bench's bound on a warm-up round: LiteLLM needs ~6 s
                                   # for one round of 32 streams on 2 cores
BOTH = ("openai", "anthropic")


# --- Process trees, and two hooks into bench: CPU of a tree, extra request headers.

def tree_pids(root: int) -> List[int]:
    """root and its descendants, from the ppid field of /proc/*/stat."""
    children: Dict[int, List[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    pids, todo = [], [root]
    while todo:
        pids.append(todo.pop())
        todo += children.get(pids[-1], [])
    return pids


def tree_cpu_mark(pid: Optional[int]) -> Optional[bench.CpuMark]:
    """bench.cpu_mark summed over a process tree; `process` adds the reaped children's
    cutime+cstime, so a worker that exits meanwhile still counts."""
    if not pid or cpu_mark_one(pid) is None:
        return None
    threads: Optional[float] = 0.0
    process = 0.0
    for member in tree_pids(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                process += sum(map(int, f.read().rsplit(")", 1)[1].split()[11:15])) * bench.TICK
        except (OSError, ValueError):
            continue
        mark = cpu_mark_one(member)
        if threads is not None:
            threads = None if mark is None or mark.threads is None else threads + mark.threads
    return bench.CpuMark(threads, process)


def tree_rss_mb(pid: int) -> Optional[float]:
    sizes = [bench.rss_mb(p) for p in tree_pids(pid)]
    return sum(s for s in sizes if s is not None) if sizes[0] is not None else None


EXTRA_HEADERS: Dict[int, str] = {}    # port -> header lines its server needs on every request


def request_bytes(port: int, call: bench.Call) -> bytes:
    data = request_bytes_one(port, call)
    extra = EXTRA_HEADERS.get(port)
    return data.replace(b"\r\n", b"\r\n" + extra.encode(), 1) if extra else data


cpu_mark_one, bench.cpu_mark = bench.cpu_mark, tree_cpu_mark    # run_load reads CPU by it
request_bytes_one, bench.request_bytes = bench.request_bytes, request_bytes  # bench.Client


# --- Peers: install, version, command line. Subclasses set the class attributes and
# command(port, mock_port, home) -> (argv, extra environment).

class Peer:
    name, apis, note = "", (), ""      # apis: the client APIs it serves

    def folder(self) -> str:
        return os.path.join(CACHE, self.name)

    def headers(self, mock_port: int) -> str:
        return ""


def run(argv: List[str], cwd: str) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if done.returncode:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines()
                 if ln.strip() and "is ignored" not in ln]
        raise bench.BenchError(f"{' '.join(argv[:4])} failed: " + " | ".join(lines[-3:]))


class LiteLLM(Peer):
    name, apis = "litellm", BOTH
    spec = "litellm[proxy]==1.108.7"   # the newest pip resolves here: 1.110.2's [proxy]
                                       # needs litellm-proxy, which the index lacks
    note = ("uvicorn as its CLI starts it (1 process, access log on, to a file); master_key = "
            "the bench's key; use_chat_completions_url_for_anthropic_messages (else /v1/messages "
            "calls the upstream's /v1/responses); LITELLM_LOCAL_MODEL_COST_MAP=True (no download)")

    def exe(self) -> str:
        return os.path.join(self.folder(), "bin", "litellm")

    def install(self) -> None:
        run([sys.executable, "-m", "venv", self.folder()], CACHE)
        run([os.path.join(self.folder(), "bin", "pip"), "install", "-q", self.spec], CACHE)

    def version(self) -> str:
        return subprocess.run([os.path.join(self.folder(), "bin", "python"), "-c",
                               "import importlib.metadata as m; print(m.version('litellm'))"],
                              capture_output=True, text=True, timeout=60).stdout.strip()

    def command(self, port: int, mock_port: int, home: str) -> Tuple[List[str], Dict[str, str]]:
        config = os.path.join(home, "litellm.yaml")
        with open(config, "w") as f:
            f.write(f"model_list:\n  - model_name: {bench.MODEL}\n    litellm_params:\n"
                    f"      model: openai/{bench.MODEL}\n"
                    f"      api_base: http://{HOST}:{mock_port}/v1\n      api_key: k\n"
                    "litellm_settings:\n  use_chat_completions_url_for_anthropic_messages: true\n"
                    f"general_settings:\n  master_key: {bench.LOCAL_KEY}\n"
                    "  dangerously_permit_weak_or_unset_master_key: true\n")
        return ([self.exe(), "--config", config, "--host", HOST, "--port", str(port)],
                {"LITELLM_LOCAL_MODEL_COST_MAP": "True"})


class NpmPeer(Peer):
    package, bin, overrides = "", "", {}

    def exe(self) -> str:
        return os.path.join(self.folder(), "node_modules", ".bin", self.bin)

    def install(self) -> None:
        os.makedirs(self.folder(), exist_ok=True)
        name, _, pinned = self.package.rpartition("@")
        with open(os.path.join(self.folder(), "package.json"), "w") as f:
            json.dump({"private": True, "dependencies": {name: pinned},
                       "overrides": self.overrides}, f)
        run(["npm", "install", "--no-audit", "--no-fund"], self.folder())

    def version(self) -> str:
        name = self.package.rpartition("@")[0]
        with open(os.path.join(self.folder(), "node_modules", name, "package.json")) as f:
            return json.load(f)["version"]


class Ccr(NpmPeer):
    name, apis, bin = "ccr", ("anthropic",), "ccr"
    package = "@musistudio/claude-code-router@2.0.0"   # 3.1.1 needs @the-next-ai/ai-gateway,
                                                       # which the registry does not serve
    note = ("`ccr start` (it stays in the foreground); LOG false: its default writes a "
            "debug log line per request to files; Router.default = the mock's model")

    def command(self, port: int, mock_port: int, home: str) -> Tuple[List[str], Dict[str, str]]:
        folder = os.path.join(home, ".claude-code-router")
        os.makedirs(folder, exist_ok=True)
        provider = {"name": "mock", "api_key": "k", "models": [bench.MODEL],
                    "api_base_url": f"http://{HOST}:{mock_port}/v1/chat/completions"}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"PORT": port, "HOST": HOST, "LOG": False, "NON_INTERACTIVE_MODE": True,
                       "Providers": [provider], "Router": {"default": f"mock,{bench.MODEL}"}}, f)
        pid_file = os.path.join(folder, ".claude-code-router.pid")
        if os.path.exists(pid_file):
            os.remove(pid_file)              # a stale one makes `ccr start` think it runs
        return [self.exe(), "start"], {}


class Portkey(NpmPeer):
    name, apis, bin = "portkey", ("openai",), "gateway"
    package = "@portkey-ai/gateway@1.15.2"
    # The versions in the gateway's own package-lock.json: with a newer @hono/node-server
    # every stream fails, "TypeError: immutable" (Portkey-AI/gateway#1389).
    overrides = {"@hono/node-server": "1.13.5", "hono": "4.9.7"}
    note = ("`gateway --headless`; provider openai, custom host the mock, as x-portkey-* "
            "headers on every request; @hono/node-server 1.13.5 and hono 4.9.7 pinned")

    def command(self, port: int, mock_port: int, home: str) -> Tuple[List[str], Dict[str, str]]:
        return [self.exe(), f"--port={port}", "--headless"], {}

    def headers(self, mock_port: int) -> str:
        return (f"x-portkey-provider: openai\r\n"
                f"x-portkey-custom-host: http://{HOST}:{mock_port}/v1\r\n")


PEERS = {peer.name: peer for peer in (LiteLLM(), Ccr(), Portkey())}


# --- Rows: what the clients send; direct sends the mock's own OpenAI request.

def loose(call: bench.Call) -> bench.Call:
    """A stream call that accepts re-framing: every text delta and the frame of the
    client's API, up to 4x the upstream's events (a usage chunk, pings)."""
    least = bench.text_deltas("openai") + (5 if call.api == "anthropic" else 2)
    return call._replace(min_events=least, max_events=4 * bench.UPSTREAM_EVENTS)


OPENAI_STREAM = loose(bench.chat_call("openai", bench.MODEL, True))
ANTHROPIC_STREAM = loose(bench.chat_call("anthropic", bench.MODEL, True))
METRICS = {"requests": ("requests/s", "CPU us/request", "p50 added ms"),
           "stream": ("upstream events/s", "CPU us/upstream event"),
           "first": ("p50 ms", "p50 added ms")}


class Row(NamedTuple):
    name: str
    call: bench.Call
    concurrency: int
    kind: str                          # a key of METRICS

    def keys(self) -> List[str]:
        return [f"{self.name}: {metric}" for metric in METRICS[self.kind]]


ROWS = (Row("non-stream openai->openai c=16", bench.CHAT, 16, "requests"),
        Row("stream openai->openai c=32", OPENAI_STREAM, 32, "stream"),
        Row("stream anthropic->openai c=32", ANTHROPIC_STREAM, 32, "stream"),
        Row("first event openai->openai c=1", OPENAI_STREAM, 1, "first"),
        Row("first event anthropic->openai c=1", ANTHROPIC_STREAM, 1, "first"))
IDLE_RSS, START = "idle RSS MB (process tree)", "start s (spawn to first answers)"
CHECK_PAIRS = {"openai": bench.OPENAI, "anthropic": bench.StreamPair("anthropic", "openai")}


class Server(NamedTuple):
    name: str
    apis: Tuple[str, ...]
    port: int
    proc: Optional[subprocess.Popen]   # None: direct


# --- Start and stop servers.

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def first_answers(port: int, apis: Tuple[str, ...]) -> str:
    """"" once one non-stream answer in each API came back good, else the error."""
    async def ask() -> None:
        for api in apis:
            client = bench.Client(port, bench.chat_call(api, bench.MODEL, False))
            try:
                await asyncio.wait_for(client.exchange(), bench.TIMEOUT)
            finally:
                client.close()
    try:
        asyncio.run(ask())
        return ""
    except bench.CLIENT_ERRORS + (asyncio.TimeoutError,) as exc:
        return f"{type(exc).__name__}: {exc}"


def start_peer(peer: Peer, mock_port: int, log_path: str) -> Tuple[Server, float]:
    """Spawn the peer in a process group of its own; wait for its first good answers."""
    port, home = free_port(), os.path.join(CACHE, f"home-{peer.name}")
    os.makedirs(home, exist_ok=True)
    argv, env = peer.command(port, mock_port, home)
    EXTRA_HEADERS[port] = peer.headers(mock_port)
    t0 = time.perf_counter()
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, cwd=home, env=dict(os.environ, HOME=home, **env),
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise bench.BenchError(f"{peer.name} did not start: {exc}") from None
    server, problem = Server(peer.name, peer.apis, port, proc), "no answer"
    while time.perf_counter() - t0 < START_TIMEOUT and proc.poll() is None:
        problem = first_answers(port, peer.apis)
        if not problem:
            return server, time.perf_counter() - t0
        time.sleep(0.25)
    why = (f"exited with code {proc.returncode}" if proc.returncode is not None
           else f"no good answer within {START_TIMEOUT:g} s: {problem[:300]}")
    stop_server(server)
    with open(log_path, errors="replace") as f:
        tail = "".join(f"\n  {peer.name}: {line[:200]}" for line in f.read().splitlines()[-5:])
    raise bench.BenchError(f"{peer.name} did not start: {why}{tail}")


def stop_server(server: Server) -> None:
    """proxypal: bench.stop_child. A peer: SIGTERM to its process group (its own, from
    start_new_session), SIGKILL if it still runs 10 s later."""
    proc = server.proc
    if server.name == "proxypal":
        bench.stop_child(proc)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(10.0)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


# --- One run.

async def measure_row(results: bench.Results, row: Row, servers: List[Server],
                      duration: float) -> None:
    bench.progress(f"  {row.name}")
    p50: Dict[str, float] = {}
    for server in servers:
        if row.call.api not in server.apis:
            continue
        call, pid = (row.call, server.proc.pid) if server.proc else (
            OPENAI_STREAM if row.call.api == "anthropic" else row.call, None)   # direct: OpenAI
        try:
            phase = await bench.run_load(server.port, call, row.concurrency, duration, pid)
        except bench.BenchError as exc:
            if server.proc is None:
                raise
            results.record_errors(row.name, server.name, [str(exc)])
            continue
        results.record_errors(row.name, server.name, phase.errors)
        p50[server.name] = record_phase(results, row, server.name, phase)
    if row.kind != "stream" and "direct" in p50:
        for name, value in p50.items():
            if name != "direct":
                results.add(row.keys()[-1], name, value - p50["direct"])


def record_phase(results: bench.Results, row: Row, name: str, phase: bench.Phase) -> float:
    """Add the phase's values to the row's keys; return its p50 (latency or first event)."""
    keys = row.keys()
    if row.kind == "first":
        firsts = [s.first_event * 1000 for s in phase.samples if s.first_event is not None]
        value = bench.percentile(firsts, 0.5) if firsts else float("nan")
        results.add(keys[0], name, value)
        return value
    units = len(phase.samples) * (bench.UPSTREAM_EVENTS if row.kind == "stream" else 1)
    results.add(keys[0], name, units / phase.elapsed)
    results.add(keys[1], name, bench.per_unit_us(phase, units))
    return bench.percentile([s.latency * 1000 for s in phase.samples], 0.5)


async def measure_servers(results: bench.Results, servers: List[Server], duration: float) -> None:
    """Check one answer per API and mode; idle RSS; then every row."""
    for server in servers[1:]:
        for api in server.apis:
            for stream in (False, True):
                problem = await bench.shape_problem(server.port, CHECK_PAIRS[api], stream)
                if problem:
                    kind = "stream" if stream else "non-stream"
                    results.record_errors(f"answer check, {api} {kind}", server.name, [problem])
    await asyncio.sleep(0.2)
    for server in servers[1:]:
        results.add(IDLE_RSS, server.name, tree_rss_mb(server.proc.pid))
    for row in ROWS:
        await measure_row(results, row, servers, duration)


def one_run(results: bench.Results, args: argparse.Namespace, mock_port: int,
            peers: List[Peer], skipped: Dict[str, str], tmp: str, run_no: int) -> None:
    servers = [Server("direct", BOTH, mock_port, None)]
    try:
        bench.progress("  starting proxypal" + "".join(f", {p.name}" for p in peers))
        t0 = time.perf_counter()
        proxy = bench.start_proxy(args.proxy, bench.write_proxy_config(tmp, mock_port),
                                  os.path.join(tmp, f"proxypal-{run_no}.log"))
        servers.append(Server("proxypal", BOTH, proxy.port, proxy.proc))
        problem = first_answers(proxy.port, BOTH)
        if problem:
            raise bench.BenchError(f"proxypal.py failed its first requests: {problem}")
        results.add(START, "proxypal", time.perf_counter() - t0)
        for peer in peers:
            try:
                server, seconds = start_peer(peer, mock_port,
                                             os.path.join(tmp, f"{peer.name}-{run_no}.log"))
            except bench.BenchError as exc:
                results.record_errors("start", peer.name, [str(exc)])
                if not results.runs(START, peer.name):
                    skipped[peer.name] = str(exc)    # never started: no column
                continue
            servers.append(server)
            results.add(START, peer.name, seconds)
        asyncio.run(measure_servers(results, servers, args.duration))
    finally:
        for server in servers:
            stop_server(server)


# --- Install, report, main.

def disk_mb(folder: str) -> str:
    out = subprocess.run(["du", "-sm", folder], capture_output=True, text=True).stdout
    return out.split()[0] if out else "?"


def prepare(peer: Peer, install: bool) -> Tuple[Optional[str], str]:
    """(why it is skipped, or None; its line for the report: version, install, disk)."""
    done = "already installed"
    if not os.path.exists(peer.exe()):
        if not install:
            return f"not installed in {peer.folder()} (--no-install)", ""
        bench.progress(f"installing {peer.name} into {peer.folder()}")
        t0 = time.monotonic()
        try:
            peer.install()
        except (bench.BenchError, OSError, subprocess.SubprocessError) as exc:
            return f"install failed: {exc}"[:600], ""
        if not os.path.exists(peer.exe()):
            return f"the install left no {peer.exe()}", ""
        done = f"installed now in {time.monotonic() - t0:.0f} s"
    try:
        version = peer.version()
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        version = f"version unknown ({exc})"
    return None, f"{version}; {done}; {disk_mb(peer.folder())} MB in {peer.folder()}"


def print_table(results: bench.Results, names: List[str], apis: Dict[str, Tuple[str, ...]],
                runs: int) -> None:
    peers = names[2:]
    print(f"\neach cell: min/median/max over {runs} run(s); x: peer / proxypal, medians; "
          "n/a: does not speak that API; -: no value (see the errors)\n")
    line = "{:<36}" + " {:>19}" * 2 + " {:>19} {:>7}" * len(peers)
    print(line.format("", *names[:2], *[x for p in peers for x in (p, "x")]))
    print("-" * (36 + 40 + 28 * len(peers)))
    for row in ROWS:
        print(row.name)
        for key in row.keys():
            print(line.format("  " + key.split(": ")[1],
                              *cells(results, key, names, apis, row.call.api)))
    print("memory and start")
    for key in (IDLE_RSS, START):
        print(line.format("  " + key.split(" (")[0], *cells(results, key, names, apis, "")))


def cells(results: bench.Results, key: str, names: List[str],
          apis: Dict[str, Tuple[str, ...]], api: str) -> List[str]:
    out, ours = [], results.median(key, "proxypal")
    for name in names:
        runs = [v for v in results.runs(key, name) if v == v]      # NaN: no first event
        if name == "direct":
            out.append(bench.cell(runs) if runs else "")
            continue
        out.append(bench.cell(runs) if not api or api in apis[name] else "n/a")
        if name != "proxypal":
            theirs = statistics.median(runs) if runs else None
            out.append("-" if theirs is None or not ours else f"{theirs / ours:.3g}x")
    return out


def print_errors(results: bench.Results, names: List[str]) -> None:
    counts = {n: sum(len(e) for where, e in results.errors.items() if where.startswith(n + ", "))
              for n in names}
    print("\nfailed requests and checks per server: "
          + ", ".join(f"{n} {counts[n]}" for n in names))
    for where, errors in results.errors.items():
        print(f"  {where}: {len(errors)}")
        for error in list(dict.fromkeys(errors))[:2]:
            print(f"    {error[:300]}")


def print_header(args: argparse.Namespace, lines: Dict[str, str], skipped: Dict[str, str],
                 elapsed: float, before: Tuple[str, Optional[bench.Busy], float]) -> None:
    with open(args.proxy, errors="replace") as f:
        version = re.search(r'__version__ = "([^"]+)"', f.read())
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        node = "(none)"
    print(f"proxypal {version.group(1) if version else '?'}: {args.proxy}")
    for name, text in lines.items():
        print(f"{name} {text}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    load, busy, wall = before
    print(f"{args.runs} run(s) in {elapsed:.0f}s, {args.duration:g}s per load point, "
          f"{bench.UPSTREAM_EVENTS}-event burst streams; Python {sys.version.split()[0]}, "
          f"node {node or '?'}, {os.cpu_count()} CPU(s) shared by the load client, the mock "
          f"and every server; {load} before, {bench.load_average()} after"
          f"{bench.others_text(busy, time.monotonic() - wall)}")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark proxypal.py against peer LLM "
                                     "proxies on one mock upstream (see the docstring).")
    parser.add_argument("--runs", type=int, default=3, help="measurement runs (default 3)")
    parser.add_argument("--duration", type=float, default=bench.DURATION,
                        help=f"seconds per load point (default {bench.DURATION:g})")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated, of {','.join(PEERS)} (default: all)")
    parser.add_argument("--proxy", metavar="FILE", default=os.environ.get(bench.PROXY_ENV)
                        or os.path.join(bench.REPO, "proxypal.py"),
                        help="the proxypal.py to measure (default: the repository's)")
    parser.add_argument("--no-install", action="store_true",
                        help="skip a peer not installed yet instead of installing it")
    args = parser.parse_args(argv)
    args.peers = list(dict.fromkeys(p.strip() for p in args.peers.split(",") if p.strip()))
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    if args.runs < 1 or args.duration <= 0:
        parser.error("--runs must be at least 1 and --duration positive")
    if not os.path.isfile(args.proxy):
        parser.error(f"no proxy file at {args.proxy}")
    args.proxy = os.path.abspath(args.proxy)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, bench.interrupt_on_sigterm)
    bench.raise_fd_limit(4096)
    os.makedirs(CACHE, exist_ok=True)
    skipped: Dict[str, str] = {}
    lines: Dict[str, str] = {}
    for name in args.peers:
        why, lines[name] = prepare(PEERS[name], not args.no_install)
        if why:
            skipped[name] = why
            del lines[name]
    peers = [PEERS[name] for name in lines]
    results = bench.Results()
    before = (bench.load_average(), bench.busy_seconds(), time.monotonic())
    with tempfile.TemporaryDirectory(prefix="proxypal-bench-peers-") as tmp:
        mock, mock_port = bench.start_server_child("mock")
        try:
            started = time.monotonic()
            for run_no in range(1, args.runs + 1):
                bench.progress(f"run {run_no}/{args.runs}")
                one_run(results, args, mock_port, [p for p in peers if p.name not in skipped],
                        skipped, tmp, run_no)
            elapsed = time.monotonic() - started
        finally:
            bench.stop_child(mock)
    names = ["direct", "proxypal"] + [p.name for p in peers if p.name not in skipped]
    print_header(args, lines, skipped, elapsed, before)
    print_table(results, names, dict({"proxypal": BOTH}, **{p.name: p.apis for p in peers}),
                args.runs)
    print_errors(results, names)
    print("\nhow each peer is run:")
    for peer in (PEERS[name] for name in names[2:]):
        print(f"  {peer.name}: {peer.note}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except bench.BenchError as exc:
        print(f"bench broke: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        sys.exit(130)
