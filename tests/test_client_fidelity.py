"""What the real agent clients need of every route, end to end through the real server:
Claude Code's mid-conversation system messages, structured output, reasoning history,
streams answered as streams, first-byte commits with keep-alives, provider headers,
session affinity, the unauthenticated probes and the models list's limits."""
from __future__ import annotations

import json
import re
import socket
import threading
from typing import Any, Dict

import pytest

from helpers import (ANTHROPIC_STREAM, OPENAI_STREAM, TIMEOUT, anthropic_message, anthropic_stream_named,
                     json_answer, openai_completion, proxypal, request, send, sse_answer)

ANTHROPIC_HEADERS = {"x-api-key": "proxypal-local", "anthropic-version": "2023-06-01"}


def openai_provider(url, models=("m",), **extra):
    return dict({"name": "Mock", "baseUrl": url + "/v1", "apiKey": "k", "models": list(models)}, **extra)


def events(body: bytes):
    out = []
    for block in body.split(b"\n\n"):
        lines = [line for line in block.decode().split("\n") if line and not line.startswith(":")]
        if lines:
            fields = dict(line.split(": ", 1) for line in lines)
            out.append((fields.get("event", ""), fields["data"]))
    return out


def test_claude_code_default_model_system_messages_reach_an_openai_upstream(upstream, proxy):
    """Claude Code's default model sends role "system" entries inside messages."""
    up = upstream(json_answer(200, openai_completion("gpt-x", "ok")))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["claude-opus-4-5"])]})
    body = {"model": "claude-opus-4-5", "max_tokens": 100, "system": "Base.",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                         {"role": "system", "content": "The user switched to plan mode."},
                         {"role": "user", "content": "Plan it"}]}
    status, _, out = request(p, "POST", "/v1/messages", body, ANTHROPIC_HEADERS, key=None)
    assert status == 200 and json.loads(out)["content"] == [{"type": "text", "text": "ok"}]
    assert [m["role"] for m in up.last().json()["messages"]] == ["system", "user", "assistant",
                                                                 "system", "user"]


def test_structured_output_crosses_to_anthropic_and_gemini(upstream, proxy):
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    anthropic = upstream(json_answer(200, anthropic_message("claude-x", '{"title":"t"}')))
    gemini = upstream(json_answer(200, {"candidates": [{"content": {"role": "model", "parts": [
        {"text": '{"isProblem": false}'}]}, "finishReason": "STOP"}], "responseId": "r"}))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": anthropic.url, "models": ["claude-x"]}],
               "geminiApiKeys": [{"apiKey": "g", "baseUrl": gemini.url, "models": ["gemini-x"]}]})
    status, _, _ = request(p, "POST", "/v1beta/models/claude-x:generateContent", {
        "contents": [{"role": "user", "parts": [{"text": "classify"}]}],
        "generationConfig": {"responseMimeType": "application/json", "responseJsonSchema": schema}},
        {"x-goog-api-key": "proxypal-local"}, key=None)
    assert status == 200
    assert anthropic.last().json()["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    status, _, _ = request(p, "POST", "/v1/chat/completions", {
        "model": "gemini-x", "messages": [{"role": "user", "content": "t"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}})
    assert status == 200
    config = gemini.last().json()["generationConfig"]
    assert config["responseMimeType"] == "application/json" and config["responseJsonSchema"] == schema


def test_thinking_history_reaches_deepseek_as_reasoning_content(upstream, proxy):
    up = upstream(json_answer(200, openai_completion("deepseek-reasoner")))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["deepseek-reasoner"])]})
    body = {"model": "deepseek-reasoner", "max_tokens": 100, "messages": [
        {"role": "user", "content": "ls"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Run ls.", "signature": ""},
                                          {"type": "tool_use", "id": "t1", "name": "Bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"}]}],
            "tools": [{"name": "Bash", "input_schema": {"type": "object", "properties": {}}}]}
    assert request(p, "POST", "/v1/messages", body, ANTHROPIC_HEADERS, key=None)[0] == 200
    assistant = up.last().json()["messages"][1]
    assert assistant["reasoning_content"] == "Run ls." and assistant["tool_calls"][0]["id"] == "t1"


def test_server_tool_toward_openai_is_a_400_naming_tool_and_route(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["m"], name="Groq")]})
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "news?"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}
    status, _, out = request(p, "POST", "/v1/messages", body, ANTHROPIC_HEADERS, key=None)
    message = json.loads(out)["error"]["message"]
    assert status == 400 and "'web_search'" in message and "'Groq'" in message and "'m'" in message
    assert up.all == []


def test_top_p_left_out_beside_temperature_for_anthropic(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message()))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    body = {"model": "claude-x", "max_tokens": 5, "temperature": 0.3, "top_p": 0.9,
            "messages": [{"role": "user", "content": "Hi"}]}
    assert request(p, "POST", "/v1/messages", body, ANTHROPIC_HEADERS, key=None)[0] == 200
    sent = up.last().json()
    assert sent["temperature"] == 0.3 and "top_p" not in sent


@pytest.mark.parametrize("client", ["anthropic", "openai"])
def test_stream_request_answered_as_a_stream_when_the_upstream_answers_json(upstream, proxy, client):
    up = upstream(json_answer(200, openai_completion("gpt-x", "Hello")))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["m"])]})
    if client == "anthropic":
        status, headers, out = request(p, "POST", "/v1/messages", {
            "model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
            ANTHROPIC_HEADERS, key=None)
        names = [e for e, _ in events(out)]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        assert '"text":"Hello"' in out.decode()
    else:
        status, headers, out = request(p, "POST", "/v1/chat/completions", {
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
        got = events(out)
        assert got[-1] == ("", "[DONE]") and '"content":"Hello"' in out.decode()
        assert all(json.loads(d).get("choices") for _, d in got[:-1])   # no usage chunk: not asked
    assert status == 200 and headers["content-type"] == "text/event-stream"


@pytest.mark.parametrize("asked", [True, False])
def test_openai_usage_chunk_only_when_asked(upstream, proxy, asked):
    up = upstream(sse_answer(ANTHROPIC_STREAM))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    body = {"model": "claude-x", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    if asked:
        body["stream_options"] = {"include_usage": True}
    status, _, out = request(p, "POST", "/v1/chat/completions", body)
    usage = [json.loads(d) for _, d in events(out) if d != "[DONE]" and json.loads(d).get("choices") == []]
    assert status == 200 and len(usage) == (1 if asked else 0)
    assert up.last().json()["stream"] is True


def test_provider_named_in_a_header(upstream, proxy):
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, ["m"], name="OpenRouter")]})
    status, headers, _ = request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
    assert status == 200 and headers["x-proxypal-provider"] == "OpenRouter"


def test_a_claude_code_session_sticks_to_one_credential(upstream, proxy):
    ups = [upstream(json_answer(200, anthropic_message())) for _ in range(3)]
    p = proxy({"claudeApiKeys": [{"apiKey": f"k{i}", "baseUrl": u.url} for i, u in enumerate(ups)]})
    for session in ("s-1", "s-2"):
        for _ in range(4):
            request(p, "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5,
                                                "messages": [{"role": "user", "content": "Hi"}]},
                    dict(ANTHROPIC_HEADERS, **{"x-claude-code-session-id": session}), key=None)
        assert sorted(len(u.all) for u in ups).count(0) >= 1   # not spread round-robin
    hits = [len(u.all) for u in ups]
    assert sum(hits) == 8 and all(h in (0, 4, 8) for h in hits)


@pytest.mark.parametrize("method,path", [("HEAD", "/"), ("GET", "/health"), ("HEAD", "/health")])
def test_probes_answer_without_a_key(proxy, method, path):
    p = proxy({})
    status, _, _ = request(p, method, path, key=None)
    assert status == 200


def test_models_list_carries_context_window_and_output_cap(proxy):
    p = proxy({"ampOpenaiProviders": [{"name": "DeepSeek", "baseUrl": "http://127.0.0.1:9/v1", "models": [
        {"name": "deepseek-chat", "alias": "claude-sonnet-4-5", "contextWindow": 128000,
         "maxOutputTokens": 8192}, "plain"]}]})
    items = {m["id"]: m for m in json.loads(request(p, "GET", "/v1/models")[2])["data"]}
    assert items["claude-sonnet-4-5"]["max_input_tokens"] == 128000
    assert items["claude-sonnet-4-5"]["max_tokens"] == 8192
    assert "max_input_tokens" not in items["plain"]


def test_models_command_lists_wildcard_mappings():
    config = proxypal.parse_config({"ampOpenaiProviders": [{"name": "Ollama", "baseUrl": "http://h/v1",
                                                            "models": ["llama3"]}],
                                    "ampModelMappings": [{"from": "claude-haiku-*", "to": "llama3"}]})
    rows = [r for r in proxypal.model_routes(config) if r["model"] == "claude-haiku-*"]
    assert rows and rows[0]["upstream_model"] == "llama3" and rows[0]["mapping"] == "claude-haiku-* -> llama3"


# -- the first byte: commit after firstByteCommitSeconds, keep-alives until the upstream speaks

def slow_upstream(upstream, respond_after, events_or_status):
    release = threading.Event()

    def respond(handler, rec):
        release.wait(TIMEOUT)
        if isinstance(events_or_status, int):
            body = json.dumps({"type": "error", "error": {"type": "overloaded_error",
                                                          "message": "Overloaded"}}).encode()
            handler.send_response(events_or_status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        sse_answer(events_or_status)(handler, rec)
    return upstream(respond), release


def read_until(sock, marker: bytes, got: bytes = b"") -> bytes:
    while marker not in got:
        more = sock.recv(65536)
        assert more, got
        got += more
    return got


def start_stream(port: int, body: dict, headers: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    data = json.dumps(body).encode()
    sock.sendall(f"POST /v1/messages HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    return sock


@pytest.mark.parametrize("kind", ["passthrough", "translated"])
def test_a_silent_upstream_gets_the_stream_committed_then_relayed_once(upstream, proxy, monkeypatch, kind):
    monkeypatch.setattr(proxypal, "COMMIT_PING_SECONDS", 0.05)
    up, release = slow_upstream(upstream, 0, ANTHROPIC_STREAM if kind == "passthrough" else OPENAI_STREAM)
    config = {"firstByteCommitSeconds": 0.1}
    config.update({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]} if kind == "passthrough"
                  else {"ampOpenaiProviders": [openai_provider(up.url, ["claude-x"])]})
    p = proxy(config)
    sock = start_stream(p.port, {"model": "claude-x", "max_tokens": 5, "stream": True,
                                 "messages": [{"role": "user", "content": "Hi"}]},
                        "x-api-key: proxypal-local\r\nanthropic-version: 2023-06-01\r\n")
    got = read_until(sock, b"event: ping", read_until(sock, b"event: message_start"))
    assert got.startswith(b"HTTP/1.1 200 ")                    # before the upstream said anything
    release.set()
    got = read_until(sock, b"0\r\n\r\n", got)
    sock.close()
    assert got.count(b"event: message_start") == 1 and b"event: message_stop" in got
    assert b'"text":"Hel"' in got or b'"text":"Hello"' in got


def test_an_upstream_silent_after_its_head_gets_one_opening(upstream, proxy, monkeypatch):
    # vLLM and LiteLLM send their head at once and the first chunk after the prefill
    monkeypatch.setattr(proxypal, "COMMIT_PING_SECONDS", 0.05)
    release = threading.Event()
    up = upstream(sse_answer(OPENAI_STREAM, gate=lambda i: i == 0 and release.wait(TIMEOUT)))
    p = proxy({"firstByteCommitSeconds": 0.1, "ampOpenaiProviders": [openai_provider(up.url, ["claude-x"])]})
    sock = start_stream(p.port, {"model": "claude-x", "max_tokens": 5, "stream": True,
                                 "messages": [{"role": "user", "content": "Hi"}]},
                        "x-api-key: proxypal-local\r\nanthropic-version: 2023-06-01\r\n")
    got = read_until(sock, b"event: ping", read_until(sock, b"event: message_start"))
    release.set()
    got = read_until(sock, b"0\r\n\r\n", got)
    sock.close()
    assert got.count(b"event: message_start") == 1 and b"event: message_stop" in got


def test_an_upstream_error_after_the_commit_arrives_as_the_streams_error_event(upstream, proxy, monkeypatch):
    monkeypatch.setattr(proxypal, "COMMIT_PING_SECONDS", 0.05)
    up, release = slow_upstream(upstream, 0, 529)
    p = proxy({"firstByteCommitSeconds": 0.1, "claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    sock = start_stream(p.port, {"model": "claude-x", "max_tokens": 5, "stream": True,
                                 "messages": [{"role": "user", "content": "Hi"}]},
                        "x-api-key: proxypal-local\r\nanthropic-version: 2023-06-01\r\n")
    got = read_until(sock, b"event: message_start")
    release.set()
    got = read_until(sock, b"0\r\n\r\n", got)
    sock.close()
    assert b"event: error" in got and b"Overloaded" in got and b"overloaded_error" in got


def test_an_error_before_the_commit_keeps_its_status(upstream, proxy):
    up, release = slow_upstream(upstream, 0, 529)
    release.set()
    p = proxy({"firstByteCommitSeconds": 5, "claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    status, _, _ = request(p, "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5, "stream": True,
                                                        "messages": [{"role": "user", "content": "Hi"}]},
                           ANTHROPIC_HEADERS, key=None)
    assert status == 529


def test_gemini_v1_paths_as_google_genai_sends_them(upstream, proxy):
    """google-genai posts to /v1/models/{model}:generateContent unless told v1beta."""
    up = upstream(json_answer(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]},
                                                    "finishReason": "STOP"}], "responseId": "r"}))
    p = proxy({"geminiApiKeys": [{"apiKey": "g", "baseUrl": up.url, "models": ["gemini-x"]}]})
    status, _, out = request(p, "POST", "/v1/models/gemini-x:generateContent",
                             {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                             {"x-goog-api-key": "proxypal-local"}, key=None)
    assert status == 200 and json.loads(out)["candidates"][0]["content"]["parts"] == [{"text": "hi"}]
    assert up.last().path == "/v1beta/models/gemini-x:generateContent"
    status, _, out = request(p, "POST", "/v1/models/nope:generateContent", {"contents": []},
                             {"x-goog-api-key": "proxypal-local"}, key=None)
    assert status == 404 and json.loads(out)["error"]["status"] == "NOT_FOUND"


# -- a prompt over the context window, in the client's own words --------------------------
# Claude Code compacts (or lowers max_tokens) only on Anthropic's "prompt is too long";
# Codex compacts on OpenAI's code context_length_exceeded. Other APIs' words for the same
# failure would leave a session stuck at its limit, failing every turn.

OVERFLOWS = [
    ("openai", {"error": {"message": "This model's maximum context length is 131072 tokens. However, you "
                                     "requested 140000 tokens.", "type": "invalid_request_error",
                          "param": "messages", "code": "context_length_exceeded"}}),
    ("gemini", {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                          "The input token count (1200000) exceeds the maximum number of tokens allowed "
                          "(1048576)."}}),
    ("llama.cpp", {"error": {"code": 400, "type": "exceed_context_size_error",
                             "message": "the request exceeds the available context size, try increasing it"}}),
]


def overflow_config(kind: str, url: str) -> Dict[str, Any]:
    if kind == "gemini":
        return {"geminiApiKeys": [{"apiKey": "k", "baseUrl": url, "models": ["m"]}]}
    return {"ampOpenaiProviders": [{"name": "Local", "baseUrl": url + "/v1", "apiKey": "k", "models": ["m"]}]}


@pytest.mark.parametrize("kind, answer", OVERFLOWS, ids=[o[0] for o in OVERFLOWS])
def test_a_context_overflow_reaches_claude_code_and_codex_in_their_words(upstream, proxy, kind, answer):
    p = proxy(overflow_config(kind, upstream(json_answer(400, answer)).url))
    status, _, out = request(p, "POST", "/v1/messages", {
        "model": "m", "max_tokens": 32000, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        ANTHROPIC_HEADERS, key=None)
    err = json.loads(out)["error"]
    assert status == 400 and err["type"] == "invalid_request_error"
    assert err["message"].startswith("prompt is too long: "), err
    status, _, out = request(p, "POST", "/v1/responses", {"model": "m", "input": "x"})
    assert status == 400 and json.loads(out)["error"]["code"] == "context_length_exceeded", out
    # streamed, as Codex asks: a response.failed event, the only place Codex reads that code
    status, _, out = request(p, "POST", "/v1/responses", {"model": "m", "input": "x", "stream": True})
    events = [json.loads(block.split("data: ", 1)[1]) for block in out.decode().split("\n\n") if "data: " in block]
    assert status == 200 and [e["type"] for e in events] == [
        "response.created", "response.in_progress", "error", "response.failed"]
    assert [e["sequence_number"] for e in events] == [0, 1, 2, 3]
    assert events[-1]["response"]["id"] == events[0]["response"]["id"]
    assert events[-1]["response"]["error"]["code"] == "context_length_exceeded", events


def test_a_context_overflow_in_a_responses_stream_reaches_claude_code_in_its_words(upstream, proxy):
    events = [b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
              b'"response":{"id":"resp_1","object":"response","status":"in_progress","output":[]}}\n\n',
              b'event: response.failed\ndata: {"type":"response.failed","sequence_number":1,"response":'
              b'{"id":"resp_1","object":"response","status":"failed","output":[],"error":{"code":'
              b'"context_length_exceeded","message":"Your input exceeds the context window of this model."}}}\n\n']
    up = upstream(sse_answer(events))
    p = proxy({"ampOpenaiProviders": [{"name": "R", "baseUrl": up.url + "/v1", "apiKey": "k", "models": ["m"],
                                       "wireApi": "responses"}]})
    status, _, out = request(p, "POST", "/v1/messages", {
        "model": "m", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        ANTHROPIC_HEADERS, key=None)
    errors = [json.loads(block.split("data: ", 1)[1]) for block in out.decode().split("\n\n")
              if block.startswith("event: error")]
    assert status == 200 and errors, out
    assert errors[-1]["error"]["type"] == "invalid_request_error"
    assert errors[-1]["error"]["message"].startswith("prompt is too long: "), errors


@pytest.mark.parametrize("fmt, status, message, expected", [
    ("anthropic", 400, "Local: context_length_exceeded: max context length is 8192", "prompt is too long: Local:"),
    ("anthropic", 400, "prompt is too long: 210000 tokens > 200000 maximum", "prompt is too long: 210000"),
    ("openai", 400, "input length and `max_tokens` exceed context limit: 190000 + 32000 > 200000", "input"),
    ("anthropic", 400, "messages: text content blocks must be non-empty", "messages: text"),
    ("anthropic", 500, "context window of the worker died", "context window of"),      # not a 4xx
])
def test_overflow_wording_is_added_once_and_only_to_a_4xx(fmt, status, message, expected):
    body = json.loads(proxypal.error_body(fmt, status, message))
    assert body["error"]["message"].startswith(expected)
    if fmt == "openai":                    # (Anthropic's other overflow wording, for Codex)
        assert body["error"]["code"] == "context_length_exceeded"


# Claude Code lowers max_tokens and retries on Anthropic's "input length and `max_tokens`
# exceed context limit: P + C > W" (the regex below is its own), when W - P - 1000 leaves at
# least 3,000 tokens; it compacts on "prompt is too long". Local models with a small window
# (vLLM, 32k) refuse its 32,000 token cap beside any prompt: every turn failed.
CLAUDE_CODE_OUTPUT_RETRY = re.compile(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)")
VLLM_CAP = ("'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context length is "
            "%d tokens and your request has %d input tokens (32000 > %d - %d). (parameter=max_tokens, value=32000)")


@pytest.mark.parametrize("message, sizes", [
    (VLLM_CAP % (100001, 81126, 100001, 81126), (81126, 32000, 100001)),
    ("This model's maximum context length is 8192 tokens. However, you requested 8500 tokens (500 in the "
     "messages, 8000 in the completion). Please reduce the length of the messages or completion.", (500, 8000, 8192)),
    ("This model's maximum context length is 128000 tokens. However, you requested 150000 tokens (90000 in the "
     "messages, 10000 in the functions, and 50000 in the completion).", (100000, 50000, 128000)),
    (VLLM_CAP % (32768, 29000, 32768, 29000), None),          # 32768 - 29000 - 1000 < 3000: compact instead
    ("This model's maximum context length is 65536 tokens. However, you requested 70000 tokens (62000 in the "
     "messages, 8000 in the completion).", None),
    ("This model's maximum context length is 32768 tokens. However, your request has 40000 input tokens. "
     "Please reduce the length of the input messages.", None),
])
def test_an_output_cap_that_does_not_fit_reaches_claude_code_as_one_it_lowers(message, sizes):
    said = json.loads(proxypal.error_body("anthropic", 400, "Local: " + message))["error"]["message"]
    found = CLAUDE_CODE_OUTPUT_RETRY.search(said)
    if sizes is None:
        assert found is None and said.startswith("prompt is too long: Local: "), said
    else:
        assert found and tuple(map(int, found.groups())) == sizes and "Local: " in said, said
    # the OpenAI family keeps OpenAI's own code for it
    assert json.loads(proxypal.error_body("openai", 400, message))["error"]["code"] == "context_length_exceeded"


def test_claude_code_gets_the_output_cap_words_through_the_proxy_with_the_config_hint(upstream, proxy):
    up = upstream(json_answer(400, {"error": {"message": VLLM_CAP % (32768, 1200, 32768, 1200),
                                              "type": "BadRequestError", "param": None, "code": 400}}))
    p = proxy({"ampOpenaiProviders": [{"name": "Local", "baseUrl": up.url + "/v1", "apiKey": "k",
                                       "models": ["qwen"]}]})
    status, _, out = request(p, "POST", "/v1/messages", {
        "model": "qwen", "max_tokens": 32000, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        ANTHROPIC_HEADERS, key=None)
    err = json.loads(out)["error"]
    assert status == 400 and err["type"] == "invalid_request_error"
    assert tuple(map(int, CLAUDE_CODE_OUTPUT_RETRY.search(err["message"]).groups())) == (1200, 32000, 32768)
    assert "maxOutputTokens of 'qwen' in ampOpenaiProviders[0].models" in err["message"], err


def test_an_openai_compatible_upstreams_error_code_reaches_a_responses_client(upstream, proxy):
    """Codex acts on OpenAI's codes (insufficient_quota stops, rate_limit_exceeded waits)."""
    up = upstream(json_answer(429, {"error": {"message": "You exceeded your current quota.",
                                              "type": "insufficient_quota", "param": None,
                                              "code": "insufficient_quota"}}))
    p = proxy({"ampOpenaiProviders": [{"name": "O", "baseUrl": up.url + "/v1", "apiKey": "k", "models": ["m"]}]})
    status, _, out = request(p, "POST", "/v1/responses", {"model": "m", "input": "x"})
    assert status == 429 and json.loads(out)["error"]["code"] == "insufficient_quota", out


# -- how long to wait, in each client's terms ----------------------------------------------
# Google says it in the body (RetryInfo; Gemini CLI waits exactly that, else guesses), the
# others in a Retry-After header (the Anthropic and OpenAI SDKs and Claude Code wait that).

GOOGLE_429 = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message":
                        "You exceeded your current quota. Please retry in 35.873589421s.",
                        "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                            {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                             "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "35s"}]}}


@pytest.mark.parametrize("body, delay", [
    (json.dumps(GOOGLE_429).encode(), 35.0),
    (b'{"error": {"code": 429, "message": "Please retry in 1.5s.", "status": "RESOURCE_EXHAUSTED"}}', 1.5),
    (b'{"error": {"code": 429, "message": "Please retry in 800ms", "status": "RESOURCE_EXHAUSTED"}}', 0.8),
    (b'{"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}', None),
])
def test_googles_retry_delay_is_read_from_its_error(body, delay):
    assert proxypal.google_retry_delay(body) == delay


def test_a_gemini_429_tells_claude_code_how_long_to_wait(upstream, proxy):
    up = upstream(json_answer(429, GOOGLE_429))
    p = proxy({"geminiApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": ["gemini-2.5-pro"]}]})
    status, headers, out = request(p, "POST", "/v1/messages", {
        "model": "gemini-2.5-pro", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
        ANTHROPIC_HEADERS, key=None)
    assert status == 429 and headers.get("retry-after") == "35", headers
    assert json.loads(out)["error"]["type"] == "rate_limit_error"
    cooled = list(p.server.balancer.cooldowns.values())      # the credential rests 35s, not 30
    assert len(cooled) == 1 and 30 < cooled[0].until - p.server.balancer.clock() <= 35, cooled


def test_an_openai_429_tells_gemini_cli_how_long_to_wait(upstream, proxy):
    up = upstream(json_answer(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                              "param": None, "code": "rate_limit_exceeded"}},
                              headers=(("Retry-After", "12"),)))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, headers, out = request(p, "POST", "/v1beta/models/m:generateContent",
                                   {"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
    err = json.loads(out)["error"]
    assert status == 429 and err["status"] == "RESOURCE_EXHAUSTED" and headers.get("retry-after") == "12"
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"} in err["details"], err


# -- google-genai (Python) writes some field names in snake_case -----------------------------
# Google's JSON parser takes proto field names too, and google-genai 3.6 sends them inside
# inlineData, fileData, thinkingConfig and Schema. Translated, they were dropped: an image
# without its type, thinking off, schema constraints lost.

GENAI_BODY = {
    "contents": [{"role": "user", "parts": [
        {"text": "Look"},
        {"inlineData": {"data": "iVBORw0KGgo=", "mime_type": "image/png"}},
        {"fileData": {"file_uri": "https://example.com/cat.png", "mime_type": "image/png"}}]},
        {"role": "model", "parts": [{"function_call": {"name": "read_file", "args": {"file_path": "a.txt"}}}]},
        {"role": "user", "parts": [{"function_response": {"name": "read_file",
                                                          "response": {"output_text": "hi"}}}]}],
    "system_instruction": {"parts": [{"text": "Be brief"}]},
    "tools": [{"function_declarations": [{"name": "read_file", "parameters": {
        "type": "OBJECT", "required": ["file_path"], "property_ordering": ["file_path"],
        "properties": {"file_path": {"type": "STRING", "max_length": 200},
                       "tags": {"type": "ARRAY", "max_items": 3, "items": {"any_of": [{"type": "STRING"}]}}}}}]}],
    "generationConfig": {"max_output_tokens": 100, "top_k": 3.0,
                         "thinkingConfig": {"include_thoughts": True, "thinking_budget": 2048}},
}


def test_google_genais_snake_case_fields_are_read_when_translated(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message("claude-x")))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": ["claude-x"]}]})
    status, _, out = request(p, "POST", "/v1beta/models/claude-x:generateContent", GENAI_BODY)
    assert status == 200, out
    sent = up.last().json()
    messages = sent["messages"]
    assert messages[0]["content"][1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    assert messages[0]["content"][2]["source"] == {"type": "url", "url": "https://example.com/cat.png"}
    assert messages[1]["content"][0]["input"] == {"file_path": "a.txt"}          # the user's keys stay
    assert "output_text" in json.dumps(messages[2]["content"][0])
    assert sent["system"][0]["text"] == "Be brief"
    assert sent["top_k"] == 3 and isinstance(sent["top_k"], int)
    # (thinking stays off while the tool turn it continues has no signed thinking)
    first_turn = dict(GENAI_BODY, contents=GENAI_BODY["contents"][:1])
    assert request(p, "POST", "/v1beta/models/claude-x:generateContent", first_turn)[0] == 200
    assert up.last().json()["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    schema = sent["tools"][0]["input_schema"]
    assert schema["required"] == ["file_path"] and "propertyOrdering" not in schema
    assert schema["properties"]["file_path"] == {"type": "string", "maxLength": 200}
    assert schema["properties"]["tags"] == {"type": "array", "maxItems": 3, "items": {"anyOf": [{"type": "string"}]}}


def test_gemini_camel_case_renames_googles_field_names_only():
    body = {"contents": [{"parts": [{"functionCall": {"name": "f", "args": {"snake_key": 1}}}]}]}
    raw = json.dumps(body).encode()
    assert proxypal.gemini_camel_case(body, raw) is None          # only the user's own keys
    fixed = proxypal.gemini_camel_case(GENAI_BODY, json.dumps(GENAI_BODY).encode())
    assert fixed["generationConfig"] == {"maxOutputTokens": 100, "topK": 3.0, "thinkingConfig": {
        "includeThoughts": True, "thinkingBudget": 2048}}
    assert fixed["contents"][2]["parts"][0] == {"functionResponse": {"name": "read_file",
                                                                     "response": {"output_text": "hi"}}}


# -- a relayed Anthropic stream names the model Claude Code asked for -------------------------
# Claude Code drops the thinking blocks of every earlier answer whose model is not the one it
# asks for now; Anthropic then refuses the tool turn those blocks must open ("Expected
# `thinking` or `redacted_thinking`, but found `tool_use`"). With an alias (Azure
# deployments, Bedrock ids) every tool loop with thinking failed.

@pytest.mark.parametrize("split", [None, 40, 1])
def test_a_relayed_anthropic_stream_names_the_model_asked_for(upstream, proxy, split):
    events = [b": hello\n\n"] + ANTHROPIC_STREAM      # (a comment first, as some gateways send)
    wire = b"".join(events)
    pieces = [wire] if split is None else [wire[i:i + split] for i in range(0, len(wire), split)]
    up = upstream(sse_answer(pieces))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": [
        {"name": "claude-x", "alias": "claude-opus-4-8"}]}]})
    status, _, out = request(p, "POST", "/v1/messages", {
        "model": "claude-opus-4-8", "max_tokens": 10, "stream": True,
        "messages": [{"role": "user", "content": "x"}]}, ANTHROPIC_HEADERS, key=None)
    assert status == 200
    assert out == b": hello\n\n" + b"".join(anthropic_stream_named("claude-opus-4-8")), out[:300]


# -- an upstream that echoes its key never shows it to the client ---------------------------

UPSTREAM_KEY = "sk-upstream-secret-0123456789"


@pytest.mark.parametrize("client", ["openai", "anthropic"])
def test_a_key_echoed_in_a_midstream_error_or_a_login_page_is_masked(upstream, proxy, client):
    events = [OPENAI_STREAM[0], b'data: {"error":{"message":"key %s overloaded","type":"server_error"}}\n\n'
              % UPSTREAM_KEY.encode()] if client == "anthropic" else \
        [OPENAI_STREAM[0], b'data: {"error": "invalid api key %s"}\n\n' % UPSTREAM_KEY.encode()]   # (a string)
    page = b"<html><body>Proxy login. Your key %s was rejected</body></html>" % UPSTREAM_KEY.encode()

    def answer(handler, rec):
        if rec.json().get("stream"):
            return sse_answer(events)(handler, rec)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", str(len(page)))
        handler.end_headers()
        handler.wfile.write(page)
    up = upstream(answer)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, apiKey=UPSTREAM_KEY)]})
    path, headers = ("/v1/messages", ANTHROPIC_HEADERS) if client == "anthropic" else ("/v1/chat/completions", None)
    for stream in (True, False):
        status, _, out = request(p, "POST", path, {"model": "m", "max_tokens": 10, "stream": stream,
                                                   "messages": [{"role": "user", "content": "x"}]},
                                 headers, key=None if headers else "proxypal-local")
        assert UPSTREAM_KEY.encode() not in out and b"***" in out, out
        assert status == (200 if stream else 502)


def test_an_upstreams_json_nested_past_pythons_limit_is_its_failure_not_the_clients(upstream, proxy):
    deep = '{"error":' * 100000 + "1" + "}" * 100000
    assert proxypal.event_object(deep) is None
    assert proxypal.upstream_message(deep.encode())[0].startswith('{"error":{"error":')
    up = upstream(sse_answer([b"event: error\ndata: " + deep.encode() + b"\n\n"]))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, out = request(p, "POST", "/v1/messages", {"model": "m", "max_tokens": 10, "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]},
                             ANTHROPIC_HEADERS, key=None)
    err = json.loads(out)["error"]
    assert status == 502 and err["type"] == "api_error" and "nests too deeply" not in err["message"], out[:200]


def test_google_genai_lists_and_gets_models_at_v1_in_geminis_shape(upstream, proxy):
    """google-genai (Python) defaults to api_version v1: GET /v1/models with x-goog-api-key."""
    up = upstream(json_answer(200, openai_completion()))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, out = request(p, "GET", "/v1/models", headers={"x-goog-api-key": "proxypal-local"}, key=None)
    assert status == 200 and [m["name"] for m in json.loads(out)["models"]] == ["models/m"], out
    status, _, out = request(p, "GET", "/v1/models/m?key=proxypal-local", key=None)
    assert status == 200 and json.loads(out)["name"] == "models/m", out
    status, _, out = request(p, "GET", "/v1/models/nope", headers={"x-goog-api-key": "proxypal-local"}, key=None)
    assert status == 404 and json.loads(out)["error"]["status"] == "NOT_FOUND", out
    status, _, out = request(p, "GET", "/v1/models")                    # the OpenAI SDK's, as before
    assert status == 200 and json.loads(out)["data"][0]["id"] == "m"


def test_an_anthropic_overloaded_529_reaches_a_gemini_client_as_503_which_it_retries(upstream, proxy):
    up = upstream(json_answer(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": ["claude-x"]}]})
    status, _, out = request(p, "POST", "/v1beta/models/claude-x:generateContent",
                             {"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
    assert status == 503 and json.loads(out)["error"]["status"] == "UNAVAILABLE", out
    status, _, out = request(p, "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x"}]}, ANTHROPIC_HEADERS, key=None)
    assert status == 529                                                # Anthropic's own, for its clients


@pytest.mark.parametrize("body, headers, said", [
    (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n',
     (("Content-Type", "text/event-stream"),), "Overloaded"),
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", (("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
     "compressed as 'gzip'"),
])
def test_an_upstreams_odd_body_is_said_in_plain_words(upstream, proxy, body, headers, said):
    status = 529 if b"event:" in body else 200

    def answer(handler, rec):
        send(handler, status, body, dict(headers)["Content-Type"], tuple(h for h in headers if h[0] != "Content-Type"))
    up = upstream(answer)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    got, _, out = request(p, "POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    message = json.loads(out)["error"]["message"]
    assert got in (529, 502) and said in message and "event:" not in message, message


# -- reasoning through Gemini CLI's history ---------------------------------------------------
# Gemini CLI keeps no thought parts in its history (it filters `part.thought`), yet DeepSeek
# and Kimi refuse a tool turn without its reasoning_content (api-docs.deepseek.com/guides/
# thinking_mode), and Anthropic keeps thinking on only for a tool turn that opens with its
# signed thinking. The answer's reasoning rides on its first functionCall's thoughtSignature.

def deepseek_like(handler, rec):
    """Streams reasoning_content and a tool call; refuses a tool turn without its reasoning."""
    body = rec.json()
    for message in body["messages"]:
        if message["role"] == "assistant" and message.get("tool_calls") and not message.get("reasoning_content"):
            return send(handler, 400, json.dumps({"error": {
                "message": "The reasoning_content in the thinking mode must be passed back to the API.",
                "type": "invalid_request_error"}}).encode())
    if any(m["role"] == "tool" for m in body["messages"]):
        return send(handler, 200, json.dumps(openai_completion("deepseek-reasoner", "Done.")).encode())
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Think "}}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "first."}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                  "function": {"name": "ls", "arguments": "{}"}}]}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    events = [b"data: " + json.dumps(dict(c, id="c1", object="chat.completion.chunk", created=1,
                                          model="deepseek-reasoner")).encode() + b"\n\n" for c in chunks]
    return sse_answer(events + [b"data: [DONE]\n\n"])(handler, rec)


def gemini_cli_history(chunks):
    """The model turn as Gemini CLI keeps it: every part but the thoughts."""
    parts = [p for c in chunks for p in c["candidates"][0]["content"]["parts"] if not p.get("thought")]
    return {"role": "model", "parts": parts}


def test_deepseek_reasoning_survives_gemini_clis_history_to_the_next_tool_turn(upstream, proxy):
    up = upstream(deepseek_like)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, models=["deepseek-reasoner"])]})
    ask = {"contents": [{"role": "user", "parts": [{"text": "list files"}]}],
           "tools": [{"functionDeclarations": [{"name": "ls", "parameters": {"type": "OBJECT", "properties": {}}}]}]}
    status, _, out = request(p, "POST", "/v1beta/models/deepseek-reasoner:streamGenerateContent?alt=sse", ask)
    chunks = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]
    model_turn = gemini_cli_history(chunks)
    assert status == 200 and "functionCall" in model_turn["parts"][0], out
    up.last()                                                           # (the first request)
    ask["contents"] += [model_turn, {"role": "user", "parts": [
        {"functionResponse": {"id": "call_1", "name": "ls", "response": {"output": "a.txt"}}}]}]
    status, _, out = request(p, "POST", "/v1beta/models/deepseek-reasoner:generateContent", ask)
    assert status == 200, out
    assistant = [m for m in up.last().json()["messages"] if m["role"] == "assistant"][0]
    assert assistant["reasoning_content"] == "Think first." and assistant["tool_calls"][0]["id"] == "call_1"


def test_claudes_signed_thinking_survives_gemini_clis_history_so_thinking_stays_on(upstream, proxy):
    answer = anthropic_message("claude-x")
    answer.update(stop_reason="tool_use", content=[
        {"type": "thinking", "thinking": "Plan.", "signature": "EqQBsig"},
        {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {}}])
    up = upstream(json_answer(200, answer))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": ["claude-x"]}]})
    ask = {"contents": [{"role": "user", "parts": [{"text": "list files"}]}],
           "generationConfig": {"thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": True}},
           "tools": [{"functionDeclarations": [{"name": "ls", "parameters": {"type": "OBJECT", "properties": {}}}]}]}
    status, _, out = request(p, "POST", "/v1beta/models/claude-x:generateContent", ask)
    assert status == 200 and up.last().json()["thinking"]["budget_tokens"] == 2048, out
    ask["contents"] += [gemini_cli_history([json.loads(out)]), {"role": "user", "parts": [
        {"functionResponse": {"id": "toolu_1", "name": "ls", "response": {"output": "a.txt"}}}]}]
    assert request(p, "POST", "/v1beta/models/claude-x:generateContent", ask)[0] == 200
    sent = up.last().json()
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent["messages"][1]["content"][0] == {"type": "thinking", "thinking": "Plan.", "signature": "EqQBsig"}


def test_deepseeks_cache_hits_count_as_cached_tokens():
    """DeepSeek says its cache hits as prompt_cache_hit_tokens (api-docs.deepseek.com/guides/kv_cache)."""
    usage = {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
             "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}
    assert proxypal.read_openai_usage(usage).cached == 64
    assert proxypal.usage_counts({"usage": usage}) == (100, 5, 64, None)
    out = proxypal.TRANSLATORS[("anthropic", "openai")].response(
        dict(openai_completion("deepseek-chat"), usage=usage), "claude-x")
    assert out["usage"]["input_tokens"] == 36 and out["usage"]["cache_read_input_tokens"] == 64


def test_a_streamed_answer_that_names_a_placeholder_key_is_relayed_as_it_is(upstream, proxy):
    """Only error events are masked: "ollama" is README's Ollama apiKey, and a word."""
    text = b'data: {"choices":[{"index":0,"delta":{"content":"That error comes from ollama."}}]}\n\n'
    up = upstream(sse_answer([text, OPENAI_STREAM[-2], b"data: [DONE]\n\n"]))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, apiKey="ollama")]})
    status, _, out = request(p, "POST", "/v1/chat/completions", {"model": "m", "stream": True,
                                                                 "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and b"That error comes from ollama." in out, out


@pytest.mark.parametrize("model", ["claude-x", "claude-opus-4-8"])
def test_a_message_start_on_several_data_lines_stays_whole(upstream, proxy, model):
    start = json.loads(ANTHROPIC_STREAM[0].split(b"data: ", 1)[1])
    lines = json.dumps(start, indent=1).encode().replace(b"\n", b"\ndata: ")
    up = upstream(sse_answer([b"event: message_start\ndata: " + lines + b"\n\n"] + ANTHROPIC_STREAM[1:]))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": [{"name": "claude-x", "alias": model}]}]})
    status, _, out = request(p, "POST", "/v1/messages", {"model": model, "max_tokens": 5, "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]},
                             ANTHROPIC_HEADERS, key=None)
    first = out.split(b"\n\n", 1)[0]
    data = json.loads(b"\n".join(line.split(b":", 1)[1] for line in first.split(b"\n")[1:]))
    assert status == 200 and data["message"]["model"] == model, first


def test_a_gemini_schemas_own_names_stay_as_sent():
    body = {"tools": [{"function_declarations": [{"name": "f", "parameters": {
        "type": "OBJECT", "$defs": {"line_item": {"type": "OBJECT"}}, "properties": {
            "items": {"type": "ARRAY", "items": {"$ref": "#/$defs/line_item"}}}}}]}]}
    fixed = proxypal.gemini_camel_case(body, json.dumps(body).encode())
    assert list(fixed["tools"][0]["functionDeclarations"][0]["parameters"]["$defs"]) == ["line_item"]


@pytest.mark.parametrize("headers, message", [
    ((("Retry-After", "1e999"),), "slow down"),
    ((), 'slow down, "retryDelay": "1.5.s"'),
    ((), "slow down. Please retry in 1.5.s"),
])
def test_an_odd_wait_in_a_429_is_no_advice_and_no_failure(upstream, proxy, headers, message):
    up = upstream(json_answer(429, {"error": {"message": message, "type": "requests"}}, headers=headers))
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url)]})
    status, _, out = request(p, "POST", "/v1beta/models/m:generateContent",
                             {"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
    assert status == 429 and "slow down" in json.loads(out)["error"]["message"], out


def test_a_gemini_relay_sends_google_genais_body_on_as_it_came_capped_where_it_says_so(upstream, proxy):
    """Google takes proto field names: a relay changes nothing but the cap it must."""
    up = upstream(json_answer(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]},
                                                    "finishReason": "STOP", "index": 0}]}))
    p = proxy({"geminiApiKeys": [{"apiKey": "k", "baseUrl": up.url,
                                  "models": [{"name": "gemini-2.5-pro", "maxOutputTokens": 50}]}]})
    assert request(p, "POST", "/v1beta/models/gemini-2.5-pro:generateContent", GENAI_BODY)[0] == 200
    sent = up.last().json()
    assert sent["generationConfig"]["max_output_tokens"] == 50 and "system_instruction" in sent
    assert sent["contents"] == GENAI_BODY["contents"]


def test_a_gemini_relay_is_capped_by_the_entrys_max_output_tokens(upstream, proxy):
    """The cap sits one level down in Gemini's body: it used to change the client's body
    too, so the relay took it for unchanged and sent the client's bytes, uncapped."""
    up = upstream(json_answer(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]},
                                                    "finishReason": "STOP", "index": 0}]}))
    p = proxy({"geminiApiKeys": [{"apiKey": "k", "baseUrl": up.url,
                                  "models": [{"name": "gemini-2.5-pro", "maxOutputTokens": 50}]}]})
    body = {"contents": [{"role": "user", "parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": 100}}
    assert request(p, "POST", "/v1beta/models/gemini-2.5-pro:generateContent", body)[0] == 200
    assert up.last().json()["generationConfig"]["maxOutputTokens"] == 50


# -- OpenRouter's reasoning_details come back unchanged on the next tool turn ------------------
# https://openrouter.ai/docs/use-cases/reasoning-tokens#preserving-reasoning-blocks: "reasoning
# details must be preserved when using multi-turn tool calling" (Gemini 3 and Claude through
# OpenRouter refuse a tool turn without them).

DETAILS = [{"type": "reasoning.text", "text": "Think first.", "signature": "sig-or-1", "format": "anthropic-claude-v1",
            "index": 0},       # (two details may share an index: OpenRouter's Gemini 3 and GPT-5 recordings)
           {"type": "reasoning.encrypted", "data": "ENCDATA", "format": "anthropic-claude-v1", "index": 0}]


def openrouter_like(handler, rec):
    body = rec.json()
    for message in body["messages"]:
        if message["role"] == "assistant" and message.get("tool_calls") and message.get("reasoning_details") != DETAILS:
            return send(handler, 400, json.dumps({"error": {
                "message": "reasoning_details must be passed back", "code": 400}}).encode())
    if any(m["role"] == "tool" for m in body["messages"]):
        return send(handler, 200, json.dumps(openai_completion("or-model", "Done.")).encode())
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}
    if not body.get("stream"):
        answer = openai_completion("or-model", "")
        answer["choices"][0].update(finish_reason="tool_calls", message={
            "role": "assistant", "content": "I'll check.", "reasoning": "Think first.", "reasoning_details": DETAILS,
            "tool_calls": [dict(call, index=None)]})
        return send(handler, 200, json.dumps(answer).encode())
    deltas = [{"role": "assistant", "reasoning": "Think ", "reasoning_details": [
                  {"type": "reasoning.text", "text": "Think ", "format": "anthropic-claude-v1", "index": 0}]},
              {"reasoning": "first.", "reasoning_details": [{"type": "reasoning.text", "text": "first.", "index": 0}]},
              {"reasoning_details": [{"type": "reasoning.text", "signature": "sig-or-1", "index": 0}]},
              {"reasoning_details": [DETAILS[1]]},
              {"content": "I'll check.", "reasoning_details": []},      # (as OpenRouter sends every text)
              {"tool_calls": [call]}]
    chunks = [{"choices": [{"index": 0, "delta": d}]} for d in deltas] + \
        [{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    return sse_answer([b"data: " + json.dumps(dict(c, id="g1", object="chat.completion.chunk", created=1,
                                                   model="or-model")).encode() + b"\n\n" for c in chunks]
                      + [b"data: [DONE]\n\n"])(handler, rec)


@pytest.mark.parametrize("stream", [True, False])
def test_openrouters_reasoning_details_come_back_through_claude_code(upstream, proxy, stream):
    up = upstream(openrouter_like)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, models=["or-model"])]})
    ask = {"model": "or-model", "max_tokens": 1000, "stream": stream, "thinking": {"type": "enabled", "budget_tokens": 1024},
           "tools": [{"name": "ls", "input_schema": {"type": "object", "properties": {}}}],
           "messages": [{"role": "user", "content": "list files"}]}
    status, _, out = request(p, "POST", "/v1/messages", ask, ANTHROPIC_HEADERS, key=None)
    assert status == 200, out
    if stream:
        blocks = {}
        for block in out.decode().split("\n\n"):
            if "data: " in block:
                event = json.loads(block.split("data: ", 1)[1])
                if event["type"] == "content_block_start":
                    blocks[event["index"]] = dict(event["content_block"])
                elif event["type"] == "content_block_delta":
                    delta = event["delta"]
                    target = blocks[event["index"]]
                    for key, field in (("thinking", "thinking"), ("signature", "signature"),
                                       ("partial_json", "input_json")):
                        if key in delta:
                            target[field] = target.get(field, "") + delta[key]
        content = [blocks[i] for i in sorted(blocks)]
        for block in content:
            if block["type"] == "tool_use":
                block["input"] = json.loads(block.pop("input_json", "") or "{}")
    else:
        content = json.loads(out)["content"]
    assert [b["type"] for b in content] == ["thinking", "text", "tool_use"], content
    assert content[0]["thinking"] == "Think first.", content
    up.last()
    ask["messages"] += [{"role": "assistant", "content": content}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "a.txt"}]}]
    status, _, out = request(p, "POST", "/v1/messages", dict(ask, stream=False), ANTHROPIC_HEADERS, key=None)
    assert status == 200, out
    assistant = [m for m in up.last().json()["messages"] if m["role"] == "assistant"][0]
    assert assistant["reasoning_details"] == DETAILS and assistant["reasoning_content"] == "Think first."



def test_a_carried_reasoning_becomes_googles_stand_in_when_the_conversation_moves_to_gemini(upstream, proxy):
    """Gemini CLI adds Google's stand-in only to a call without a signature; the carried
    reasoning fills that slot, so a Gemini 3 upstream must get the stand-in in its place."""
    up = upstream(json_answer(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]},
                                                    "finishReason": "STOP", "index": 0}]}))
    p = proxy({"geminiApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": ["gemini-3-pro-preview"]}]})
    signature = proxypal.carried_reasoning([proxypal.Reasoning("Think first.")])
    call = {"functionCall": {"id": "call_1", "name": "ls", "args": {}}, "thoughtSignature": signature}
    body = {"contents": [{"role": "user", "parts": [{"text": "list"}]}, {"role": "model", "parts": [call]},
                         {"role": "user", "parts": [{"functionResponse": {"id": "call_1", "name": "ls",
                                                                          "response": {"output": "a"}}}]}]}
    assert request(p, "POST", "/v1beta/models/gemini-3-pro-preview:generateContent", body)[0] == 200
    assert up.last().json()["contents"][1]["parts"][0]["thoughtSignature"] == "skip_thought_signature_validator"


def test_a_failover_from_a_gemini_relay_still_reads_the_carried_reasoning(upstream, proxy):
    """The relay's copy loses the carried value; the client's body keeps it for the next try."""
    gemini = upstream(json_answer(503, {"error": {"code": 503, "message": "busy", "status": "UNAVAILABLE"}}))
    deepseek = upstream(deepseek_like)
    p = proxy({"requestRetry": 1, "routingStrategy": "fill-first",
               "geminiApiKeys": [{"apiKey": "k", "baseUrl": gemini.url, "models": [{"name": "g", "alias": "m"}]}],
               "ampOpenaiProviders": [openai_provider(deepseek.url, models=["m"])]})
    signature = proxypal.carried_reasoning([proxypal.Reasoning("Think first.")])
    body = {"contents": [{"role": "user", "parts": [{"text": "list"}]}, {"role": "model", "parts": [
        {"functionCall": {"id": "call_1", "name": "ls", "args": {}}, "thoughtSignature": signature}]},
        {"role": "user", "parts": [{"functionResponse": {"id": "call_1", "name": "ls", "response": {"output": "a"}}}]}]}
    status, _, out = request(p, "POST", "/v1beta/models/m:generateContent", body)
    assert status == 200, out
    assistant = [m for m in deepseek.last().json()["messages"] if m["role"] == "assistant"][0]
    assert assistant["reasoning_content"] == "Think first."


def test_google_genais_streamed_history_keeps_its_own_thoughts_once(upstream, proxy):
    """google-genai keeps each streamed chunk as a model content, thoughts included: the
    reasoning the call carries is not added a second time."""
    up = upstream(deepseek_like)
    p = proxy({"ampOpenaiProviders": [openai_provider(up.url, models=["m"])]})
    signature = proxypal.carried_reasoning([proxypal.Reasoning("Think first.")])
    body = {"contents": [{"role": "user", "parts": [{"text": "list"}]},
                         {"role": "model", "parts": [{"text": "Think ", "thought": True}]},
                         {"role": "model", "parts": [{"text": "first.", "thought": True}]},
                         {"role": "model", "parts": [{"functionCall": {"id": "call_1", "name": "ls", "args": {}},
                                                      "thoughtSignature": signature}]},
                         {"role": "user", "parts": [{"functionResponse": {"id": "call_1", "name": "ls",
                                                                          "response": {"output": "a"}}}]}]}
    assert request(p, "POST", "/v1beta/models/m:generateContent", body)[0] == 200
    assistant = [m for m in up.last().json()["messages"] if m["role"] == "assistant"][0]
    assert assistant["reasoning_content"].count("first.") == 1, assistant
