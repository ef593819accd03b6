"""The official SDKs through the proxy to every upstream kind: openai (chat.completions
create and stream, responses.create and responses.stream()), anthropic (messages.create,
messages.stream, count_tokens) and google-genai (generate_content and
generate_content_stream). Each call offers a get_weather tool: the scripted upstream asks
for it, the test sends the result back, the upstream answers with the cell's marker.
Assertions cover what the SDK returned and what the upstream received."""
from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass

import pytest

import harness
from harness import LOCAL_KEY, ProxyProcess
from scripted_upstreams import KINDS, Scenario

MODEL = "e2e-model"          # the name the SDKs ask for; each upstream serves it by alias
TIMEOUT = 30
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_RESULT = "18C and cloudy"
QUESTION = "What is the weather in Paris?"
UPSTREAM_KINDS = ["anthropic", "openai", "gemini", "bedrock", "responses"]


@dataclass
class Exchange:
    """What one SDK conversation produced: the tool call, then the final text."""
    tool_name: str = ""
    tool_args: dict = None
    final_text: str = ""


# -- openai -------------------------------------------------------------------------

def openai_client(url: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=LOCAL_KEY, max_retries=0, timeout=TIMEOUT)


CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                "parameters": WEATHER_SCHEMA}}]


def chat_followup(call_id: str, name: str, arguments: str) -> list:
    return [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": WEATHER_RESULT}]


def openai_chat_create(url: str) -> Exchange:
    client = openai_client(url)
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                           tools=CHAT_TOOLS)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    second = client.chat.completions.create(
        model=MODEL, tools=CHAT_TOOLS,
        messages=chat_followup(call.id, call.function.name, call.function.arguments))
    return Exchange(call.function.name, json.loads(call.function.arguments),
                    second.choices[0].message.content or "")


def chat_stream(client, messages: list) -> tuple:
    """(tool calls by index {id, name, arguments}, text, finish_reason, usage) of a stream."""
    calls, text, finish, usage = {}, "", None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, tools=CHAT_TOOLS,
                                                stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                slot["name"] = (tc.function and tc.function.name) or slot["name"]
                slot["arguments"] += (tc.function and tc.function.arguments) or ""
    return calls, text, finish, usage


def openai_chat_stream(url: str) -> Exchange:
    client = openai_client(url)
    calls, _, finish, _ = chat_stream(client, [{"role": "user", "content": QUESTION}])
    assert finish == "tool_calls" and len(calls) == 1, f"stream gave calls={calls} finish={finish}"
    call = calls[0]
    _, text, finish, usage = chat_stream(client, chat_followup(call["id"], call["name"], call["arguments"]))
    assert finish == "stop", f"final finish_reason {finish!r}"
    assert usage is not None and usage.total_tokens > 0, "include_usage asked, no usage chunk"
    return Exchange(call["name"], json.loads(call["arguments"]), text)


RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
                    "parameters": WEATHER_SCHEMA, "strict": False}]


def responses_followup(call) -> list:
    return [{"role": "user", "content": QUESTION},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": WEATHER_RESULT}]


def function_call_of(response):
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, f"no function_call item in {response.output}"
    return calls[0]


def openai_responses_create(url: str) -> Exchange:
    client = openai_client(url)
    first = client.responses.create(model=MODEL, input=QUESTION, tools=RESPONSES_TOOLS)
    call = function_call_of(first)
    second = client.responses.create(model=MODEL, input=responses_followup(call), tools=RESPONSES_TOOLS)
    return Exchange(call.name, json.loads(call.arguments), second.output_text)


def openai_responses_stream(url: str) -> Exchange:
    client = openai_client(url)
    with client.responses.stream(model=MODEL, input=QUESTION, tools=RESPONSES_TOOLS) as stream:
        first = stream.get_final_response()
    call = function_call_of(first)
    text = ""
    with client.responses.stream(model=MODEL, input=responses_followup(call), tools=RESPONSES_TOOLS) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert final.output_text == text, f"deltas {text!r} differ from the final response {final.output_text!r}"
    return Exchange(call.name, json.loads(call.arguments), final.output_text)


# -- anthropic ------------------------------------------------------------------------

def anthropic_client(url: str):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=url, api_key=LOCAL_KEY, max_retries=0, timeout=TIMEOUT)


ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER_SCHEMA}]


def anthropic_followup(message) -> list:
    use = next(block for block in message.content if block.type == "tool_use")
    return [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in message.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": WEATHER_RESULT}]}]


def tool_use_of(message):
    uses = [block for block in message.content if block.type == "tool_use"]
    assert uses and message.stop_reason == "tool_use", f"no tool_use in {message}"
    return uses[0]


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def anthropic_messages_create(url: str) -> Exchange:
    client = anthropic_client(url)
    first = client.messages.create(model=MODEL, max_tokens=1024, tools=ANTHROPIC_TOOLS,
                                   messages=[{"role": "user", "content": QUESTION}])
    use = tool_use_of(first)
    second = client.messages.create(model=MODEL, max_tokens=1024, tools=ANTHROPIC_TOOLS,
                                    messages=anthropic_followup(first))
    return Exchange(use.name, use.input, text_of(second))


def anthropic_messages_stream(url: str) -> Exchange:
    client = anthropic_client(url)
    with client.messages.stream(model=MODEL, max_tokens=1024, tools=ANTHROPIC_TOOLS,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        first = stream.get_final_message()
    use = tool_use_of(first)
    with client.messages.stream(model=MODEL, max_tokens=1024, tools=ANTHROPIC_TOOLS,
                                messages=anthropic_followup(first)) as stream:
        text = "".join(stream.text_stream)
        second = stream.get_final_message()
    assert second.stop_reason == "end_turn", f"stop_reason {second.stop_reason!r}"
    assert text == text_of(second)
    return Exchange(use.name, use.input, text)


def anthropic_count_tokens(url: str) -> Exchange:
    client = anthropic_client(url)
    counted = client.messages.count_tokens(model=MODEL, tools=ANTHROPIC_TOOLS,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert isinstance(counted.input_tokens, int) and counted.input_tokens > 0, \
        f"count_tokens answered {counted.model_dump()}"
    return Exchange()


# -- google-genai -----------------------------------------------------------------------

def genai_parts():
    genai = pytest.importorskip("google.genai")
    return genai, genai.types


def genai_client(url: str):
    genai, types = genai_parts()
    return genai.Client(api_key=LOCAL_KEY, http_options=types.HttpOptions(base_url=url, timeout=TIMEOUT * 1000))


def genai_config():
    """The tool, and thinking with its thoughts shown: google-genai writes thinking_config's
    fields (and inline_data's) in snake_case, and types thought_signature as base64 bytes."""
    _, types = genai_parts()
    tool = types.Tool(function_declarations=[types.FunctionDeclaration(
        name="get_weather", description="Weather for a city", parameters_json_schema=WEATHER_SCHEMA)])
    return types.GenerateContentConfig(
        tools=[tool], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        thinking_config=types.ThinkingConfig(thinking_budget=1024, include_thoughts=True))


# a 1x1 PNG: sent with the question, so each upstream gets an image in its own form
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def genai_question():
    _, types = genai_parts()
    return [types.Content(role="user", parts=[types.Part(text=QUESTION),
                                              types.Part.from_bytes(data=PIXEL, mime_type="image/png")])]


def genai_followup(call_content, call) -> list:
    _, types = genai_parts()
    return [types.Content(role="user", parts=[types.Part(text=QUESTION)]), call_content,
            types.Content(role="user", parts=[types.Part.from_function_response(
                name=call.name, response={"result": WEATHER_RESULT})])]


def genai_generate_content(url: str) -> Exchange:
    client = genai_client(url)
    first = client.models.generate_content(model=MODEL, contents=genai_question(), config=genai_config())
    assert first.function_calls, f"no function call in {first}"
    call = first.function_calls[0]
    second = client.models.generate_content(model=MODEL, config=genai_config(),
                                            contents=genai_followup(first.candidates[0].content, call))
    return Exchange(call.name, dict(call.args), second.text or "")


def genai_generate_content_stream(url: str) -> Exchange:
    _, types = genai_parts()
    client = genai_client(url)
    calls, parts = [], []
    for chunk in client.models.generate_content_stream(model=MODEL, contents=genai_question(),
                                                       config=genai_config()):
        calls += chunk.function_calls or []
        parts += (chunk.candidates[0].content.parts or []) if chunk.candidates and chunk.candidates[0].content else []
    assert len(calls) == 1, f"stream gave function calls {calls}"
    text = ""
    model_turn = types.Content(role="model", parts=[p for p in parts if p.function_call])
    for chunk in client.models.generate_content_stream(model=MODEL, config=genai_config(),
                                                       contents=genai_followup(model_turn, calls[0])):
        text += chunk.text or ""
    return Exchange(calls[0].name, dict(calls[0].args), text)


# -- the matrix ---------------------------------------------------------------------------

CASES = {   # name -> (client format, function)
    "openai-chat-create": ("openai", openai_chat_create),
    "openai-chat-stream": ("openai", openai_chat_stream),
    "openai-responses-create": ("responses", openai_responses_create),
    "openai-responses-stream": ("responses", openai_responses_stream),
    "anthropic-messages-create": ("anthropic", anthropic_messages_create),
    "anthropic-messages-stream": ("anthropic", anthropic_messages_stream),
    "anthropic-count-tokens": ("anthropic", anthropic_count_tokens),
    "genai-generate-content": ("gemini", genai_generate_content),
    "genai-generate-content-stream": ("gemini", genai_generate_content_stream),
}
SDK_OF = {"openai": "openai", "responses": "openai", "anthropic": "anthropic", "gemini": "google-genai"}


@pytest.mark.parametrize("kind", UPSTREAM_KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_sdk(tools, cell, case, kind):
    client_format, run = CASES[case]
    sdk = SDK_OF[client_format]
    version = ((tools.get("venv") or {}).get("packages") or {}).get(sdk, {}).get("version", "")
    cell.set(f"sdk {sdk}", version, f"{client_format} -> {kind}", f"{case}-{kind}")
    scenario = Scenario(secrets.token_hex(4), mode="weather")
    folder = harness.cell_dir(f"sdk-{cell.name}")
    upstream = KINDS[kind](scenario)
    proxy = None
    try:
        proxy = ProxyProcess(harness.provider_config(kind, upstream.url, aliases=(MODEL,)), folder)
        try:
            got = run(proxy.url)
        except Exception as exc:              # an SDK error: say what the proxy logged
            raise AssertionError(f"{type(exc).__name__}: {str(exc)[:300]}; "
                                 f"proxy: {' || '.join(proxy.errors()[:2])}; "
                                 f"upstream saw: {','.join(upstream.labels()) or 'nothing'}") from exc
    finally:
        if proxy is not None:
            proxy.close()
        upstream.close()
        harness.save_artifacts(folder, upstream)
    check_upstream(case, kind, upstream, scenario, got)


def check_upstream(case: str, kind: str, upstream, scenario: Scenario, got: Exchange) -> None:
    seen = upstream.requests
    if case == "anthropic-count-tokens":
        counted = [r for r in seen if r.label == "count_tokens"]
        if kind in ("anthropic", "bedrock"):       # these upstreams can count; others are estimated
            assert counted, f"count_tokens not forwarded to the {kind} upstream: {upstream.labels()}"
        return
    assert got.tool_name == "get_weather" and got.tool_args == {"city": "Paris"}, \
        f"the SDK got tool call {got.tool_name!r} {got.tool_args!r}"
    assert scenario.marker in got.final_text, f"final text {got.final_text!r} lacks the marker"
    turns = [r for r in seen if r.label in ("main-turn", "tool-result-turn")]
    assert [r.label for r in turns] == ["main-turn", "tool-result-turn"], \
        f"upstream saw {upstream.labels()}"
    expected_model = harness.UPSTREAM_MODEL[kind]
    for rec in turns:
        assert "get_weather" in rec.tools, f"the tool did not reach the upstream: {rec.tools}"
        assert rec.model.endswith(expected_model), f"upstream asked for {rec.model!r}, not {expected_model!r}"
    assert any(WEATHER_RESULT in result for result in turns[1].results), \
        f"the tool result did not reach the upstream: {turns[1].results}"
