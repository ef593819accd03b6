"""Anthropic Messages <-> OpenAI Chat Completions (PROTOCOLS.md sections C and D):
request and response mapping tables as named cases, and stream transcripts fed to the
translators whole and through the SSE byte layer split every way."""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Tuple

import pytest

from helpers import feed_all_ways, proxypal, without_cache_marks

ClientError = proxypal.ClientError
MODEL = "client-model"
A2O = proxypal.TRANSLATORS[("anthropic", "openai")]
O2A = proxypal.TRANSLATORS[("openai", "anthropic")]


def case_ids(cases: list) -> List[str]:
    return [c[0] for c in cases]


# =============================================================================
# C.1 Anthropic client -> OpenAI-compatible upstream: requests
# =============================================================================

def anth(**fields: Any) -> Dict[str, Any]:
    """A minimal Anthropic request with `fields` added or replaced."""
    body = {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
    body.update(fields)
    return body


def oai(**fields: Any) -> Dict[str, Any]:
    """The OpenAI request anth() becomes, with `fields` added or replaced."""
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}
    body.update(fields)
    return body


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather", "input_schema": WEATHER_SCHEMA}
WEATHER_FUNCTION = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                     "parameters": WEATHER_SCHEMA}}

C1_CASES = [
    ("model-and-max-tokens-copied", anth(), oai()),
    ("system-string-first-message", anth(system="Be terse."),
     oai(messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])),
    ("system-blocks-joined-cache-control-dropped",
     anth(system=[{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                  {"type": "text", "text": "B"}]),
     oai(messages=[{"role": "system", "content": "A\nB"}, {"role": "user", "content": "Hi"}])),
    ("billing-header-system-block-dropped",
     anth(system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0; cch=1;"},
                  {"type": "text", "text": "You are Claude Code."}]),
     oai(messages=[{"role": "system", "content": "You are Claude Code."},
                   {"role": "user", "content": "Hi"}])),
    ("temperature-top-p-kept-top-k-dropped-user-id-to-user",
     anth(temperature=0.5, top_p=0.9, top_k=40, metadata={"user_id": "u1"}),
     oai(temperature=0.5, top_p=0.9, user="u1")),
    ("stop-sequences-to-stop", anth(stop_sequences=["END", "STOP"]), oai(stop=["END", "STOP"])),
    ("stream-true-asks-for-usage", anth(stream=True),
     oai(stream=True, stream_options={"include_usage": True})),
    ("stream-false-no-stream-options", anth(stream=False), oai(stream=False)),
    ("tools-to-functions-cache-control-dropped",
     anth(tools=[dict(WEATHER_TOOL, cache_control={"type": "ephemeral"}, strict=True)]),
     oai(tools=[WEATHER_FUNCTION])),
    ("tool-schema-gains-properties",
     anth(tools=[{"name": "noop", "input_schema": {"type": "object"}}]),
     oai(tools=[{"type": "function", "function": {"name": "noop", "parameters": {
         "type": "object", "properties": {}}}}])),
    ("tool-choice-auto", anth(tools=[WEATHER_TOOL], tool_choice={"type": "auto"}),
     oai(tools=[WEATHER_FUNCTION], tool_choice="auto")),
    ("tool-choice-any-is-required", anth(tools=[WEATHER_TOOL], tool_choice={"type": "any"}),
     oai(tools=[WEATHER_FUNCTION], tool_choice="required")),
    ("tool-choice-tool-is-function",
     anth(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"}),
     oai(tools=[WEATHER_FUNCTION],
         tool_choice={"type": "function", "function": {"name": "get_weather"}})),
    ("tool-choice-none", anth(tools=[WEATHER_TOOL], tool_choice={"type": "none"}),
     oai(tools=[WEATHER_FUNCTION], tool_choice="none")),
    ("disable-parallel-tool-use",
     anth(tools=[WEATHER_TOOL], tool_choice={"type": "auto", "disable_parallel_tool_use": True}),
     oai(tools=[WEATHER_FUNCTION], tool_choice="auto", parallel_tool_calls=False)),
    ("thinking-budget-1024-low", anth(thinking={"type": "enabled", "budget_tokens": 1024}),
     oai(reasoning_effort="low")),
    ("thinking-budget-8192-medium", anth(thinking={"type": "enabled", "budget_tokens": 8192}),
     oai(reasoning_effort="medium")),
    ("thinking-budget-8193-high", anth(thinking={"type": "enabled", "budget_tokens": 8193}),
     oai(reasoning_effort="high")),
    ("thinking-disabled-omitted", anth(thinking={"type": "disabled"}), oai()),
    ("thinking-adaptive-takes-output-config-effort",
     anth(thinking={"type": "adaptive"}, output_config={"effort": "high"}),
     oai(reasoning_effort="high")),
    ("user-text-blocks-become-one-string",
     anth(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b",
                                                  "cache_control": {"type": "ephemeral"}}]}]),
     oai(messages=[{"role": "user", "content": "a\nb"}])),
    ("user-image-base64-and-url",
     anth(messages=[{"role": "user", "content": [
         {"type": "text", "text": "compare"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
         {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]}]),
     oai(messages=[{"role": "user", "content": [
         {"type": "text", "text": "compare"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
         {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]}])),
    ("user-pdf-document-to-file-part",
     anth(messages=[{"role": "user", "content": [
         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                         "data": "JVBE"}, "title": "r.pdf"},
         {"type": "text", "text": "summarize"}]}]),
     oai(messages=[{"role": "user", "content": [
         {"type": "file", "file": {"filename": "r.pdf", "file_data": "data:application/pdf;base64,JVBE"}},
         {"type": "text", "text": "summarize"}]}])),
    ("assistant-text-and-tool-use-one-message",
     anth(messages=[{"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
                         "input": {"city": "Paris"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A",
                                                  "content": "18C"}]}]),
     oai(messages=[{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": "Checking.", "tool_calls": [
                       {"id": "toolu_01A", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                   {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C"}])),
    ("assistant-only-tool-use-content-empty-string-thinking-as-reasoning-content",
     anth(messages=[{"role": "user", "content": "ls"},
                    {"role": "assistant", "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "EqQB"},
                        {"type": "redacted_thinking", "data": "xyz"},
                        {"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}]),
     oai(messages=[{"role": "user", "content": "ls"},
                   {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": [
                       {"id": "t1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "t1", "content": ""}])),
    ("tool-results-before-user-text-is-error-prefixed",
     anth(messages=[{"role": "user", "content": [
         {"type": "text", "text": "and now?"},
         {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "ok"},
                                                                  {"type": "text", "text": "done"}]},
         {"type": "tool_result", "tool_use_id": "b", "content": "no such file", "is_error": True}]}]),
     oai(messages=[{"role": "tool", "tool_call_id": "a", "content": "ok\n\ndone"},
                   {"role": "tool", "tool_call_id": "b", "content": "Error: no such file"},
                   {"role": "user", "content": "and now?"}])),
    ("image-in-tool-result-moves-to-user-message",
     anth(messages=[{"role": "user", "content": [
         {"type": "tool_result", "tool_use_id": "s", "content": [
             {"type": "text", "text": "screenshot"},
             {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                          "data": "/9j/"}}]}]}]),
     oai(messages=[{"role": "tool", "tool_call_id": "s",
                    "content": "screenshot\n\n[image 1 follows in the next message]"},
                   {"role": "user", "content": [{"type": "image_url", "image_url": {
                       "url": "data:image/jpeg;base64,/9j/"}}]}])),
    ("tool-ids-sanitized-both-sides",
     anth(messages=[{"role": "user", "content": "go"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "call.1:a|b",
                                                       "name": "f", "input": {"x": 1}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call.1:a|b",
                                                  "content": "r"}]}]),
     oai(messages=[{"role": "user", "content": "go"},
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"id": "call_1_a_b", "type": "function",
                        "function": {"name": "f", "arguments": '{"x":1}'}}]},
                   {"role": "tool", "tool_call_id": "call_1_a_b", "content": "r"}])),
    ("consecutive-user-and-assistant-merged",
     anth(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}]),
     oai(messages=[{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "cd"}])),
]


@pytest.mark.parametrize("name,body,expected", C1_CASES, ids=case_ids(C1_CASES))
def test_anthropic_to_openai_request(name, body, expected):
    assert A2O.request(body) == expected


CLAUDE_CODE_REQUEST = {
    "model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": True,
    "metadata": {"user_id": "user_abc_account__session_123"},
    "thinking": {"type": "enabled", "budget_tokens": 31999},
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.14; cc_entrypoint=cli"},
               {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
               {"type": "text", "text": "Env: linux", "cache_control": {"type": "ephemeral"}}],
    "tools": [{"name": "Bash", "description": "Run a command",
               "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                                "required": ["command"], "additionalProperties": False,
                                "$schema": "http://json-schema.org/draft-07/schema#"},
               "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
            {"type": "text", "text": "run ls", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "User wants ls.", "signature": "ErUBCkYIBxgCKkB"},
            {"type": "text", "text": "Running it."},
            {"type": "tool_use", "id": "toolu_01Bash", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01Bash", "is_error": True,
             "cache_control": {"type": "ephemeral"},
             "content": [{"type": "text", "text": "ls: permission denied"},
                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                      "data": "iVBORw0"}}]},
            {"type": "text", "text": "why?"}]}]}

CLAUDE_CODE_EXPECTED = {
    "model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": True,
    "stream_options": {"include_usage": True}, "reasoning_effort": "high",
    "user": "user_abc_account__session_123",
    "tools": [{"type": "function", "function": {
        "name": "Bash", "description": "Run a command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                       "required": ["command"], "additionalProperties": False,
                       "$schema": "http://json-schema.org/draft-07/schema#"}}}],
    "messages": [
        {"role": "system", "content": "You are Claude Code.\nEnv: linux"},
        {"role": "user", "content": "<system-reminder>ctx</system-reminder>\nrun ls"},
        {"role": "assistant", "content": "Running it.", "reasoning_content": "User wants ls.", "tool_calls": [
            {"id": "toolu_01Bash", "type": "function",
             "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01Bash",
         "content": "Error: ls: permission denied\n\n[image 1 follows in the next message]"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0"}},
            {"type": "text", "text": "why?"}]}]}


def test_claude_code_request_to_openai():
    assert A2O.request(CLAUDE_CODE_REQUEST) == CLAUDE_CODE_EXPECTED


C1_ERRORS = [
    ("messages-not-a-list", anth(messages="hi"), "messages must be an array, not a string"),
    ("unknown-role-in-messages", anth(messages=[{"role": "critic", "content": "x"}]),
     'messages[0]: Unexpected role "critic". The Messages API accepts a top-level `system`'),
    ("server-tool-toward-openai", anth(tools=[{"type": "web_search_20250305", "name": "web_search",
                                               "max_uses": 5}]),
     "tool 'web_search' is a web search tool that the provider runs itself, and OpenAI Chat "
     "Completions upstreams cannot run it"),
    ("image-file-source", anth(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f1"}}]}]),
     "messages[0].content[0]: a image with source type 'file' cannot be translated"),
]


@pytest.mark.parametrize("name,body,message", C1_ERRORS, ids=case_ids(C1_ERRORS))
def test_anthropic_to_openai_request_refuses(name, body, message):
    with pytest.raises(ClientError) as info:
        A2O.request(body)
    assert message in info.value.message
    assert info.value.status == 400


# =============================================================================
# D.1 OpenAI client -> Anthropic-format upstream: requests
# =============================================================================

def chat(**fields: Any) -> Dict[str, Any]:
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": "Hi"}]}
    body.update(fields)
    return body


HI = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


def msgs(**fields: Any) -> Dict[str, Any]:
    """The Anthropic request chat() becomes (default max_tokens 8192)."""
    body = {"model": "gpt-x", "messages": HI, "max_tokens": 8192}
    body.update(fields)
    return body


D1_CASES = [
    ("default-max-tokens", chat(), msgs()),
    ("max-tokens-copied", chat(max_tokens=50), msgs(max_tokens=50)),
    ("max-completion-tokens-preferred", chat(max_tokens=50, max_completion_tokens=70),
     msgs(max_tokens=70)),
    ("system-and-developer-collected-in-order",
     chat(messages=[{"role": "system", "content": "A"}, {"role": "user", "content": "Hi"},
                    {"role": "developer", "content": [{"type": "text", "text": "B"}]}]),
     msgs(system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}])),
    ("temperature-clamped-to-1", chat(temperature=1.7), msgs(temperature=1)),
    ("temperature-wins-over-top-p", chat(temperature=0.2, top_p=0.5), msgs(temperature=0.2)),
    ("top-p-alone-and-top-k", chat(top_p=0.5, top_k=20), msgs(top_p=0.5, top_k=20)),
    ("stop-string-to-list", chat(stop="END"), msgs(stop_sequences=["END"])),
    ("stop-list", chat(stop=["a", "b"]), msgs(stop_sequences=["a", "b"])),
    ("stream-kept-stream-options-dropped",
     chat(stream=True, stream_options={"include_usage": True}), msgs(stream=True)),
    ("user-to-metadata", chat(user="u-42"), msgs(metadata={"user_id": "u-42"})),
    ("n-1-and-unsupported-knobs-dropped",
     chat(n=1, seed=3, logit_bias={"1": 2}, logprobs=True, frequency_penalty=0.1,
          presence_penalty=0.1, metadata={"k": "v"}, store=True), msgs()),
    ("tools-to-input-schema", chat(tools=[WEATHER_FUNCTION]), msgs(tools=[WEATHER_TOOL])),
    ("tool-without-parameters-gets-empty-object-schema",
     chat(tools=[{"type": "function", "function": {"name": "now"}}]),
     msgs(tools=[{"name": "now", "input_schema": {"type": "object", "properties": {}}}])),
    ("tool-choice-auto", chat(tools=[WEATHER_FUNCTION], tool_choice="auto"),
     msgs(tools=[WEATHER_TOOL], tool_choice={"type": "auto"})),
    ("tool-choice-required-is-any", chat(tools=[WEATHER_FUNCTION], tool_choice="required"),
     msgs(tools=[WEATHER_TOOL], tool_choice={"type": "any"})),
    ("tool-choice-none", chat(tools=[WEATHER_FUNCTION], tool_choice="none"),
     msgs(tools=[WEATHER_TOOL], tool_choice={"type": "none"})),
    ("tool-choice-function-is-tool",
     chat(tools=[WEATHER_FUNCTION], tool_choice={"type": "function",
                                                 "function": {"name": "get_weather"}}),
     msgs(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"})),
    ("parallel-tool-calls-false-rides-on-auto",
     chat(tools=[WEATHER_FUNCTION], parallel_tool_calls=False),
     msgs(tools=[WEATHER_TOOL], tool_choice={"type": "auto", "disable_parallel_tool_use": True})),
    ("parallel-tool-calls-false-with-required",
     chat(tools=[WEATHER_FUNCTION], tool_choice="required", parallel_tool_calls=False),
     msgs(tools=[WEATHER_TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True})),
    ("reasoning-effort-low-fits-under-the-clients-cap-drops-temperature",
     chat(reasoning_effort="low", max_completion_tokens=3000, temperature=0.3),
     msgs(thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=3000)),
    ("reasoning-budget-never-outgrows-the-clients-cap",
     chat(reasoning_effort="medium", max_completion_tokens=4000),
     msgs(thinking={"type": "enabled", "budget_tokens": 2000}, max_tokens=4000)),
    ("cap-too-small-for-thinking-keeps-sampling",
     chat(reasoning_effort="low", max_completion_tokens=1000, temperature=0.3),
     msgs(max_tokens=1000, temperature=0.3)),
    ("reasoning-effort-medium-keeps-larger-max-tokens",
     chat(reasoning_effort="medium", max_tokens=20000),
     msgs(thinking={"type": "enabled", "budget_tokens": 8192}, max_tokens=20000)),
    ("reasoning-effort-high-default-max-tokens",
     chat(reasoning_effort="high"),
     msgs(thinking={"type": "enabled", "budget_tokens": 24576}, max_tokens=32768)),
    ("reasoning-effort-none-no-thinking", chat(reasoning_effort="none"), msgs()),
    ("reasoning-effort-with-forced-tool-no-thinking",
     chat(reasoning_effort="high", tools=[WEATHER_FUNCTION], tool_choice="required"),
     msgs(tools=[WEATHER_TOOL], tool_choice={"type": "any"})),
    ("response-format-json-object-as-system-text",
     chat(response_format={"type": "json_object"}),
     msgs(system=[{"type": "text", "text": "Respond with one JSON object and nothing else."}])),
    ("user-image-data-url-and-http-url",
     chat(messages=[{"role": "user", "content": [
         {"type": "text", "text": "what?"},
         {"type": "image_url", "image_url": {"url": "data:image/webp;base64,UklG", "detail": "low"}},
         {"type": "image_url", "image_url": {"url": "https://x.test/b.png"}}]}]),
     msgs(messages=[{"role": "user", "content": [
         {"type": "text", "text": "what?"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": "UklG"}},
         {"type": "image", "source": {"type": "url", "url": "https://x.test/b.png"}}]}])),
    ("user-file-data-to-document",
     chat(messages=[{"role": "user", "content": [
         {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"}}]}]),
     msgs(messages=[{"role": "user", "content": [
         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                         "data": "JVBE"}}]}])),
    ("assistant-tool-calls-and-tool-results-merged",
     chat(messages=[
         {"role": "user", "content": "Weather in Paris and Rome?", "name": "ann"},
         {"role": "assistant", "content": None, "reasoning_content": "two calls",
          "tool_calls": [
              {"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
              {"id": "call|2", "type": "function",
               "function": {"name": "get_weather", "arguments": "{not json"}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
         {"role": "tool", "tool_call_id": "call|2", "content": [{"type": "text", "text": "20C"}]},
         {"role": "user", "content": "Thanks"}]),
     msgs(messages=[
         {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
         {"role": "assistant", "content": [
             {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
             {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
             {"type": "tool_result", "tool_use_id": "call_2", "content": "20C"},
             {"type": "text", "text": "Thanks"}]}])),
    ("assistant-text-parts-and-empty-text-skipped",
     chat(messages=[{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": [{"type": "text", "text": ""},
                                                      {"type": "text", "text": "Hello"}]},
                    {"role": "user", "content": "Bye"}]),
     msgs(messages=HI + [{"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                         {"role": "user", "content": [{"type": "text", "text": "Bye"}]}])),
    ("starts-with-assistant-gets-placeholder-user",
     chat(messages=[{"role": "assistant", "content": "Hello"}]),
     msgs(messages=[{"role": "user", "content": [{"type": "text", "text": "(continue)"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}])),
    ("only-system-gets-placeholder-user",
     chat(messages=[{"role": "system", "content": "S"}]),
     msgs(system=[{"type": "text", "text": "S"}],
          messages=[{"role": "user", "content": [{"type": "text", "text": "(continue)"}]}])),
    ("consecutive-user-messages-merged",
     chat(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
     msgs(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b"}]}])),
]


@pytest.mark.parametrize("name,body,expected", D1_CASES, ids=case_ids(D1_CASES))
def test_openai_to_anthropic_request(name, body, expected):
    assert without_cache_marks(O2A.request(body)) == expected


D1_ERRORS = [
    ("n-above-1", chat(n=3), '"n" is 3: Anthropic upstreams return one choice'),
    ("audio-part", chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]}]),
     "messages[0].content[0]: audio/wav cannot be sent to an Anthropic upstream"),
    ("file-id-part", chat(messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-1"}}]}]), "a file part needs file_data"),
    ("image-not-a-url", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]),
     "messages[0].content[0].image_url.url is \"ftp://x/y.png\"; send a base64 data: URL"),
    ("unknown-role", chat(messages=[{"role": "critic", "content": "x"}]),
     "messages[0].role is \"critic\""),
    ("non-function-tool", chat(tools=[{"type": "custom", "custom": {"name": "x"}}]),
     "tools[0] is not a function tool"),
]


@pytest.mark.parametrize("name,body,message", D1_ERRORS, ids=case_ids(D1_ERRORS))
def test_openai_to_anthropic_request_refuses(name, body, message):
    with pytest.raises(ClientError) as info:
        O2A.request(body)
    assert message in info.value.message
    assert info.value.status == 400


def test_translators_compose_one_reader_with_one_writer():
    """Every pair is the client format's reader composed with the upstream's writer; the
    same-format pairs are marked for the byte relay."""
    assert proxypal.CODECS["anthropic"].read_request is proxypal.read_anthropic_request
    assert proxypal.CODECS["openai"].write_request is proxypal.write_openai_request
    body = anth(system="S", tools=[WEATHER_TOOL])
    assert A2O.request(body) == proxypal.write_openai_request(proxypal.read_anthropic_request(body))
    assert [t.passthrough for t in proxypal.TRANSLATORS.values()].count(True) == len(proxypal.CODECS)


# =============================================================================
# C.2, C.4, C.5 OpenAI answer -> Anthropic client
# =============================================================================

def completion(message: Dict[str, Any], finish: Any = "stop", usage: Any = None) -> Dict[str, Any]:
    body = {"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "up-model",
            "choices": [{"index": 0, "message": dict(role="assistant", **message),
                         "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return body


ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0}


def message(content: list, stop: str = "end_turn", usage: Any = None) -> Dict[str, Any]:
    return {"id": "msg_chatcmpl-9", "type": "message", "role": "assistant", "model": MODEL,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": usage or ZERO_USAGE}


C2_CASES = [
    ("text", completion({"content": "Hello"}), message([{"type": "text", "text": "Hello"}])),
    ("reasoning-content-leads-as-unsigned-thinking",
     completion({"content": "42", "reasoning_content": "think"}),
     message([{"type": "thinking", "thinking": "think", "signature": ""},
              {"type": "text", "text": "42"}])),
    ("ollama-reasoning-field", completion({"content": "ok", "reasoning": "r"}),
     message([{"type": "thinking", "thinking": "r", "signature": ""}, {"type": "text", "text": "ok"}])),
    ("tool-calls-string-object-and-invalid-arguments",
     completion({"content": "", "tool_calls": [
         {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
         {"id": "call.b", "type": "function", "function": {"name": "g", "arguments": {"y": 2}}},
         {"type": "function", "function": {"name": "h", "arguments": "{oops"}}]}, "tool_calls"),
     message([{"type": "tool_use", "id": "call_a", "name": "f", "input": {"x": 1}},
              {"type": "tool_use", "id": "call_b", "name": "g", "input": {"y": 2}},
              {"type": "tool_use", "id": "toolu_chatcmpl-9_2", "name": "h", "input": {}}], "tool_use")),
    ("stop-with-tool-call-forced-to-tool-use",
     completion({"content": "Sure.", "tool_calls": [
         {"id": "c1", "function": {"name": "ls", "arguments": "{}"}}]}, "stop"),
     message([{"type": "text", "text": "Sure."},
              {"type": "tool_use", "id": "c1", "name": "ls", "input": {}}], "tool_use")),
    ("tool-calls-reason-without-tool-is-end-turn", completion({"content": "x"}, "tool_calls"),
     message([{"type": "text", "text": "x"}], "end_turn")),
    ("length-is-max-tokens", completion({"content": "cut"}, "length"),
     message([{"type": "text", "text": "cut"}], "max_tokens")),
    ("content-filter-is-refusal", completion({"content": None}, "content_filter"),
     message([], "refusal")),
    ("unknown-finish-is-end-turn", completion({"content": "x"}, None),
     message([{"type": "text", "text": "x"}])),
    ("usage-cached-tokens-subtracted",
     completion({"content": "x"}, usage={"prompt_tokens": 100, "completion_tokens": 7,
                                         "total_tokens": 107,
                                         "prompt_tokens_details": {"cached_tokens": 60}}),
     message([{"type": "text", "text": "x"}], usage={
         "input_tokens": 40, "output_tokens": 7, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": 60})),
    ("usage-openrouter-cache-write-passed",
     completion({"content": "x"}, usage={"prompt_tokens": 100, "completion_tokens": 1,
                                         "prompt_tokens_details": {"cached_tokens": 10,
                                                                   "cache_write_tokens": 30}}),
     message([{"type": "text", "text": "x"}], usage={
         "input_tokens": 60, "output_tokens": 1, "cache_creation_input_tokens": 30,
         "cache_read_input_tokens": 10})),
]


@pytest.mark.parametrize("name,body,expected", C2_CASES, ids=case_ids(C2_CASES))
def test_openai_to_anthropic_response(name, body, expected):
    assert A2O.response(body, MODEL) == expected


def test_openai_response_without_id_gets_stable_msg_id():
    body = completion({"content": "x"})
    del body["id"]
    first = A2O.response(body, MODEL)["id"]
    assert first.startswith("msg_") and len(first) == 16
    assert A2O.response(body, MODEL)["id"] == first


def test_openai_response_without_choices_is_upstream_error():
    with pytest.raises(proxypal.UpstreamError) as info:
        A2O.response({"error": {"message": "boom"}}, MODEL)
    assert "boom" in info.value.message


# =============================================================================
# D.2, D.4, D.5 Anthropic answer -> OpenAI client
# =============================================================================

def anthropic_answer(content: list, stop: str = "end_turn", usage: Any = None) -> Dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-up",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": usage or {"input_tokens": 3, "output_tokens": 2}}


def chat_answer(message: Dict[str, Any], finish: str = "stop", usage: Any = None) -> Dict[str, Any]:
    return {"id": "chatcmpl-msg_01", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "message": dict(role="assistant", **message),
                         "logprobs": None, "finish_reason": finish}],
            "usage": dict(usage or {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                    "prompt_tokens_details": {"cached_tokens": 0}},
                          completion_tokens_details={"reasoning_tokens": 0})}


D2_CASES = [
    ("text-blocks-joined", anthropic_answer([{"type": "text", "text": "Hel"},
                                             {"type": "text", "text": "lo"}]),
     chat_answer({"content": "Hello"})),
    ("thinking-to-reasoning-content-signature-dropped",
     anthropic_answer([{"type": "thinking", "thinking": "hmm", "signature": "EqQB"},
                       {"type": "redacted_thinking", "data": "x"}, {"type": "text", "text": "ok"}]),
     chat_answer({"content": "ok", "reasoning_content": "hmm"})),
    ("tool-use-only-content-null",
     anthropic_answer([{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1]}}],
                      "tool_use"),
     chat_answer({"content": None, "tool_calls": [
         {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a":[1]}'}}]},
         "tool_calls")),
    ("text-and-tool-use",
     anthropic_answer([{"type": "text", "text": "Checking."},
                       {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}}], "tool_use"),
     chat_answer({"content": "Checking.", "tool_calls": [
         {"id": "toolu_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
         "tool_calls")),
    ("empty-content-is-empty-string", anthropic_answer([]), chat_answer({"content": ""})),
    ("usage-cache-fields-added-to-prompt",
     anthropic_answer([{"type": "text", "text": "x"}], usage={
         "input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 20,
         "cache_read_input_tokens": 70}),
     chat_answer({"content": "x"}, usage={"prompt_tokens": 100, "completion_tokens": 5,
                                          "total_tokens": 105,
                                          "prompt_tokens_details": {"cached_tokens": 70}})),
]

STOP_TO_FINISH = [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
                  ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("pause_turn", "stop"),
                  ("model_context_window_exceeded", "length"), ("something_new", "stop"),
                  (None, "stop")]


def without_created(obj: Dict[str, Any], before: int) -> Dict[str, Any]:
    assert before <= obj["created"] <= int(time.time())
    return dict(obj, created=0)


@pytest.mark.parametrize("name,body,expected", D2_CASES, ids=case_ids(D2_CASES))
def test_anthropic_to_openai_response(name, body, expected):
    before = int(time.time())
    assert without_created(O2A.response(body, MODEL), before) == expected


@pytest.mark.parametrize("stop,finish", STOP_TO_FINISH, ids=[str(s) for s, _ in STOP_TO_FINISH])
def test_stop_reason_to_finish_reason(stop, finish):
    out = O2A.response(anthropic_answer([], stop), MODEL)
    assert out["choices"][0]["finish_reason"] == finish


def test_anthropic_error_body_is_upstream_error():
    with pytest.raises(proxypal.UpstreamError) as info:
        O2A.response(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, MODEL)
    assert "Overloaded" in info.value.message


# =============================================================================
# Stream machinery: whole, and through SSESplitter + parse_sse_event split every way
# =============================================================================

class SSEPipe:
    """Upstream bytes -> SSESplitter -> parse_sse_event -> translator, as the server does."""

    def __init__(self, factory: Any):
        self.splitter = proxypal.SSESplitter()
        self.translator = factory(MODEL, 7)

    def _events(self, blocks: List[bytes]) -> list:
        out = []
        for block in blocks:
            parsed = proxypal.parse_sse_event(block)
            if parsed is not None:
                out += self.translator.feed(*parsed)
        return out

    def feed(self, data: bytes) -> list:
        return self._events(self.splitter.feed(data))

    def finish(self) -> list:
        return self._events(self.splitter.close()) + self.translator.close()


def decoded(events: List[Tuple[str, str]]) -> List[Tuple[str, Any]]:
    """(event, parsed JSON) with `created` zeroed (it is the clock's), [DONE] kept."""
    out = []
    for event, data in events:
        obj = data if data == "[DONE]" else json.loads(data)
        if isinstance(obj, dict) and "created" in obj:
            assert isinstance(obj["created"], int)
            obj = dict(obj, created=0)
        out.append((event, obj))
    return out


def run_stream(factory: Any, upstream: List[Tuple[str, str]], wire: bytes) -> list:
    """The translator's output fed event by event, asserted equal to the output when the
    same stream arrives as bytes cut at every place."""
    whole = factory(MODEL, 7)
    out: list = []
    for event, data in upstream:
        out += whole.feed(event, data)
    out = decoded(out + whole.close())
    every_way = feed_all_ways(lambda: SSEPipe(factory), wire, lambda pipe: pipe.finish(), decoded)
    assert every_way == out
    return out


# =============================================================================
# C.3 OpenAI chunks -> Anthropic events
# =============================================================================

def chunk(delta: Any = None, finish: Any = None, usage: Any = None, choices: bool = True) -> str:
    body: Dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                            "model": "up"}
    body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


def tc(index: Any, args: Any = None, id: str = None, name: str = None) -> Dict[str, Any]:
    item: Dict[str, Any] = {"index": index} if index is not None else {}
    if id is not None:
        item.update(id=id, type="function")
    function = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    item["function"] = function
    return item


USAGE = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
A_USAGE = {"input_tokens": 20, "output_tokens": 5, "cache_creation_input_tokens": 0,
           "cache_read_input_tokens": 0}
ROLE = chunk({"role": "assistant", "content": ""})
DONE = "[DONE]"


def a_start() -> Tuple[str, Any]:
    return ("message_start", {"type": "message_start", "message": {
        "id": "msg_c1", "type": "message", "role": "assistant", "content": [], "model": MODEL,
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 0, "cache_read_input_tokens": 0}}})


def a_open(index: int, block: Dict[str, Any]) -> Tuple[str, Any]:
    return ("content_block_start", {"type": "content_block_start", "index": index,
                                    "content_block": block})


def a_text(index: int) -> Tuple[str, Any]:
    return a_open(index, {"type": "text", "text": ""})


def a_thinking(index: int) -> Tuple[str, Any]:
    return a_open(index, {"type": "thinking", "thinking": "", "signature": ""})


def a_tool(index: int, id: str, name: str) -> Tuple[str, Any]:
    return a_open(index, {"type": "tool_use", "id": id, "name": name, "input": {}})


def a_delta(index: int, kind: str, value: str) -> Tuple[str, Any]:
    key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}[kind]
    return ("content_block_delta", {"type": "content_block_delta", "index": index,
                                    "delta": {"type": kind, key: value}})


def a_stop(index: int) -> Tuple[str, Any]:
    return ("content_block_stop", {"type": "content_block_stop", "index": index})


def a_end(reason: str, usage: Any = None) -> List[Tuple[str, Any]]:
    return [("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": reason, "stop_sequence": None},
                               "usage": usage or A_USAGE}),
            ("message_stop", {"type": "message_stop"})]


def a_error(message: str) -> Tuple[str, Any]:
    return ("error", {"type": "error", "error": {"type": "api_error", "message": message}})


EARLY = proxypal.STREAM_CUT.format(end="a finish_reason")

C3_CASES = [
    ("text-only", [ROLE, chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk(finish="stop"),
                   chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_text(0), a_delta(0, "text_delta", "Hel"), a_delta(0, "text_delta", "lo"),
      a_stop(0)] + a_end("end_turn")),
    ("stop-sequence-matched-is-end-turn",
     [chunk({"role": "assistant", "content": "A"}, finish="stop", usage=USAGE), DONE],
     [a_start(), a_text(0), a_delta(0, "text_delta", "A"), a_stop(0)] + a_end("end_turn")),
    ("length-is-max-tokens", [ROLE, chunk({"content": "cut"}, finish="length"),
                              chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_text(0), a_delta(0, "text_delta", "cut"), a_stop(0)] + a_end("max_tokens")),
    ("content-filter-is-refusal", [ROLE, chunk(finish="content_filter"), DONE],
     [a_start()] + a_end("refusal", {"output_tokens": 0})),
    ("tool-call-fragmented-arguments",
     [ROLE, chunk({"tool_calls": [tc(0, "", "call_1", "get_weather")]}),
      chunk({"tool_calls": [tc(0, '{"city":')]}), chunk({"tool_calls": [tc(0, '"Paris"}')]}),
      chunk(finish="tool_calls"), chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_tool(0, "call_1", "get_weather"), a_delta(0, "input_json_delta", '{"city":'),
      a_delta(0, "input_json_delta", '"Paris"}'), a_stop(0)] + a_end("tool_use")),
    ("text-then-tool-in-one-chunk-stop-forced-to-tool-use",
     [chunk({"content": "Sure.", "tool_calls": [tc(0, "{}", "call_9", "ls")]}),
      chunk(finish="stop"), chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_text(0), a_delta(0, "text_delta", "Sure."), a_stop(0),
      a_tool(1, "call_9", "ls"), a_delta(1, "input_json_delta", "{}"), a_stop(1)]
     + a_end("tool_use")),
    ("parallel-tool-calls-one-after-another",
     [ROLE, chunk({"tool_calls": [tc(0, "", "call_a", "ls")]}),
      chunk({"tool_calls": [tc(0, '{"d":"/"}')]}),
      chunk({"tool_calls": [tc(1, "", "call_b", "cat")]}),
      chunk({"tool_calls": [tc(1, '{"p":"x"}')]}), chunk(finish="tool_calls"),
      chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_tool(0, "call_a", "ls"), a_delta(0, "input_json_delta", '{"d":"/"}'),
      a_stop(0), a_tool(1, "call_b", "cat"), a_delta(1, "input_json_delta", '{"p":"x"}'),
      a_stop(1)] + a_end("tool_use")),
    ("parallel-tool-calls-interleaved-second-waits",
     [ROLE, chunk({"tool_calls": [tc(0, "", "call_a", "ls")]}),
      chunk({"tool_calls": [tc(1, '{"p":', "call_b", "cat")]}),
      chunk({"tool_calls": [tc(0, '{"d":"/"}')]}),
      chunk({"tool_calls": [tc(1, '"x"}')]}), chunk(finish="tool_calls"),
      chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_tool(0, "call_a", "ls"), a_delta(0, "input_json_delta", '{"d":"/"}'),
      a_stop(0), a_tool(1, "call_b", "cat"), a_delta(1, "input_json_delta", '{"p":'),
      a_delta(1, "input_json_delta", '"x"}'), a_stop(1)] + a_end("tool_use")),
    ("parallel-unfinished-first-call-flushes-rest-whole-at-finish",
     [ROLE, chunk({"tool_calls": [tc(0, '{"d":"/', "call_a", "ls")]}),
      chunk({"tool_calls": [tc(1, '{"p":"x"}', "call_b", "cat")]}), chunk(finish="tool_calls"),
      chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_tool(0, "call_a", "ls"), a_delta(0, "input_json_delta", '{"d":"/'),
      a_stop(0), a_tool(1, "call_b", "cat"), a_delta(1, "input_json_delta", '{"p":"x"}'),
      a_stop(1)] + a_end("tool_use")),
    ("ollama-whole-calls-no-index-object-arguments",
     [chunk({"role": "assistant", "content": "", "tool_calls": [
         {"id": "call_1", "function": {"name": "ls", "arguments": {"path": "/"}}},
         {"id": "call_2", "function": {"name": "pwd", "arguments": "{}"}}]}),
      chunk(finish="stop", usage=USAGE), DONE],
     [a_start(), a_tool(0, "call_1", "ls"), a_delta(0, "input_json_delta", '{"path":"/"}'),
      a_stop(0), a_tool(1, "call_2", "pwd"), a_delta(1, "input_json_delta", "{}"), a_stop(1)]
     + a_end("tool_use")),
    ("id-and-name-in-separate-fragments-name-repeated",
     [ROLE, chunk({"tool_calls": [tc(0, id="call_x")]}),
      chunk({"tool_calls": [tc(0, name="grep")]}),
      chunk({"tool_calls": [tc(0, '{"q":1}', name="grep")]}), chunk(finish="tool_calls"), DONE],
     [a_start(), a_tool(0, "call_x", "grep"), a_delta(0, "input_json_delta", '{"q":1}'),
      a_stop(0)] + a_end("tool_use", {"output_tokens": 0})),
    ("missing-tool-id-generated-from-message-id",
     [ROLE, chunk({"tool_calls": [tc(0, name="f")]}), chunk({"tool_calls": [tc(0, "{}")]}),
      chunk(finish="tool_calls"), DONE],
     [a_start(), a_tool(0, "toolu_c1_0", "f"), a_delta(0, "input_json_delta", "{}"), a_stop(0)]
     + a_end("tool_use", {"output_tokens": 0})),
    ("reasoning-content-then-text",
     [ROLE, chunk({"reasoning_content": "Let me "}), chunk({"reasoning_content": "think"}),
      chunk({"content": "42"}), chunk(finish="stop"), chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_thinking(0), a_delta(0, "thinking_delta", "Let me "),
      a_delta(0, "thinking_delta", "think"), a_stop(0), a_text(1), a_delta(1, "text_delta", "42"),
      a_stop(1)] + a_end("end_turn")),
    ("openrouter-reasoning-field-comment-ignored",
     [chunk({"role": "assistant", "reasoning": "hm"}), chunk({"content": "ok"}, finish="stop"),
      chunk(usage=USAGE, choices=False), DONE],
     [a_start(), a_thinking(0), a_delta(0, "thinking_delta", "hm"), a_stop(0), a_text(1),
      a_delta(1, "text_delta", "ok"), a_stop(1)] + a_end("end_turn")),
    ("usage-with-cached-tokens",
     [ROLE, chunk({"content": "x"}), chunk(finish="stop"),
      chunk(usage={"prompt_tokens": 1000, "completion_tokens": 9, "total_tokens": 1009,
                   "prompt_tokens_details": {"cached_tokens": 800}}, choices=False), DONE],
     [a_start(), a_text(0), a_delta(0, "text_delta", "x"), a_stop(0)]
     + a_end("end_turn", {"input_tokens": 200, "output_tokens": 9,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 800})),
    ("finish-without-done-ends-normally", [ROLE, chunk({"content": "x"}, finish="stop")],
     [a_start(), a_text(0), a_delta(0, "text_delta", "x"), a_stop(0)]
     + a_end("end_turn", {"output_tokens": 0})),
    ("cut-mid-text-is-error", [ROLE, chunk({"content": "Hal"})],
     [a_start(), a_text(0), a_delta(0, "text_delta", "Hal"), a_stop(0), a_error(EARLY)]),
    ("cut-mid-tool-call-is-error", [ROLE, chunk({"tool_calls": [tc(0, '{"a', "c", "f")]})],
     [a_start(), a_tool(0, "c", "f"), a_delta(0, "input_json_delta", '{"a'), a_stop(0),
      a_error(EARLY)]),
    ("cut-before-any-chunk-is-error", [], [a_error(EARLY)]),
    ("error-chunk-mid-stream",
     [ROLE, chunk({"content": "par"}),
      json.dumps({"error": {"message": "Provider returned error", "code": 502}}),
      chunk({"content": "ignored"})],
     [a_start(), a_text(0), a_delta(0, "text_delta", "par"), a_stop(0),
      a_error("Provider returned error")]),
    ("finish-reason-error-is-error-event",
     [ROLE, chunk({"content": "x"}, finish="error")],
     [a_start(), a_text(0), a_delta(0, "text_delta", "x"), a_stop(0),
      a_error('upstream finished with finish_reason "error"')]),
]


def openai_wire(chunks: List[str]) -> bytes:
    """The upstream's bytes: CRLF framing, an OpenRouter comment and data lines."""
    out = b": OPENROUTER PROCESSING\r\n\r\n"
    for data in chunks:
        out += b"data: " + data.encode() + b"\r\n\r\n"
    return out


def assert_anthropic_order(events: List[Tuple[str, Any]]) -> None:
    """The event grammar the Anthropic SDKs accumulate (A.4): message_start, then per
    block start -> deltas -> stop with indexes 0, 1, 2..., then message_delta and
    message_stop; or, at any point, a final error event. Event name == JSON type."""
    for name, obj in events:
        assert name == obj["type"]
    names = [name for name, _ in events]
    if names and names[-1] == "error":
        names = names[:-1]
        assert "message_stop" not in names
    elif names:
        assert names[-2:] == ["message_delta", "message_stop"]
        names = names[:-2]
    assert names[:1] == ["message_start"] or not names
    open_index, expected_index = None, 0
    for name, obj in events[1:len(names)]:
        if name == "content_block_start":
            assert open_index is None and obj["index"] == expected_index
            open_index, expected_index = obj["index"], expected_index + 1
        elif name in ("content_block_delta", "content_block_stop"):
            assert obj["index"] == open_index
            if name == "content_block_stop":
                open_index = None
        else:
            assert name == "ping"
    assert open_index is None


@pytest.mark.parametrize("name,chunks,expected", C3_CASES, ids=case_ids(C3_CASES))
def test_openai_stream_to_anthropic(name, chunks, expected):
    out = run_stream(A2O.stream, [("message", c) for c in chunks],
                     openai_wire(chunks))
    assert out == expected
    assert_anthropic_order(out)


def test_tool_arguments_never_sent_empty():
    chunks = dict((name, up) for name, up, _ in C3_CASES)["tool-call-fragmented-arguments"]
    out = run_stream(A2O.stream, [("message", c) for c in chunks],
                     openai_wire(chunks))
    deltas = [obj["delta"] for name, obj in out if name == "content_block_delta"]
    assert deltas and all(d["partial_json"] for d in deltas)


@pytest.mark.parametrize("bad", [
    [a_start(), ("message_stop", {"type": "message_stop"})],
    [a_start(), a_text(1), a_stop(1)] + a_end("end_turn"),
    [a_start(), a_text(0), a_text(1), a_stop(1)] + a_end("end_turn"),
    [a_start(), a_text(0)] + a_end("end_turn"),
], ids=["no-message-delta", "index-starts-at-1", "interleaved-blocks", "block-left-open"])
def test_order_checker_rejects_bad_orders(bad):
    with pytest.raises(AssertionError):
        assert_anthropic_order(bad)


# =============================================================================
# D.3 Anthropic events -> OpenAI chunks
# =============================================================================

def ev(obj: Dict[str, Any]) -> Tuple[str, str]:
    return obj["type"], json.dumps(obj)


def u_start(usage: Any = None) -> Tuple[str, str]:
    return ev({"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "content": [], "model": "claude-up",
        "stop_reason": None, "stop_sequence": None,
        "usage": usage or {"input_tokens": 12, "output_tokens": 1}}})


def u_open(index: int, block: Dict[str, Any]) -> Tuple[str, str]:
    return ev({"type": "content_block_start", "index": index, "content_block": block})


def u_delta(index: int, delta: Dict[str, Any]) -> Tuple[str, str]:
    return ev({"type": "content_block_delta", "index": index, "delta": delta})


def u_stop(index: int) -> Tuple[str, str]:
    return ev({"type": "content_block_stop", "index": index})


def u_end(reason: str, usage: Any = None) -> List[Tuple[str, str]]:
    return [ev({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None},
                "usage": usage or {"output_tokens": 4}}), ev({"type": "message_stop"})]


PING = ev({"type": "ping"})


def o_chunk(delta: Dict[str, Any], finish: Any = None) -> Tuple[str, Any]:
    return ("", {"id": "chatcmpl-msg_01", "object": "chat.completion.chunk", "created": 0,
                 "model": MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def o_end(finish: str, usage: Any = None) -> List[Tuple[str, Any]]:
    usage = dict(usage or {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16,
                           "prompt_tokens_details": {"cached_tokens": 0}},
                 completion_tokens_details={"reasoning_tokens": 0})
    return [o_chunk({}, finish),
            ("", {"id": "chatcmpl-msg_01", "object": "chat.completion.chunk", "created": 0,
                  "model": MODEL, "choices": [], "usage": usage}),
            ("", "[DONE]")]


def o_error(message: str, kind: str, code: Any = None) -> List[Tuple[str, Any]]:
    """A failed stream ends with one error chunk and no [DONE]."""
    return [("", {"error": {"message": message, "type": kind, "code": code, "param": None}})]


O_ROLE = o_chunk({"role": "assistant", "content": ""})
TEXT = {"type": "text", "text": ""}

D3_CASES = [
    ("text-with-ping",
     [u_start(), u_open(0, TEXT), PING, u_delta(0, {"type": "text_delta", "text": "Hel"}),
      u_delta(0, {"type": "text_delta", "text": "lo"}), u_stop(0)] + u_end("end_turn"),
     [O_ROLE, o_chunk({"content": "Hel"}), o_chunk({"content": "lo"})] + o_end("stop")),
    ("text-then-tool-call-tool-index-counts-from-0",
     [u_start(), u_open(0, TEXT), u_delta(0, {"type": "text_delta", "text": "Checking."}),
      u_stop(0), u_open(1, {"type": "tool_use", "id": "toolu_01T1", "name": "get_weather",
                            "input": {}}),
      u_delta(1, {"type": "input_json_delta", "partial_json": ""}),
      u_delta(1, {"type": "input_json_delta", "partial_json": '{"city": "Pa'}),
      u_delta(1, {"type": "input_json_delta", "partial_json": 'ris"}'}), u_stop(1)]
     + u_end("tool_use"),
     [O_ROLE, o_chunk({"content": "Checking."}),
      o_chunk({"tool_calls": [{"index": 0, "id": "toolu_01T1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
      o_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]}),
      o_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]})]
     + o_end("tool_calls")),
    ("two-tool-calls-indexes-0-and-1",
     [u_start(), u_open(0, {"type": "tool_use", "id": "t_a", "name": "ls", "input": {}}),
      u_delta(0, {"type": "input_json_delta", "partial_json": "{}"}), u_stop(0),
      u_open(1, {"type": "tool_use", "id": "t_b", "name": "pwd", "input": {}}),
      u_delta(1, {"type": "input_json_delta", "partial_json": "{}"}), u_stop(1)]
     + u_end("tool_use"),
     [O_ROLE,
      o_chunk({"tool_calls": [{"index": 0, "id": "t_a", "type": "function",
                               "function": {"name": "ls", "arguments": ""}}]}),
      o_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
      o_chunk({"tool_calls": [{"index": 1, "id": "t_b", "type": "function",
                               "function": {"name": "pwd", "arguments": ""}}]}),
      o_chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]})]
     + o_end("tool_calls")),
    ("thinking-to-reasoning-content-signature-and-redacted-dropped",
     [u_start(), u_open(0, {"type": "thinking", "thinking": ""}),
      u_delta(0, {"type": "thinking_delta", "thinking": "Let me think"}),
      u_delta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}), u_stop(0),
      u_open(1, {"type": "redacted_thinking", "data": "abc"}), u_stop(1),
      u_open(2, TEXT), u_delta(2, {"type": "text_delta", "text": "42"}), u_stop(2)]
     + u_end("end_turn"),
     [O_ROLE, o_chunk({"reasoning_content": "Let me think"}), o_chunk({"content": "42"})]
     + o_end("stop")),
    ("usage-with-cache-fields-last-value-wins",
     [u_start({"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 100,
               "cache_read_input_tokens": 900}),
      u_open(0, TEXT), u_delta(0, {"type": "text_delta", "text": "x"}), u_stop(0)]
     + u_end("end_turn", {"output_tokens": 30, "input_tokens": 6}),
     [O_ROLE, o_chunk({"content": "x"})]
     + o_end("stop", {"prompt_tokens": 1006, "completion_tokens": 30, "total_tokens": 1036,
                      "prompt_tokens_details": {"cached_tokens": 900}})),
    ("max-tokens-is-length", [u_start()] + u_end("max_tokens"), [O_ROLE] + o_end("length")),
    ("stop-sequence-is-stop", [u_start()] + u_end("stop_sequence"), [O_ROLE] + o_end("stop")),
    ("refusal-is-content-filter", [u_start()] + u_end("refusal"),
     [O_ROLE] + o_end("content_filter")),
    ("error-event-mid-stream",
     [u_start(), u_open(0, TEXT), u_delta(0, {"type": "text_delta", "text": "a"}),
      ev({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
      u_delta(0, {"type": "text_delta", "text": "ignored"})],
     [O_ROLE, o_chunk({"content": "a"})] + o_error("Overloaded", "api_error")),
    ("cut-before-message-stop-is-error",
     [u_start(), u_open(0, TEXT), u_delta(0, {"type": "text_delta", "text": "a"})],
     [O_ROLE, o_chunk({"content": "a"})]
     + o_error(proxypal.STREAM_CUT.format(end="message_stop"), "api_error")),
    ("cut-after-message-delta-is-error",
     [u_start(), u_open(0, TEXT), u_delta(0, {"type": "text_delta", "text": "a"}), u_stop(0),
      u_end("end_turn")[0]],
     [O_ROLE, o_chunk({"content": "a"}), o_chunk({}, "stop")]
     + o_error(proxypal.STREAM_CUT.format(end="message_stop"), "api_error")),
]


def anthropic_wire(events: List[Tuple[str, str]]) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (e.encode(), d.encode()) for e, d in events)


@pytest.mark.parametrize("name,events,expected", D3_CASES, ids=case_ids(D3_CASES))
def test_anthropic_stream_to_openai(name, events, expected):
    out = run_stream(O2A.stream, events, anthropic_wire(events))
    assert out == expected
    assert all(name == "" for name, _ in out)
    assert out[-1] == ("", "[DONE]") or "error" in out[-1][1]


@pytest.mark.parametrize("effort, chat_effort, responses_effort", [
    ("low", "low", "low"), ("high", "high", "high"),
    ("max", "xhigh", "xhigh"),         # Anthropic's top effort is OpenAI's xhigh
    ("none", None, "none"),            # Chat: left out (models before GPT-5.1 refuse "none")
])
def test_an_anthropic_effort_reaches_openai_in_its_words(effort, chat_effort, responses_effort):
    body = {"model": "c", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}],
            "thinking": {"type": "adaptive"}, "output_config": {"effort": effort}}
    assert A2O.request(body).get("reasoning_effort") == chat_effort
    to_responses = proxypal.TRANSLATORS[("anthropic", "responses")].request(body)
    assert to_responses["reasoning"]["effort"] == responses_effort


@pytest.mark.parametrize("upstream", ["openai", "gemini", "responses"])
def test_claude_codes_tool_search_is_left_out_and_the_deferred_tools_go_as_ordinary_ones(upstream):
    """ENABLE_TOOL_SEARCH: the tool search tool runs on Anthropic's servers and only spares
    context; elsewhere the request goes without it rather than failing every turn."""
    body = anth(tools=[{"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
                       {"name": "Bash", "description": "run", "input_schema": {"type": "object", "properties": {}}},
                       {"name": "mcp__github__create_issue", "description": "issue", "defer_loading": True,
                        "input_schema": {"type": "object", "properties": {}}}])
    out = json.dumps(proxypal.TRANSLATORS[("anthropic", upstream)].request(body))
    assert "Bash" in out and "mcp__github__create_issue" in out
    assert "tool_search" not in out and "defer_loading" not in out


def marked(body: Dict[str, Any]) -> List[str]:
    """Where a request toward Anthropic carries cache_control: tools[i], system[i],
    messages[i].content[j]."""
    places = [f"tools[{i}]" for i, t in enumerate(body.get("tools", [])) if "cache_control" in t]
    places += [f"system[{i}]" for i, b in enumerate(body.get("system") or []) if "cache_control" in b]
    return places + [f"messages[{i}].content[{j}]" for i, m in enumerate(body["messages"])
                     for j, b in enumerate(m["content"]) if "cache_control" in b]


OPENAI_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TOOL_LOOP = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


@pytest.mark.parametrize("body, places", [
    (chat(), ["messages[0].content[0]"]),
    (chat(messages=TOOL_LOOP, tools=[OPENAI_WEATHER]),
     ["tools[0]", "system[0]", "messages[0].content[0]", "messages[2].content[0]"]),
    (chat(messages=TOOL_LOOP + [{"role": "assistant", "content": "Sunny."},
                                {"role": "user", "content": [{"type": "text", "text": "And"},
                                                             {"type": "text", "text": "tomorrow?"}]}]),
     ["system[0]", "messages[2].content[0]", "messages[4].content[1]"]),
], ids=["one-turn", "tool-loop", "next-turn"])
def test_prompt_caching_is_asked_of_claude_for_clients_whose_apis_cache_on_their_own(body, places):
    """Claude caches only up to marked blocks: the tools, the system prompt and the end of
    the last two user turns (where the next request's prefix ends); 4 marks at most."""
    assert marked(O2A.request(body)) == places



@pytest.mark.parametrize("model", ["anthropic.claude-3-haiku-20240307-v1:0", "claude-3-5-sonnet-20241022"])
def test_no_cache_marks_for_models_that_refuse_them(model):
    """Claude 3 and 3.5 Sonnet answer cache_control with a 400 on Bedrock ("does not
    support cache_control" on Anthropic for some): the request that worked still works."""
    out = O2A.request(chat(model=model, messages=TOOL_LOOP, tools=[OPENAI_WEATHER]))
    assert marked(out) == []


@pytest.mark.parametrize("client, upstream", [("responses", "openai"), ("openai", "responses")])
def test_a_generic_upstream_code_does_not_hide_a_context_overflow(client, upstream):
    """DeepSeek and many OpenAI-compatible servers put their type in `code`."""
    body = json.dumps({"error": {"message": "This model's maximum context length is 65536 tokens. However, "
                                            "you requested 70000 tokens", "type": "invalid_request_error",
                                 "param": None, "code": "invalid_request_error"}}).encode()
    out = json.loads(proxypal.upstream_error_body(client, upstream, 400, body, "DeepSeek")[0])
    assert out["error"]["code"] == "context_length_exceeded"
