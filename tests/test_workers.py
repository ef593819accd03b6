"""`--workers 3` behaves as one proxy: usage totals are the sum over the workers (and
survive a worker killed mid-load and a restart), a cooldown one worker learns diverts
the others, the page's log shows every worker's lines, and config saves through any
worker reach all of them without lost updates."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers import TIMEOUT, MockUpstream, json_answer, openai_completion, send

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT") or not os.path.isdir("/proc"),
                                reason="--workers needs SO_REUSEPORT (Linux, macOS); kills use /proc")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "proxypal.py")
KEY = "mk-workers-test"
POLL = 0.5                                  # CONFIG_POLL_SECONDS: how often workers look


class Workers:
    """`python proxypal.py --workers 3` on a config file; the parent's and children's pids."""

    def __init__(self, config_path, count: int = 3):
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "--config", str(config_path), "--port",
                                      os.environ.get("WORKERS_PORT", "0"), "--workers", str(count)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().split("listening on ")[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.serving = set()
        while len(self.serving) < count - 1:   # each child says so once it holds the port
            line = self.proc.stderr.readline()
            assert line, "the workers did not start"
            if "serving on port" in line:
                self.serving.add(int(line.split("worker ")[1].split()[0]))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(TIMEOUT)


def call(url: str, method: str = "POST", path: str = "/v1/chat/completions", body=None, headers=None):
    """One request on a fresh connection (so the kernel picks a worker each time)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers=dict(
        {"Authorization": "Bearer proxypal-local", "Content-Type": "application/json", "Connection": "close"},
        **(headers or {})))
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def management(url: str, path: str, method: str = "GET", body=None):
    return call(url, method, "/v0/management/" + path, body, {"X-Management-Key": KEY})


def chat(model: str = "m"):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def folder(tmp_path):
    return tmp_path


def write_config(folder, **extra):
    path = folder / "config.json"
    path.write_text(json.dumps(dict({"managementKey": KEY}, **extra)))
    return path


def test_usage_is_the_sum_over_workers_and_survives_a_kill_and_a_restart(folder):
    up = MockUpstream(json_answer(200, openai_completion("m")))
    path = write_config(folder, ampOpenaiProviders=[
        {"name": "Mock", "baseUrl": up.url + "/v1", "apiKey": "k", "models": ["m"]}])
    workers = Workers(path)
    done, stop = [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                status, _ = call(workers.url, body=chat())
            except OSError:                      # the killed worker's connections
                continue
            if status == 200:
                done.append(1)
    try:
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        while len(done) < 150:
            time.sleep(0.01)
        victim = sorted(workers.serving)[0]
        os.kill(victim, signal.SIGKILL)          # mid-load, no chance to flush anything
        while len(done) < 300:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        totals = {management(workers.url, "usage?range=all")[1]["total"]["requests"] for _ in range(12)}
        assert len(totals) == 1, totals          # every worker reads the same file
        counted = totals.pop()
        # A request is counted just before its answer's last write: the killed worker may
        # have counted one whose answer never left (one per load thread at most). None of
        # the answered ones is lost.
        assert len(done) <= counted <= len(done) + len(threads), \
            f"{counted} counted, {len(done)} answered"
        states = {management(workers.url, "state")[1]["since_start"]["requests"] for _ in range(12)}
        assert states == {counted}               # the dashboard agrees, whichever worker answers
    finally:
        stop.set()
        workers.stop()
    answered = counted
    workers = Workers(path)                      # a restart on the same folder
    try:
        for _ in range(20):
            assert call(workers.url, body=chat())[0] == 200
        usage = management(workers.url, "usage?range=all")[1]
        assert usage["total"]["requests"] == answered + 20
        assert management(workers.url, "usage")[1]["total"]["requests"] == 20     # since this start
    finally:
        workers.stop()
        up.close()


def test_a_cooldown_one_worker_learns_diverts_the_others(folder):
    hits = []

    def limited(handler, rec):
        hits.append(1)
        send(handler, 429, b'{"error":{"message":"slow down"}}', headers=(("Retry-After", "120"),))
    busy = MockUpstream(limited)
    spare = MockUpstream(json_answer(200, openai_completion("m", "from the spare key")))
    path = write_config(folder, routingStrategy="fill-first", ampOpenaiProviders=[
        {"name": "Busy", "baseUrl": busy.url + "/v1", "apiKey": "k1", "models": ["m"]},
        {"name": "Spare", "baseUrl": spare.url + "/v1", "apiKey": "k2", "models": ["m"]}])
    workers = Workers(path)
    try:
        assert call(workers.url, body=chat())[0] == 429          # one worker meets the 429
        state = folder / "state.json"
        deadline = time.monotonic() + TIMEOUT
        while not (state.exists() and "rate limited" in state.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(2 * POLL)                     # every worker reads it within a poll
        for _ in range(30):                      # on fresh connections: every worker
            status, body = call(workers.url, body=chat())
            assert status == 200 and body["choices"][0]["message"]["content"] == "from the spare key"
        assert len(hits) == 1, f"the rate-limited key was hit {len(hits)} times"
    finally:
        workers.stop()
        busy.close()
        spare.close()


def test_the_page_sees_every_worker_and_saves_reach_all_of_them(folder):
    up = MockUpstream(json_answer(200, openai_completion("m")))
    path = write_config(folder, requestLogging=True, ampOpenaiProviders=[
        {"name": "Mock", "baseUrl": up.url + "/v1", "apiKey": "k", "models": ["m"]}])
    workers = Workers(path)
    try:
        for _ in range(30):
            assert call(workers.url, body=chat())[0] == 200
        tags = set()
        for _ in range(10):
            lines = management(workers.url, "logs?level=INFO")[1]["lines"]
            tags |= {line["worker"] for line in lines}
        assert len(tags) == 3, f"log lines came from workers {tags}"
        requests = management(workers.url, "requests")[1]["requests"]
        assert len([r for r in requests if r["path"] == "/v1/chat/completions"]) == 30
        assert len({r["worker"] for r in requests}) > 1

        _, got = management(workers.url, "config")
        doc = dict(got["config"], ampModelMappings=[{"from": "alias-*", "to": "m", "enabled": True}])
        assert management(workers.url, "config", "PUT", {"config": doc, "version": got["version"]})[0] == 200
        again = dict(got["config"], requestRetry=2)      # a second page, on the old version
        status, err = management(workers.url, "config", "PUT", {"config": again, "version": got["version"]})
        assert status == 409 and "changed since it was read" in err["error"]["message"]
        time.sleep(2 * POLL)                     # the other workers reload within a poll
        for _ in range(20):
            assert call(workers.url, body=chat("alias-x"))[0] == 200
    finally:
        workers.stop()
        up.close()
