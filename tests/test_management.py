"""The management page's API (/v0/management/...) through the real server: every
operation, saves that fail, race or carry keys proxypal does not know, usage that
survives a restart, the live log; and the store and counters under it."""
from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import stat
import time
from typing import Any, Dict

import pytest

from helpers import (TIMEOUT, RunningProxy, json_answer, openai_completion, proxypal, request,
                     sse_answer, OPENAI_STREAM)

KEY = "mk-test-management-1"
H = {"X-Management-Key": KEY}


def mgmt(p, method: str, path: str, body: Any = None):
    status, headers, raw = request(p, method, "/v0/management/" + path, body, H, key=None)
    return status, headers, json.loads(raw) if raw else None


def provider(url: str, name: str = "Mock", models=("m",)) -> Dict[str, Any]:
    return {"name": name, "baseUrl": url + "/v1", "apiKey": "sk-upstream-secret", "models": list(models)}


@pytest.fixture
def config_file(tmp_path):
    def make(doc: Dict[str, Any]):
        path = tmp_path / "proxypal" / "config.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
        return path
    return make


def test_page_is_served_without_a_key_with_strict_headers(proxy):
    p = proxy({"managementKey": KEY})
    status, headers, body = request(p, "GET", "/", key=None)
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"<title>proxypal</title>" in body and KEY.encode() not in body
    csp = headers["content-security-policy"]
    assert csp.startswith("default-src 'none'; script-src 'sha256-") and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    # The hashes are of the page's own script and style: a browser would run exactly those.
    import base64
    import hashlib
    import re
    script = re.search(rb"<script>(.*?)</script>", body, re.S).group(1)
    assert base64.b64encode(hashlib.sha256(script).digest()).decode() in csp


def own_address() -> str:
    """A non-loopback address of this machine, or "" when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return ""
    return "" if address.startswith("127.") else address


def test_other_machines_get_neither_page_nor_api():
    address = own_address()
    if not address:
        pytest.skip("this machine has no non-loopback address to connect from")
    p = RunningProxy({"managementKey": KEY, "proxyApiKey": "remote-client-key"}, host=address)
    try:
        for path, headers in (("/", {}), ("/v0/management/state", H)):
            conn = http.client.HTTPConnection(address, p.port, timeout=TIMEOUT)
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 403 and b"allowRemoteManagement" in body
    finally:
        p.close()


def test_a_reverse_proxy_on_this_machine_does_not_make_others_local(upstream, proxy):
    # nginx in front: its connections come from 127.0.0.1, for clients anywhere
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"managementKey": KEY, "apiKeys": ["team-secret"], "ampOpenaiProviders": [provider(up.url)]})
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for forwarded in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"},
                      {"X-Real-IP": "203.0.113.9"}):
        status, _, body = request(p, "POST", "/v1/chat/completions", chat, forwarded)
        message = json.loads(body)["error"]["message"]
        assert status == 403 and "only from this machine" in message and "proxyApiKey" in message
        assert request(p, "GET", "/", headers=forwarded, key=None)[0] == 403
        assert request(p, "GET", "/v0/management/state", headers=dict(forwarded, **H), key=None)[0] == 403
        assert request(p, "POST", "/v1/chat/completions", chat, forwarded, key="team-secret")[0] == 200
    assert len(up.all) == 3                        # only the secret key's requests went out
    assert request(p, "POST", "/v1/chat/completions", chat)[0] == 200      # (and this machine's)
    remote = proxy({"managementKey": KEY, "allowRemoteManagement": True})
    assert request(remote, "GET", "/", headers={"X-Forwarded-For": "203.0.113.9"}, key=None)[0] == 200


@pytest.mark.parametrize("host,elsewhere", [
    ("127.0.0.1:8317", False), ("localhost", False), ("localhost.:8317", False), ("[::1]:8317", False),
    ("app.localhost", False), ("myhost", False), ("x", False), ("0.0.0.0:8317", False),
    ("LOCALHOST", False), ("", False), ("localhost.localdomain", False),
    ("localhost6.localdomain6:8317", False), ("127.1:8317", False), ("0:8317", False),
    (socket.gethostname() + ":8317", False), ("10.1", True),
    ("evil.example:8317", True), ("evil.example.", True), ("abc.ngrok-free.app", True),
    ("192.168.1.5:8317", True), ("[2001:db8::1]:8317", True), ("host.docker.internal", True),
])
def test_a_host_header_naming_another_machine(host, elsewhere):
    assert proxypal.names_another_machine(host) is elsewhere


def test_a_page_pointing_its_own_name_at_this_machine_cannot_use_the_public_key(upstream, proxy):
    # DNS rebinding: evil.example resolves to 127.0.0.1, so the page's requests are
    # same-origin GETs with no Origin header; a tunnel looks the same from here
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"managementKey": KEY, "apiKeys": ["team-secret"], "ampOpenaiProviders": [provider(up.url)]})
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    evil = {"Host": "evil.example:8317"}
    status, _, body = request(p, "GET", "/v1/models", headers=evil)
    message = json.loads(body)["error"]["message"]
    assert status == 403 and "'evil.example:8317'" in message and "proxyApiKey" in message
    assert request(p, "POST", "/v1/chat/completions", chat, evil)[0] == 403
    assert request(p, "GET", "/", headers=evil, key=None)[0] == 403
    assert request(p, "POST", "/v1/chat/completions", chat, evil, key="team-secret")[0] == 200
    for local in ("localhost:8317", "127.0.0.1", "[::1]:8317"):
        assert request(p, "POST", "/v1/chat/completions", chat, {"Host": local})[0] == 200
    assert len(up.all) == 4
    remote = proxy({"managementKey": KEY, "allowRemoteManagement": True})
    assert request(remote, "GET", "/", headers=evil, key=None)[0] == 200


def test_state_shows_counts_providers_cooldowns_and_versions(upstream, proxy, config_file):
    ok = upstream(json_answer(200, openai_completion()))
    limited = upstream(json_answer(429, {"error": {"message": "slow down"}}, headers=(("retry-after", "120"),)))
    path = config_file({"managementKey": KEY, "ampOpenaiProviders": [
        provider(ok.url, "Good", ["m"]), provider(limited.url, "Busy", ["b"])]})
    p = proxy(str(path))
    assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200
    assert request(p, "POST", "/v1/chat/completions", {"model": "b", "messages": []})[0] == 429
    status, headers, state = mgmt(p, "GET", "state")
    assert status == 200 and headers["cache-control"] == "no-store"
    assert state["today"]["requests"] == 2 and state["since_start"]["requests"] == 2
    assert state["today"]["success_rate"] == 0.5 and state["today"]["input_tokens"] == 3
    good, busy = state["providers"]
    assert good["name"] == "Good" and good["last_status"] == 200 and good["cooling_until"] is None
    assert busy["last_status"] == 429 and "slow down" in busy["last_error"]
    assert busy["cooling_until"] > state["now"] + 100 and busy["cooling_reason"] == "rate limited (429)"
    assert state["config"]["version"] == proxypal.ConfigStore.version_of(path.read_bytes())
    assert state["local_key"] == "proxypal-local" and state["local_key_is_default"] is True
    assert "sk-upstream-secret" not in json.dumps(state)


def test_config_and_settings_with_command_line_overrides(config_file):
    path = config_file({"managementKey": KEY, "debug": False, "someProxyPalKey": [1, 2]})
    p = RunningProxy(str(path))
    p.server.overrides = {"debug": True}
    try:
        status, _, got = mgmt(p, "GET", "config")
        assert status == 200 and got["config"] == json.loads(path.read_text())
        assert got["version"] == proxypal.ConfigStore.version_of(path.read_bytes()) and got["writable"]
        settings = {s["key"]: s for s in got["settings"]}
        assert settings["debug"]["override"] is True and settings["debug"]["live"] is True
        assert settings["port"]["live"] is False and settings["routingStrategy"]["choices"] == ["round-robin", "fill-first"]
        assert settings["proxyApiKey"]["secret"] is True and settings["requestRetry"]["help"]
    finally:
        p.close()


def save(p, doc, version):
    return mgmt(p, "PUT", "config", {"config": doc, "version": version})


def test_a_save_is_validated_written_atomically_and_applied_at_once(upstream, proxy, config_file):
    up = upstream(json_answer(200, openai_completion("gpt-x", "from the new provider")))
    path = config_file({"managementKey": KEY})
    p = proxy(str(path))
    _, _, got = mgmt(p, "GET", "config")
    doc = dict(got["config"], ampOpenaiProviders=[provider(up.url, "OpenRouter", ["openai/gpt-4-turbo"])])
    status, _, res = save(p, doc, got["version"])
    assert status == 200 and res["providers"] == 1 and res["models"] == 1
    assert json.loads(path.read_text()) == doc
    assert json.loads((path.parent / "config.json.bak").read_text()) == {"managementKey": KEY}
    assert res["version"] == proxypal.ConfigStore.version_of(path.read_bytes())
    # Applied now, not when the watcher notices: the very next request routes there.
    status, _, body = request(p, "POST", "/v1/chat/completions", {"model": "openai/gpt-4-turbo", "messages": []})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "from the new provider"


@pytest.mark.parametrize("change,where,says", [
    (lambda d: d.update(ampOpenaiProviders=[{"name": "X", "baseUrl": "ftp://x", "models": ["m"]}]),
     "ampOpenaiProviders[0].baseUrl", "must be a URL starting with http:// or https://"),
    (lambda d: d.update(ampOpenaiProviders=[{"baseUrl": "http://x/v1", "models": ["m"]}]),
     "ampOpenaiProviders[0].name", '"name" is required'),
    (lambda d: d.update(requestRetry=99), "requestRetry", "must be between 0 and 20"),
    (lambda d: d.update(routingStrategy="random"), "routingStrategy", 'must be "round-robin" or "fill-first"'),
    (lambda d: d.pop("managementKey"), "managementKey", "must stay set"),
    (lambda d: d.update(proxyApiKey=KEY), "managementKey", "must differ from proxyApiKey"),
], ids=["bad-url", "missing-name", "out-of-range", "bad-choice", "management-key-removed", "key-reused"])
def test_an_invalid_save_names_the_field_and_changes_nothing(proxy, config_file, change, where, says):
    path = config_file({"managementKey": KEY, "requestRetry": 1})
    before = path.read_bytes()
    p = proxy(str(path))
    _, _, got = mgmt(p, "GET", "config")
    doc = dict(got["config"])
    change(doc)
    status, _, err = save(p, doc, got["version"])
    assert status == 400 and err["error"]["path"] == where and says in err["error"]["message"]
    assert path.read_bytes() == before and not (path.parent / "config.json.bak").exists()


def test_a_save_that_would_expose_the_public_key_where_it_listens_is_refused(proxy, config_file):
    path = config_file({"managementKey": KEY, "proxyApiKey": "team-secret"})
    before = path.read_bytes()
    p = proxy(str(path), host="0.0.0.0")          # (as --host 0.0.0.0 on the command line)
    _, _, got = mgmt(p, "GET", "config")
    doc = dict(got["config"])
    doc.pop("proxyApiKey")
    status, _, err = save(p, doc, got["version"])
    assert status == 400 and err["error"]["path"] == "host" and "proxyApiKey" in err["error"]["message"]
    assert path.read_bytes() == before


def test_a_save_over_an_external_edit_is_refused_and_the_edit_is_seen(proxy, config_file):
    path = config_file({"managementKey": KEY, "requestRetry": 1})
    p = proxy(str(path))
    _, _, got = mgmt(p, "GET", "config")
    edited = {"managementKey": KEY, "requestRetry": 3, "debug": True}          # by hand, meanwhile
    path.write_text(json.dumps(edited))
    status, _, err = save(p, dict(got["config"], requestRetry=2), got["version"])
    assert status == 409 and "changed since it was read" in err["error"]["message"]
    assert json.loads(path.read_text()) == edited
    _, _, state = mgmt(p, "GET", "state")                     # the page polls this: it sees the edit
    assert state["config"]["version"] != got["version"]
    assert state["config"]["version"] == proxypal.ConfigStore.version_of(path.read_bytes())
    _, _, again = mgmt(p, "GET", "config")
    assert again["config"] == edited and save(p, dict(edited, requestRetry=2), again["version"])[0] == 200


def test_a_file_broken_by_hand_is_shown_as_the_running_config_and_a_save_repairs_it(proxy,
                                                                                   config_file):
    good = {"managementKey": KEY, "requestRetry": 1}
    path = config_file(good)
    p = proxy(str(path))
    broken = json.dumps(good)[:-1] + ', "requestRetry": 2,'       # cut off while editing
    path.write_text(broken)
    deadline = time.monotonic() + TIMEOUT      # the file watcher notices within a second
    while not mgmt(p, "GET", "state")[2]["config"]["reload_error"]:
        assert time.monotonic() < deadline, "the broken file was never noticed"
        time.sleep(0.05)
    status, _, got = mgmt(p, "GET", "config")
    assert status == 200 and got["config"] == good and "JSON" in got["error"]
    assert got["version"] == proxypal.ConfigStore.version_of(broken.encode())
    _, _, state = mgmt(p, "GET", "state")
    assert state["config"]["reload_error"] and state["config"]["version"] == got["version"]
    status, _, res = save(p, dict(got["config"], requestRetry=2), got["version"])
    assert status == 200, res
    assert json.loads(path.read_text()) == dict(good, requestRetry=2)
    assert (path.parent / "config.json.bak").read_text() == broken    # nothing the user typed is lost
    _, _, again = mgmt(p, "GET", "config")
    assert again["error"] == "" and again["config"]["requestRetry"] == 2
    _, _, state = mgmt(p, "GET", "state")
    assert state["config"]["reload_error"] == ""


def test_a_failed_write_keeps_the_old_file_and_says_why(proxy, config_file, monkeypatch):
    path = config_file({"managementKey": KEY, "requestRetry": 1})
    before = path.read_bytes()
    p = proxy(str(path))
    _, _, got = mgmt(p, "GET", "config")
    folder = path.parent
    if os.geteuid() != 0:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)             # a read-only folder
    else:                                                    # root writes anywhere: make the
        def refuse(*args, **kwargs):                         # folder refuse as a read-only one does
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(proxypal.tempfile, "mkstemp", refuse)
    try:
        status, _, err = save(p, dict(got["config"], requestRetry=2), got["version"])
    finally:
        folder.chmod(0o755)
    assert status == 500
    assert err["error"]["message"] == f"cannot write {path}.bak: Permission denied; the file was not changed"
    assert path.read_bytes() == before
    assert sorted(os.listdir(folder)) == ["config.json"]     # no temp file left behind
    assert request(p, "GET", "/v1/models")[0] == 200         # the proxy runs on


def test_keys_proxypal_does_not_know_survive_ten_saves(proxy, config_file):
    foreign = {"_templates": {"claudeApiKeys": [{"apiKey": "x"}]}, "quotaSwitchProject": True,
               "oauthExcludedModels": {"gemini": ["a"]}, "commercialMode": False}
    path = config_file(dict(foreign, managementKey=KEY, ampOpenaiProviders=[
        {"name": "A", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": "k", "models": ["m"],
         "priority": 3, "x-note": "kept"}]))
    p = proxy(str(path))
    for i in range(10):                                      # what the page does: read, change, save
        _, _, got = mgmt(p, "GET", "config")
        doc = got["config"]
        doc["debug"] = i % 2 == 0
        doc["ampOpenaiProviders"][0]["models"].append(f"m{i}")
        assert save(p, doc, got["version"])[0] == 200
    saved = json.loads(path.read_text())
    assert {k: saved[k] for k in foreign} == foreign
    entry = saved["ampOpenaiProviders"][0]
    assert entry["priority"] == 3 and entry["x-note"] == "kept" and len(entry["models"]) == 11


def test_a_proxy_built_from_a_dict_shows_its_config_but_cannot_save(proxy):
    p = proxy({"managementKey": KEY, "requestRetry": 2})
    _, _, got = mgmt(p, "GET", "config")
    assert got["config"] == {"managementKey": KEY, "requestRetry": 2} and got["writable"] is False
    status, _, err = save(p, got["config"], got["version"])
    assert status == 409 and "not a file" in err["error"]["message"]


def test_disabled_entries_stay_in_the_file_but_serve_nothing(upstream, proxy, config_file):
    up = upstream(json_answer(200, openai_completion()))
    path = config_file({"managementKey": KEY, "ampOpenaiProviders": [dict(provider(up.url), disabled=True)]})
    p = proxy(str(path))
    assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 503
    _, _, got = mgmt(p, "GET", "config")
    doc = got["config"]
    del doc["ampOpenaiProviders"][0]["disabled"]
    assert save(p, doc, got["version"])[0] == 200
    assert request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 200


def models_listing(handler, rec):
    from helpers import send
    if rec.path.endswith("/models"):
        send(handler, 200, json.dumps({"object": "list", "data": [{"id": "zeta"}, {"id": "alpha"}]}).encode())
    else:
        send(handler, 401, json.dumps({"error": {"message": "bad key"}}).encode())


def test_provider_test_and_fetch_models(upstream, proxy):
    up = upstream(models_listing)
    p = proxy({"managementKey": KEY})
    entry = provider(up.url, "New", ["alpha", "missing"])
    status, _, res = mgmt(p, "POST", "test", {"list": "ampOpenaiProviders", "entry": entry})
    assert status == 200 and res["ok"] is False
    by_model = {r["model"]: r for r in res["results"]}
    assert by_model["alpha"]["ok"] is True and by_model["alpha"]["latency_ms"] >= 0
    assert "'missing' is not in the provider's models listing" in by_model["missing"]["detail"]
    assert up.last().headers["authorization"] == "Bearer sk-upstream-secret"
    status, _, res = mgmt(p, "POST", "fetch-models", {"list": "ampOpenaiProviders", "entry": entry})
    assert status == 200 and res == {"models": ["alpha", "zeta"]}


def test_provider_test_failures_say_why_without_the_key(upstream, proxy):
    """Neither the key nor a secret header: an upstream that echoes what it was sent shows
    neither on the page."""
    up = upstream(json_answer(401, {"error": {"message": "invalid key sk-upstream-secret, "
                                                          "header hdr-secret-value"}}))
    p = proxy({"managementKey": KEY})
    entry = dict(provider(up.url), headers={"X-Api-Key": "hdr-secret-value"})
    _, _, res = mgmt(p, "POST", "test", {"list": "ampOpenaiProviders", "entry": entry})
    assert res["ok"] is False and "HTTP 401" in res["results"][0]["detail"]
    for secret in ("sk-upstream-secret", "hdr-secret-value"):
        assert secret not in json.dumps(res)
    status, _, err = mgmt(p, "POST", "fetch-models", {"list": "ampOpenaiProviders", "entry": entry})
    assert status == 502 and "answered HTTP 401" in err["error"]["message"]
    for secret in ("sk-upstream-secret", "hdr-secret-value"):
        assert secret not in err["error"]["message"]


def test_the_api_answers_no_other_origin_and_shows_no_key_a_client_sent(upstream, proxy):
    up = upstream(json_answer(200, openai_completion("m")))
    p = proxy({"managementKey": KEY, "proxyApiKey": "client-secret-key",
               "ampOpenaiProviders": [provider(up.url)]})
    status, headers, _ = request(p, "GET", "/v0/management/state", None,
                                 dict(H, Origin="http://evil.example"), key=None)
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, _ = request(p, "OPTIONS", "/v0/management/config", None,
                                 {"Origin": "http://evil.example",
                                  "Access-Control-Request-Method": "PUT",
                                  "Access-Control-Request-Headers": "x-management-key"}, key=None)
    assert "access-control-allow-origin" not in headers
    request(p, "GET", "/nope/client-secret-key", key="client-secret-key")
    _, _, records = mgmt(p, "GET", "requests")      # (mgmt parses it: still JSON)
    assert records["requests"] and "client-secret-key" not in json.dumps(records)


def test_the_request_log_stays_json_whatever_the_secrets_look_like(upstream, proxy):
    """A key that is also JSON text ("null", a local server's placeholder "1234") is
    masked in the values, never inside the JSON around them."""
    up = upstream(json_answer(200, openai_completion("m")))
    p = proxy({"managementKey": KEY, "ampOpenaiProviders": [dict(provider(up.url), apiKey="null")]})
    for _ in range(3):
        request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": [
            {"role": "user", "content": "hi"}]})
    status, _, raw = request(p, "GET", "/v0/management/requests", None, H, key=None)
    assert status == 200 and len(json.loads(raw)["requests"]) == 3


@pytest.mark.parametrize("body,status,says", [
    ({"list": "claudeApiKeys", "entry": {"apiKey": "k", "baseUrl": "https://bedrock-runtime.us-east-1.amazonaws.com"}},
     400, "has no models listing"),
    ({"list": "nope", "entry": {}}, 400, "list: must be claudeApiKeys"),
    ({"list": "ampOpenaiProviders", "entry": {"name": "x"}}, 400, '"baseUrl" is required'),
], ids=["bedrock-lists-nothing", "unknown-list", "invalid-entry"])
def test_fetch_models_refusals(proxy, body, status, says):
    p = proxy({"managementKey": KEY})
    got_status, _, err = mgmt(p, "POST", "fetch-models", body)
    assert got_status == status and says in err["error"]["message"]


def test_routes_and_request_records(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"managementKey": KEY, "ampOpenaiProviders": [provider(up.url, "Groq", ["llama3"])],
               "ampModelMappings": [{"from": "claude-haiku-*", "to": "llama3", "enabled": True}]})
    _, _, routes = mgmt(p, "GET", "routes")
    assert {(r["model"], r["provider"], r["upstream_model"]) for r in routes["routes"]} == {
        ("llama3", "Groq", "llama3"), ("claude-haiku-*", "Groq", "llama3")}
    assert routes["mappings"] == [{"from": "claude-haiku-*", "to": "llama3", "enabled": True}]
    request(p, "POST", "/v1/chat/completions", {"model": "claude-haiku-4-5", "messages": []})
    request(p, "POST", "/v1/chat/completions", {"model": "nope", "messages": []})
    _, _, got = mgmt(p, "GET", "requests")
    newest, older = got["requests"][:2]
    assert newest["model"] == "nope" and newest["status"] == 404
    assert older["model"] == "claude-haiku-4-5" and older["upstream_model"] == "llama3"
    assert older["provider"] == "Groq" and older["input_tokens"] == 3 and older["ttfb_ms"] > 0


def test_usage_ranges_and_a_restart(upstream, config_file):
    up = upstream(json_answer(200, openai_completion()))
    path = config_file({"managementKey": KEY, "ampOpenaiProviders": [provider(up.url)]})
    p = RunningProxy(str(path))
    try:
        for _ in range(3):
            request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
        _, _, usage = mgmt(p, "GET", "usage?range=24h")
        assert usage["range"] == "24h" and usage["persisted"] is True
        assert usage["models"]["m"]["requests"] == 3 and usage["providers"]["Mock"]["input_tokens"] == 9
    finally:
        p.close()
    lines = (path.parent / "usage.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["m"] in ("m",) for line in lines)
    p = RunningProxy(str(path))                              # a new process, the same folder
    try:
        request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
        _, _, usage = mgmt(p, "GET", "usage?range=all")
        assert usage["models"]["m"]["requests"] == 4 and usage["total"]["output_tokens"] == 4
        _, _, since_start = mgmt(p, "GET", "usage")           # the old shape: this process only
        assert since_start["range"] == "start" and since_start["models"]["m"]["requests"] == 1
        status, _, err = mgmt(p, "GET", "usage?range=1y")
        assert status == 400 and "unknown" in err["error"]["message"]
    finally:
        p.close()


def test_log_lines_and_the_live_tail(proxy):
    p = proxy({"managementKey": KEY})
    proxypal.log.setLevel("INFO")
    try:
        proxypal.log.info("before the tail, key %s", "sk-should-be-masked-123")
        _, _, got = mgmt(p, "GET", "logs?level=INFO&q=before")
        assert got["lines"][-1]["message"].startswith("before the tail") and got["last"] >= 1
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=TIMEOUT)
        conn.request("GET", "/v0/management/logs/stream?level=WARNING&q=disk", headers=H)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
        assert resp.read1(65536).startswith(b": ping")     # committed, nothing new yet
        p.loop.call_soon_threadsafe(proxypal.log.info, "disk info line: filtered out by level")
        p.loop.call_soon_threadsafe(proxypal.log.warning, "disk almost full")
        data = b""
        while b"disk almost full" not in data:
            data += resp.read1(65536)
        event = json.loads(data.split(b"data: ", 1)[1].split(b"\n\n", 1)[0])
        assert event["level"] == "WARNING" and event["message"] == "disk almost full"
        assert b"filtered out" not in data
        conn.close()
    finally:
        proxypal.log.setLevel("NOTSET")


def test_log_lines_are_masked(proxy):
    p = proxy({"managementKey": KEY, "ampOpenaiProviders": [
        {"name": "A", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": "sk-very-secret-upstream", "models": ["m"]}]})
    proxypal.log.setLevel("INFO")
    try:
        p.call(_log_info("sending with sk-very-secret-upstream and x-api-key: abcdef123"))
        _, _, got = mgmt(p, "GET", "logs?q=sending")
        assert got["lines"][-1]["message"] == "sending with *** and x-api-key: ***"
    finally:
        proxypal.log.setLevel("NOTSET")


async def _log_info(text: str) -> None:
    proxypal.log.info(text)


# -- the usage store and token counts ---------------------------------------------------

def record(model: str = "m", provider: str = "P", status: int = 200, tokens=(10, 5, 2, 1), ttfb=0.05):
    return proxypal.Record("id", "openai", "POST", "/v1/chat/completions", 0.0, model=model,
                           provider=provider, status=status, tokens=tokens, ttfb=ttfb)


def test_two_processes_share_one_usage_file_and_compaction_loses_nothing(tmp_path, monkeypatch):
    now = [1_800_000_000.0]
    a = proxypal.UsageStore(str(tmp_path), clock=lambda: now[0])
    b = proxypal.UsageStore(str(tmp_path), clock=lambda: now[0])
    monkeypatch.setattr(proxypal, "USAGE_FILE_MAX", 2000)      # compact early
    for hour in range(20 * 24):                              # 20 days, both writing
        now[0] = 1_800_000_000.0 + hour * 3600
        a.record(record(), 0.2)
        b.record(record(provider="Q", status=429), 0.4)
        a.flush()
        b.flush()
    for store in (a, b):
        got = store.snapshot("all")
        assert got["total"]["requests"] == 960 and got["providers"]["P"]["requests"] == 480
        assert got["providers"]["Q"]["errors"] == {"429": 480}
        assert got["total"]["cached_tokens"] == 1920 and got["total"]["reasoning_tokens"] == 960
    header, *lines = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert list(header) == ["compacted"]                     # how readers notice a compaction
    assert any(line["s"] == 86400 for line in lines)         # old hours merged into days
    # now is the start of hour 479: the last 24 hours are hours 455 to 479, still hourly
    assert b.snapshot("24h")["total"]["requests"] == 2 * 25
    latency = a.snapshot("all")["providers"]["P"]["latency_ms"]
    assert 200 <= latency["p50"] <= 240                      # 0.2 s, binned within 20%


def test_a_torn_last_line_is_skipped_and_read_once_complete(tmp_path):
    store = proxypal.UsageStore(str(tmp_path))
    line = json.dumps({"t": 0, "s": 3600, "m": "m", "p": "P", "n": 2, "e": {}, "i": 1, "o": 1,
                       "c": 0, "r": 0, "l": {}, "f": {}})
    path = tmp_path / "usage.jsonl"
    path.write_text(line + "\n" + line[:20])
    assert store.snapshot("all")["total"]["requests"] == 2
    with open(path, "a") as f:
        f.write(line[20:] + "\n")
    assert store.snapshot("all")["total"]["requests"] == 4


@pytest.mark.parametrize("answer,expected", [
    ({"usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 2}}}, (10, 5, 4, 2)),
    ({"usage": {"input_tokens": 3, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 2,
                "output_tokens": 9}}, (12, 9, 7, None)),
    ({"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 3, "thoughtsTokenCount": 4,
                        "cachedContentTokenCount": 5}}, (8, 7, 5, 4)),
    ({"response": {"usage": {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 6},
                             "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 3}}}}, (20, 7, 6, 3)),
    ({"usage": {"prompt_tokens": 1}}, (1, None, None, None)),
    ({"choices": []}, (None, None, None, None)),
], ids=["openai", "anthropic", "gemini", "responses", "partial", "none"])
def test_usage_counts_of_every_format(answer, expected):
    assert proxypal.usage_counts(answer) == expected


def test_stream_usage_counts_reach_the_request_record(upstream, proxy):
    events = OPENAI_STREAM[:-1] + [
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-x","choices":[],'
        b'"usage":{"prompt_tokens":11,"completion_tokens":6,"prompt_tokens_details":{"cached_tokens":5}}}\n\n',
        OPENAI_STREAM[-1]]
    up = upstream(sse_answer(events))
    p = proxy({"managementKey": KEY, "ampOpenaiProviders": [provider(up.url)]})
    request(p, "POST", "/v1/chat/completions", {"model": "m", "stream": True, "messages": []})
    _, _, got = mgmt(p, "GET", "requests")
    entry = got["requests"][0]
    assert (entry["input_tokens"], entry["output_tokens"], entry["cached_tokens"]) == (11, 6, 5)


def test_a_compaction_that_cannot_write_loses_nothing_and_waits_for_the_file_to_grow(
        tmp_path, monkeypatch, caplog):
    now = [1_800_000_000.0]
    store = proxypal.UsageStore(str(tmp_path), clock=lambda: now[0])
    monkeypatch.setattr(proxypal, "USAGE_FILE_MAX", 4000)
    tries = []

    def disk_full(path, data):
        tries.append(path)
        raise proxypal.ConfigWriteError("", f"cannot write {path}: No space left on device")
    monkeypatch.setattr(proxypal.ConfigStore, "write_file", staticmethod(disk_full))
    hours = 0

    def write_until(size):                                  # one hour a line, past `size`
        nonlocal hours
        while not hours or (tmp_path / "usage.jsonl").stat().st_size <= size:
            now[0] = 1_800_000_000.0 + hours * 3600
            store.record(record(), 0.2)
            hours += 1
    write_until(4000)
    store.flush()                                           # tried, refused: no exception
    assert len(tries) == 1 and "not compacted" in caplog.text and "No space" in caplog.text
    store.flush()
    assert len(tries) == 1                                  # not again at every flush
    size = (tmp_path / "usage.jsonl").stat().st_size
    write_until(size + 1000)                                # a quarter of the limit more
    store.flush()
    assert len(tries) == 2
    assert store.snapshot("all")["total"]["requests"] == hours       # every line counted
    monkeypatch.undo()
    monkeypatch.setattr(proxypal, "USAGE_FILE_MAX", 4000)
    write_until((tmp_path / "usage.jsonl").stat().st_size + 1000)
    store.flush()                                           # the disk has room again
    first = json.loads((tmp_path / "usage.jsonl").read_text().splitlines()[0])
    assert list(first) == ["compacted"]
    store.record(record(), 0.2)                             # into the new file
    fresh = proxypal.UsageStore(str(tmp_path), clock=lambda: now[0])
    assert fresh.snapshot("all")["total"]["requests"] == hours + 1


def test_a_folder_that_refuses_usage_lines_keeps_the_counts_and_a_bounded_backlog(
        tmp_path, monkeypatch, caplog):
    """A read-only config folder refuses usage.jsonl for good: the counts stay right in
    memory, the lines wait (the newest USAGE_PENDING_MAX bytes of them) and are retried
    by flush, not by every request, and reach the file once the folder takes them."""
    monkeypatch.setattr(proxypal, "USAGE_PENDING_MAX", 2000)
    real_open, read_only = os.open, [True]

    def refusing_open(path, flags, *args):
        if read_only[0] and str(path).endswith("usage.jsonl") and flags & os.O_WRONLY:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)
    monkeypatch.setattr(proxypal.os, "open", refusing_open)
    store = proxypal.UsageStore(str(tmp_path))
    writes = []
    real_write = proxypal.UsageStore._write
    monkeypatch.setattr(proxypal.UsageStore, "_write", lambda self: (writes.append(1), real_write(self)))
    with caplog.at_level(logging.WARNING, logger="proxypal"):
        for _ in range(100):
            store.record(record(), 0.2)
        assert len(writes) == 1                               # refused once, then left to flush
        store.flush()
        store.flush()
    assert len(writes) == 3 and caplog.text.count("usage not saved") == 1
    assert sum(map(len, store.pending)) <= 2000 and store.dropped > 70
    got = store.snapshot("all")
    assert got["total"]["requests"] == 100 and got["persisted"] is False   # counted all the same
    assert "Permission denied" in got["error"] and "not kept" in got["error"]
    read_only[0] = False                                     # the folder takes them again
    store.flush()
    kept = (tmp_path / "usage.jsonl").read_text().splitlines()
    assert len(kept) == 100 - store.dropped and store.pending == [] and not store.refused
    store.record(record(), 0.2)                              # written at once again
    assert len((tmp_path / "usage.jsonl").read_text().splitlines()) == len(kept) + 1


def test_the_shared_journal_never_fails_its_caller_and_follows_a_rotation(tmp_path, monkeypatch):
    """With --workers the page's journal is a file; one that cannot be made (a read-only
    folder) must not break the request or the log call that writes to it, and after a
    rotation the next line goes to the new file."""
    path = tmp_path / "logs" / "journal.jsonl"
    journal = proxypal.Journal("w1", str(path))
    real_open, refuse = os.open, [True]

    def refusing_open(name, flags, *args, **kwargs):
        if refuse[0] and str(name) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(name, flags, *args, **kwargs)
    monkeypatch.setattr(proxypal.os, "open", refusing_open)
    logger = logging.getLogger("proxypal.journal-test")
    logger.addHandler(journal)
    try:
        journal.add_request(record(), 1.0, 2.0)              # no exception: the view waits
        logger.warning("a log line while the folder refuses")
        refuse[0] = False
        journal.add_request(record(model="first"), 1.0, 2.0)
        os.replace(path, str(path) + ".1")                   # what rotate() does
        journal.add_request(record(model="second"), 1.0, 2.0)
        rotated = [json.loads(line)["request"]["model"] for line in open(str(path) + ".1")]
        current = [json.loads(line)["request"]["model"] for line in open(path)]
        shutil.rmtree(path.parent)                           # a clean-up removed the folder
        journal.add_request(record(model="third"), 1.0, 2.0)
    finally:
        logger.removeHandler(journal)
        journal.close()
    assert rotated == ["first"] and current == ["second"]
    assert [json.loads(line)["request"]["model"] for line in open(path)] == ["third"]
