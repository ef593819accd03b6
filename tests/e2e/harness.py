"""The e2e harness: the proxy under test as a subprocess, its config per route, the
agent CLIs run non-interactively with a bounded time, and the files a cell leaves behind
(artifacts for debugging, captures of what the clients send)."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROXY_FILE = os.environ.get("PROXYPAL_E2E_PROXY") or os.path.join(REPO, "proxypal.py")
CACHE = os.environ.get("PROXYPAL_E2E_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "proxypal-e2e")
ARTIFACTS = os.environ.get("PROXYPAL_E2E_ARTIFACTS") or os.path.join(CACHE, "artifacts")
CAPTURES = os.environ.get("PROXYPAL_E2E_CAPTURES", "")     # set to save client captures

LOCAL_KEY = "proxypal-local"
UPSTREAM_KEY = "sk-e2e-upstream-key"
PROXY_START_TIMEOUT = 20
CLI_TIMEOUT = 150          # one CLI run; a 429 cell waits out the proxy's 30 s cooldown


def load_tools() -> dict:
    """What setup_tools.py installed (tools.json), or {} when it did not run."""
    try:
        with open(os.path.join(CACHE, "tools.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# -- the proxy under test ----------------------------------------------------------

class ProxyProcess:
    """`python proxypal.py --config FILE --port 0` with its request log on, the port read
    from its banner. Its stderr (the log) is kept in a file for the report."""

    def __init__(self, config: dict, workdir: str, flags: tuple = ("--log-requests", "--debug")):
        os.makedirs(workdir, exist_ok=True)
        self.config_path = os.path.join(workdir, "proxy-config.json")
        self.log_path = os.path.join(workdir, "proxy.log")
        with open(self.config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, PROXY_FILE, "--config", self.config_path, "--port", "0", *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1"))
        self.port = self._read_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _read_port(self) -> int:
        lines: "queue.Queue[str]" = queue.Queue()

        def pump() -> None:               # keep draining stdout so the proxy never blocks
            for line in self.proc.stdout:
                lines.put(line)
            lines.put("")
        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        seen = []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not line:
                break
            seen.append(line)
            match = re.search(r"listening on http://[^\s:]+:(\d+)", line)
            if match:
                return int(match.group(1))
        self.close()
        raise RuntimeError(f"proxy did not start: {''.join(seen)}{self.log()[-2000:]}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def request_log(self) -> list:
        """The proxy's request-log lines (JSON objects with a status)."""
        entries = []
        for line in self.log().splitlines():
            start = line.find("{")
            if start < 0:
                continue
            try:
                entry = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(entry, dict) and "status" in entry:
                entries.append(entry)
        return entries

    def errors(self) -> list:
        """Short lines for each request the proxy answered with an error."""
        out = []
        for e in self.request_log():
            if (e.get("status") or 0) >= 400 or e.get("error"):
                out.append(f"{e.get('method')} {e.get('path')} model={e.get('model')} -> "
                           f"{e.get('status')} (upstream {e.get('upstream_status')}): {e.get('error')}")
        return sorted(out, key=lambda line: line.startswith("HEAD "))   # model calls first

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# -- configs per route ---------------------------------------------------------------

BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
UPSTREAM_MODEL = {             # the model each upstream kind is asked for
    "anthropic": "claude-sonnet-4-5",
    "openai": "gpt-e2e",
    "gemini": "gemini-2.5-flash",
    "bedrock": BEDROCK_MODEL,
    "responses": "gpt-e2e-responses",
}


def provider_config(kind: str, upstream_url: str, aliases: tuple = ()) -> dict:
    """A config with one credential (the user's only key) of `kind` at `upstream_url`.
    `aliases` are extra model names clients may ask for that reach the upstream's model."""
    model = UPSTREAM_MODEL[kind]
    models = [{"name": model, "alias": alias} for alias in aliases]
    if kind == "anthropic":
        entry = {"apiKey": UPSTREAM_KEY, "baseUrl": upstream_url}
        if models:
            entry["models"] = [model] + models
        return {"claudeApiKeys": [entry]}
    if kind == "bedrock":
        return {"claudeApiKeys": [{
            "apiKey": "unused", "baseUrl": "http://bedrock-runtime.us-east-1.amazonaws.com",
            "proxyUrl": upstream_url,
            "headers": {"x-amz-access-key": "AKIAE2EEXAMPLEKEY000", "x-amz-secret-key": "e2e-secret",
                        "x-amz-region": "us-east-1"},
            "models": [{"name": model, "alias": "claude-sonnet-4-5"}] + models}]}
    if kind == "gemini":
        entry = {"apiKey": UPSTREAM_KEY, "baseUrl": upstream_url}
        if models:
            entry["models"] = [model] + models
        return {"geminiApiKeys": [entry]}
    entry = {"name": f"e2e-{kind}", "baseUrl": upstream_url + "/v1", "apiKey": UPSTREAM_KEY,
             "models": [model] + models}
    if kind == "responses":
        entry["wireApi"] = "responses"
    return {"ampOpenaiProviders": [entry]}


def route_config(kind: str, upstream_url: str, catch_all: str = "", aliases: tuple = ()) -> dict:
    """provider_config plus an ampModelMappings catch-all (e.g. 'claude-*') that sends
    every model name the client picks by itself (default model, side calls) upstream."""
    config = provider_config(kind, upstream_url, aliases)
    target = "claude-sonnet-4-5" if kind == "bedrock" else UPSTREAM_MODEL[kind]
    if catch_all:
        config["ampModelMappings"] = [{"from": catch_all, "to": target}]
    return config


# -- running a CLI -----------------------------------------------------------------

@dataclass
class CliResult:
    argv: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def excerpt(self, limit: int = 1200) -> str:
        text = (self.stderr.strip() or self.stdout.strip())
        return text[-limit:]


def base_env(home: str) -> dict:
    """A clean environment: nothing of the caller's API settings leaks into a cell."""
    node_dir = os.path.dirname(shutil.which("node") or "/usr/bin/node")
    path = os.pathsep.join(dict.fromkeys([node_dir, "/usr/local/bin", "/usr/bin", "/bin"]))
    return {"PATH": path, "HOME": home, "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1",
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"), "CI": "1"}


def run_cli(argv: list, env: dict, cwd: str, timeout: float = CLI_TIMEOUT) -> CliResult:
    """Run a CLI in its own process group; on time-out the whole group is killed."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        timed_out = True
    return CliResult(argv, proc.returncode if not timed_out else -9, out, err,
                     time.monotonic() - started, timed_out)


# -- what a cell leaves behind ------------------------------------------------------------

def cell_dir(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    path = os.path.join(ARTIFACTS, safe)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def save_artifacts(path: str, upstream=None, result: CliResult = None) -> None:
    if upstream is not None:
        with open(os.path.join(path, "upstream-requests.json"), "w", encoding="utf-8") as f:
            json.dump([dict(r.as_capture(), label=r.label, status=r.status, fault=r.fault)
                       for r in upstream.requests], f, indent=1)
    if result is not None:
        with open(os.path.join(path, "cli-output.txt"), "w", encoding="utf-8") as f:
            f.write(f"$ {' '.join(result.argv)}\nexit {result.returncode} after {result.seconds:.1f}s"
                    f"{' (timed out)' if result.timed_out else ''}\n\n--- stdout\n{result.stdout}"
                    f"\n--- stderr\n{result.stderr}")


def save_captures(client: str, upstream, namer, variant: str = "") -> list:
    """One request per distinct kind of call (namer(recorded) -> name), secrets redacted,
    under $PROXYPAL_E2E_CAPTURES/<client>/ as NAME[.VARIANT].json; returns the names."""
    if not CAPTURES:
        return []
    folder = os.path.join(CAPTURES, client)
    os.makedirs(folder, exist_ok=True)
    saved = []
    for rec in upstream.requests:
        name = namer(rec)
        if name and rec.label == "tool-result-turn" and len(rec.results) > 1:
            name += "-parallel"
        if not name or name in saved:
            continue
        saved.append(name)
        file_name = f"{name}.{variant}.json" if variant else f"{name}.json"
        with open(os.path.join(folder, file_name), "w", encoding="utf-8") as f:
            json.dump(rec.as_capture(), f, indent=1, ensure_ascii=False)
    return saved


@dataclass
class Outcome:
    """Everything one agent cell observed, with a one-line diagnosis for failures."""
    result: CliResult
    upstream: object
    proxy: object = None
    files: dict = field(default_factory=dict)     # name -> content found (None: missing)
    workdir: str = ""                              # the CLI's working directory

    def diagnosis(self) -> str:
        parts = [f"exit {self.result.returncode}" + (" (timed out)" if self.result.timed_out else "")]
        if self.proxy is not None:
            errors = self.proxy.errors()
            if errors:
                parts.append("proxy: " + " || ".join(errors[:3]))
        parts.append("upstream saw: " + (",".join(self.upstream.labels()) or "nothing"))
        excerpt = " ".join(self.result.excerpt(400).split())
        if excerpt:
            parts.append(f"cli: {excerpt}")
        return "; ".join(parts)
