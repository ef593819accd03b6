"""Operations: hot reload, request log, secrets never shown, usage counters, and the
check / models / init commands, through real sockets and real processes."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from helpers import (OPENAI_STREAM, TIMEOUT, json_answer, openai_completion, proxypal, request,
                     send, sse_answer, mock_provider)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "proxypal.py")


def provider(url, name="Mock", models=("m",), key="up-key"):
    return {"name": name, "baseUrl": url + "/v1", "apiKey": key, "models": list(models)}


def wait_until(predicate, what):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- hot reload -----------------------------------------------------------------------

def test_config_change_applies_within_two_seconds(upstream, proxy, tmp_path):
    up = upstream(json_answer(200, openai_completion()))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url, models=["old"])]}))
    p = proxy(str(path))
    assert request(p, "POST", "/v1/chat/completions", {"model": "new", "messages": []})[0] == 404
    path.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url, models=["old", "new"])]}))
    changed = time.monotonic()
    wait_until(lambda: request(p, "POST", "/v1/chat/completions", {"model": "new", "messages": []})[0] == 200,
               "the new model to route")
    assert time.monotonic() - changed < 2.5


def test_a_cooldown_file_with_a_bad_status_does_not_stop_config_reloads(upstream, proxy, tmp_path):
    """state.json (the cooldowns workers share) is read by the same background step that
    polls the config: a value in it that is not a number must not end that step."""
    up = upstream(json_answer(200, openai_completion()))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url, models=["old"])]}))
    p = proxy(str(path))
    (tmp_path / "state.json").write_text(json.dumps({"cooldowns": {
        "some-key": {"until": time.time() + 600, "status": "soon", "reason": "429"}}}))
    wait_until(lambda: p.server.cooldown_file.stamp != (0, 0), "the poll to read state.json")
    path.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url, models=["old", "new"])]}))
    wait_until(lambda: request(p, "POST", "/v1/chat/completions", {"model": "new", "messages": []})[0] == 200,
               "the new model to route")


def test_a_failing_background_step_is_logged_once_and_run_again(upstream, proxy, tmp_path,
                                                                 monkeypatch, caplog):
    monkeypatch.setattr(proxypal, "USAGE_FLUSH_SECONDS", 0.02)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({}))
    p = proxy(str(path))
    runs = []

    def flaky_flush():
        runs.append(time.monotonic())
        if len(runs) <= 5:
            raise RuntimeError("disk gone")
    with caplog.at_level(logging.ERROR, logger="proxypal"):
        monkeypatch.setattr(p.server.usage, "flush", flaky_flush)
        wait_until(lambda: len(runs) >= 8, "the flush to run on after failing")
    assert caplog.text.count("_flush_usage failed") == 1 and "disk gone" in caplog.text


def test_invalid_reload_keeps_running_config(upstream, proxy, tmp_path, caplog):
    up = upstream(json_answer(200, openai_completion()))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url)]}))
    p = proxy(str(path))
    path.write_text('{"ampOpenaiProviders": [{"name": "x", "baseUrl": 5}]}')
    with caplog.at_level(logging.ERROR, logger="proxypal"):
        assert p.call(_reload(p.server)) is False
    assert 'ampOpenaiProviders[0]: "baseUrl" must be a string' in caplog.text
    assert "keeping the running config" in caplog.text
    assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200


async def _reload(server):
    return server.reload()


def test_in_flight_stream_finishes_on_its_config(upstream, proxy, tmp_path):
    release = threading.Event()

    def gate(i):
        if i == 1:
            assert release.wait(TIMEOUT)
    up = upstream(sse_answer(OPENAI_STREAM, gate=gate))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url)]}))
    p = proxy(str(path))
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "stream": True, "messages": []}),
                 {"Authorization": "Bearer proxypal-local"})
    resp = conn.getresponse()
    first = resp.read1(65536)
    path.write_text(json.dumps({"ampOpenaiProviders": []}))     # the provider disappears
    assert p.call(_reload(p.server)) is True
    assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 503
    release.set()
    assert first + resp.read() == b"".join(OPENAI_STREAM)
    conn.close()


# -- request log, usage -------------------------------------------------------------------

def test_request_log_entry_is_exact():
    record = proxypal.Record("ab-1", "anthropic", "POST", "/v1/messages", t0=10.0, model="claude-x",
                             routed="claude-y", upstream_model="claude-y-azure", provider="Azure",
                             status=200, upstream_status=200, ttfb=0.25, tokens=(12, 34, 5, None))
    entry = proxypal.request_log_entry(record, now=10.5, wall=0.0)
    entry.pop("time")
    assert entry == {"id": "ab-1", "format": "anthropic", "method": "POST", "path": "/v1/messages",
                     "model": "claude-x", "routed": "claude-y", "upstream_model": "claude-y-azure",
                     "provider": "Azure", "status": 200,
                     "upstream_status": 200, "latency_ms": 500.0, "ttfb_ms": 250.0,
                     "input_tokens": 12, "output_tokens": 34, "cached_tokens": 5,
                     "reasoning_tokens": None, "error": None}


def test_usage_counters(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    bad = upstream(json_answer(500, {"error": {"message": "boom"}}))
    p = proxy({"managementKey": "mgmt-key-1", "ampOpenaiProviders": [
        provider(up.url, "Good", ["m"]), provider(bad.url, "Bad", ["b"])]})
    for _ in range(3):
        request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
    request(p, "POST", "/v1/chat/completions", {"model": "b", "messages": []})
    status, _, body = request(p, "GET", "/v0/management/usage", headers={"X-Management-Key": "mgmt-key-1"}, key=None)
    usage = json.loads(body)
    assert status == 200
    good = usage["models"]["m"]
    assert good["requests"] == 3 and good["errors"] == {} and good["input_tokens"] == 9 and good["output_tokens"] == 3
    assert good["latency_ms"]["p50"] > 0 and good["ttfb_ms"]["p95"] > 0
    assert usage["providers"]["Bad"]["errors"] == {"500": 1}


@pytest.mark.parametrize("seconds,fraction,expected", [
    ([], 0.5, None), ([0.00004], 0.5, 0.0), ([0.0004], 0.5, 0.43), ([0.010], 0.95, 11.45),
    ([0.010, 0.010, 0.100, 1.0], 0.5, 11.45), ([0.001 * i for i in range(1, 101)], 0.95, 102.07),
], ids=["empty", "under-0.1ms", "sub-ms", "one", "median", "p95"])
def test_histogram_percentile_is_the_bin_edge_above(seconds, fraction, expected):
    """Latencies go into bins 20% wide; a percentile is the upper edge of its bin, so it is
    never below the true value and at most 20% above it."""
    bins = {}
    for s in seconds:
        key = proxypal._usage_bin(s)
        bins[key] = bins.get(key, 0) + 1
    assert proxypal._bin_percentile(bins, fraction) == expected


# -- secrets ------------------------------------------------------------------------------

SECRETS = ["sk-upstream-secret-1234", "local-client-secret-99", "mgmt-secret-777", "proxy-pass-555",
           "AKIA-secret-access", "aws-secret-key-xyz", "apim-secret-4321"]


def test_secrets_never_appear_in_output_or_log_files(upstream, tmp_path):
    up = upstream(json_answer(401, {"error": {"message": "Incorrect API key provided: sk-upstream-secret-1234 "
                                                         "(gateway subscription apim-secret-4321)"}}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "proxyApiKey": "local-client-secret-99", "managementKey": "mgmt-secret-777", "debug": True,
        "requestLogging": True, "loggingToFile": True, "proxyPassword": "proxy-pass-555",
        "ampOpenaiProviders": [dict(provider(up.url, key="sk-upstream-secret-1234"),   # a gateway's own
                                    headers={"Ocp-Apim-Subscription-Key": "apim-secret-4321"})],   # key
        "claudeApiKeys": [{"apiKey": "x-key-bedrock", "baseUrl": "https://bedrock-runtime.us-east-1.amazonaws.com",
                           "headers": {"x-amz-access-key": "AKIA-secret-access", "x-amz-secret-key": "aws-secret-key-xyz"}}]}))
    proc = subprocess.Popen([sys.executable, SCRIPT, "--config", str(config), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split("listening on ")[1].strip()
        for path, headers in [("/v1/chat/completions", {"Authorization": "Bearer local-client-secret-99"}),
                              ("/v1/chat/completions?key=local-client-secret-99", {}),
                              ("/v1/chat/completions", {"x-api-key": "wrong-key-sk-upstream-secret-1234"})]:
            req = urllib.request.Request(url + path, data=json.dumps({"model": "m", "messages": []}).encode(),
                                         headers=dict(headers, **{"Content-Type": "application/json"}))
            try:
                urllib.request.urlopen(req, timeout=TIMEOUT).read()
            except urllib.error.HTTPError as exc:
                body = exc.read().decode()
                assert not [s for s in SECRETS if s in body], body
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    logs = (tmp_path / "logs" / "proxypal.log").read_text()
    assert '"status": 401' in err and '"status": 401' in logs      # the request log was written
    everything = out + err + logs
    assert [s for s in SECRETS if s in everything] == []
    if os.name == "posix":                         # (a log line may quote what a client sent)
        assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("text,expected", [
    ("Authorization: Bearer abcdef123", "Authorization: Bearer ***"),
    ("x-api-key: sk-ant-xyz", "x-api-key: ***"),
    ("GET /v1beta/models?key=AIzaSecret&x=1", "GET /v1beta/models?key=***&x=1"),
    ('{"apiKey": "sk-live-1"}', '{"apiKey": "***"}'),
    ("provider said: secret-value-here", "provider said: ***"),
], ids=["bearer", "x-api-key", "query-key", "json-apikey", "known-secret"])
def test_mask_secrets(text, expected):
    assert proxypal.mask_secrets(text, ["secret-value-here"]) == expected


# -- commands -----------------------------------------------------------------------------

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=TIMEOUT * 3, env=dict(os.environ, **(env or {})))


def test_check_command(upstream, tmp_path):
    def openai_like(handler, rec):
        if rec.method == "GET" and rec.path == "/v1/models":
            send(handler, 200, json.dumps({"object": "list", "data": [{"id": "llama3"}]}).encode())
        else:
            send(handler, 404, b"not found", "text/plain")
    good = upstream(openai_like)
    anthropic_like = upstream(json_answer(200, {"type": "message", "content": []}))
    denied = upstream(json_answer(401, {"error": {"message": "bad key"}}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "ampOpenaiProviders": [provider(good.url, "Ollama", ["llama3", "mistral"]),
                               provider(denied.url, "Groq", ["g1"], key="gsk-secret-key")],
        "claudeApiKeys": [{"apiKey": "k", "baseUrl": anthropic_like.url + "/anthropic",
                           "models": [{"name": "claude-opus-4-5", "alias": "opus"}]}]}))
    out = run_cli("check", "--config", str(config), "--json")
    rows = {(r["provider"], r["model"]): r for r in json.loads(out.stdout)}
    assert out.returncode == 1
    assert rows[("Ollama", "llama3")]["ok"] is True
    assert rows[("Ollama", "mistral")]["ok"] is False and "not in the provider's models listing" in rows[("Ollama", "mistral")]["detail"]
    assert rows[("Groq", "g1")]["status"] == 401 and "check the apiKey" in rows[("Groq", "g1")]["detail"]
    claude = [r for r in rows.values() if r["entry"] == "claudeApiKeys[0]"][0]
    assert claude["ok"] is True
    sent = anthropic_like.last()
    assert sent.path == "/anthropic/v1/messages" and sent.json()["max_tokens"] == 1
    table = run_cli("check", "--config", str(config))
    assert table.returncode == 1 and "FAIL" in table.stdout and "gsk-secret-key" not in table.stdout


def test_check_knows_ollamas_latest_tag(upstream, tmp_path):
    """Ollama lists `llama3:latest` (its /v1/models) for the `llama3` it serves."""
    up = upstream(json_answer(200, {"object": "list", "data": [
        {"id": "llama3:latest", "object": "model", "owned_by": "library"},
        {"id": "codellama:7b", "object": "model", "owned_by": "library"}]}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ampOpenaiProviders": [
        provider(up.url, "Ollama", ["llama3", "llama3:latest", "codellama:7b", "codellama"])]}))
    out = run_cli("check", "--config", str(config), "--json")
    assert {r["model"]: r["ok"] for r in json.loads(out.stdout)} == {
        "llama3": True, "llama3:latest": True, "codellama:7b": True, "codellama": False}


def test_check_all_pass_exits_0(upstream, tmp_path):
    up = upstream(json_answer(200, {"data": [{"id": "m"}]}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url)]}))
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 0 and " ok " in out.stdout


def test_models_command(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "claudeApiKeys": [{"apiKey": "a", "models": [{"name": "claude-opus-4-5", "alias": "opus"}]},
                          {"apiKey": "b", "models": [{"name": "claude-opus-4-5", "alias": "opus"}]}],
        "ampOpenaiProviders": [{"name": "Ollama", "baseUrl": "http://localhost:11434/v1", "models": ["llama3"]}],
        "ampModelMappings": [{"from": "claude-haiku-4-5", "to": "llama3"}]}))
    out = run_cli("models", "--config", str(config), "--json")
    rows = json.loads(out.stdout)
    assert out.returncode == 0
    opus = [r for r in rows if r["model"] == "opus"]
    assert len(opus) == 2 and all(r["credentials"] == 2 and r["upstream_model"] == "claude-opus-4-5" for r in opus)
    haiku = [r for r in rows if r["model"] == "claude-haiku-4-5"][0]
    assert haiku["provider"] == "Ollama" and haiku["mapping"] == "claude-haiku-4-5 -> llama3"
    text = run_cli("models", "--config", str(config)).stdout
    assert "shared by 2" in text and "llama3" in text


def test_init_writes_valid_starter_and_never_overwrites(tmp_path):
    path = tmp_path / "new" / "config.json"
    out = run_cli("init", "--config", str(path))
    assert out.returncode == 0 and path.exists()
    config = proxypal.load_config(str(path))
    assert config.credentials == () and config.proxy_api_key == "proxypal-local" and config.host == "127.0.0.1"
    templates = json.loads(path.read_text())["_templates"]
    proxypal.parse_config({k: v for k, v in templates.items()})          # the templates are valid too
    path.write_text('{"port": 9999}')
    again = run_cli("init", "--config", str(path))
    assert again.returncode == 1 and "never overwrites" in again.stderr
    assert path.read_text() == '{"port": 9999}'
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]   # no temp file left


def test_a_config_that_is_elsewhere_than_its_path_says_where_it_is(tmp_path):
    # The Microsoft Store's Python writes what goes under %APPDATA% into its own package
    # folder, and realpath() finds it; a symlinked folder is the same case on any system.
    base = os.path.realpath(tmp_path)
    real = os.path.join(base, "real")
    os.mkdir(real)
    try:
        os.symlink(real, os.path.join(base, "link"))
    except OSError:
        pytest.skip("no symlinks here")
    path = os.path.join(base, "link", "config.json")
    really = os.path.join(real, "config.json")
    out = run_cli("init", "--config", path)
    assert out.returncode == 0 and f"wrote {path} (the file is at {really})" in out.stdout
    banner = proxypal.banner(proxypal.Server(proxypal.load_config(path)))
    assert f"config: {path} (the file is at {really}) (no providers yet" in banner
    assert proxypal.shown_path(really) == really
    assert proxypal.shown_path("") == "" and proxypal.shown_path("no-such.json") == "no-such.json"
    assert "config: given in code (no providers yet" in proxypal.banner(proxypal.Server(proxypal.parse_config({})))


def test_init_uses_default_path(tmp_path):
    out = run_cli("init", env={"XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path), "PROXYPAL_CONFIG": ""})
    assert out.returncode == 0 and (tmp_path / "proxypal" / "config.json").exists()


# -- processes ------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX")
def test_sighup_reloads(upstream, tmp_path):
    up = upstream(json_answer(200, openai_completion()))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url, models=["a"])]}))
    proc = subprocess.Popen([sys.executable, SCRIPT, "--config", str(config), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split("listening on ")[1].strip()
        config.write_text(json.dumps({"ampOpenaiProviders": [provider(up.url, models=["a", "b"])]}))
        proc.send_signal(signal.SIGHUP)
        line = ""
        while "config reloaded" not in line:
            line = proc.stderr.readline()
            assert line, "the proxy exited"
        assert "1 providers, 2 models" in line
        req = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer proxypal-local"})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            assert [m["id"] for m in json.loads(resp.read())["data"]] == ["a", "b"]
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


@pytest.mark.skipif(not hasattr(__import__("socket"), "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
def test_workers_share_the_port(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--config", str(tmp_path / "none.json"), "--port", "0",
                             "--workers", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(6)]
        url = lines[0].split("listening on ")[1].strip()
        assert lines[5].startswith("workers: 3 processes share port")
        serving = set()
        while len(serving) < 2:            # each worker says so once it holds the port
            line = proc.stderr.readline()
            assert line and "cannot start" not in line, line
            if "serving on port" in line:
                serving.add(line.split("worker ")[1].split()[0])
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert sorted(children) == sorted(serving)
        for _ in range(10):
            with urllib.request.urlopen(url + "/health", timeout=TIMEOUT) as resp:
                assert resp.status == 200
        for pid in children:               # the workers are serving, not dead on bind
            assert "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
    finally:
        proc.kill()
        proc.wait()


def test_log_files_rotate_under_the_cap(tmp_path):
    config = proxypal.parse_config({"loggingToFile": True, "logsMaxTotalSizeMb": 1},
                                   path=str(tmp_path / "config.json"))
    saved = list(proxypal.log.handlers), proxypal.log.level, proxypal.log.propagate
    try:
        proxypal.setup_logging(config)
        proxypal.log.handlers = [h for h in proxypal.log.handlers if isinstance(h, logging.FileHandler)]
        for i in range(3000):
            proxypal.log.info("line %d %s", i, "x" * 1000)
    finally:
        for handler in proxypal.log.handlers:
            handler.close()
        proxypal.log.handlers, proxypal.log.level, proxypal.log.propagate = saved
    files = list((tmp_path / "logs").iterdir())
    total = sum(f.stat().st_size for f in files)
    assert len(files) == proxypal.LOG_FILE_BACKUPS + 1 and total <= 1024 * 1024


def test_aborted_stream_is_logged_in_usage(upstream, proxy):
    release = threading.Event()

    def gate(i):
        if i == 1:
            release.wait(TIMEOUT)
    up = upstream(sse_answer(OPENAI_STREAM, gate=gate))
    p = proxy({"managementKey": "mk-123456", "ampOpenaiProviders": [mock_provider(up.url)]})
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer proxypal-local\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"chat.completion.chunk" not in got:
        got += sock.recv(65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()                                  # RST
    release.set()
    for _ in range(100):
        usage = json.loads(request(p, "GET", "/v0/management/usage", headers={"X-Management-Key": "mk-123456"},
                                   key=None)[2])
        if usage["models"].get("m", {}).get("requests"):
            break
        threading.Event().wait(0.05)
    assert usage["models"]["m"]["requests"] == 1
