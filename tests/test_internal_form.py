"""The internal form of section 7: each format's reader and writer are inverses for
everything that format can express (requests, whole answers, streams), and opaque values
only ever go back to the format that made them."""
from __future__ import annotations

import base64
import json
import re
from typing import Any, Dict, List, Tuple

import pytest

from helpers import proxypal

CODECS = proxypal.CODECS
PNG = "iVBORw0KGgo="
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

# Requests each format's writer produces exactly as its reader reads them.
REQUESTS = {
    "anthropic": {
        "model": "claude-x",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather?", "cache_control": {"type": "ephemeral"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "document", "source": {"type": "url", "url": "https://x.test/a.pdf"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Paris.", "signature": "EqQB"},
                {"type": "redacted_thinking", "data": "Rk9P"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": [
                    {"type": "text", "text": "late"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": PNG}}],
                 "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Thanks"}]}],
        "system": [{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
        "stop_sequences": ["END"], "stream": True, "metadata": {"user_id": "u1"},
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": SCHEMA,
                   "cache_control": {"type": "ephemeral"}},
                  {"type": "web_search_20250305", "name": "web_search"}],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "max_tokens": 1000, "temperature": 0.5, "top_k": 40,
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
    },
    "openai": {
        "model": "gpt-x",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
                {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"}}]},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Paris.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "user", "content": "Thanks"},
            {"role": "system", "content": "Now in French."}],
        "max_tokens": 300, "temperature": 0.5, "top_p": 0.9, "seed": 7, "presence_penalty": 0.1,
        "frequency_penalty": 0.2, "stop": ["END"], "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                    "parameters": SCHEMA}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "reasoning_effort": "high",
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA,
                                                                   "strict": True}},
        "user": "u1",
    },
    "gemini": {
        "contents": [
            {"role": "user", "parts": [{"text": "Weather?"},
                                       {"inlineData": {"mimeType": "image/png", "data": PNG}},
                                       {"fileData": {"fileUri": "gs://b/a.pdf", "mimeType": "application/pdf"}}]},
            {"role": "model", "parts": [{"text": "Paris.", "thought": True, "thoughtSignature": "CiQB"},
                                        {"text": "Checking."},
                                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                                         "thoughtSignature": "Zz"}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                             "response": {"result": "18C"}}},
                                       {"text": "Thanks"}]}],
        "systemInstruction": {"parts": [{"text": "Be terse."}]},
        "tools": [{"functionDeclarations": [{"name": "get_weather", "description": "Weather",
                                             "parameters": SCHEMA}]},
                  {"googleSearch": {}}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": {"maxOutputTokens": 300, "temperature": 0.5, "topP": 0.9, "topK": 40,
                             "seed": 7, "presencePenalty": 0.1, "frequencyPenalty": 0.2,
                             "stopSequences": ["END"], "responseMimeType": "application/json",
                             "responseJsonSchema": SCHEMA,
                             "thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": True}},
    },
}


@pytest.mark.parametrize("fmt", sorted(REQUESTS))
def test_request_round_trips_through_the_internal_form(fmt):
    codec = CODECS[fmt]
    assert codec.write_request(codec.read_request(REQUESTS[fmt])) == REQUESTS[fmt]


ANSWERS = {
    "anthropic": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                  "content": [{"type": "thinking", "thinking": "Hm", "signature": "EqQB"},
                              {"type": "redacted_thinking", "data": "Rk9P"},
                              {"type": "text", "text": "Checking."},
                              {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1]}}],
                  "stop_reason": "tool_use", "stop_sequence": None,
                  "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 20,
                            "cache_read_input_tokens": 70}},
    "openai": {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
               "choices": [{"index": 0, "message": {
                   "role": "assistant", "content": "Checking.", "reasoning_content": "Hm",
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "f", "arguments": '{"a":[1]}'}}]},
                   "logprobs": None, "finish_reason": "tool_calls"}],
               "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
                         "prompt_tokens_details": {"cached_tokens": 70},
                         "completion_tokens_details": {"reasoning_tokens": 30}}},
    "gemini": {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "Hm", "thought": True, "thoughtSignature": "CiQB"}, {"text": "Checking."},
        {"functionCall": {"id": "call_1", "name": "f", "args": {"a": [1]}}, "thoughtSignature": "Zz"}]},
        "index": 0, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20, "totalTokenCount": 150,
                          "cachedContentTokenCount": 70, "thoughtsTokenCount": 30},
        "modelVersion": "m", "responseId": "r1"},
}


@pytest.mark.parametrize("fmt", sorted(ANSWERS))
def test_answer_round_trips_through_the_internal_form(fmt):
    codec = CODECS[fmt]
    got = codec.write_response(codec.read_response(ANSWERS[fmt]), "m", None)
    if fmt == "openai":
        assert isinstance(got.pop("created"), int)
        got["created"] = 0
    assert got == ANSWERS[fmt]


def events(fmt: str, items: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    return [(item["type"] if fmt == "anthropic" else "", item if isinstance(item, str)
             else json.dumps(item, separators=(",", ":"))) for item in items]


STREAMS = {
    "anthropic": [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                              "content": [], "model": "m", "stop_reason": None,
                                              "stop_sequence": None,
                                              "usage": {"input_tokens": 10, "output_tokens": 0,
                                                        "cache_read_input_tokens": 70}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQB"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "Rk9P"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Check"}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "ing."}},
        {"type": "content_block_stop", "index": 2},
        {"type": "content_block_start", "index": 3,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}},
        {"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": '{"a":'}},
        {"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": "[1]}"}},
        {"type": "content_block_stop", "index": 3},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 20,
                   "cache_read_input_tokens": 70}},
        {"type": "message_stop"}],
    "openai": [
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"reasoning_content": "Hm"}, "finish_reason": None}]},
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "Checking."}, "finish_reason": None}]},
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                            "function": {"name": "f", "arguments": ""}}]},
                      "finish_reason": None}]},
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":[1]}'}}]},
                      "finish_reason": None}]},
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
                   "prompt_tokens_details": {"cached_tokens": 70},
                   "completion_tokens_details": {"reasoning_tokens": 30}}},
        "[DONE]"],
    "gemini": [
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hm", "thought": True}]}, "index": 0}],
         "modelVersion": "m", "responseId": "r1"},
        {"candidates": [{"content": {"role": "model", "parts": [
            {"text": "", "thought": True, "thoughtSignature": "CiQB"}]}, "index": 0}],
         "modelVersion": "m", "responseId": "r1"},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "Checking."}]}, "index": 0}],
         "modelVersion": "m", "responseId": "r1"},
        {"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"id": "call_1", "name": "f", "args": {"a": [1]}}, "thoughtSignature": "Zz"}]},
            "index": 0}], "modelVersion": "m", "responseId": "r1"},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "index": 0,
                         "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20, "totalTokenCount": 150,
                           "cachedContentTokenCount": 70, "thoughtsTokenCount": 30},
         "modelVersion": "m", "responseId": "r1"}],
}


@pytest.mark.parametrize("fmt", sorted(STREAMS))
def test_stream_round_trips_through_the_internal_form(fmt):
    codec = CODECS[fmt]
    reader = codec.stream_reader(codec.stream_writer("m", 0, None))
    given = events(fmt, STREAMS[fmt])
    out: List[Tuple[str, str]] = []
    for event, data in given:
        out += reader.feed(event or "message", data)
    out += reader.close()
    normalize = (lambda d: d if d == "[DONE]" else dict(json.loads(d), created=0)
                 if fmt == "openai" else json.loads(d))
    assert [(e, normalize(d)) for e, d in out] == [(e, normalize(d)) for e, d in given]


# -- opaque values go back only to the format that made them ---------------------------

def anthropic_answer_with(signature: str) -> Dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "thinking", "thinking": "Hm", "signature": signature},
                        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}],
            "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}


def test_anthropic_signature_crosses_a_gemini_client_and_comes_back_whole():
    to_client = proxypal.TRANSLATORS[("gemini", "anthropic")].response(anthropic_answer_with("EqQB"), "m")
    parts = to_client["candidates"][0]["content"]["parts"]
    assert parts[0] == {"text": "Hm", "thought": True, "thoughtSignature": "cHAxOmFudGhyb3BpYzpFcVFC"}
    replayed = {"contents": [{"role": "user", "parts": [{"text": "go"}]},
                             {"role": "model", "parts": parts},
                             {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"result": "ok"}}}]}]}
    to_anthropic = proxypal.TRANSLATORS[("gemini", "anthropic")].request(replayed)
    assert to_anthropic["messages"][1]["content"][0] == {"type": "thinking", "thinking": "Hm", "signature": "EqQB"}
    to_openai = proxypal.TRANSLATORS[("gemini", "openai")].request(replayed)
    assert "pp1:" not in json.dumps(to_openai) and "EqQB" not in json.dumps(to_openai)


def test_a_gemini_client_keeps_a_foreign_signature_as_the_base64_it_types_it_as():
    """google-genai (Python) parses thoughtSignature as base64 bytes: `pp1:anthropic:…`
    as text failed its validation and lost the whole answer."""
    value = proxypal.carry("EqQB", "anthropic", "gemini")
    assert base64.b64decode(value, validate=True) == b"pp1:anthropic:EqQB"
    assert proxypal.uncarry(value, "gemini") == ("anthropic", "EqQB", False)
    assert proxypal.uncarry("pp1:anthropic:EqQB", "gemini") == ("anthropic", "EqQB", False)   # as sent before
    assert proxypal.uncarry("CiQBjz1rX", "gemini") == ("gemini", "CiQBjz1rX", False)          # Google's own
    assert proxypal.uncarry("cHAxO!!", "gemini") == ("gemini", "cHAxO!!", False)              # not base64
    assert proxypal.carry("EqQB", "anthropic", "responses") == "pp1:anthropic:EqQB"


def test_gemini_signature_never_reaches_anthropic_and_returns_to_gemini():
    gemini = proxypal.TRANSLATORS[("anthropic", "gemini")].response(ANSWERS["gemini"], "m")
    thinking = gemini["content"][0]
    assert thinking == {"type": "thinking", "thinking": "Hm", "signature": "pp1:gemini:CiQB"}
    assert gemini["content"][2] == {"type": "thinking", "thinking": "", "signature": "pp1:gemini:Zz"}
    history = {"model": "claude-x", "max_tokens": 10, "messages": [
        {"role": "user", "content": "go"}, {"role": "assistant", "content": gemini["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": gemini["content"][3]["id"],
                                      "content": "ok"}]}]}
    to_gemini = proxypal.TRANSLATORS[("anthropic", "gemini")].request(history)
    assert to_gemini["contents"][1]["parts"][0] == {"text": "Hm", "thought": True, "thoughtSignature": "CiQB"}
    call = [p for p in to_gemini["contents"][1]["parts"] if "functionCall" in p]
    assert call[0]["thoughtSignature"] == "Zz"     # the call's own, not the documented stand-in
    relayed = json.loads(json.dumps(history))
    assert proxypal.foreign_reasoning_dropped("anthropic", relayed)
    assert all(b["type"] != "thinking" for b in relayed["messages"][1]["content"])


def test_unsigned_thinking_is_dropped_before_an_anthropic_relay():
    body = {"messages": [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": "from elsewhere", "signature": ""},
        {"type": "thinking", "thinking": "own", "signature": "EqQB"}, {"type": "text", "text": "x"}]}]}
    assert proxypal.foreign_reasoning_dropped("anthropic", body)
    assert [b.get("thinking") for b in body["messages"][0]["content"]] == ["own", None]
    assert not proxypal.foreign_reasoning_dropped("anthropic", body)


def test_reasoning_another_format_made_never_reaches_a_responses_relay():
    """A Codex thread that ran on Claude, then /model to a relayed OpenAI model: the
    items Claude's thinking became would be 400 invalid_encrypted_content there."""
    own = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAAB"}
    claude = {"type": "reasoning", "id": "rs_x_0", "summary": [], "encrypted_content": "pp1:anthropic:EqQB"}
    unsigned = {"type": "reasoning", "id": "rs_x_1", "summary": [{"type": "summary_text", "text": "DeepSeek"}]}
    call = {"type": "function_call", "name": "shell", "arguments": "{}", "call_id": "c1"}
    body = {"store": False, "input": [own, claude, unsigned, call]}
    assert proxypal.foreign_reasoning_dropped("responses", body)
    assert body["input"] == [own, call]
    assert not proxypal.foreign_reasoning_dropped("responses", body)
    stored = {"store": True, "input": [unsigned]}      # OpenAI keeps the items: the id finds it
    assert not proxypal.foreign_reasoning_dropped("responses", stored)


def test_carry_and_uncarry_are_inverses():
    for value, origin, redacted in (("EqQB", "anthropic", False), ("Rk9P", "anthropic", True),
                                    ("CiQB", "gemini", False), ("gAAAA:x", "responses", False)):
        for client in ("anthropic", "gemini", "openai"):
            carried = proxypal.carry(value, origin, client, redacted)
            assert proxypal.uncarry(carried, client) == (origin, value, redacted)


@pytest.mark.parametrize("data,expected", [
    ('{"a":1}', {"a": 1}), (' {"a": [1, {"b": null}]}\n', {"a": [1, {"b": None}]}),
    ('{"a":1}x', None), ('{"a":1} {"b":2}', None), ("[1]", None), ('"text"', None), ("", None),
    ("ping", None), ("{", None), ('{"a":"\\u00e9"}', {"a": "é"}),
])
def test_event_object_is_one_json_object_or_none(data, expected):
    assert proxypal.event_object(data) == expected


# A Responses request with every kind of input item the reader knows.
RESPONSES_REQUEST = {
    "model": "gpt-x", "instructions": "Be terse.", "stream": True,
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                     {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"},
                                     {"type": "input_file", "filename": "a.pdf", "file_data": "JVBE"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Paris."}],
         "encrypted_content": "gAAA"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"type": "custom_tool_call", "call_id": "call_2", "name": "patch", "input": "x"},
        {"type": "custom_tool_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "ok"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]}],
    "tools": [{"type": "function", "name": "get_weather", "parameters": SCHEMA},
              {"type": "custom", "name": "patch", "description": "Patch"},
              {"type": "web_search"}],
    "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False,
    "reasoning": {"effort": "high", "summary": "auto"}, "max_output_tokens": 300,
    "text": {"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}},
    "temperature": 0.5, "top_p": 0.9, "user": "u1", "prompt_cache_key": "k",
}
WRONG_TYPES = [None, True, 7, 1.5, "x", [], {}, [1], [{}], {"a": []}]


def paths(value: Any, at: Tuple[Any, ...] = ()):
    yield at
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, at + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, at + (i,))


def replaced(value: Any, at: Tuple[Any, ...], new: Any) -> Any:
    if not at:
        return new
    copy = json.loads(json.dumps(value))
    holder = copy
    for key in at[:-1]:
        holder = holder[key]
    holder[at[-1]] = new
    return copy


@pytest.mark.parametrize("fmt", ["anthropic", "openai", "gemini", "responses"])
def test_a_field_of_any_wrong_type_is_a_client_error_never_a_crash(fmt):
    """Every field of a full request, replaced by every JSON type, read for every upstream
    format as the server reads it: the request is used or refused with a ClientError
    (a 400 in the client's format); nothing else may escape (it would be a 500)."""
    base = RESPONSES_REQUEST if fmt == "responses" else REQUESTS[fmt]
    crashes = []
    for at in paths(base):
        if not at:
            continue
        for new in WRONG_TYPES:
            body = replaced(base, at, new)
            for upstream in sorted(CODECS):
                translator = proxypal.TRANSLATORS[(fmt, upstream)]
                try:
                    proxypal.session_key(proxypal.Request("POST", "/", "/", "", "HTTP/1.1", {}, [], True), body)
                    proxypal.local_count(fmt, body)
                    if translator.passthrough:
                        proxypal.foreign_reasoning_dropped(fmt, body)
                    else:
                        translator.write(translator.read(body))
                except proxypal.ClientError:
                    pass
                except Exception as exc:
                    crashes.append(f"{fmt}->{upstream} {'.'.join(map(str, at))}={new!r}: "
                                   f"{type(exc).__name__}: {exc}")
    assert not crashes, f"{len(crashes)} crashes, e.g.:\n" + "\n".join(crashes[:15])


# -- a stream and the same answer whole say the same thing ----------------------------

def streamed(client: str, upstream: str, items: List[Tuple[str, Any]]) -> List[Tuple[str, Any]]:
    """The client's events for the upstream's events, data parsed ([DONE] kept as is)."""
    reader = proxypal.TRANSLATORS[(client, upstream)].stream("m")
    out: List[Tuple[str, str]] = []
    for event, data in items:
        out += reader.feed(event, data if isinstance(data, str) else json.dumps(data))
    out += reader.close()
    return [(e, d if d == "[DONE]" else json.loads(d)) for e, d in out]


def _a(kind: str, **fields: Any) -> Tuple[str, Dict[str, Any]]:
    return kind, dict(type=kind, **fields)


A_START = _a("message_start", message={"id": "msg_1", "type": "message", "role": "assistant",
                                       "content": [], "model": "x", "stop_reason": None,
                                       "usage": {"input_tokens": 5, "output_tokens": 1}})


def anthropic_tool_stream(call_id: str, partial: str) -> List[Tuple[str, Any]]:
    return [A_START, _a("content_block_start", index=0, content_block={
                "type": "tool_use", "id": call_id, "name": "now", "input": {}}),
            _a("content_block_delta", index=0, delta={"type": "input_json_delta",
                                                      "partial_json": partial}),
            _a("content_block_stop", index=0),
            _a("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 3}),
            _a("message_stop")]


def openai_arguments(events: List[Tuple[str, Any]]) -> Dict[int, Tuple[str, str]]:
    calls: Dict[int, List[str]] = {}
    for _, data in events:
        for choice in (data.get("choices") or []) if isinstance(data, dict) else []:
            for call in choice["delta"].get("tool_calls") or []:
                got = calls.setdefault(call["index"], [call.get("id", ""), ""])
                got[1] += call["function"].get("arguments", "")
    return {i: tuple(v) for i, v in calls.items()}


def test_a_tool_without_arguments_streams_an_empty_object_as_openai_sends_it():
    assert openai_arguments(streamed("openai", "anthropic", anthropic_tool_stream("toolu_1", ""))) \
        == {0: ("toolu_1", "{}")}


def test_a_tool_id_other_apis_refuse_is_made_safe_streamed_as_whole():
    whole = CODECS["anthropic"].read_response({"id": "msg_1", "type": "message", "content": [
        {"type": "tool_use", "id": "call.1:x", "name": "now", "input": {}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 3}})
    events = streamed("openai", "anthropic", anthropic_tool_stream("call.1:x", "{}"))
    assert openai_arguments(events)[0][0] == whole.parts[0].id == "call_1_x"


def _c(delta: Dict[str, Any], finish: Any = None) -> Tuple[str, Dict[str, Any]]:
    return "", {"id": "c1", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_an_answer_the_cap_cut_mid_tool_call_says_max_tokens_streamed_and_whole():
    """Anthropic's own API ends such an answer with max_tokens (the input may be cut): a
    client told tool_use would run a tool with broken input."""
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "Bash", "arguments": '{"command": "ls -'}}
    events = streamed("anthropic", "openai", [_c({"role": "assistant"}), _c({"tool_calls": [call]}),
                                              _c({}, "length"), ("", "[DONE]")])
    [delta] = [d for e, d in events if e == "message_delta"]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    whole = proxypal.TRANSLATORS[("anthropic", "openai")].response({"id": "c1", "choices": [{
        "index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": None,
                                                           "tool_calls": [call]}}]}, "m")
    assert whole["stop_reason"] == "max_tokens"
    back = streamed("openai", "anthropic", anthropic_tool_stream("toolu_1", '{"a":')[:-2] + [
        _a("message_delta", delta={"stop_reason": "max_tokens"}, usage={"output_tokens": 9}),
        _a("message_stop")])
    assert [c["finish_reason"] for _, d in back if isinstance(d, dict) for c in d.get("choices", [])
            if c["finish_reason"]] == ["length"]


def test_an_openai_call_without_an_id_has_one_id_streamed_and_whole():
    call = {"index": 0, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    events = streamed("anthropic", "openai", [_c({"role": "assistant"}), _c({"tool_calls": [call]}),
                                              _c({}, "tool_calls"), ("", "[DONE]")])
    [block] = [d["content_block"] for e, d in events if e == "content_block_start"]
    whole = proxypal.TRANSLATORS[("anthropic", "openai")].response({"id": "c1", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
                                                               "tool_calls": [call]}}]}, "m")
    assert block["id"] == whole["content"][0]["id"] == "toolu_c1_0"


GEMINI_CALL_CUT = {"candidates": [{"content": {"role": "model", "parts": [
    {"functionCall": {"name": "f", "args": {"a": 1}}}]}, "finishReason": "MAX_TOKENS"}],
    "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2}, "responseId": "r1"}


def test_a_whole_gemini_call_is_a_tool_turn_streamed_as_whole_whatever_the_finish():
    """Gemini's calls arrive whole: a Responses client (Codex) must not drop one as
    incomplete."""
    events = streamed("responses", "gemini", [("", GEMINI_CALL_CUT)])
    assert events[-1][0] == "response.completed"
    whole = proxypal.TRANSLATORS[("responses", "gemini")].response(GEMINI_CALL_CUT, "m")
    assert whole["status"] == "completed"


GEMINI_TWO_THOUGHTS = {"candidates": [{"content": {"role": "model", "parts": [
    {"text": "A", "thought": True, "thoughtSignature": "S1"},
    {"text": "B", "thought": True, "thoughtSignature": "S2"}, {"text": "ok"}]},
    "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 3}, "responseId": "r1"}


def test_two_signed_thoughts_stay_two_blocks_each_with_its_signature():
    events = streamed("anthropic", "gemini", [("", GEMINI_TWO_THOUGHTS)])
    blocks = [d["content_block"]["type"] for e, d in events if e == "content_block_start"]
    signatures = [d["delta"]["signature"] for e, d in events
                  if e == "content_block_delta" and d["delta"]["type"] == "signature_delta"]
    assert blocks == ["thinking", "thinking", "text"]
    assert [proxypal.uncarry(s, "gemini")[1] for s in signatures] == ["S1", "S2"]
    items = [d["item"] for e, d in streamed("responses", "gemini", [("", GEMINI_TWO_THOUGHTS)])
             if e == "response.output_item.done" and d["item"]["type"] == "reasoning"]
    assert len(items) == 2


def test_reasoning_summary_parts_are_lines_apart_streamed_as_whole():
    item = {"id": "rs_1", "type": "reasoning", "summary": [
        {"type": "summary_text", "text": "**Plan**"}, {"type": "summary_text", "text": "**Check**"}]}
    done = {"id": "resp_1", "status": "completed", "output": [item],
            "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}
    events = [_a("response.created", response={"id": "resp_1"}),
              _a("response.output_item.added", output_index=0,
                 item={"id": "rs_1", "type": "reasoning", "summary": []})] + [
        _a("response.reasoning_summary_text.delta", output_index=0, item_id="rs_1",
           summary_index=i, delta=text) for i, text in enumerate(["**Plan**", "**Check**"])] + [
        _a("response.output_item.done", output_index=0, item=item),
        _a("response.completed", response=done)]
    thinking = "".join(d["delta"]["thinking"] for e, d in streamed("anthropic", "responses", events)
                       if e == "content_block_delta" and d["delta"]["type"] == "thinking_delta")
    whole = proxypal.TRANSLATORS[("anthropic", "responses")].response(done, "m")
    assert thinking == whole["content"][0]["thinking"] == "**Plan**\n**Check**"


# -- requests the target API would refuse -------------------------------------------------

TOOL_LOOP = [{"role": "user", "content": "ls"},
             {"role": "assistant", "content": None, "reasoning_content": "t", "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "sh", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "a"}]


def test_thinking_goes_only_where_the_tool_turn_it_continues_starts_with_signed_thinking():
    """Anthropic: with thinking on, the assistant turn a tool loop continues must start
    with a thinking block; a Chat client keeps no signature, so that request goes without
    thinking rather than fail at the second step of every tool loop."""
    out = proxypal.TRANSLATORS[("openai", "anthropic")].request(
        {"model": "m", "reasoning_effort": "high", "messages": TOOL_LOOP})
    assert "thinking" not in out and out["max_tokens"] == proxypal.ANTHROPIC_DEFAULT_MAX_TOKENS
    first = proxypal.TRANSLATORS[("openai", "anthropic")].request(
        {"model": "m", "reasoning_effort": "high", "messages": TOOL_LOOP[:1]})
    assert first["thinking"]["type"] == "enabled"
    signed = dict(REQUESTS["anthropic"], messages=REQUESTS["anthropic"]["messages"][:2] + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "18C"}]}],
        thinking={"type": "enabled", "budget_tokens": 2048}, tool_choice={"type": "auto"},
        max_tokens=8000)
    assert CODECS["anthropic"].write_request(CODECS["anthropic"].read_request(signed))["thinking"]


@pytest.mark.parametrize("budget,cap,expected", [(31999, 8192, 4096), (8192, 8192, 4096),
                                                 (4000, 1500, None), (2048, 8192, 2048)])
def test_a_cap_under_the_thinking_budget_keeps_the_budget_under_the_cap(budget, cap, expected):
    body = {"max_tokens": 32000, "thinking": {"type": "enabled", "budget_tokens": budget}}
    proxypal.clamp_output_tokens(body, cap)
    assert body["max_tokens"] == min(cap, 32000)
    assert (body.get("thinking") or {}).get("budget_tokens") == expected


def test_whitespace_only_text_never_reaches_anthropic():
    out = proxypal.TRANSLATORS[("openai", "anthropic")].request({"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "\n\n", "tool_calls": TOOL_LOOP[1]["tool_calls"]},
        TOOL_LOOP[2]]})
    texts = [b["text"] for m in out["messages"] for b in m["content"] if b["type"] == "text"]
    assert texts == ["hi"]


def test_gemini_gets_a_user_turn_first_and_arrays_with_their_items():
    out = proxypal.TRANSLATORS[("openai", "gemini")].request({"model": "m", "messages": [
        {"role": "system", "content": "s"}] + TOOL_LOOP[1:], "tools": [{"type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "array"}}}}}]})
    assert out["contents"][0]["role"] == "user" and out["contents"][1]["role"] == "model"
    params = out["tools"][0]["functionDeclarations"][0]["parameters"]
    assert params["properties"]["x"] == {"type": "array", "items": {"type": "string"}}
    alone = proxypal.TRANSLATORS[("openai", "gemini")].request(
        {"model": "m", "messages": [{"role": "system", "content": "s"}]})
    assert alone["contents"] == [{"role": "user", "parts": [{"text": "(continue)"}]}]


@pytest.mark.parametrize("decl", [{"name": "f", "parametersJsonSchema": True},
                                  {"name": "f", "parametersJsonSchema": "{}"},
                                  {"name": "f", "parameters": {"type": "OBJECT"},
                                   "parametersJsonSchema": {"$defs": {"a": True}, "$ref": "#/$defs/a"}}])
def test_a_schema_that_is_no_object_is_read_as_none_not_a_crash(decl):
    for upstream in ("anthropic", "openai", "responses", "gemini"):
        proxypal.TRANSLATORS[("gemini", upstream)].request(
            {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
             "tools": [{"functionDeclarations": [decl]}]})


def test_a_gemini_results_images_reach_every_upstream():
    """Gemini CLI sends a result's images as the functionResponse's own parts (Gemini 3)."""
    request = {"contents": [
        {"role": "user", "parts": [{"text": "read"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "read_file", "args": {"p": "a.jpg"}}}]},
        {"role": "user", "parts": [{"functionResponse": {
            "name": "read_file", "response": {"output": "Binary content provided"},
            "parts": [{"inlineData": {"mimeType": "image/jpg", "data": PNG}}]}}]}]}
    out = proxypal.TRANSLATORS[("gemini", "anthropic")].request(request)
    result = out["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and result["content"][1]["source"] == {
        "type": "base64", "media_type": "image/jpeg", "data": PNG}
    out = proxypal.TRANSLATORS[("gemini", "openai")].request(request)
    assert out["messages"][-1]["content"][0]["image_url"]["url"].endswith(PNG)


def test_a_system_message_between_a_call_and_its_result_waits_until_after_the_result():
    """OpenAI wants a call's tool messages right after it (Codex can send a developer
    message in between)."""
    out = proxypal.TRANSLATORS[("responses", "openai")].request({"model": "m", "input": [
        {"role": "user", "content": "ls"},
        {"type": "function_call", "call_id": "c1", "name": "sh", "arguments": "{}"},
        {"role": "developer", "content": "be careful"},
        {"type": "function_call_output", "call_id": "c1", "output": "a"}]})
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "tool", "system"]
    assert out["messages"][-1]["content"] == "be careful"


def test_a_cap_changes_no_budget_it_did_not_lower_nor_an_interleaved_one():
    body = {"max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 6000}}
    proxypal.clamp_output_tokens(body, 8192)          # (interleaved thinking allows this)
    assert body["thinking"]["budget_tokens"] == 6000
    body = {"max_tokens": 32000, "thinking": {"type": "enabled", "budget_tokens": 31999}}
    proxypal.clamp_output_tokens(body, 8192, interleaved=True)
    assert body == {"max_tokens": 8192, "thinking": {"type": "enabled", "budget_tokens": 31999}}


def test_a_system_instruction_with_one_part_object_as_googles_samples_send_it():
    chat = CODECS["gemini"].read_request({"systemInstruction": {"parts": {"text": "Be terse."}},
                                          "contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert [t.text for t in chat.system] == ["Be terse."]


IMAGE = base64.b64encode(bytes(range(256)) * 1200).decode()       # 300 KB, 400,000 base64 chars


@pytest.mark.parametrize("fmt, body", [
    ("gemini", {"contents": [{"role": "user", "parts": [
        {"text": "what is this"}, {"inlineData": {"mimeType": "image/png", "data": IMAGE}}]}]}),
    ("gemini", {"generateContentRequest": {"model": "models/m", "contents": [{"role": "user", "parts": [
        {"text": "what is this"}, {"inlineData": {"mimeType": "image/png", "data": IMAGE}}]}]}}),
    ("anthropic", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}},
        {"type": "text", "text": "what is this"}]}]}),
    ("openai", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGE}},
        {"type": "text", "text": "what is this"}]}]}),
], ids=["gemini", "gemini-generateContentRequest", "anthropic", "openai-data-url"])
def test_an_inline_image_counts_as_an_image_not_as_its_base64(fmt, body):
    """Gemini CLI refuses a prompt, and Claude Code compacts, on these estimates: a 300 KB
    image as text would be 100,000 tokens."""
    counted = proxypal.local_count(fmt, body)
    tokens = counted.get("totalTokens", counted.get("input_tokens"))
    assert proxypal.MEDIA_TOKENS < tokens < proxypal.MEDIA_TOKENS + 60, counted


# -- a translated burst: its first event goes out before the rest is translated --------

def sse_bytes(items: List[Tuple[str, str]]) -> bytes:
    return b"".join((f"event: {e}\n" if e else "").encode() + f"data: {d}\n\n".encode() for e, d in items)


@pytest.mark.parametrize("client,upstream", [("anthropic", "openai"), ("openai", "anthropic"),
                                             ("responses", "gemini"), ("gemini", "anthropic")])
def test_a_burst_gives_its_first_event_alone_then_the_same_stream(client, upstream):
    given = events(upstream, STREAMS[upstream])
    burst = sse_bytes([(e if upstream == "anthropic" else "", d) for e, d in given])

    def pipe():
        writer = CODECS[client].stream_writer("m", 0, None)
        return proxypal.StreamPipe(proxypal.SSEDecoder(), CODECS[upstream].stream_reader(writer), client)
    early = pipe()
    first = early.first(burst)
    assert first and len(given) - 3 <= len(early.held) < len(given)   # the first upstream
                                                                       # events that say anything
    rest = early.feed(b"")
    assert not early.held and early.feed(b"") == b""
    whole = pipe()
    normal = whole._out(whole.decoder.feed(burst))
    ids = re.compile(rb'"(?:id|created|created_at|responseId)"\s*:\s*("[^"]*"|\d+)')
    assert ids.sub(b"", first + rest + early.close()) == ids.sub(b"", normal + whole.close())


def test_a_client_gone_before_the_held_events_went_out_still_has_their_usage_counted():
    given = events("openai", STREAMS["openai"])
    writer = CODECS["anthropic"].stream_writer("m", 0, None)
    pipe = proxypal.StreamPipe(proxypal.SSEDecoder(), CODECS["openai"].stream_reader(writer), "anthropic")
    assert pipe.first(sse_bytes(given)) and pipe.held          # the usage is in the last chunk
    usage = pipe.usage                             # (relay reads it as it ends, written or not)
    assert not pipe.held and usage is not None and (usage.input, usage.output) == (100, 50)
