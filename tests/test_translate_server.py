"""Translation end to end: clients of one format through the real server to mock
upstreams of another, streams included; what the upstream received is asserted too."""
from __future__ import annotations

import json

from helpers import (ANTHROPIC_STREAM, OPENAI_STREAM, anthropic_message, json_answer, proxypal,
                     openai_completion, request, sse_answer)

ANTHROPIC_HEADERS = {"x-api-key": "proxypal-local", "anthropic-version": "2023-06-01"}

TOOL_STREAM = [
    b'data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"deepseek-chat","choices":[{"index":0,"delta":{"role":"assistant","content":"Checking."},"finish_reason":null}]}\n\n',
    b'data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"deepseek-chat","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]}\n\n',
    b'data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"deepseek-chat","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\":"}}]},"finish_reason":null}]}\n\n',
    b'data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"deepseek-chat","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\"Paris\\"}"}}]},"finish_reason":null}]}\n\n',
    b'data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"deepseek-chat","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\n',
    b'data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"deepseek-chat","choices":[],"usage":{"prompt_tokens":82,"completion_tokens":17,"total_tokens":99}}\n\n',
    b"data: [DONE]\n\n",
]


def events(body: bytes):
    out = []
    for block in body.split(b"\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.decode().split("\n"))
            out.append((lines.get("event", ""), lines["data"]))
    return out


def claude_code_request(**extra):
    return dict({"model": "deepseek-chat", "max_tokens": 32000, "stream": True,
                 "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2"},
                            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
                 "metadata": {"user_id": "u"},
                 "tools": [{"name": "get_weather", "description": "Weather", "cache_control": {"type": "ephemeral"},
                            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
                 "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?",
                                                            "cache_control": {"type": "ephemeral"}}]}]}, **extra)


def test_claude_code_on_openai_compatible_stream(upstream, proxy):
    up = upstream(sse_answer(TOOL_STREAM))
    p = proxy({"ampOpenaiProviders": [{"name": "DeepSeek", "baseUrl": up.url + "/v1", "apiKey": "sk-ds",
                                       "models": [{"name": "deepseek-chat", "alias": "deepseek-chat",
                                                   "maxOutputTokens": 8192}]}]})
    status, headers, body = request(p, "POST", "/v1/messages", claude_code_request(), ANTHROPIC_HEADERS, key=None)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    got = events(body)
    names = [e for e, _ in got]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = json.loads(got[0][1])
    assert start["message"]["model"] == "deepseek-chat" and start["message"]["usage"]["input_tokens"] > 0
    deltas = [json.loads(d)["delta"] for e, d in got if e == "content_block_delta"]
    assert {"type": "text_delta", "text": "Checking."} in deltas
    assert "".join(d["partial_json"] for d in deltas if d["type"] == "input_json_delta") == '{"city":"Paris"}'
    final = json.loads(got[-2][1])
    assert final["delta"]["stop_reason"] == "tool_use" and final["usage"]["output_tokens"] == 17
    rec = up.last()
    sent = rec.json()
    assert sent["model"] == "deepseek-chat" and sent["max_tokens"] == 8192 and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    text = json.dumps(sent)
    assert "cache_control" not in text and "metadata" not in sent and "x-anthropic-billing-header" not in text
    assert sent["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    assert rec.headers["authorization"] == "Bearer sk-ds"


def test_anthropic_client_non_stream_on_openai_upstream(upstream, proxy):
    up = upstream(json_answer(200, openai_completion("llama3", "Bonjour")))
    p = proxy({"ampOpenaiProviders": [{"name": "Ollama", "baseUrl": up.url + "/v1", "apiKey": "ollama",
                                       "models": ["llama3"]}]})
    status, _, body = request(p, "POST", "/v1/messages", {"model": "llama3", "max_tokens": 50,
                                                          "messages": [{"role": "user", "content": "Hi"}]},
                              ANTHROPIC_HEADERS, key=None)
    msg = json.loads(body)
    assert status == 200 and msg["type"] == "message" and msg["model"] == "llama3"
    assert msg["content"] == [{"type": "text", "text": "Bonjour"}] and msg["stop_reason"] == "end_turn"
    assert msg["usage"]["input_tokens"] == 3 and msg["usage"]["output_tokens"] == 1


def test_openai_client_on_anthropic_upstream(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message("claude-opus-4-5", "Hello")))
    p = proxy({"claudeApiKeys": [{"apiKey": "sk-ant", "baseUrl": up.url,
                                  "models": [{"name": "claude-opus-4-5", "alias": "opus"}]}]})
    status, _, body = request(p, "POST", "/v1/chat/completions", {
        "model": "opus", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    out = json.loads(body)
    assert status == 200 and out["object"] == "chat.completion" and out["model"] == "opus"
    assert out["choices"][0]["message"]["content"] == "Hello" and out["choices"][0]["finish_reason"] == "stop"
    sent = up.last()
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == "sk-ant"
    body_sent = sent.json()
    # (prompt caching, which OpenAI does by itself, asked of Claude: the prefix is marked)
    mark = {"cache_control": {"type": "ephemeral"}}
    assert body_sent["model"] == "claude-opus-4-5"
    assert body_sent["system"] == [{"type": "text", "text": "Be brief.", **mark}]
    assert body_sent["max_tokens"] > 0
    assert body_sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi", **mark}]}]


def test_openai_client_stream_on_anthropic_upstream(upstream, proxy):
    up = upstream(sse_answer(ANTHROPIC_STREAM))
    p = proxy({"claudeApiKeys": [{"apiKey": "sk-ant", "baseUrl": up.url}]})
    status, _, body = request(p, "POST", "/v1/chat/completions", {
        "model": "claude-sonnet-4-5", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    got = events(body)
    assert status == 200 and got[-1] == ("", "[DONE]")
    chunks = [json.loads(d) for _, d in got[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == ["stop"]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "claude-sonnet-4-5" for c in chunks)


def test_count_tokens_estimated_for_openai_upstream(upstream, proxy):
    up = upstream()
    p = proxy({"ampOpenaiProviders": [{"name": "Groq", "baseUrl": up.url + "/v1", "apiKey": "g",
                                       "models": ["llama3-70b-8192"]}]})
    text = "word " * 400
    status, _, body = request(p, "POST", "/v1/messages/count_tokens", {
        "model": "llama3-70b-8192", "messages": [{"role": "user", "content": text}]}, ANTHROPIC_HEADERS, key=None)
    count = json.loads(body)["input_tokens"]
    assert status == 200 and 400 <= count <= 700 and up.all == []


def test_translated_upstream_error_in_client_format(upstream, proxy):
    up = upstream(json_answer(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}}))
    p = proxy({"ampOpenaiProviders": [{"name": "Groq", "baseUrl": up.url + "/v1", "apiKey": "g", "models": ["m"]}]})
    status, _, body = request(p, "POST", "/v1/messages", {"model": "m", "max_tokens": 5, "messages": []},
                              ANTHROPIC_HEADERS, key=None)
    err = json.loads(body)
    assert status == 429 and err["type"] == "error" and err["error"]["type"] == "rate_limit_error"
    assert err["error"]["message"].startswith("Groq: ") and "Rate limit reached" in err["error"]["message"]


def test_openai_stream_cut_gives_anthropic_error_event(upstream, proxy):
    up = upstream(sse_answer(OPENAI_STREAM[:2], "close"))
    p = proxy({"ampOpenaiProviders": [{"name": "vLLM", "baseUrl": up.url + "/v1", "apiKey": "t", "models": ["m"]}]})
    status, _, body = request(p, "POST", "/v1/messages", {"model": "m", "max_tokens": 5, "stream": True,
                                                          "messages": [{"role": "user", "content": "Hi"}]},
                              ANTHROPIC_HEADERS, key=None)
    got = events(body)
    assert status == 200 and got[-1][0] == "error" and "message_stop" not in [e for e, _ in got]
    assert json.loads(got[-1][1])["error"]["message"].startswith("vLLM: ")


def test_unsigned_thinking_never_reaches_anthropic(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message()))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": [
                   {"type": "thinking", "thinking": "from another provider", "signature": ""},
                   {"type": "thinking", "thinking": "real", "signature": "EqQBCgIYAh"},
                   {"type": "text", "text": "Hello"}]},
               {"role": "user", "content": "Again"}]
    request(p, "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": history},
            ANTHROPIC_HEADERS, key=None)
    sent = up.last().json()["messages"][1]["content"]
    assert sent == [{"type": "thinking", "thinking": "real", "signature": "EqQBCgIYAh"},
                    {"type": "text", "text": "Hello"}]


GEMINI_STREAM = [
    b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Hel"}]}}],"modelVersion":"gemini-2.5-pro"}\r\n\r\n',
    b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"lo"}]},"finishReason":"STOP"}],'
    b'"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":2,"totalTokenCount":7},"modelVersion":"gemini-2.5-pro"}\r\n\r\n',
]


def gemini_key(url, models=("gemini-2.5-pro",)):
    return {"geminiApiKeys": [{"apiKey": "AIza-test", "baseUrl": url, "models": list(models)}]}


def test_claude_code_on_gemini_stream(upstream, proxy):
    up = upstream(sse_answer(GEMINI_STREAM))
    p = proxy(gemini_key(up.url))
    status, _, body = request(p, "POST", "/v1/messages", claude_code_request(model="gemini-2.5-pro"),
                              ANTHROPIC_HEADERS, key=None)
    got = events(body)
    assert status == 200 and got[0][0] == "message_start" and got[-1][0] == "message_stop"
    text = "".join(json.loads(d)["delta"].get("text", "") for e, d in got if e == "content_block_delta")
    assert text == "Hello"
    rec = up.last()
    assert rec.path == "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    assert rec.headers["x-goog-api-key"] == "AIza-test"
    sent = rec.json()
    assert "model" not in sent and "stream" not in sent and sent["contents"][0]["role"] == "user"
    assert "cache_control" not in json.dumps(sent)


def test_openai_client_on_gemini_non_stream(upstream, proxy):
    up = upstream(json_answer(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi!"}]},
                                                    "finishReason": "STOP"}],
                                    "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2}}))
    p = proxy(gemini_key(up.url))
    status, _, body = request(p, "POST", "/v1/chat/completions", {
        "model": "gemini-2.5-pro", "messages": [{"role": "user", "content": "Hello"}]})
    out = json.loads(body)
    assert status == 200 and out["choices"][0]["message"]["content"] == "Hi!" and out["model"] == "gemini-2.5-pro"
    assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] == 2
    assert up.last().path == "/v1beta/models/gemini-2.5-pro:generateContent"


def test_gemini_client_on_openai_upstream_stream(upstream, proxy):
    up = upstream(sse_answer(OPENAI_STREAM))
    p = proxy({"ampOpenaiProviders": [{"name": "OpenRouter", "baseUrl": up.url + "/api/v1", "apiKey": "or",
                                       "models": ["openai/gpt-4o"]}]})
    status, _, body = request(p, "POST", "/v1beta/models/openai%2Fgpt-4o:streamGenerateContent?alt=sse",
                              {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]},
                              {"x-goog-api-key": "proxypal-local"}, key=None)
    assert status == 200
    chunks = [json.loads(d) for _, d in events(body)]
    text = "".join(p.get("text", "") for c in chunks for cand in c.get("candidates", [])
                   for p in cand.get("content", {}).get("parts", []))
    assert text == "Hello" and any(c.get("candidates", [{}])[0].get("finishReason") == "STOP" for c in chunks)
    sent = up.last().json()
    assert sent["model"] == "openai/gpt-4o" and sent["stream"] is True
    assert sent["messages"] == [{"role": "user", "content": "Hi"}]


def test_gemini_models_list(upstream, proxy):
    up = upstream()
    p = proxy(gemini_key(up.url, ["gemini-2.5-pro", "gemini-2.5-flash"]))
    status, _, body = request(p, "GET", "/v1beta/models?key=proxypal-local", key=None)
    names = [m["name"] for m in json.loads(body)["models"]]
    assert status == 200 and names == ["models/gemini-2.5-pro", "models/gemini-2.5-flash"]
    # one model, as google-genai's models.get asks; a name no provider serves: Gemini's 404
    status, _, body = request(p, "GET", "/v1beta/models/gemini-2.5-flash?key=proxypal-local", key=None)
    assert status == 200 and json.loads(body)["name"] == "models/gemini-2.5-flash"
    status, _, body = request(p, "GET", "/v1beta/models/gemini-9?key=proxypal-local", key=None)
    assert status == 404 and json.loads(body)["error"]["status"] == "NOT_FOUND"
    status, headers, _ = request(p, "GET", "/v1beta/models/gemini-2.5-flash:generateContent", key=None)
    assert status == 405 and headers["allow"] == "POST"          # a POST route, not a model


def test_translated_requests_to_openai_itself_use_max_completion_tokens(upstream, proxy):
    up = upstream(json_answer(200, openai_completion("o3")))
    p = proxy({"proxyUrl": up.url, "ampOpenaiProviders": [
        {"name": "OpenAI", "baseUrl": "http://api.openai.com/v1", "apiKey": "sk", "models": ["o3"]}]})
    request(p, "POST", "/v1/messages", {"model": "o3", "max_tokens": 300,
                                        "messages": [{"role": "user", "content": "Hi"}]},
            ANTHROPIC_HEADERS, key=None)
    sent = up.last().json()
    assert sent["max_completion_tokens"] == 300 and "max_tokens" not in sent


LEGACY = {"model": "claude-x", "function_call": {"name": "get_weather"},
          "functions": [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
          "messages": [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": None,
                        "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                       {"role": "function", "name": "get_weather", "content": "18C"}]}


def test_modern_openai_request_converts_legacy_functions():
    out = proxypal.modern_openai_request(LEGACY)
    assert out["tools"] == [{"type": "function", "function": LEGACY["functions"][0]}]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert out["messages"][1]["tool_calls"] == [{"id": "call_1", "type": "function",
                                                 "function": LEGACY["messages"][1]["function_call"]}]
    assert "function_call" not in out["messages"][1]
    assert out["messages"][2] == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert proxypal.modern_openai_request(plain) is plain


def test_legacy_functions_reach_anthropic_as_tools(upstream, proxy):
    up = upstream(json_answer(200, anthropic_message()))
    p = proxy({"claudeApiKeys": [{"apiKey": "k", "baseUrl": up.url}]})
    assert request(p, "POST", "/v1/chat/completions", LEGACY)[0] == 200
    sent = up.last().json()
    assert sent["tools"][0]["name"] == "get_weather" and sent["tool_choice"]["name"] == "get_weather"
    use = sent["messages"][1]["content"][-1]
    result = sent["messages"][2]["content"][0]
    assert use["type"] == "tool_use" and use["input"] == {"city": "Paris"}
    assert result["type"] == "tool_result" and result["tool_use_id"] == use["id"] and result["content"] == "18C"
