"""OpenAI Responses clients (Codex CLI, the openai SDK's responses.*) through the real
server: relayed to a server that speaks Responses with only the model rewritten,
translated to every other upstream kind, counted, discovered; and every other client
format reaching a provider whose entry says wireApi "responses"."""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Tuple

import pytest

from helpers import (ANTHROPIC_STREAM, anthropic_message, json_answer, openai_completion,
                     proxypal, request, request_stream, send, sse_answer)
from test_translate_responses import (PATCH, RESPONSE, RESPONSES_STREAM, SHELL,
                                      assert_responses_grammar, codex, sse)

ANTHROPIC_HEADERS = {"x-api-key": "proxypal-local", "anthropic-version": "2023-06-01"}


def responses_provider(url: str, **extra: Any) -> Dict[str, Any]:
    return {"ampOpenaiProviders": [dict({"name": "Native", "baseUrl": url + "/v1", "apiKey": "sk-native",
                                         "wireApi": "responses", "models": ["gpt-x"]}, **extra)]}


def named_events(body: bytes) -> List[Tuple[str, Any]]:
    out = []
    for block in body.decode().split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            out.append((fields.get("event", ""), json.loads(fields["data"])))
    return out


def test_codex_stream_relayed_to_a_native_server_with_only_the_model_rewritten(upstream, proxy):
    wire = sse(RESPONSES_STREAM)
    up = upstream(sse_answer([wire]))
    p = proxy(responses_provider(up.url, models=[{"name": "gpt-5.5-upstream", "alias": "gpt-x"}]))
    body = codex(model="gpt-x", tools=[SHELL, PATCH, {"type": "web_search"}], previous_response_id=None,
                 include=["reasoning.encrypted_content"], prompt_cache_key="thread-1")
    status, headers, got = request(p, "POST", "/v1/responses", body, {"session-id": "thread-1"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert got == wire                                   # event by event, byte for byte
    rec = up.last()
    assert rec.path == "/v1/responses" and rec.headers["authorization"] == "Bearer sk-native"
    assert rec.json() == dict(body, model="gpt-5.5-upstream")


def test_state_stays_with_a_native_server(upstream, proxy):
    up = upstream(json_answer(200, RESPONSE))
    p = proxy(responses_provider(up.url))
    body = {"model": "gpt-x", "input": "Go on", "previous_response_id": "resp_1", "store": True}
    status, _, got = request(p, "POST", "/v1/responses", body)
    assert status == 200 and json.loads(got)["id"] == "resp_9"
    assert up.last().json()["previous_response_id"] == "resp_1"


def test_codex_on_anthropic_streams_the_full_responses_sequence(upstream, proxy):
    up = upstream(sse_answer(ANTHROPIC_STREAM))
    p = proxy({"claudeApiKeys": [{"apiKey": "sk-ant", "baseUrl": up.url,
                                  "models": [{"name": "claude-x", "alias": "gpt-x", "maxOutputTokens": 6000}]}]})
    status, headers, got = request(p, "POST", "/v1/responses", codex(model="gpt-x", tools=[SHELL, PATCH]))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = named_events(got)
    for _, obj in events:
        if "response" in obj:
            obj["response"]["created_at"] = 0
    assert_responses_grammar(events)
    final = events[-1][1]["response"]
    assert events[-1][0] == "response.completed" and final["model"] == "gpt-x"
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"]["input_tokens"] == 3 and final["usage"]["output_tokens"] == 2
    rec = up.last()
    sent = rec.json()
    assert rec.path == "/v1/messages" and sent["model"] == "claude-x" and sent["stream"] is True
    assert sent["max_tokens"] == 6000                    # the entry's cap is the default
    assert sent["system"][0]["text"] == "You are Codex."
    assert [t["name"] for t in sent["tools"]] == ["shell", "apply_patch"]


def test_codex_on_gemini_non_stream(upstream, proxy):
    answer = {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "apply_patch", "args": {"input": "*** Begin Patch\n*** End Patch"}}}]},
        "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4,
                                                    "totalTokenCount": 13}, "responseId": "g1"}
    up = upstream(json_answer(200, answer))
    p = proxy({"geminiApiKeys": [{"apiKey": "AIza-test", "baseUrl": up.url, "models": ["gemini-2.5-flash"]}]})
    status, _, got = request(p, "POST", "/v1/responses",
                             codex(model="gemini-2.5-flash", stream=False, tools=[PATCH]))
    obj = json.loads(got)
    assert status == 200 and obj["object"] == "response" and obj["status"] == "completed"
    assert obj["output"] == [{"id": obj["output"][0]["id"], "type": "custom_tool_call", "status": "completed",
                              "call_id": obj["output"][0]["call_id"], "name": "apply_patch",
                              "input": "*** Begin Patch\n*** End Patch"}]
    assert up.last().path == "/v1beta/models/gemini-2.5-flash:generateContent"


def test_amp_path_reaches_the_responses_endpoint(upstream, proxy):
    up = upstream(json_answer(200, openai_completion("gpt-x", "Hi")))
    p = proxy({"ampOpenaiProviders": [{"name": "Groq", "baseUrl": up.url + "/v1", "apiKey": "k",
                                       "models": ["gpt-x"]}]})
    status, _, got = request(p, "POST", "/api/provider/openai/v1/responses",
                             {"model": "gpt-x", "input": "Hi", "stream": False})
    obj = json.loads(got)
    assert status == 200 and obj["output"][0]["content"][0]["text"] == "Hi"
    assert up.last().path == "/v1/chat/completions"


@pytest.mark.parametrize("body,status,message", [
    ({"model": "nope", "input": "Hi"}, 404, "Invalid model 'nope'"),
    ({"model": "gpt-x", "input": "Hi", "previous_response_id": "resp_1"}, 400, '"previous_response_id" refers'),
    ({"model": "gpt-x", "input": 5}, 400, '"input"'),
], ids=["unknown-model", "state-on-a-translated-route", "bad-input"])
def test_refusals_come_in_the_responses_error_shape(upstream, proxy, body, status, message):
    up = upstream(json_answer(200, anthropic_message()))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": [{"name": "c", "alias": "gpt-x"}]}]})
    got_status, _, got = request(p, "POST", "/v1/responses", body)
    error = json.loads(got)["error"]
    assert got_status == status and message in error["message"]
    assert set(error) == {"message", "type", "code", "param"}
    assert up.all == []


def test_upstream_rate_limit_reaches_codex_in_its_shape(upstream, proxy):
    up = upstream(json_answer(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow"}},
                              headers=(("retry-after", "7"),)))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": [{"name": "c", "alias": "gpt-x"}]}]})
    status, headers, got = request(p, "POST", "/v1/responses", codex(model="gpt-x", stream=False))
    assert status == 429 and headers["retry-after"] == "7"
    error = json.loads(got)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["message"].endswith("Slow")


def test_input_tokens_counted_by_a_native_server_else_estimated(upstream, proxy):
    native = upstream(json_answer(200, {"object": "response.input_tokens", "input_tokens": 123}))
    other = upstream(json_answer(500, {}))
    p = proxy({"ampOpenaiProviders": [{"name": "Native", "baseUrl": native.url + "/v1", "apiKey": "k",
                                       "wireApi": "responses", "models": ["gpt-x"]}],
               "claudeApiKeys": [{"apiKey": "k", "baseUrl": other.url, "models": ["claude-x"]}]})
    status, _, got = request(p, "POST", "/v1/responses/input_tokens", {"model": "gpt-x", "input": "Hello"})
    assert status == 200 and json.loads(got)["input_tokens"] == 123
    assert native.last().path == "/v1/responses/input_tokens"
    status, _, got = request(p, "POST", "/v1/responses/input_tokens",
                             {"model": "claude-x", "input": "Hello there, how are you?"})
    obj = json.loads(got)
    assert status == 200 and obj["object"] == "response.input_tokens" and obj["input_tokens"] > 0
    assert other.all == []


def test_codex_catalogue_request_gets_an_empty_catalogue_beside_the_list(proxy):
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "models": ["claude-x"]}]})
    status, _, got = request(p, "GET", "/v1/models?client_version=0.155.1")
    obj = json.loads(got)
    assert status == 200 and obj["models"] == [] and [m["id"] for m in obj["data"]] == ["claude-x"]
    assert "models" not in json.loads(request(p, "GET", "/v1/models")[2])


def test_chat_client_reaches_a_responses_only_provider(upstream, proxy):
    up = upstream(json_answer(200, RESPONSE))
    p = proxy(responses_provider(up.url))
    status, _, got = request(p, "POST", "/v1/chat/completions",
                             {"model": "gpt-x", "messages": [{"role": "user", "content": "ls"}],
                              "tools": [{"type": "function", "function": {"name": "Bash", "parameters": {}}}]})
    obj = json.loads(got)
    assert status == 200 and obj["choices"][0]["finish_reason"] == "tool_calls"
    assert obj["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "Bash",
                                                                          "arguments": '{"command":"ls"}'}
    rec = up.last()
    assert rec.path == "/v1/responses" and rec.json()["store"] is False
    assert rec.json()["input"] == [{"type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": "ls"}]}]


def test_two_entries_with_one_key_each_keep_their_wire_api(upstream, proxy):
    answers = {"/v1/chat/completions": json_answer(200, openai_completion("chat-m")),
               "/v1/responses": json_answer(200, RESPONSE)}
    up = upstream(lambda handler, rec: answers[rec.path](handler, rec))
    native = responses_provider(up.url, name="Responses", models=["resp-m"])["ampOpenaiProviders"][0]
    chat = dict(native, name="Chat", models=["chat-m"], wireApi="chat")
    p = proxy({"ampOpenaiProviders": [chat, native]})
    for model in ("chat-m", "resp-m"):
        status, headers, _ = request(p, "POST", "/v1/chat/completions",
                                     {"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200
    assert [up.last().path, up.last().path] == ["/v1/chat/completions", "/v1/responses"]


def test_claude_code_stream_on_a_responses_only_provider(upstream, proxy):
    up = upstream(sse_answer([sse(RESPONSES_STREAM)]))
    p = proxy(responses_provider(up.url))
    status, _, got = request(p, "POST", "/v1/messages",
                             {"model": "gpt-x", "max_tokens": 100, "stream": True,
                              "messages": [{"role": "user", "content": "ls"}]}, ANTHROPIC_HEADERS, key=None)
    events = named_events(got)
    assert status == 200 and events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert up.last().json()["stream"] is True


@pytest.mark.parametrize("base,wire,client,expected", [
    ("https://api.openai.com/v1", "", "responses", "responses"),
    ("https://api.openai.com/v1", "", "openai", "openai"),
    ("https://api.openai.com/v1", "chat", "responses", "openai"),
    ("https://api.groq.com/openai/v1", "", "responses", "openai"),
    ("http://localhost:8000/v1", "responses", "anthropic", "responses"),
    ("http://localhost:8000/v1", "responses", "openai", "responses"),
])
def test_which_api_a_provider_is_spoken_to_in(base, wire, client, expected):
    entry = {"name": "P", "baseUrl": base, "apiKey": "k", "models": ["m"]}
    if wire:
        entry["wireApi"] = wire
    config = proxypal.parse_config({"ampOpenaiProviders": [entry]})
    upstream = list(proxypal.make_upstreams(config, {}).values())[0]
    assert upstream.api_for(client) == expected
    assert upstream.api_for(client, "embeddings") == "openai"


@pytest.mark.parametrize("status, error, code", [
    (400, {"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens > 200000 maximum"},
     "context_length_exceeded"),
    (529, {"type": "overloaded_error", "message": "Overloaded"}, "server_error"),
], ids=["too-long", "overloaded"])
def test_a_committed_stream_that_fails_keeps_its_numbering_its_id_and_the_failures_code(upstream, proxy, status,
                                                                                       error, code):
    """Silent past firstByteCommitSeconds, the stream opened (response.created); then the
    upstream failed. The failure continues that stream: numbered after it, the same
    response id, and the code Codex acts on (it compacts on context_length_exceeded)."""
    def slow(handler, rec):
        time.sleep(0.6)                    # past the commit below
        send(handler, status, json.dumps({"type": "error", "error": error}).encode())
    up = upstream(slow)
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url, "models": ["gpt-x"]}],
               "firstByteCommitSeconds": 0.2})
    status, _, body, complete = request_stream(p, "POST", "/v1/responses", codex(model="gpt-x"))
    events = named_events(body)
    assert status == 200 and complete and events[0][0] == "response.created"
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert events[-1][0] == "response.failed"
    assert events[-1][1]["response"]["id"] == events[0][1]["response"]["id"]
    assert events[-1][1]["response"]["error"]["code"] == code
