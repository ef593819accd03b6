"""Gemini translators (PROTOCOLS.md E.6, E.7): OpenAI and Anthropic clients to a Gemini
upstream, Gemini clients to OpenAI and Anthropic upstreams. Requests, non-stream answers
and stream transcripts are tables of named cases; every stream is fed whole, byte by
byte and cut in two at every byte through SSESplitter + parse_sse_event."""
from __future__ import annotations

import base64
import json
import re
from typing import Any, Dict, List, Tuple

import pytest

from helpers import feed_all_ways, proxypal, without_cache_marks

OA_GEM = proxypal.TRANSLATORS[("openai", "gemini")]
AN_GEM = proxypal.TRANSLATORS[("anthropic", "gemini")]
SIG = "skip_thought_signature_validator"
MODEL = "gemini-2.5-flash"


# -- helpers ----------------------------------------------------------------------

def user(*parts: Dict[str, Any]) -> Dict[str, Any]:
    return {"role": "user", "parts": list(parts)}


def model(*parts: Dict[str, Any]) -> Dict[str, Any]:
    return {"role": "model", "parts": list(parts)}


def call(name: str, args: Dict[str, Any], signed: bool = False) -> Dict[str, Any]:
    part: Dict[str, Any] = {"functionCall": {"name": name, "args": args}}
    if signed:
        part["thoughtSignature"] = SIG
    return part


def result(name: str, value: Any, key: str = "result") -> Dict[str, Any]:
    return {"functionResponse": {"name": name, "response": {key: value}}}


def gem(contents: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    return {"contents": contents, **extra}


def chunk(parts: List[Dict[str, Any]] = None, finish: str = None, usage: Dict[str, Any] = None,
          rid: str = "r1") -> Dict[str, Any]:
    """One Gemini GenerateContentResponse (a stream chunk or a whole answer)."""
    cand: Dict[str, Any] = {"content": {"role": "model", "parts": parts or []}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    obj: Dict[str, Any] = {"candidates": [cand]}
    if usage is not None:
        obj["usageMetadata"] = usage
    obj.update({"modelVersion": MODEL, "responseId": rid})
    return obj


class Pipe:
    """Upstream bytes -> SSESplitter -> parse_sse_event -> a stream translator."""

    def __init__(self, stream_class: Any, input_estimate: int = 0) -> None:
        self.splitter = proxypal.SSESplitter()
        self.translator = stream_class(MODEL, input_estimate)

    def _events(self, blocks: List[bytes]) -> List[Tuple[str, str]]:
        out = []
        for block in blocks:
            event = proxypal.parse_sse_event(block)
            if event:
                out += self.translator.feed(*event)
        return out

    def feed(self, data: bytes) -> List[Tuple[str, str]]:
        return self._events(self.splitter.feed(data))

    def finish(self) -> List[Tuple[str, str]]:
        return self._events(self.splitter.close()) + self.translator.close()


def sse_bytes(events: List[Any], crlf: bool = True) -> bytes:
    """Gemini (alt=sse) and OpenAI frame events as `data:` lines; Google uses CRLF.
    An item is a dict (JSON), a str (raw data) or an (event, dict) pair."""
    sep = "\r\n" if crlf else "\n"
    out = []
    for item in events:
        name, data = item if isinstance(item, tuple) else ("", item)
        text = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}{sep}" if name else "") + f"data: {text}{sep}{sep}")
    return "".join(out).encode("utf-8")


def normalize(events: List[Tuple[str, str]]) -> List[Tuple[str, Any]]:
    """(event, parsed data); OpenAI's `created` is checked to be an int, then dropped."""
    out = []
    for name, data in events:
        obj = data if data == "[DONE]" else json.loads(data)
        if isinstance(obj, dict) and "created" in obj:
            assert isinstance(obj.pop("created"), int)
        out.append((name, obj))
    return out


def run_stream(stream_class: Any, upstream: List[Any], input_estimate: int = 0,
               crlf: bool = True) -> List[Tuple[str, Any]]:
    """The translator's output for these upstream events: fed as parsed events, and as
    bytes whole, byte by byte and cut at every position; all must agree."""
    direct = stream_class(MODEL, input_estimate)
    events = []
    for item in upstream:
        name, data = item if isinstance(item, tuple) else ("message", item)
        events += direct.feed(name or "message", data if isinstance(data, str) else json.dumps(data))
    events += direct.close()
    whole = normalize(events)
    split = feed_all_ways(lambda: Pipe(stream_class, input_estimate), sse_bytes(upstream, crlf),
                          lambda pipe: pipe.finish(), normalize)
    assert split == whole
    return whole


# -- E.7: JSON Schema -> Gemini Schema --------------------------------------------

OBJ = {"type": "object"}
SCHEMA_CASES = [
    ("plain-object-kept",
     {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
      "required": ["city"]},
     {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
      "required": ["city"]}),
    ("meta-and-unknown-keywords-removed",
     {"$schema": "http://json-schema.org/draft-07/schema#", "$id": "x", "$comment": "c",
      "type": "object", "additionalProperties": False, "patternProperties": {"^x": OBJ},
      "propertyNames": {"pattern": "a"}, "unevaluatedProperties": False,
      "properties": {"n": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 9,
                           "multipleOf": 2, "minimum": 1, "maximum": 8, "examples": [2],
                           "readOnly": True, "writeOnly": False, "deprecated": True,
                           "x-google": 1}},
      "not": OBJ, "if": OBJ, "then": OBJ, "else": OBJ},
     {"type": "object", "properties": {"n": {"type": "number", "minimum": 1, "maximum": 8}}}),
    ("local-ref-inlined",
     {"type": "object", "$defs": {"Pt": {"type": "object", "properties": {"x": {"type": "integer"}}}},
      "properties": {"p": {"$ref": "#/$defs/Pt", "description": "a point"}}},
     {"type": "object", "properties": {"p": {"type": "object", "description": "a point",
                                             "properties": {"x": {"type": "integer"}}}}}),
    ("definitions-ref-inlined",
     {"type": "object", "definitions": {"S": {"type": "string"}},
      "properties": {"s": {"$ref": "#/definitions/S"}}},
     {"type": "object", "properties": {"s": {"type": "string"}}}),
    ("recursive-ref-becomes-bare-object",
     {"type": "object", "$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}},
      "properties": {"n": {"$ref": "#/$defs/N"}}},
     {"type": "object", "properties": {"n": {"type": "object", "properties": {"next": OBJ}}}}),
    ("unknown-ref-becomes-bare-object",
     {"type": "object", "properties": {"r": {"$ref": "https://x/y.json"}}},
     {"type": "object", "properties": {"r": OBJ}}),
    ("allOf-merged-into-parent",
     {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
      "required": ["a", "b"]}),
    ("oneOf-becomes-anyOf",
     {"oneOf": [{"type": "string"}, {"type": "integer"}]},
     {"anyOf": [{"type": "string"}, {"type": "integer"}]}),
    ("anyOf-null-branch-becomes-nullable",
     {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
     {"nullable": True, "type": "string", "maxLength": 5}),
    ("type-list-with-null",
     {"type": ["string", "null"]}, {"type": "string", "nullable": True}),
    ("type-list-of-several",
     {"type": ["string", "integer"]}, {"anyOf": [{"type": "string"}, {"type": "integer"}]}),
    ("const-string-becomes-enum",
     {"const": "on"}, {"enum": ["on"], "type": "string"}),
    ("enum-of-strings-kept",
     {"type": "string", "enum": ["a", "b"]}, {"type": "string", "enum": ["a", "b"]}),
    ("enum-of-numbers-dropped",
     {"type": "integer", "enum": [1, 2]}, {"type": "integer"}),
    ("format-date-time-kept-uri-dropped",
     {"type": "object", "properties": {"t": {"type": "string", "format": "date-time"},
                                       "u": {"type": "string", "format": "uri"}}},
     {"type": "object", "properties": {"t": {"type": "string", "format": "date-time"},
                                       "u": {"type": "string"}}}),
    ("property-names-that-look-like-keywords-kept",
     {"type": "object", "properties": {"$ref": {"type": "string"}, "type": {"type": "string"},
                                       "additionalProperties": {"type": "boolean"}}},
     {"type": "object", "properties": {"$ref": {"type": "string"}, "type": {"type": "string"},
                                       "additionalProperties": {"type": "boolean"}}}),
    ("required-limited-to-properties",
     {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "ghost"]},
     {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
    ("empty-properties-dropped", {"type": "object", "properties": {}}, OBJ),
    ("array-items-cleaned",
     {"type": "array", "items": {"type": "object", "additionalProperties": True,
                                 "properties": {"k": {"type": "string"}}},
      "minItems": 1, "uniqueItems": True, "contains": OBJ},
     {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {"k": {"type": "string"}}}}),
    ("tuple-items-first-kept",
     {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]},
     {"type": "array", "items": {"type": "string"}}),
]


@pytest.mark.parametrize("schema, expected", [c[1:] for c in SCHEMA_CASES],
                         ids=[c[0] for c in SCHEMA_CASES])
def test_gemini_schema(schema, expected):
    assert proxypal.gemini_schema(schema) == expected


# -- E.6 requests: OpenAI client -> Gemini ------------------------------------------

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_DECL = {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA}
PNG = "iVBORw0KGgo="


def oa(messages: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    return {"model": "gemini-x", "messages": messages, **extra}


def oa_call(call_id: str, name: str, arguments: str) -> Dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


OA_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": WEATHER_SCHEMA}}
HI = [{"role": "user", "content": "Hi"}]
OA_REQUEST_CASES = [
    ("user-text", oa(HI), gem([user({"text": "Hi"})])),
    ("system-and-developer-to-systemInstruction",
     oa([{"role": "system", "content": "Be terse."},
         {"role": "developer", "content": [{"type": "text", "text": "No "}, {"type": "text", "text": "emoji."}]},
         {"role": "user", "content": "Hi"}]),
     gem([user({"text": "Hi"})], systemInstruction={"parts": [{"text": "Be terse."}, {"text": "No emoji."}]})),
    ("image-data-url-to-inlineData",
     oa([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                      {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}",
                                                                          "detail": "high"}}]}]),
     gem([user({"text": "What is this?"}, {"inlineData": {"mimeType": "image/png", "data": PNG}})])),
    ("image-gs-uri-to-fileData",
     oa([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "gs://b/cat.png"}}]}]),
     gem([user({"fileData": {"fileUri": "gs://b/cat.png"}})])),
    ("pdf-file-data-url-to-inlineData",
     oa([{"role": "user", "content": [{"type": "file", "file": {"filename": "a.pdf",
                                                               "file_data": "data:application/pdf;base64,JVBE"}}]}]),
     gem([user({"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}})])),
    ("input-audio-to-inlineData",
     oa([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}]}]),
     gem([user({"inlineData": {"mimeType": "audio/wav", "data": "UklG"}})])),
    ("assistant-text-to-model",
     oa(HI + [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]),
     gem([user({"text": "Hi"}), model({"text": "Hello."}), user({"text": "Bye"})])),
    ("consecutive-same-role-merged",
     oa(HI + [{"role": "user", "content": "Again"}]),
     gem([user({"text": "Hi"}, {"text": "Again"})])),
    ("tool-call-and-result-named-by-history",
     oa(HI + [{"role": "assistant", "content": None,
               "tool_calls": [oa_call("call_1", "get_weather", '{"city":"Paris"}')]},
              {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]),
     gem([user({"text": "Hi"}), model(call("get_weather", {"city": "Paris"}, signed=True)),
          user(result("get_weather", "18C"))])),
    ("parallel-calls-one-signature-results-in-one-content",
     oa(HI + [{"role": "assistant", "content": "Checking.",
               "tool_calls": [oa_call("a", "get_weather", '{"city":"Paris"}'),
                              oa_call("b", "get_time", "")]},
              {"role": "tool", "tool_call_id": "a", "content": "18C"},
              {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "9:00"}]},
              {"role": "user", "content": "Thanks"}]),
     gem([user({"text": "Hi"}),
          model({"text": "Checking."}, call("get_weather", {"city": "Paris"}, signed=True), call("get_time", {})),
          user(result("get_weather", "18C"), result("get_time", "9:00"), {"text": "Thanks"})])),
    ("reasoning-content-in-history-dropped",
     oa(HI + [{"role": "assistant", "content": "Yo", "reasoning_content": "hmm"}]),
     gem([user({"text": "Hi"}), model({"text": "Yo"})])),
    ("generation-fields",
     oa(HI, max_completion_tokens=300, max_tokens=100, temperature=0.2, top_p=0.9, top_k=40,
        presence_penalty=0.1, frequency_penalty=0.3, seed=7, stop="END"),
     gem([user({"text": "Hi"})], generationConfig={
         "maxOutputTokens": 300, "temperature": 0.2, "topP": 0.9, "topK": 40, "presencePenalty": 0.1,
         "frequencyPenalty": 0.3, "seed": 7, "stopSequences": ["END"]})),
    ("max-tokens-and-stop-list-truncated-to-5",
     oa(HI, max_tokens=100, stop=["1", "2", "3", "4", "5", "6"], n=1),
     gem([user({"text": "Hi"})], generationConfig={"maxOutputTokens": 100,
                                                   "stopSequences": ["1", "2", "3", "4", "5"]})),
    ("json-object-response-format",
     oa(HI, response_format={"type": "json_object"}),
     gem([user({"text": "Hi"})], generationConfig={"responseMimeType": "application/json"})),
    ("json-schema-response-format",
     oa(HI, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}}),
     gem([user({"text": "Hi"})], generationConfig={"responseMimeType": "application/json",
                                                   "responseJsonSchema": WEATHER_SCHEMA})),
    ("tools-to-one-functionDeclarations-entry",
     oa(HI, tools=[OA_TOOL, {"type": "function", "function": {"name": "now", "parameters": {
         "type": "object", "properties": {}, "additionalProperties": False}}}]),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL, {"name": "now"}]}])),
    ("tool-choice-auto", oa(HI, tools=[OA_TOOL], tool_choice="auto"),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL]}],
         toolConfig={"functionCallingConfig": {"mode": "AUTO"}})),
    ("tool-choice-required", oa(HI, tools=[OA_TOOL], tool_choice="required"),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL]}],
         toolConfig={"functionCallingConfig": {"mode": "ANY"}})),
    ("tool-choice-none", oa(HI, tools=[OA_TOOL], tool_choice="none"),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL]}],
         toolConfig={"functionCallingConfig": {"mode": "NONE"}})),
    ("tool-choice-specific-function",
     oa(HI, tools=[OA_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL]}],
         toolConfig={"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})),
    ("tool-choice-without-tools-dropped", oa(HI, tool_choice="auto"), gem([user({"text": "Hi"})])),
    ("reasoning-effort-low", oa(HI, reasoning_effort="low"),
     gem([user({"text": "Hi"})], generationConfig={"thinkingConfig": {"thinkingBudget": 1024,
                                                                       "includeThoughts": True}})),
    ("reasoning-effort-medium", oa(HI, reasoning_effort="medium"),
     gem([user({"text": "Hi"})], generationConfig={"thinkingConfig": {"thinkingBudget": 8192,
                                                                       "includeThoughts": True}})),
    ("reasoning-effort-high", oa(HI, reasoning_effort="high"),
     gem([user({"text": "Hi"})], generationConfig={"thinkingConfig": {"thinkingBudget": 24576,
                                                                       "includeThoughts": True}})),
    ("reasoning-effort-none", oa(HI, reasoning_effort="none"),
     gem([user({"text": "Hi"})], generationConfig={"thinkingConfig": {"thinkingBudget": 0}})),
    ("model-stream-and-openai-only-fields-dropped",
     oa(HI, stream=True, stream_options={"include_usage": True}, user="u1", parallel_tool_calls=False,
        store=True, metadata={"a": "b"}, logprobs=False),
     gem([user({"text": "Hi"})])),
]


@pytest.mark.parametrize("body, expected", [c[1:] for c in OA_REQUEST_CASES],
                         ids=[c[0] for c in OA_REQUEST_CASES])
def test_openai_to_gemini_request(body, expected):
    assert OA_GEM.request(body) == expected


# -- E.6 requests: Anthropic client -> Gemini ---------------------------------------

def an(messages: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": messages, **extra}


AN_TOOL = {"name": "get_weather", "description": "Weather", "input_schema": WEATHER_SCHEMA,
           "cache_control": {"type": "ephemeral"}, "strict": True, "input_examples": [{}],
           "defer_loading": False, "eager_input_streaming": True}
AN_HI = [{"role": "user", "content": "Hi"}]
GEN_1024 = {"maxOutputTokens": 1024}
AN_REQUEST_CASES = [
    ("user-string", an(AN_HI), gem([user({"text": "Hi"})], generationConfig=GEN_1024)),
    ("system-string", an(AN_HI, system="Be terse."),
     gem([user({"text": "Hi"})], systemInstruction={"parts": [{"text": "Be terse."}]}, generationConfig=GEN_1024)),
    ("system-blocks-billing-header-and-cache-control-dropped",
     an(AN_HI, system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1"},
                       {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]),
     gem([user({"text": "Hi"})], systemInstruction={"parts": [{"text": "You are Claude Code."}]},
         generationConfig=GEN_1024)),
    ("image-base64-to-inlineData",
     an([{"role": "user", "content": [
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
         {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}}]}]),
     gem([user({"inlineData": {"mimeType": "image/png", "data": PNG}}, {"text": "What is this?"})],
         generationConfig=GEN_1024)),
    ("image-url-gs-to-fileData",
     an([{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "gs://b/c.png"}}]}]),
     gem([user({"fileData": {"fileUri": "gs://b/c.png"}})], generationConfig=GEN_1024)),
    ("pdf-document-base64-to-inlineData",
     an([{"role": "user", "content": [{"type": "document", "source": {
         "type": "base64", "media_type": "application/pdf", "data": "JVBE"}, "title": "t"}]}]),
     gem([user({"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}})], generationConfig=GEN_1024)),
    ("text-document-to-text",
     an([{"role": "user", "content": [{"type": "document", "source": {
         "type": "text", "media_type": "text/plain", "data": "notes"}}]}]),
     gem([user({"text": "notes"})], generationConfig=GEN_1024)),
    ("empty-text-block-skipped",
     an([{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "Hi"}]}]),
     gem([user({"text": "Hi"})], generationConfig=GEN_1024)),
    ("tool-use-and-result-named-by-history",
     an(AN_HI + [{"role": "assistant", "content": [
         {"type": "text", "text": "Checking."},
         {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A",
                                       "content": "18C, cloudy", "cache_control": {"type": "ephemeral"}}]}]),
     gem([user({"text": "Hi"}),
          model({"text": "Checking."}, call("get_weather", {"city": "Paris"}, signed=True)),
          user(result("get_weather", "18C, cloudy"))], generationConfig=GEN_1024)),
    ("parallel-results-one-content-error-flag-and-image",
     an(AN_HI + [{"role": "assistant", "content": [
         {"type": "tool_use", "id": "t1", "name": "read", "input": {"path": "a"}},
         {"type": "tool_use", "id": "t2", "name": "shot", "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "t1", "is_error": True,
              "content": [{"type": "text", "text": "no such"}, {"type": "text", "text": "file"}]},
             {"type": "tool_result", "tool_use_id": "t2", "content": [
                 {"type": "text", "text": "screen:"},
                 {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
             {"type": "text", "text": "Go on."}]}]),
     gem([user({"text": "Hi"}), model(call("read", {"path": "a"}, signed=True), call("shot", {})),
          user(result("read", "no such\nfile", key="error"), result("shot", "screen:"),
               {"inlineData": {"mimeType": "image/png", "data": PNG}}, {"text": "Go on."})],
         generationConfig=GEN_1024)),
    ("thinking-blocks-in-history-dropped",
     an(AN_HI + [{"role": "assistant", "content": [
         {"type": "thinking", "thinking": "hmm", "signature": "EqQB"},
         {"type": "redacted_thinking", "data": "xyz"}, {"type": "text", "text": "Yo"}]}]),
     gem([user({"text": "Hi"}), model({"text": "Yo"})], generationConfig=GEN_1024)),
    ("thinking-enabled-to-thinkingConfig",
     an(AN_HI, max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048}),
     gem([user({"text": "Hi"})], generationConfig={
         "maxOutputTokens": 4096, "thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": True}})),
    ("thinking-adaptive-to-dynamic-budget", an(AN_HI, thinking={"type": "adaptive"}),
     gem([user({"text": "Hi"})], generationConfig={
         "maxOutputTokens": 1024, "thinkingConfig": {"thinkingBudget": -1, "includeThoughts": True}})),
    ("thinking-disabled-omitted", an(AN_HI, thinking={"type": "disabled"}),
     gem([user({"text": "Hi"})], generationConfig=GEN_1024)),
    ("sampling-and-stop-sequences",
     an(AN_HI, temperature=0.5, top_p=0.9, top_k=20, stop_sequences=["a", "b", "c", "d", "e", "f"]),
     gem([user({"text": "Hi"})], generationConfig={
         "maxOutputTokens": 1024, "temperature": 0.5, "topP": 0.9, "topK": 20,
         "stopSequences": ["a", "b", "c", "d", "e"]})),
    ("tools-cleaned-web-search-becomes-google-search",
     an(AN_HI, tools=[AN_TOOL, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                      {"type": "custom", "name": "noop", "input_schema": {"type": "object"}}]),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL, {"name": "noop"}]},
                                        {"googleSearch": {}}],
         generationConfig=GEN_1024)),
    ("mid-conversation-system-message-to-systemInstruction",
     an(AN_HI + [{"role": "assistant", "content": "Yo"}, {"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Again"}], system="Base."),
     gem([user({"text": "Hi"}), model({"text": "Yo"}), user({"text": "Again"})],
         systemInstruction={"parts": [{"text": "Base."}, {"text": "Be brief."}]},
         generationConfig=GEN_1024)),
    ("tool-choice-auto", an(AN_HI, tools=[AN_TOOL], tool_choice={"type": "auto"}),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL]}],
         toolConfig={"functionCallingConfig": {"mode": "AUTO"}}, generationConfig=GEN_1024)),
    ("tool-choice-any", an(AN_HI, tools=[AN_TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True}),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL]}],
         toolConfig={"functionCallingConfig": {"mode": "ANY"}}, generationConfig=GEN_1024)),
    ("tool-choice-none", an(AN_HI, tools=[AN_TOOL], tool_choice={"type": "none"}),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL]}],
         toolConfig={"functionCallingConfig": {"mode": "NONE"}}, generationConfig=GEN_1024)),
    ("tool-choice-specific-tool", an(AN_HI, tools=[AN_TOOL], tool_choice={"type": "tool", "name": "get_weather"}),
     gem([user({"text": "Hi"})], tools=[{"functionDeclarations": [WEATHER_DECL]}],
         toolConfig={"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
         generationConfig=GEN_1024)),
    ("anthropic-only-fields-dropped",
     an(AN_HI, stream=True, metadata={"user_id": "u"}, service_tier="auto",
        context_management={"edits": []}),
     gem([user({"text": "Hi"})], generationConfig=GEN_1024)),
]


@pytest.mark.parametrize("body, expected", [c[1:] for c in AN_REQUEST_CASES],
                         ids=[c[0] for c in AN_REQUEST_CASES])
def test_anthropic_to_gemini_request(body, expected):
    assert AN_GEM.request(body) == expected


REQUEST_ERRORS = [
    ("openai-https-image", OA_GEM, oa([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}]}]),
     "messages[0].content[0].image_url.url: URL 'https://x.test/cat.png' cannot be sent to a Gemini "
     "upstream"),
    ("openai-unknown-tool-call-id", OA_GEM, oa(HI + [{"role": "tool", "tool_call_id": "ghost", "content": "1"}]),
     "messages[1] answers tool call 'ghost', which no earlier assistant message holds"),
    ("openai-n-above-1", OA_GEM, oa(HI, n=2), '"n" is 2: Gemini upstreams return one choice'),
    ("openai-unknown-role", OA_GEM, oa([{"role": "robot", "content": "x"}]),
     'messages[0].role is "robot"'),
    ("openai-unknown-reasoning-effort", OA_GEM, oa(HI, reasoning_effort="extreme"),
     "reasoning_effort 'extreme' is unknown"),
    ("openai-unknown-tool-choice", OA_GEM, oa(HI, tool_choice="sometimes"), "tool_choice 'sometimes' is unknown"),
    ("openai-image-in-system", OA_GEM, oa([{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]),
     "messages[0].content[0]: only text parts are allowed here"),
    ("openai-messages-not-a-list", OA_GEM, {"messages": "hi"}, "messages must be an array"),
    ("anthropic-https-image", AN_GEM, an([{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x.test/c.png"}}]}]),
     "messages[0].content[0]: URL 'https://x.test/c.png' cannot be sent"),
    ("anthropic-file-source", AN_GEM, an([{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "f1"}}]}]),
     "messages[0].content[0]: a document with source type 'file' cannot be translated"),
    ("anthropic-unknown-tool-use-id", AN_GEM, an([{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_X", "content": "1"}]}]),
     "messages[0].content[0] answers tool call 'toolu_X'"),
    ("anthropic-unknown-role", AN_GEM, an([{"role": "critic", "content": "x"}]),
     'messages[0]: Unexpected role "critic"'),
    ("anthropic-unknown-tool-choice", AN_GEM, an(AN_HI, tool_choice={"type": "some"}),
     'tool_choice {"type": "some"} is unknown'),
]


@pytest.mark.parametrize("translator, body, message", [c[1:] for c in REQUEST_ERRORS],
                         ids=[c[0] for c in REQUEST_ERRORS])
def test_untranslatable_request_is_a_client_error(translator, body, message):
    with pytest.raises(proxypal.ClientError) as info:
        translator.request(body)
    assert info.value.status == 400
    assert message in info.value.message


# -- E.6 non-stream responses: Gemini -> Anthropic and OpenAI -----------------------

USAGE = {"promptTokenCount": 40, "candidatesTokenCount": 12, "totalTokenCount": 90, "thoughtsTokenCount": 38}
USAGE_CACHED = {"promptTokenCount": 100, "cachedContentTokenCount": 60, "candidatesTokenCount": 5,
                "thoughtsTokenCount": 20, "totalTokenCount": 125}
AN_USAGE = {"input_tokens": 40, "output_tokens": 50, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
AN_USAGE_CACHED = {"input_tokens": 40, "output_tokens": 25, "cache_read_input_tokens": 60,
                   "cache_creation_input_tokens": 0}
OA_USAGE = {"prompt_tokens": 40, "completion_tokens": 50, "total_tokens": 90,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 38}}
OA_USAGE_CACHED = {"prompt_tokens": 100, "completion_tokens": 25, "total_tokens": 125,
                   "prompt_tokens_details": {"cached_tokens": 60},
                   "completion_tokens_details": {"reasoning_tokens": 20}}
# Derived, deterministic tool ids (the same answer always gets the same ids).
TOOLU_PARIS = CALL_PARIS = "call_f1cc4d6ed759"
TOOLU_TIME = CALL_TIME = "call_39d2784282cb"
PARIS = {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "CiQB"}
TIME = {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}}
# A signed call's signature goes to an Anthropic client in an empty thinking block before
# it: sent back, it reaches Gemini again on that call (not the documented stand-in).
SIGNED_PARIS = {"type": "thinking", "thinking": "", "signature": "pp1:gemini:CiQB"}


def an_msg(content: List[Dict[str, Any]], stop: str, usage: Dict[str, Any] = AN_USAGE,
           rid: str = "r1") -> Dict[str, Any]:
    return {"id": f"msg_{rid}", "type": "message", "role": "assistant", "model": MODEL, "content": content,
            "stop_reason": stop, "stop_sequence": None, "usage": usage}


def oa_msg(message: Dict[str, Any], finish: str, usage: Dict[str, Any] = OA_USAGE,
           rid: str = "r1") -> Dict[str, Any]:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage}


RESPONSE_CASES = [
    ("text-parts-merged",
     chunk([{"text": "Hel"}, {"text": "lo"}], "STOP", USAGE),
     an_msg([{"type": "text", "text": "Hello"}], "end_turn"),
     oa_msg({"content": "Hello"}, "stop")),
    ("thoughts-first-then-text-cached-usage",
     chunk([{"text": "Think", "thought": True}, {"text": "ing", "thought": True, "thoughtSignature": "Ts"},
            {"text": "Answer"}, {"text": "", "thoughtSignature": "Zz"}], "STOP", USAGE_CACHED),
     an_msg([{"type": "thinking", "thinking": "Thinking", "signature": "pp1:gemini:Ts"},
             {"type": "text", "text": "Answer"}],
            "end_turn", AN_USAGE_CACHED),
     oa_msg({"content": "Answer", "reasoning_content": "Thinking"}, "stop", OA_USAGE_CACHED)),
    ("thought-without-signature-gets-empty-signature",
     chunk([{"text": "Hm", "thought": True}, {"text": "Ok"}], "STOP", USAGE),
     an_msg([{"type": "thinking", "thinking": "Hm", "signature": ""}, {"type": "text", "text": "Ok"}], "end_turn"),
     oa_msg({"content": "Ok", "reasoning_content": "Hm"}, "stop")),
    ("function-call-with-STOP-is-tool-use",
     chunk([PARIS], "STOP", USAGE, rid="r3"),
     an_msg([SIGNED_PARIS,
             {"type": "tool_use", "id": TOOLU_PARIS, "name": "get_weather", "input": {"city": "Paris"}}],
            "tool_use", rid="r3"),
     oa_msg({"content": None, "tool_calls": [{"id": CALL_PARIS, "type": "function", "function": {
         "name": "get_weather", "arguments": '{"city":"Paris"}'}}]}, "tool_calls", rid="r3")),
    ("text-and-parallel-calls",
     chunk([{"text": "Checking."}, PARIS, TIME], "STOP", USAGE, rid="r3"),
     an_msg([{"type": "text", "text": "Checking."}, SIGNED_PARIS,
             {"type": "tool_use", "id": TOOLU_PARIS, "name": "get_weather", "input": {"city": "Paris"}},
             {"type": "tool_use", "id": TOOLU_TIME, "name": "get_time", "input": {"tz": "CET"}}],
            "tool_use", rid="r3"),
     oa_msg({"content": "Checking.", "tool_calls": [
         {"id": CALL_PARIS, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
         {"id": CALL_TIME, "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]},
         "tool_calls", rid="r3")),
    ("vertex-call-id-kept-and-sanitized",
     chunk([{"functionCall": {"id": "fc.1:a", "name": "ls", "args": {}}}], "STOP", USAGE),
     an_msg([{"type": "tool_use", "id": "fc_1_a", "name": "ls", "input": {}}], "tool_use"),
     oa_msg({"content": None, "tool_calls": [{"id": "fc_1_a", "type": "function", "function": {
         "name": "ls", "arguments": "{}"}}]}, "tool_calls")),
    ("MAX_TOKENS", chunk([{"text": "Cut"}], "MAX_TOKENS", USAGE),
     an_msg([{"type": "text", "text": "Cut"}], "max_tokens"), oa_msg({"content": "Cut"}, "length")),
    ("SAFETY-without-parts", chunk([], "SAFETY", USAGE),
     an_msg([], "refusal"), oa_msg({"content": ""}, "content_filter")),
    ("prompt-blocked",
     {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": USAGE, "responseId": "r1"},
     an_msg([], "refusal"), oa_msg({"content": ""}, "content_filter")),
]
# Every finishReason of E.3 and where E.6 sends it.
FINISH_ROWS = [
    ("STOP", "end_turn", "stop"), ("MAX_TOKENS", "max_tokens", "length"),
    ("SAFETY", "refusal", "content_filter"), ("RECITATION", "refusal", "content_filter"),
    ("BLOCKLIST", "refusal", "content_filter"), ("PROHIBITED_CONTENT", "refusal", "content_filter"),
    ("SPII", "refusal", "content_filter"), ("IMAGE_SAFETY", "refusal", "content_filter"),
    ("LANGUAGE", "refusal", "content_filter"), ("MALFORMED_FUNCTION_CALL", "end_turn", "stop"),
    ("OTHER", "end_turn", "stop"), ("FINISH_REASON_UNSPECIFIED", "end_turn", "stop"),
    ("TOO_MANY_TOOL_CALLS", "end_turn", "stop"),
]


@pytest.mark.parametrize("body, anthropic, openai", [c[1:] for c in RESPONSE_CASES],
                         ids=[c[0] for c in RESPONSE_CASES])
def test_gemini_response(body, anthropic, openai):
    assert AN_GEM.response(body, MODEL) == anthropic
    got = OA_GEM.response(body, MODEL)
    assert isinstance(got.pop("created"), int)
    assert got == openai


@pytest.mark.parametrize("reason, stop_reason, finish_reason", FINISH_ROWS, ids=[r[0] for r in FINISH_ROWS])
def test_finish_reason(reason, stop_reason, finish_reason):
    body = chunk([{"text": "x"}], reason, USAGE)
    assert AN_GEM.response(body, MODEL)["stop_reason"] == stop_reason
    assert OA_GEM.response(body, MODEL)["choices"][0]["finish_reason"] == finish_reason


def test_tool_ids_differ_between_answers_and_repeat_for_the_same_answer():
    first = AN_GEM.response(chunk([PARIS], "STOP", USAGE, rid="a"), MODEL)["content"][-1]["id"]
    again = AN_GEM.response(chunk([PARIS], "STOP", USAGE, rid="a"), MODEL)["content"][-1]["id"]
    other = AN_GEM.response(chunk([PARIS], "STOP", USAGE, rid="b"), MODEL)["content"][-1]["id"]
    assert first == again != other


# -- E.6 streams: Gemini alt=sse -> Anthropic events and OpenAI chunks --------------

def ev(kind: str, **fields: Any) -> Tuple[str, Dict[str, Any]]:
    return kind, {"type": kind, **fields}


def start(input_tokens: int, cached: int = 0, rid: str = "r1") -> Tuple[str, Dict[str, Any]]:
    return ev("message_start", message={
        "id": f"msg_{rid}", "type": "message", "role": "assistant", "content": [], "model": MODEL,
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 0, "cache_read_input_tokens": cached}})


def block(index: int, kind: str, **extra: Any) -> Tuple[str, Dict[str, Any]]:
    content = {"type": kind, kind: ""} if kind in ("text", "thinking") else {"type": kind, **extra}
    if kind == "thinking":
        content["signature"] = ""
    return ev("content_block_start", index=index, content_block=content)


def delta(index: int, kind: str, key: str, value: str) -> Tuple[str, Dict[str, Any]]:
    return ev("content_block_delta", index=index, delta={"type": kind, key: value})


def text(index: int, value: str) -> Tuple[str, Dict[str, Any]]:
    return delta(index, "text_delta", "text", value)


def stop(index: int) -> Tuple[str, Dict[str, Any]]:
    return ev("content_block_stop", index=index)


def tool(index: int, call_id: str, name: str, args: str) -> List[Tuple[str, Dict[str, Any]]]:
    return [block(index, "tool_use", id=call_id, name=name, input={}),
            delta(index, "input_json_delta", "partial_json", args), stop(index)]


def signed(index: int, signature: str) -> List[Tuple[str, Dict[str, Any]]]:
    """The empty thinking block that carries a signed functionCall's signature before it."""
    return [block(index, "thinking"), delta(index, "signature_delta", "signature", signature),
            stop(index)]


def end(reason: str, usage: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    return [ev("message_delta", delta={"stop_reason": reason, "stop_sequence": None}, usage=usage),
            ev("message_stop")]


def an_error(kind: str, message: str) -> Tuple[str, Dict[str, Any]]:
    return "error", {"type": "error", "error": {"type": kind, "message": message}}


def oc(delta_: Dict[str, Any], finish: str = None, rid: str = "r1") -> Tuple[str, Dict[str, Any]]:
    return "", {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "model": MODEL,
                "choices": [{"index": 0, "delta": delta_, "finish_reason": finish}]}


def oc_end(usage: Dict[str, Any], rid: str = "r1") -> List[Tuple[str, Any]]:
    return [("", {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "model": MODEL,
                  "choices": [], "usage": usage}), ("", "[DONE]")]


def oc_error(message: str, kind: str = "api_error", code: str = None) -> Tuple[str, Dict[str, Any]]:
    return "", {"error": {"message": message, "type": kind, "code": code, "param": None}}


ROLE = oc({"role": "assistant", "content": ""})
CUT = proxypal.STREAM_CUT.format(end="a finishReason")
PROMPT_ONLY = {"promptTokenCount": 40, "totalTokenCount": 40}
USAGE_ZERO = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
AN_USAGE_ZERO = {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0}

# (id, upstream Gemini events, expected Anthropic events, expected OpenAI events)
STREAM_CASES = [
    ("text",
     [chunk([{"text": "Hel"}], usage=PROMPT_ONLY), chunk([{"text": "lo"}], "STOP", USAGE)],
     [start(40), block(0, "text"), text(0, "Hel"), text(0, "lo"), stop(0), *end("end_turn", AN_USAGE)],
     [ROLE, oc({"content": "Hel"}), oc({"content": "lo"}), oc({}, "stop"), *oc_end(OA_USAGE)]),
    ("thoughts-signature-then-text-cached-usage",
     [chunk([{"text": "Let me", "thought": True}], usage={"promptTokenCount": 100, "cachedContentTokenCount": 60}),
      chunk([{"text": " think", "thought": True, "thoughtSignature": "Ts"}, {"text": "Answer"}]),
      chunk([{"text": "", "thoughtSignature": "Zz"}], "STOP", USAGE_CACHED)],
     [start(40, 60), block(0, "thinking"), delta(0, "thinking_delta", "thinking", "Let me"),
      delta(0, "thinking_delta", "thinking", " think"),
      delta(0, "signature_delta", "signature", "pp1:gemini:Ts"), stop(0),
      block(1, "text"), text(1, "Answer"), stop(1), *end("end_turn", AN_USAGE_CACHED)],
     [ROLE, oc({"reasoning_content": "Let me"}), oc({"reasoning_content": " think"}), oc({"content": "Answer"}),
      oc({}, "stop"), *oc_end(OA_USAGE_CACHED)]),
    ("function-call-whole",
     [chunk([PARIS], "STOP", USAGE, rid="r3")],
     [start(40, rid="r3"), *signed(0, "pp1:gemini:CiQB"),
      *tool(1, TOOLU_PARIS, "get_weather", '{"city":"Paris"}'), *end("tool_use", AN_USAGE)],
     [oc({"role": "assistant", "content": ""}, rid="r3"),
      oc({"tool_calls": [{"index": 0, "id": CALL_PARIS, "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}, rid="r3"),
      oc({}, "tool_calls", rid="r3"), *oc_end(OA_USAGE, rid="r3")]),
    ("text-then-parallel-calls",
     [chunk([{"text": "Checking."}], usage=PROMPT_ONLY, rid="r3"), chunk([PARIS], rid="r3"),
      chunk([TIME], "STOP", USAGE, rid="r3")],
     [start(40, rid="r3"), block(0, "text"), text(0, "Checking."), stop(0), *signed(1, "pp1:gemini:CiQB"),
      *tool(2, TOOLU_PARIS, "get_weather", '{"city":"Paris"}'), *tool(3, TOOLU_TIME, "get_time", '{"tz":"CET"}'),
      *end("tool_use", AN_USAGE)],
     [oc({"role": "assistant", "content": ""}, rid="r3"), oc({"content": "Checking."}, rid="r3"),
      oc({"tool_calls": [{"index": 0, "id": CALL_PARIS, "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}, rid="r3"),
      oc({"tool_calls": [{"index": 1, "id": CALL_TIME, "type": "function",
                          "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]}, rid="r3"),
      oc({}, "tool_calls", rid="r3"), *oc_end(OA_USAGE, rid="r3")]),
    ("call-without-args-gets-{}",
     [chunk([{"functionCall": {"name": "ls"}}], "STOP", USAGE, rid="r9")],
     [start(40, rid="r9"), *tool(0, "call_688e2e753723", "ls", "{}"), *end("tool_use", AN_USAGE)],
     [oc({"role": "assistant", "content": ""}, rid="r9"),
      oc({"tool_calls": [{"index": 0, "id": "call_688e2e753723", "type": "function",
                          "function": {"name": "ls", "arguments": "{}"}}]}, rid="r9"),
      oc({}, "tool_calls", rid="r9"), *oc_end(OA_USAGE, rid="r9")]),
    ("MAX_TOKENS",
     [chunk([{"text": "Cut"}], "MAX_TOKENS", USAGE)],
     [start(40), block(0, "text"), text(0, "Cut"), stop(0), *end("max_tokens", AN_USAGE)],
     [ROLE, oc({"content": "Cut"}), oc({}, "length"), *oc_end(OA_USAGE)]),
    ("SAFETY",
     [chunk([{"text": "I"}], usage=PROMPT_ONLY), chunk([], "SAFETY", USAGE)],
     [start(40), block(0, "text"), text(0, "I"), stop(0), *end("refusal", AN_USAGE)],
     [ROLE, oc({"content": "I"}), oc({}, "content_filter"), *oc_end(OA_USAGE)]),
    ("prompt-blocked",
     [{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": PROMPT_ONLY, "responseId": "r1"}],
     [start(40), *end("refusal", {"input_tokens": 40, "output_tokens": 0, "cache_read_input_tokens": 0,
                                   "cache_creation_input_tokens": 0})],
     [ROLE, oc({}, "content_filter"),
      *oc_end({**USAGE_ZERO, "prompt_tokens": 40, "total_tokens": 40})]),
    ("usage-after-finish-chunk",
     [chunk([{"text": "Hi"}], "STOP"), {"usageMetadata": USAGE, "responseId": "r1"}],
     [start(7), block(0, "text"), text(0, "Hi"), stop(0), *end("end_turn", AN_USAGE)],
     [ROLE, oc({"content": "Hi"}), oc({}, "stop"), *oc_end(OA_USAGE)]),
    ("finish-without-any-usage-ends-at-close",
     [chunk([{"text": "Hi"}], "STOP")],
     [start(7), block(0, "text"), text(0, "Hi"), stop(0), *end("end_turn", {"output_tokens": 0})],
     [ROLE, oc({"content": "Hi"}), oc({}, "stop"), *oc_end(USAGE_ZERO)]),
    ("ends-without-finishReason-is-an-error",
     [chunk([{"text": "Hel"}], usage=PROMPT_ONLY)],
     [start(40), block(0, "text"), text(0, "Hel"), stop(0), an_error("api_error", CUT)],
     [ROLE, oc({"content": "Hel"}), oc_error(CUT)]),
    ("empty-stream-is-an-error", [],
     [an_error("api_error", CUT)], [oc_error(CUT)]),
    ("upstream-error-mid-stream-then-nothing",
     [chunk([{"text": "Hel"}], usage=PROMPT_ONLY),
      {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}},
      chunk([{"text": "lo"}], "STOP", USAGE)],
     [start(40), block(0, "text"), text(0, "Hel"), stop(0), an_error("overloaded_error", "The model is overloaded.")],
     [ROLE, oc({"content": "Hel"}), oc_error("The model is overloaded.")]),
    ("upstream-rate-limit-error-first",
     [{"error": {"code": 429, "message": "Quota exceeded.", "status": "RESOURCE_EXHAUSTED"}}],
     [an_error("rate_limit_error", "Quota exceeded.")],
     [oc_error("Quota exceeded.", "rate_limit_error", "rate_limit_exceeded")]),
    ("not-json-is-skipped-and-the-cut-still-reported",
     [chunk([{"text": "A"}], usage=PROMPT_ONLY), "<html>oops"],
     [start(40), block(0, "text"), text(0, "A"), stop(0), an_error("api_error", CUT)],
     [ROLE, oc({"content": "A"}), oc_error(CUT)]),
    ("not-json-line-between-chunks-is-skipped",
     [chunk([{"text": "A"}], usage=PROMPT_ONLY), "keep-alive", chunk([{"text": "B"}], "STOP", USAGE)],
     [start(40), block(0, "text"), text(0, "A"), text(0, "B"), stop(0), *end("end_turn", AN_USAGE)],
     [ROLE, oc({"content": "A"}), oc({"content": "B"}), oc({}, "stop"), *oc_end(OA_USAGE)]),
]


@pytest.mark.parametrize("upstream, expected", [(c[1], c[2]) for c in STREAM_CASES],
                         ids=[c[0] for c in STREAM_CASES])
def test_gemini_stream_to_anthropic(upstream, expected):
    assert run_stream(AN_GEM.stream, upstream, input_estimate=7) == expected


@pytest.mark.parametrize("upstream, expected", [(c[1], c[3]) for c in STREAM_CASES],
                         ids=[c[0] for c in STREAM_CASES])
def test_gemini_stream_to_openai(upstream, expected):
    assert run_stream(OA_GEM.stream, upstream, input_estimate=7) == expected


def test_gemini_stream_with_lf_framing_and_comments_gives_the_same_events():
    upstream = [chunk([{"text": "Hi"}], "STOP", USAGE)]
    data = b": keepalive\n\n" + sse_bytes(upstream, crlf=False)
    got = feed_all_ways(lambda: Pipe(AN_GEM.stream), data, lambda pipe: pipe.finish(), normalize)
    assert got == run_stream(AN_GEM.stream, upstream)


def test_anthropic_stream_events_follow_a4_order():
    """Every Anthropic transcript above: message_start first, blocks with increasing
    index each started once and stopped once, then message_delta and message_stop,
    or an error as the last event."""
    for case in STREAM_CASES:
        names = [name for name, _ in run_stream(AN_GEM.stream, case[1])]
        if names[-1] == "error":
            names = names[:-1]
        else:
            assert names[-2:] == ["message_delta", "message_stop"], case[0]
            names = names[:-2]
        assert not names or names[0] == "message_start", case[0]
        opened = [d["index"] for n, d in run_stream(AN_GEM.stream, case[1]) if n == "content_block_start"]
        assert opened == list(range(len(opened))), case[0]


# -- usage: one table, both directions where the mapping is lossless ----------------

USAGE_ROWS = [("cached-and-thoughts", USAGE_CACHED, OA_USAGE_CACHED),
              ("thoughts-no-cache", USAGE, {**OA_USAGE, "prompt_tokens_details": {"cached_tokens": 0}})]


@pytest.mark.parametrize("gemini, openai", [r[1:] for r in USAGE_ROWS], ids=[r[0] for r in USAGE_ROWS])
def test_usage_gemini_openai_both_ways(gemini, openai):
    assert proxypal.write_openai_usage(proxypal.read_gemini_usage(gemini)) == openai
    assert proxypal.write_gemini_usage(proxypal.read_openai_usage(openai)) == gemini


def test_usage_anthropic_to_gemini_counts_cache_in_the_prompt():
    usage = {"input_tokens": 30, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 60,
             "output_tokens": 25}
    assert proxypal.write_gemini_usage(proxypal.read_anthropic_usage(usage)) == {
        "promptTokenCount": 100, "cachedContentTokenCount": 60, "candidatesTokenCount": 25,
        "totalTokenCount": 125}


# -- Gemini clients -> OpenAI and Anthropic upstreams (E.6 reversed) ---------------

GEM_OA = proxypal.TRANSLATORS[("gemini", "openai")]
GEM_AN = proxypal.TRANSLATORS[("gemini", "anthropic")]
G_HI = [user({"text": "Hi"})]
G_TOOLS = [{"functionDeclarations": [{"name": "get_weather", "description": "Weather", "parameters": {
    "type": "OBJECT", "properties": {"city": {"type": "STRING", "nullable": True}}, "required": ["city"]}},
    {"name": "now"}]}]
JS_WEATHER = {"type": "object", "properties": {"city": {"type": ["string", "null"]}}, "required": ["city"]}
NO_ARGS = {"type": "object", "properties": {}}
OA_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                              "parameters": JS_WEATHER}},
            {"type": "function", "function": {"name": "now", "parameters": NO_ARGS}}]
AN_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": JS_WEATHER},
            {"name": "now", "input_schema": NO_ARGS}]
MAX = proxypal.ANTHROPIC_DEFAULT_MAX_TOKENS


def a_user(*blocks: Dict[str, Any]) -> Dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def a_asst(*blocks: Dict[str, Any]) -> Dict[str, Any]:
    return {"role": "assistant", "content": list(blocks)}


def a_text(value: str) -> Dict[str, Any]:
    return {"type": "text", "text": value}


def a_use(call_id: str, name: str, args: Dict[str, Any]) -> Dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": args}


def a_result(call_id: str, content: str, error: bool = False) -> Dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": call_id, "content": content, **({"is_error": True} if error else {})}


def o_calls(*calls: Tuple[str, str, str], text: str = "") -> Dict[str, Any]:
    return {"role": "assistant", "content": text, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls]}


WEATHER_TURNS = G_HI + [model({"text": "Checking."}, {**call("get_weather", {"city": "Paris"}), "thoughtSignature": "Cq"},
                              call("now", {})),
                        user(result("get_weather", "18C"), result("now", {"t": 9}, key="output"),
                             {"text": "Thanks"})]
# (id, Gemini body, expected OpenAI request, expected Anthropic request)
GEMINI_CLIENT_REQUEST_CASES = [
    ("text-and-system",
     gem(G_HI, systemInstruction={"parts": [{"text": "Be terse."}, {"text": "No emoji."}]}),
     {"messages": [{"role": "system", "content": "Be terse.\nNo emoji."}, {"role": "user", "content": "Hi"}]},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX,
      "system": [a_text("Be terse."), a_text("No emoji.")]}),
    ("model-role-to-assistant-and-same-role-merged",
     gem(G_HI + [model({"text": "Hello."}), user({"text": "A"}), user({"text": "B"})]),
     {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "A\nB"}]},
     {"messages": [a_user(a_text("Hi")), a_asst(a_text("Hello.")), a_user(a_text("A"), a_text("B"))],
      "max_tokens": MAX}),
    ("calls-get-ids-responses-matched-by-name",
     gem(WEATHER_TURNS),
     {"messages": [{"role": "user", "content": "Hi"},
                   o_calls(("call_0", "get_weather", '{"city":"Paris"}'), ("call_1", "now", "{}"), text="Checking."),
                   {"role": "tool", "tool_call_id": "call_0", "content": "18C"},
                   {"role": "tool", "tool_call_id": "call_1", "content": '{"t":9}'},
                   {"role": "user", "content": "Thanks"}]},
     {"messages": [a_user(a_text("Hi")),
                   a_asst(a_text("Checking."), a_use("call_0", "get_weather", {"city": "Paris"}),
                          a_use("call_1", "now", {})),
                   a_user(a_result("call_0", "18C"), a_result("call_1", '{"t":9}'), a_text("Thanks"))],
      "max_tokens": MAX}),
    ("call-ids-kept-and-matched-client-made-id-falls-back-to-name",
     gem(G_HI + [model({"functionCall": {"id": "toolu_9", "name": "a", "args": {}}},
                       {"functionCall": {"name": "b", "args": {}}}),
                 user({"functionResponse": {"id": "b-1712-xyz", "name": "b", "response": {"error": "boom"}}},
                      {"functionResponse": {"id": "toolu_9", "name": "a", "response": {"result": "ok"}}})]),
     {"messages": [{"role": "user", "content": "Hi"}, o_calls(("toolu_9", "a", "{}"), ("call_1", "b", "{}")),
                   {"role": "tool", "tool_call_id": "call_1", "content": "Error: boom"},
                   {"role": "tool", "tool_call_id": "toolu_9", "content": "ok"}]},
     {"messages": [a_user(a_text("Hi")), a_asst(a_use("toolu_9", "a", {}), a_use("call_1", "b", {})),
                   a_user(a_result("call_1", "boom", error=True), a_result("toolu_9", "ok"))],
      "max_tokens": MAX}),
    ("tool-results-lead-the-merged-user-message",
     gem(G_HI + [model(call("now", {})), user({"text": "note"}), user(result("now", "9"))]),
     {"messages": [{"role": "user", "content": "Hi"}, o_calls(("call_0", "now", "{}")),
                   {"role": "tool", "tool_call_id": "call_0", "content": "9"}, {"role": "user", "content": "note"}]},
     {"messages": [a_user(a_text("Hi")), a_asst(a_use("call_0", "now", {})),
                   a_user(a_result("call_0", "9"), a_text("note"))], "max_tokens": MAX}),
    ("images-and-pdf-inline",
     gem([user({"text": "Look"}, {"inlineData": {"mimeType": "image/png", "data": PNG}},
               {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}})]),
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
         {"type": "file", "file": {"filename": "file.pdf", "file_data": "data:application/pdf;base64,JVBE"}}]}]},
     {"messages": [a_user(a_text("Look"), {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                         "data": PNG}},
                          {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                          "data": "JVBE"}})], "max_tokens": MAX}),
    ("https-fileData-image-by-url",
     gem([user({"fileData": {"mimeType": "image/jpeg", "fileUri": "https://x.test/a.jpg"}})]),
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]}]},
     {"messages": [a_user({"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}})],
      "max_tokens": MAX}),
    ("thoughts-anthropic-signed-kept-for-anthropic-others-dropped-text-to-openai",
     gem(G_HI + [model({"text": "Let me", "thought": True}, {"text": " see", "thought": True},
                       {"text": "", "thought": True, "thoughtSignature": "cHAxOmFudGhyb3BpYzpFcVFC"},
                       {"text": "mine", "thought": True, "thoughtSignature": "CiQB"},
                       {"text": "idle", "thought": True}, {"text": "Yes."})]),
     {"messages": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Yes.", "reasoning_content": "Let me see\nmine\nidle"}]},
     {"messages": [a_user(a_text("Hi")), a_asst({"type": "thinking", "thinking": "Let me see", "signature": "EqQB"},
                                                a_text("Yes."))], "max_tokens": MAX}),
    ("generation-config",
     gem(G_HI, generationConfig={"maxOutputTokens": 300, "temperature": 1.5, "topP": 0.9, "topK": 40,
                                 "stopSequences": ["END"], "seed": 3, "presencePenalty": 0.1,
                                 "frequencyPenalty": 0.2, "candidateCount": 1},
         safetySettings=[{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "OFF"}]),
     {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300, "temperature": 1.5, "top_p": 0.9,
      "presence_penalty": 0.1, "frequency_penalty": 0.2, "seed": 3, "stop": ["END"]},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": 300, "temperature": 1.0, "top_k": 40,
      "stop_sequences": ["END"]}),
    ("thinking-budget-to-effort-and-thinking",
     gem(G_HI, generationConfig={"maxOutputTokens": 2000, "temperature": 0.5, "topK": 5,
                                 "thinkingConfig": {"thinkingBudget": 4096, "includeThoughts": True}}),
     {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2000, "temperature": 0.5,
      "reasoning_effort": "medium"},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": 2000 + 4096,
      "thinking": {"type": "enabled", "budget_tokens": 4096}}),
    ("small-budget-raised-to-anthropic-minimum",
     gem(G_HI, generationConfig={"thinkingConfig": {"thinkingBudget": 500}}),
     {"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "low"},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX, "thinking": {"type": "enabled", "budget_tokens": 1024}}),
    ("dynamic-thinking-asks-for-nothing",
     gem(G_HI, generationConfig={"thinkingConfig": {"thinkingBudget": -1, "includeThoughts": True}}),
     {"messages": [{"role": "user", "content": "Hi"}]},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX}),
    ("tools-to-json-schema-auto",
     gem(G_HI, tools=G_TOOLS, toolConfig={"functionCallingConfig": {"mode": "AUTO"}}),
     {"messages": [{"role": "user", "content": "Hi"}], "tools": OA_TOOLS, "tool_choice": "auto"},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX, "tools": AN_TOOLS, "tool_choice": {"type": "auto"}}),
    ("tool-config-any", gem(G_HI, tools=G_TOOLS, toolConfig={"functionCallingConfig": {"mode": "ANY"}}),
     {"messages": [{"role": "user", "content": "Hi"}], "tools": OA_TOOLS, "tool_choice": "required"},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX, "tools": AN_TOOLS, "tool_choice": {"type": "any"}}),
    ("tool-config-none", gem(G_HI, tools=G_TOOLS, toolConfig={"functionCallingConfig": {"mode": "NONE"}}),
     {"messages": [{"role": "user", "content": "Hi"}], "tools": OA_TOOLS, "tool_choice": "none"},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX, "tools": AN_TOOLS, "tool_choice": {"type": "none"}}),
    ("tool-config-one-allowed-name",
     gem(G_HI, tools=G_TOOLS, toolConfig={"functionCallingConfig": {"mode": "ANY",
                                                                    "allowedFunctionNames": ["now"]}}),
     {"messages": [{"role": "user", "content": "Hi"}], "tools": OA_TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "now"}}},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX, "tools": AN_TOOLS,
      "tool_choice": {"type": "tool", "name": "now"}}),
    ("json-response-schema",
     gem(G_HI, generationConfig={"responseMimeType": "application/json",
                                 "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}}}),
     {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema", "json_schema": {
         "name": "response", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX, "output_config": {"format": {
         "type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}}),
    ("json-mime-type-without-schema",
     gem(G_HI, generationConfig={"responseMimeType": "application/json"}),
     {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_object"}},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX,
      "system": [a_text("Respond with one JSON object and nothing else.")]}),
    ("thinking-level-any-case-is-an-effort",
     gem(G_HI, generationConfig={"thinkingConfig": {"thinkingLevel": "HIGH"}}),
     {"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "high"},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": 24576 + MAX,
      "thinking": {"type": "enabled", "budget_tokens": 24576}}),
    ("google-search-becomes-anthropic-web-search",
     gem(G_HI, tools=[{"googleSearch": {}}]), None,
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX,
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    ("stream-flag-asks-openai-for-usage",
     {**gem(G_HI), "stream": True},
     {"messages": [{"role": "user", "content": "Hi"}], "stream": True,
      "stream_options": {"include_usage": True}},
     {"messages": [a_user(a_text("Hi"))], "max_tokens": MAX, "stream": True}),
]


@pytest.mark.parametrize("body, openai, anthropic", [c[1:] for c in GEMINI_CLIENT_REQUEST_CASES],
                         ids=[c[0] for c in GEMINI_CLIENT_REQUEST_CASES])
def test_gemini_client_request(body, openai, anthropic):
    if openai is not None:
        assert GEM_OA.request(body) == openai
    assert without_cache_marks(GEM_AN.request(body)) == anthropic


def test_google_search_toward_openai_is_refused_by_name():
    with pytest.raises(proxypal.ClientError) as info:
        GEM_OA.request(gem(G_HI, tools=[{"googleSearch": {}}]))
    assert "tool 'googleSearch' is a web search tool" in info.value.message


GEMINI_CLIENT_ERRORS = [
    ("response-without-call", gem(G_HI + [user(result("ghost", "1"))]),
     "contents[1].parts[0]: functionResponse 'ghost' answers no earlier functionCall"),
    ("second-response-to-one-call",
     gem(G_HI + [model(call("a", {})), user(result("a", "1"), result("a", "2"))]),
     "contents[2].parts[1]: functionResponse 'a' answers no earlier functionCall"),
    ("candidate-count", gem(G_HI, generationConfig={"candidateCount": 2}), "candidateCount=2 is not supported"),
    ("gs-file", gem([user({"fileData": {"mimeType": "image/png", "fileUri": "gs://b/x.png"}})]), "gs://b/x.png"),
    ("bad-role", gem([{"role": "system", "parts": [{"text": "x"}]}]), "contents[0]: role 'system' is not user or model"),
]


@pytest.mark.parametrize("translator", [GEM_OA, GEM_AN], ids=["to-openai", "to-anthropic"])
@pytest.mark.parametrize("body, message", [c[1:] for c in GEMINI_CLIENT_ERRORS],
                         ids=[c[0] for c in GEMINI_CLIENT_ERRORS])
def test_gemini_client_untranslatable_request(translator, body, message):
    with pytest.raises(proxypal.ClientError) as info:
        translator.request(body)
    assert message in info.value.message


def g_answer(parts: List[Dict[str, Any]], finish: str, usage: Dict[str, Any], rid: str) -> Dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0, "finishReason": finish}],
            "usageMetadata": usage, "modelVersion": MODEL, "responseId": rid}


def oa_completion(message: Dict[str, Any], finish: str, usage: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-x",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": usage}


def an_message(content: List[Dict[str, Any]], stop_reason: str) -> Dict[str, Any]:
    return {"id": "msg_9", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 30, "output_tokens": 25, "cache_read_input_tokens": 60,
                      "cache_creation_input_tokens": 10}}


AN_AS_GEMINI_USAGE = {"promptTokenCount": 100, "cachedContentTokenCount": 60, "candidatesTokenCount": 25,
                      "totalTokenCount": 125}
# An answer's thinking rides again on its first call (Gemini CLI keeps no thought parts):
# base64 of "pp1:reasoning:" and the blocks, so that they come back before that call's turn.
CARRIED_THINKING = base64.b64encode(("pp1:reasoning:" + json.dumps(
    [{"t": "Hm", "s": "EqQB", "o": "anthropic", "r": False}, {"t": "", "s": "xx", "o": "anthropic", "r": True}],
    separators=(",", ":"))).encode()).decode()
GEMINI_CLIENT_RESPONSE_CASES = [
    ("openai-text-and-reasoning",
     GEM_OA, oa_completion({"content": "Hi", "reasoning_content": "Hm"}, "stop", OA_USAGE_CACHED),
     g_answer([{"text": "Hm", "thought": True}, {"text": "Hi"}], "STOP", USAGE_CACHED, "chatcmpl-9")),
    ("openai-tool-calls-carry-their-ids",
     GEM_OA, oa_completion({"content": None, "tool_calls": [
         {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
         {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "not json"}}]},
         "tool_calls", OA_USAGE_CACHED),
     g_answer([{"functionCall": {"id": "call_a", "name": "get_weather", "args": {"city": "Paris"}}},
               {"functionCall": {"id": "call_b", "name": "now", "args": {}}}], "STOP", USAGE_CACHED, "chatcmpl-9")),
    ("openai-length", GEM_OA, oa_completion({"content": "Cu"}, "length", OA_USAGE_CACHED),
     g_answer([{"text": "Cu"}], "MAX_TOKENS", USAGE_CACHED, "chatcmpl-9")),
    ("openai-content-filter-empty", GEM_OA, oa_completion({"content": None}, "content_filter", OA_USAGE_CACHED),
     g_answer([{"text": ""}], "SAFETY", USAGE_CACHED, "chatcmpl-9")),
    ("anthropic-thinking-text-tool",
     GEM_AN, an_message([{"type": "thinking", "thinking": "Hm", "signature": "EqQB"},
                         {"type": "redacted_thinking", "data": "xx"}, a_text("Checking."),
                         a_use("toolu_1", "get_weather", {"city": "Paris"})], "tool_use"),
     g_answer([{"text": "Hm", "thought": True, "thoughtSignature": "cHAxOmFudGhyb3BpYzpFcVFC"},
               {"text": "", "thought": True, "thoughtSignature": "cHAxOmFudGhyb3BpYyE6eHg="}, {"text": "Checking."},
               {"functionCall": {"id": "toolu_1", "name": "get_weather", "args": {"city": "Paris"}},
                "thoughtSignature": CARRIED_THINKING}],      # (the thinking again, for Gemini CLI)
              "STOP", AN_AS_GEMINI_USAGE, "msg_9")),
    ("anthropic-max-tokens", GEM_AN, an_message([a_text("Cu")], "max_tokens"),
     g_answer([{"text": "Cu"}], "MAX_TOKENS", AN_AS_GEMINI_USAGE, "msg_9")),
    ("anthropic-refusal", GEM_AN, an_message([], "refusal"),
     g_answer([{"text": ""}], "SAFETY", AN_AS_GEMINI_USAGE, "msg_9")),
]
STOP_TO_FINISH_ROWS = [
    ("end_turn", "STOP"), ("stop_sequence", "STOP"), ("tool_use", "STOP"), ("pause_turn", "STOP"),
    ("max_tokens", "MAX_TOKENS"), ("model_context_window_exceeded", "MAX_TOKENS"), ("refusal", "SAFETY"),
    ("something_new", "STOP")]
OPENAI_FINISH_ROWS = [("stop", "STOP"), ("length", "MAX_TOKENS"), ("tool_calls", "STOP"),
                      ("function_call", "STOP"), ("content_filter", "SAFETY"), ("error", "STOP")]


@pytest.mark.parametrize("translator, body, expected", [c[1:] for c in GEMINI_CLIENT_RESPONSE_CASES],
                         ids=[c[0] for c in GEMINI_CLIENT_RESPONSE_CASES])
def test_gemini_client_response(translator, body, expected):
    assert translator.response(body, MODEL) == expected


@pytest.mark.parametrize("stop_reason, finish", STOP_TO_FINISH_ROWS, ids=[r[0] for r in STOP_TO_FINISH_ROWS])
def test_anthropic_stop_reason_to_gemini(stop_reason, finish):
    body = an_message([a_text("x")], stop_reason)
    assert GEM_AN.response(body, MODEL)["candidates"][0]["finishReason"] == finish


@pytest.mark.parametrize("reason, finish", OPENAI_FINISH_ROWS, ids=[r[0] for r in OPENAI_FINISH_ROWS])
def test_openai_finish_reason_to_gemini(reason, finish):
    body = oa_completion({"content": "x"}, reason, OA_USAGE)
    assert GEM_OA.response(body, MODEL)["candidates"][0]["finishReason"] == finish


# -- streams to Gemini clients ------------------------------------------------------

def gc(parts: List[Dict[str, Any]], finish: str = None, usage: Dict[str, Any] = None,
       rid: str = "c1") -> Tuple[str, Dict[str, Any]]:
    """An expected Gemini chunk for the client."""
    if finish and not parts:            # a finishing chunk always has a part, as Google's do
        parts = [{"text": ""}]
    return "", chunk(parts, finish, usage, rid)


def gerr(code: int, message: str, status: str) -> Tuple[str, Dict[str, Any]]:
    """An expected error for the client: a bare JSON object, as Google sends one mid-stream."""
    return "error", {"error": {"code": code, "message": message, "status": status}}


def ochunk(delta_: Dict[str, Any], finish: str = None, **extra: Any) -> Dict[str, Any]:
    choices = [{"index": 0, "delta": delta_, "finish_reason": finish}] if delta_ is not None else []
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
            "choices": choices, **extra}


def otool(index: int, fragment: str, call_id: str = None, name: str = None) -> Dict[str, Any]:
    item: Dict[str, Any] = {"index": index, "function": {"arguments": fragment}}
    if call_id:
        item.update(id=call_id, type="function")
        item["function"]["name"] = name
    return ochunk({"tool_calls": [item]})


OPENAI_UPSTREAM_STREAM_CASES = [
    ("text-usage-done",
     [ochunk({"role": "assistant", "content": ""}), ochunk({"content": "Hel"}), ochunk({"content": "lo"}),
      ochunk({}, "stop"), ochunk(None, usage=OA_USAGE_CACHED), "[DONE]"],
     [gc([{"text": "Hel"}]), gc([{"text": "lo"}]), gc([], "STOP", USAGE_CACHED)]),
    ("reasoning-then-text",
     [ochunk({"role": "assistant", "reasoning_content": "Hm"}), ochunk({"reasoning": "m"}),
      ochunk({"content": "Yes"}, "stop"), ochunk(None, usage=OA_USAGE_CACHED), "[DONE]"],
     [gc([{"text": "Hm", "thought": True}]), gc([{"text": "m", "thought": True}]), gc([{"text": "Yes"}]),
      gc([], "STOP", USAGE_CACHED)]),
    ("parallel-tool-calls-each-whole-once-complete",
     [ochunk({"role": "assistant", "content": None}), otool(0, "", "call_a", "get_weather"),
      otool(0, '{"city":'), otool(1, "", "call_b", "now"), otool(0, '"Paris"}'), otool(1, "{}"),
      ochunk({}, "tool_calls"), ochunk(None, usage=OA_USAGE_CACHED), "[DONE]"],
     [gc([{"functionCall": {"id": "call_a", "name": "get_weather", "args": {"city": "Paris"}}}]),
      gc([{"functionCall": {"id": "call_b", "name": "now", "args": {}}}]), gc([], "STOP", USAGE_CACHED)]),
    ("unfinished-tool-call-sent-at-the-finish",
     [otool(0, '{"a":', "call_a", "f"), ochunk({}, "tool_calls"), "[DONE]"],
     [gc([{"functionCall": {"id": "call_a", "name": "f", "args": {}}}]), gc([], "STOP")]),
    ("usage-on-the-finish-chunk-ends-at-once",
     [ochunk({"content": "Hi"}, "length", usage=OA_USAGE_CACHED), ochunk({"content": "late"})],
     [gc([{"text": "Hi"}]), gc([], "MAX_TOKENS", USAGE_CACHED)]),
    ("done-without-usage",
     [ochunk({"content": "Hi"}), ochunk({}, "content_filter"), "[DONE]"],
     [gc([{"text": "Hi"}]), gc([], "SAFETY")]),
    ("finish-then-eof-without-done",
     [ochunk({"content": "Hi"}), ochunk({}, "stop")],
     [gc([{"text": "Hi"}]), gc([], "STOP")]),
    ("eof-without-finish-is-an-error",
     [ochunk({"content": "Hi"})],
     [gc([{"text": "Hi"}]), gerr(502, proxypal.STREAM_CUT.format(end="a finish_reason"), "UNAVAILABLE")]),
    ("upstream-error-chunk",
     [ochunk({"content": "Hi"}), {"error": {"message": "Rate limited", "code": 429}}, ochunk({}, "stop")],
     [gc([{"text": "Hi"}]), gerr(429, "Rate limited", "RESOURCE_EXHAUSTED")]),
]


@pytest.mark.parametrize("upstream, expected", [c[1:] for c in OPENAI_UPSTREAM_STREAM_CASES],
                         ids=[c[0] for c in OPENAI_UPSTREAM_STREAM_CASES])
def test_openai_stream_to_gemini_client(upstream, expected):
    assert run_stream(GEM_OA.stream, upstream, crlf=False) == expected


def aev(kind: str, **fields: Any) -> Tuple[str, Dict[str, Any]]:
    return kind, {"type": kind, **fields}


A_START = aev("message_start", message={"id": "c1", "type": "message", "role": "assistant", "content": [],
                                        "model": "claude-x", "stop_reason": None, "stop_sequence": None,
                                        "usage": {"input_tokens": 30, "output_tokens": 1,
                                                  "cache_read_input_tokens": 60, "cache_creation_input_tokens": 10}})


def a_end(reason: str) -> List[Tuple[str, Dict[str, Any]]]:
    return [aev("message_delta", delta={"stop_reason": reason, "stop_sequence": None}, usage={"output_tokens": 25}),
            aev("message_stop")]


ANTHROPIC_UPSTREAM_STREAM_CASES = [
    ("thinking-signature-text",
     [A_START, aev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
      aev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hm"}),
      aev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "EqQB"}),
      aev("content_block_stop", index=0), aev("ping"),
      aev("content_block_start", index=1, content_block={"type": "text", "text": ""}),
      aev("content_block_delta", index=1, delta={"type": "text_delta", "text": "Yes"}),
      aev("content_block_stop", index=1), *a_end("end_turn")],
     [gc([{"text": "Hm", "thought": True}]),
      gc([{"text": "", "thought": True, "thoughtSignature": "cHAxOmFudGhyb3BpYzpFcVFC"}]),
      gc([{"text": "Yes"}]), gc([], "STOP", AN_AS_GEMINI_USAGE)]),
    ("tool-use-whole-at-block-stop",
     [A_START, aev("content_block_start", index=0, content_block={"type": "tool_use", "id": "toolu_1",
                                                                   "name": "get_weather", "input": {}}),
      aev("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": ""}),
      aev("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": '{"city": "Pa'}),
      aev("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": 'ris"}'}),
      aev("content_block_stop", index=0),
      aev("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_2", "name": "now",
                                                          "input": {}}),
      aev("content_block_stop", index=1), *a_end("tool_use")],
     [gc([{"functionCall": {"id": "toolu_1", "name": "get_weather", "args": {"city": "Paris"}}}]),
      gc([{"functionCall": {"id": "toolu_2", "name": "now", "args": {}}}]), gc([], "STOP", AN_AS_GEMINI_USAGE)]),
    ("max-tokens",
     [A_START, aev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
      aev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Cu"}),
      aev("content_block_stop", index=0), *a_end("max_tokens")],
     [gc([{"text": "Cu"}]), gc([], "MAX_TOKENS", AN_AS_GEMINI_USAGE)]),
    ("ends-without-message-stop-is-an-error",
     [A_START, aev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
      aev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Cu"}), a_end("end_turn")[0]],
     [gc([{"text": "Cu"}]), gerr(502, proxypal.STREAM_CUT.format(end="message_stop"), "UNAVAILABLE")]),
    ("overloaded-error-event",
     [A_START, ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
      aev("message_stop")],
     [gerr(503, "Overloaded", "UNAVAILABLE")]),
]


@pytest.mark.parametrize("upstream, expected", [c[1:] for c in ANTHROPIC_UPSTREAM_STREAM_CASES],
                         ids=[c[0] for c in ANTHROPIC_UPSTREAM_STREAM_CASES])
def test_anthropic_stream_to_gemini_client(upstream, expected):
    assert run_stream(GEM_AN.stream, upstream, crlf=False) == expected


# -- tool names the other API refuses: stand-ins out, the client's names back ----------
# OpenAI and Anthropic take ^[a-zA-Z0-9_-]{1,64}$, Gemini ^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$;
# Gemini CLI's MCP tools hold dots, Codex's namespaced tools pass 64 characters.

@pytest.mark.parametrize("name, stand_in", [
    ("files.read", "files_read_601e4eb6"),
    ("1st", "_1st_e01ddf65"),
])
def test_a_stand_in_name_has_a_known_answer(name, stand_in):
    assert proxypal.stand_in_name(name) == stand_in


@pytest.mark.parametrize("name", ["mcp:server:tool", "x" * 100, "a b/\u00e9", "9" * 70, "."])
def test_a_stand_in_name_is_valid_everywhere_and_distinct(name):
    stand_in = proxypal.stand_in_name(name)
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", stand_in)
    assert stand_in != proxypal.stand_in_name(name + "_")


def oa_tool_chunk(name: str) -> str:
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
                       "choices": [{"index": 0, "delta": {"tool_calls": [{
                           "index": 0, "id": "call_a", "type": "function",
                           "function": {"name": name, "arguments": "{}"}}]}, "finish_reason": None}]})


def test_gemini_cli_tool_names_with_dots_reach_openai_as_stand_ins_and_come_back():
    stand_in = proxypal.stand_in_name("files.read")
    body = gem([user({"text": "read a"}), model(call("files.read", {"path": "a"})),
                user(result("files.read", "text of a"))],
               tools=[{"functionDeclarations": [{"name": "files.read"}, {"name": "now"}]}])
    out = GEM_OA.request(body)
    assert [t["function"]["name"] for t in out["tools"]] == [stand_in, "now"]
    assert out["messages"][1]["tool_calls"][0]["function"]["name"] == stand_in
    ask = GEM_OA.read(body)
    whole = GEM_OA.response(oa_completion({"content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": stand_in, "arguments": "{}"}}]},
        "tool_calls", OA_USAGE_CACHED), MODEL, ask)
    assert whole["candidates"][0]["content"]["parts"][0]["functionCall"]["name"] == "files.read"
    stream = GEM_OA.stream(MODEL, 0, ask)
    events = stream.feed("message", oa_tool_chunk(stand_in)) + stream.feed("message", "[DONE]")
    parts = [p for _, data in events + stream.close()
             for p in json.loads(data)["candidates"][0]["content"]["parts"]]
    assert [p["functionCall"]["name"] for p in parts if "functionCall" in p] == ["files.read"]


def test_an_openai_tool_name_gemini_refuses_goes_as_a_stand_in_and_comes_back():
    body = oa(HI, tools=[{"type": "function", "function": {"name": "1st", "parameters": WEATHER_SCHEMA}}],
              tool_choice={"type": "function", "function": {"name": "1st"}})
    out = OA_GEM.request(body)
    assert out["tools"][0]["functionDeclarations"][0]["name"] == "_1st_e01ddf65"
    assert out["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"] == ["_1st_e01ddf65"]
    answer = OA_GEM.response(g_answer([{"functionCall": {"name": "_1st_e01ddf65", "args": {"city": "Oslo"}}}],
                                      "STOP", USAGE, "r9"), "gpt-x", OA_GEM.read(body))
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "1st"
    assert OA_GEM.request(oa(HI, tools=[{"type": "function", "function": {"name": "a.b:c"}}])
                          )["tools"][0]["functionDeclarations"][0]["name"] == "a.b:c"   # Gemini's own


@pytest.mark.parametrize("translator", [OA_GEM, proxypal.TRANSLATORS[("openai", "anthropic")]],
                         ids=["to-gemini", "to-anthropic"])
def test_a_tool_without_a_name_is_a_clear_400(translator):
    with pytest.raises(proxypal.ClientError) as info:
        translator.request(oa(HI, tools=[{"type": "function", "function": {"name": ""}}]))
    assert info.value.status == 400 and "empty name" in info.value.message


def test_gemini_clis_upper_case_schema_types_reach_other_apis_as_json_schema():
    """Gemini CLI's router, edit fixer and compression write responseJsonSchema with the
    SDK's Type enum ("OBJECT", "STRING"); JSON Schema's type names are lower case."""
    classifier = {"type": "OBJECT", "properties": {
        "reasoning": {"type": "STRING"}, "model_choice": {"type": "STRING", "enum": ["flash", "pro"]},
        "scores": {"type": "ARRAY", "items": {"type": "INTEGER"}}}, "required": ["reasoning"]}
    expected = {"type": "object", "properties": {
        "reasoning": {"type": "string"}, "model_choice": {"type": "string", "enum": ["flash", "pro"]},
        "scores": {"type": "array", "items": {"type": "integer"}}}, "required": ["reasoning"]}
    body = gem([user({"text": "route"})], generationConfig={
        "responseMimeType": "application/json", "responseJsonSchema": classifier},
        tools=[{"functionDeclarations": [{"name": "pick", "parametersJsonSchema": classifier}]}])
    to_openai = GEM_OA.request(body)
    assert to_openai["response_format"]["json_schema"]["schema"] == expected
    assert to_openai["tools"][0]["function"]["parameters"] == expected
    to_anthropic = GEM_AN.request(body)
    assert to_anthropic["tools"][0]["input_schema"] == expected


def oa_args_chunk(fragment: str, start: bool = False, finish: str = None) -> str:
    call: Dict[str, Any] = {"index": 0, "function": {"arguments": fragment}}
    if start:
        call.update(id="call_a", type="function")
        call["function"]["name"] = "write_file"
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
                       "choices": [{"index": 0, "delta": {"tool_calls": [call]} if fragment or start else {},
                                    "finish_reason": finish}]})


@pytest.mark.parametrize("arguments, kept", [
    ('{"file_path": "a.py", "content": "import os\\nprint(', False),    # cut by the cap
    ('{"file_path": "a.py", "content": ""}', True),                       # whole, then the cap
], ids=["cut-mid-arguments", "whole-before-the-cap"])
def test_a_call_the_output_cap_cut_short_never_reaches_gemini_cli(arguments, kept):
    """Gemini never sends a partial call; Gemini CLI would run write_file with {}."""
    stream = GEM_OA.stream(MODEL, 0, GEM_OA.read(gem([user({"text": "write a.py"})])))
    events = stream.feed("message", oa_args_chunk("", start=True)) + \
        stream.feed("message", oa_args_chunk(arguments)) + \
        stream.feed("message", oa_args_chunk("", finish="length")) + \
        stream.feed("message", "[DONE]") + stream.close()
    chunks = [json.loads(data)["candidates"][0] for _, data in events]
    calls = [p["functionCall"] for c in chunks for p in c["content"]["parts"] if "functionCall" in p]
    assert calls == ([{"id": "call_a", "name": "write_file", "args": json.loads(arguments)}] if kept else [])
    assert chunks[-1]["finishReason"] == "MAX_TOKENS"
