"""OpenAI Responses clients (Codex CLI) on every upstream format: requests, whole answers
and stream transcripts as named cases; every stream fed whole, byte by byte and cut at
every byte, and checked against the event grammar the openai SDK's stream helper relies on."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

import pytest

from helpers import feed_all_ways, proxypal, without_cache_marks

R_OA = proxypal.TRANSLATORS[("responses", "openai")]
R_AN = proxypal.TRANSLATORS[("responses", "anthropic")]
R_GE = proxypal.TRANSLATORS[("responses", "gemini")]
SHELL = {"type": "function", "name": "shell", "description": "Run", "strict": False,
         "parameters": {"type": "object", "properties": {"command": {"type": "array",
                                                                     "items": {"type": "string"}}}}}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: patch"}}
PATCH_TEXT = "*** Begin Patch\n*** Update File: a.txt\n-old\n+new\n*** End Patch"


def codex(**extra: Any) -> Dict[str, Any]:
    """A Codex-shaped request: instructions, developer and user messages, store false."""
    body = {"model": "m", "instructions": "You are Codex.", "store": False, "stream": True,
            "input": [{"type": "message", "role": "developer",
                       "content": [{"type": "input_text", "text": "Sandbox: none."}]},
                      {"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "Fix a.txt"}]}]}
    body.update(extra)
    return body


TOOL_HISTORY = [
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Fix a.txt"}]},
    {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Look first."}],
     "encrypted_content": "gAAAA-openai-blob"},
    {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": '{"command":["cat","a.txt"]}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "old"},
    {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": PATCH_TEXT},
    {"type": "custom_tool_call_output", "call_id": "call_2", "output": "Done!"},
]


def test_codex_turn_to_openai_chat():
    body = codex(input=TOOL_HISTORY, tools=[SHELL, PATCH], tool_choice="auto", parallel_tool_calls=False,
                 reasoning={"effort": "medium", "summary": "auto"}, prompt_cache_key="conv-1",
                 include=["reasoning.encrypted_content"])
    out = R_OA.request(body)
    assert out["messages"] == [
        {"role": "system", "content": "You are Codex."},
        {"role": "user", "content": "Fix a.txt"},
        {"role": "assistant", "content": "", "reasoning_content": "Look first.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "shell",
                                                             "arguments": '{"command":["cat","a.txt"]}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "old"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_2", "type": "function", "function": {
                "name": "apply_patch", "arguments": json.dumps({"input": PATCH_TEXT}, separators=(",", ":"))}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "Done!"}]
    patch = out["tools"][1]["function"]
    assert patch["parameters"] == {"type": "object", "properties": {"input": {"type": "string"}},
                                   "required": ["input"]}
    assert "start: patch" in patch["description"] and "not JSON" in patch["description"]
    assert out["tool_choice"] == "auto" and out["parallel_tool_calls"] is False
    assert out["reasoning_effort"] == "medium" and out["stream_options"] == {"include_usage": True}
    assert "gAAAA" not in json.dumps(out)                  # a foreign blob never travels


def test_codex_turn_to_anthropic_keeps_only_anthropic_signatures():
    history = [dict(TOOL_HISTORY[1], encrypted_content="pp1:anthropic:EqQB")] + TOOL_HISTORY[2:4]
    out = R_AN.request(codex(input=[TOOL_HISTORY[0]] + history, tools=[SHELL, PATCH],
                             max_output_tokens=4000))
    assert out["system"] == [{"type": "text", "text": "You are Codex."},
                             {"type": "text", "text": "Sandbox: none."}] or \
        out["system"][0]["text"] == "You are Codex."
    assistant = out["messages"][1]
    assert assistant["content"][0] == {"type": "thinking", "thinking": "Look first.", "signature": "EqQB"}
    assert assistant["content"][1]["type"] == "tool_use" and assistant["content"][1]["id"] == "call_1"
    assert without_cache_marks(out["messages"][2]["content"][0]) == {
        "type": "tool_result", "tool_use_id": "call_1", "content": "old"}
    assert out["max_tokens"] == 4000
    foreign = R_AN.request(codex(input=TOOL_HISTORY[:4]))
    assert all(b["type"] != "thinking" for m in foreign["messages"] for b in m["content"])


def test_codex_turn_to_gemini():
    out = R_GE.request(codex(input=TOOL_HISTORY[:4], tools=[SHELL],
                             text={"format": {"type": "json_schema", "name": "o", "strict": True,
                                              "schema": {"type": "object", "properties": {}}}}))
    assert out["systemInstruction"] == {"parts": [{"text": "You are Codex."}]}
    call = out["contents"][1]["parts"][0]
    assert call == {"functionCall": {"name": "shell", "args": {"command": ["cat", "a.txt"]}},
                    "thoughtSignature": "skip_thought_signature_validator"}
    assert out["contents"][2]["parts"][0] == {"functionResponse": {"name": "shell", "response": {"result": "old"}}}
    assert out["generationConfig"]["responseMimeType"] == "application/json"


def test_a_local_shell_call_in_the_history_stays_paired_with_its_output():
    """A thread that used local_shell (codex-mini, relayed), then moved to a translated
    model: a result without its call is a 400 on every turn (Anthropic, OpenAI, Gemini)."""
    history = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "ls"}]},
               {"type": "local_shell_call", "id": "lsh_1", "call_id": "call_ls", "status": "completed",
                "action": {"type": "exec", "command": ["ls", "-a"], "working_directory": "/w"}},
               {"type": "function_call_output", "call_id": "call_ls", "output": "a.txt"},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "next"}]}]
    out = R_AN.request(codex(input=history, tools=[SHELL]))
    uses = [b for m in out["messages"] for b in m["content"] if b.get("type") == "tool_use"]
    assert [(u["id"], u["name"], u["input"]) for u in uses] == [
        ("call_ls", "local_shell", {"command": ["ls", "-a"], "working_directory": "/w"})]
    assert [b["tool_use_id"] for m in out["messages"] for b in m["content"]
            if b.get("type") == "tool_result"] == ["call_ls"]
    chat = R_OA.request(codex(input=history, tools=[SHELL]))
    assert [c["id"] for m in chat["messages"] for c in m.get("tool_calls") or []] == ["call_ls"]
    assert R_GE.request(codex(input=history, tools=[SHELL]))["contents"]     # (not a 400)


def test_namespace_tools_are_flattened_and_requalified():
    body = codex(tools=[{"type": "namespace", "name": "mcp_github", "tools": [
        {"type": "function", "name": "search", "parameters": {"type": "object", "properties": {}}}]}])
    assert R_OA.request(body)["tools"][0]["function"]["name"] == "mcp_github__search"
    chat = R_OA.read(body)
    answer = {"id": "c1", "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "mcp_github__search", "arguments": "{}"}}]},
        "finish_reason": "tool_calls"}]}
    item = R_OA.response(answer, "m", chat)["output"][0]
    assert item["name"] == "search" and item["namespace"] == "mcp_github" and item["call_id"] == "call_9"


def test_a_namespaced_name_over_64_characters_goes_as_a_stand_in_and_comes_back_requalified():
    namespace, name = "mcp__" + "very_long_server_name_" * 2, "search_issues_and_pull_requests"
    flat = f"{namespace}__{name}"
    assert len(flat) > 64
    body = codex(tools=[{"type": "namespace", "name": namespace, "tools": [
        {"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}]}])
    stand_in = R_AN.request(body)["tools"][0]["name"]
    assert stand_in == proxypal.stand_in_name(flat) and len(stand_in) <= 64
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "c", "stop_reason": "tool_use",
              "content": [{"type": "tool_use", "id": "toolu_1", "name": stand_in, "input": {}}],
              "usage": {"input_tokens": 5, "output_tokens": 3}}
    item = R_AN.response(answer, "m", R_AN.read(body))["output"][0]
    assert (item["namespace"], item["name"]) == (namespace, name)
    events = R_AN.replay(answer, "m", 0, R_AN.read(body))
    done = [json.loads(d)["item"] for e, d in events if e == "response.output_item.done"]
    assert [(i["namespace"], i["name"]) for i in done] == [(namespace, name)]


@pytest.mark.parametrize("body,message", [
    (codex(previous_response_id="resp_1"), '"previous_response_id" refers to a response'),
    (codex(store=True), '"store": true asks to keep the response'),
    (codex(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0]: an item_reference needs"),
    (codex(tools=[{"type": "function", "parameters": {}}]), "a function or custom tool needs a name"),
], ids=["previous-response-id", "store-true", "item-reference", "function-without-name"])
def test_state_the_proxy_does_not_keep_is_refused(body, message):
    with pytest.raises(proxypal.ClientError) as info:
        R_OA.request(body)
    assert message in info.value.message and info.value.status == 400


def test_web_search_goes_to_anthropic_as_its_server_tool():
    out = R_AN.request(codex(tools=[{"type": "web_search"}]))
    assert without_cache_marks(out["tools"]) == [{"type": "web_search_20250305", "name": "web_search"}]


HOSTED = [{"type": "web_search", "external_web_access": True}, {"type": "file_search", "vector_store_ids": ["v"]},
          {"type": "image_generation"}, {"type": "some_future_tool"}]


@pytest.mark.parametrize("translator,expected", [
    (R_OA, [{"type": "function", "function": {"name": "shell", "description": "Run",
                                              "parameters": SHELL["parameters"]}}]),
    (R_AN, [{"name": "shell", "description": "Run", "input_schema": SHELL["parameters"]},
            {"type": "web_search_20250305", "name": "web_search"}]),
    (R_GE, [{"functionDeclarations": [{"name": "shell", "description": "Run",
                                       "parameters": SHELL["parameters"]}]}]),
], ids=["openai", "anthropic", "gemini"])
def test_hosted_tools_codex_offers_by_default_are_left_out_where_the_upstream_lacks_them(
        translator, expected, caplog):
    """Codex lists web_search with every turn; a refusal would end every session on an
    upstream without it, so the tools the upstream cannot run are left out instead, with
    a warning once per process."""
    proxypal._TOOLS_LEFT_OUT.clear()
    out = translator.request(codex(tools=[SHELL] + HOSTED))
    assert without_cache_marks(out["tools"]) == expected
    warned = [r.getMessage() for r in caplog.records if "is left out of requests" in r.getMessage()]
    assert any("'file_search'" in m for m in warned)
    caplog.clear()
    translator.request(codex(tools=[SHELL] + HOSTED))
    assert not [r for r in caplog.records if "is left out of requests" in r.getMessage()]


def test_gemini_gets_google_search_when_no_functions_are_declared():
    assert R_GE.request(codex(tools=HOSTED[:1]))["tools"] == [{"googleSearch": {}}]


TOOL_SEARCH = {"type": "tool_search", "execution": "client", "description": "Find deferred tools",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                              "required": ["query"]}}
SEARCH_HISTORY = [
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "File an issue"}]},
    {"type": "tool_search_call", "call_id": "ts_1", "execution": "client", "status": "completed",
     "arguments": {"query": "github issue"}},
    {"type": "tool_search_output", "call_id": "ts_1", "execution": "client", "status": "completed",
     "tools": [{"type": "namespace", "name": "mcp_github", "description": "GitHub", "tools": [
         {"type": "function", "name": "create_issue", "parameters": {"type": "object", "properties": {}}}]}]},
]


def test_tool_search_is_a_function_and_the_tools_it_found_join_the_request():
    out = R_OA.request(codex(input=SEARCH_HISTORY, tools=[SHELL, TOOL_SEARCH]))
    names = [t["function"]["name"] for t in out["tools"]]
    assert names == ["shell", "tool_search", "mcp_github__create_issue"]
    assert out["tools"][1]["function"]["parameters"] == TOOL_SEARCH["parameters"]
    assert out["messages"][2]["tool_calls"][0] == {"id": "ts_1", "type": "function", "function": {
        "name": "tool_search", "arguments": '{"query":"github issue"}'}}
    assert out["messages"][3] == {"role": "tool", "tool_call_id": "ts_1",
                                  "content": "Tools loaded: mcp_github"}


def test_a_tool_search_call_goes_back_as_its_own_item():
    chat = R_OA.read(codex(tools=[TOOL_SEARCH]))
    answer = {"id": "c1", "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_5", "type": "function", "function": {"name": "tool_search",
                                                           "arguments": '{"query":"calendar"}'}}]},
        "finish_reason": "tool_calls"}]}
    item = R_OA.response(answer, "m", chat)["output"][0]
    assert item == {"id": "tsc_call_5", "type": "tool_search_call", "status": "completed",
                    "call_id": "call_5", "execution": "client", "arguments": {"query": "calendar"}}
    streamed = run_stream(R_OA, [
        chunk({"tool_calls": [{"index": 0, "id": "call_5", "type": "function",
                               "function": {"name": "tool_search", "arguments": '{"query":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"calendar"}'}}]}),
        chunk(finish="tool_calls"), chunk(usage=USAGE), ("", "[DONE]")], chat)
    assert [n for n, _ in streamed] == ["response.created", "response.in_progress",
                                        "response.output_item.added", "response.output_item.done",
                                        "response.completed"]
    assert streamed[3][1]["item"] == item


# -- whole answers ----------------------------------------------------------------------

def openai_answer(finish: str = "tool_calls") -> Dict[str, Any]:
    return {"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "up", "choices": [{
        "index": 0, "finish_reason": finish, "message": {
            "role": "assistant", "content": "Patching.", "reasoning_content": "Plan it.", "tool_calls": [
                {"id": "call_2", "type": "function",
                 "function": {"name": "apply_patch", "arguments": json.dumps({"input": PATCH_TEXT})}}]}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                  "prompt_tokens_details": {"cached_tokens": 60},
                  "completion_tokens_details": {"reasoning_tokens": 5}}}


def test_openai_answer_as_a_response_object():
    chat = R_OA.read(codex(tools=[SHELL, PATCH], metadata={"k": "v"}))
    out = R_OA.response(openai_answer(), "m", chat)
    assert out["id"] == "resp_chatcmpl-9" and out["object"] == "response" and out["status"] == "completed"
    assert out["model"] == "m" and out["metadata"] == {"k": "v"} and out["instructions"] == "You are Codex."
    kinds = [i["type"] for i in out["output"]]
    assert kinds == ["reasoning", "message", "custom_tool_call"]
    assert out["output"][0]["summary"] == [{"type": "summary_text", "text": "Plan it."}]
    assert out["output"][2] == {"id": "ctc_call_2", "type": "custom_tool_call", "status": "completed",
                                "call_id": "call_2", "name": "apply_patch", "input": PATCH_TEXT}
    assert out["usage"] == {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 60},
                            "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 5},
                            "total_tokens": 120}


def test_length_is_incomplete():
    out = R_OA.response(openai_answer("length"), "m", None)
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}


def test_anthropic_answer_carries_its_signature_as_encrypted_content():
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "c",
              "content": [{"type": "thinking", "thinking": "Hm", "signature": "EqQB"},
                          {"type": "tool_use", "id": "toolu_1", "name": "shell", "input": {"command": ["ls"]}}],
              "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 3}}
    out = R_AN.response(answer, "m", R_AN.read(codex(tools=[SHELL])))
    assert out["output"][0]["encrypted_content"] == "pp1:anthropic:EqQB"
    assert out["output"][1] == {"id": "fc_toolu_1", "type": "function_call", "status": "completed",
                                "call_id": "toolu_1", "name": "shell", "arguments": '{"command":["ls"]}'}


# -- streams ----------------------------------------------------------------------------

def sse(events: List[Tuple[str, Any]]) -> bytes:
    out = b""
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        out += (f"event: {name}\n" if name else "").encode() + f"data: {text}\n\n".encode()
    return out


def decoded(events: List[Tuple[str, str]]) -> List[Tuple[str, Any]]:
    out = []
    for name, data in events:
        obj = json.loads(data)
        if "response" in obj:
            obj["response"]["created_at"] = 0
        out.append((name, obj))
    return out


class Pipe:
    def __init__(self, translator: Any, ask: Any) -> None:
        self.splitter, self.reader = proxypal.SSESplitter(), translator.stream("m", 0, ask)

    def feed(self, data: bytes) -> list:
        return [e for b in self.splitter.feed(data) for e in self.reader.feed(*(proxypal.parse_sse_event(b) or ("", "")))]

    def finish(self) -> list:
        return [e for b in self.splitter.close() for e in self.reader.feed(*proxypal.parse_sse_event(b))] \
            + self.reader.close()


def run_stream(translator: Any, upstream: List[Tuple[str, Any]], ask: Any = None) -> List[Tuple[str, Any]]:
    whole = translator.stream("m", 0, ask)
    out = []
    for name, data in upstream:
        out += whole.feed(name or "message", data if isinstance(data, str) else json.dumps(data))
    out = decoded(out + whole.close())
    assert feed_all_ways(lambda: Pipe(translator, ask), sse(upstream), lambda p: p.finish(), decoded) == out
    assert_responses_grammar(out)
    return out


def assert_responses_grammar(events: List[Tuple[str, Any]]) -> None:
    """What openai-python's stream helper and Codex rely on: created first, every event
    typed and numbered 0, 1, 2...; items added with output_index 0, 1, 2... before anything
    names them, each done once; one terminal event, whose output holds every done item."""
    assert events and events[0][0] == "response.created"
    assert [obj["sequence_number"] for _, obj in events] == list(range(len(events)))
    assert all(name == obj["type"] for name, obj in events)
    added, done, parts = [], {}, set()
    for name, obj in events:
        if name == "response.output_item.added":
            assert obj["output_index"] == len(added)
            added.append(obj["item"]["id"])
        elif name == "response.content_part.added":
            parts.add((obj["output_index"], obj["content_index"]))
        elif name in ("response.output_text.delta",):
            assert (obj["output_index"], obj["content_index"]) in parts
        elif name == "response.output_item.done":
            assert obj["item"]["id"] == added[obj["output_index"]] and obj["output_index"] not in done
            done[obj["output_index"]] = obj["item"]
        elif "output_index" in obj:
            assert obj["output_index"] < len(added) and obj["output_index"] not in done
    terminal = [n for n, _ in events if n in ("response.completed", "response.incomplete", "response.failed")]
    assert len(terminal) == 1 and events[-1][0] == terminal[0]
    final = events[-1][1]["response"]
    assert isinstance(final["id"], str) and final["id"].startswith("resp_")
    if terminal[0] != "response.failed":
        assert final["output"] == [done[i] for i in range(len(added))]
        assert all(isinstance(final["usage"][k], int) for k in ("input_tokens", "output_tokens", "total_tokens"))


def chunk(delta: Dict[str, Any] = None, finish: str = None, usage: Dict[str, Any] = None) -> Tuple[str, Any]:
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if usage is None else []}
    if usage is not None:
        body["usage"] = usage
    return "", body


USAGE = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
OPENAI_TOOL_STREAM = [
    chunk({"role": "assistant", "reasoning_content": "Plan"}), chunk({"content": "Edit"}),
    chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "shell", "arguments": '{"command":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '["ls"]}'}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                           "function": {"name": "apply_patch", "arguments": json.dumps({"input": PATCH_TEXT})}}]}),
    chunk(finish="tool_calls"), chunk(usage=USAGE), ("", "[DONE]")]


def test_openai_stream_as_the_full_responses_sequence():
    ask = R_OA.read(codex(tools=[SHELL, PATCH]))
    out = run_stream(R_OA, OPENAI_TOOL_STREAM, ask)
    names = [n for n, _ in out]
    assert names == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done", "response.output_item.done", "response.completed"]
    final = out[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call", "custom_tool_call"]
    assert final["output"][2]["arguments"] == '{"command":["ls"]}'
    assert final["output"][3]["input"] == PATCH_TEXT
    assert final["usage"]["input_tokens"] == 10 and final["usage"]["output_tokens"] == 4


def test_cut_stream_ends_with_error_and_response_failed():
    out = run_stream(R_OA, OPENAI_TOOL_STREAM[:3])
    assert [n for n, _ in out][-2:] == ["error", "response.failed"]
    failed = out[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "ended the stream before" in failed["error"]["message"]


def test_rate_limit_error_mid_stream_tells_codex_to_wait():
    out = run_stream(R_OA, OPENAI_TOOL_STREAM[:2] + [("", {"error": {"code": 429, "message": "Slow down"}})])
    assert out[-1][1]["response"]["error"] == {"code": "rate_limit_exceeded", "message": "Slow down"}


def test_length_ends_with_response_incomplete():
    out = run_stream(R_OA, [chunk({"content": "Cut"}), chunk(finish="length"), chunk(usage=USAGE)])
    assert out[-1][0] == "response.incomplete"
    assert out[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out[-1][1]["response"]["output"][0]["status"] == "incomplete"


def anthropic(kind: str, **fields: Any) -> Tuple[str, Any]:
    return kind, {"type": kind, **fields}


ANTHROPIC_STREAM = [
    anthropic("message_start", message={"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                        "model": "c", "usage": {"input_tokens": 7, "output_tokens": 1}}),
    anthropic("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
    anthropic("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hm"}),
    anthropic("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "EqQB"}),
    anthropic("content_block_stop", index=0),
    anthropic("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_1",
                                                              "name": "shell", "input": {}}),
    anthropic("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": '{"command":["ls"]}'}),
    anthropic("content_block_stop", index=1),
    anthropic("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 9}),
    anthropic("message_stop")]


def test_anthropic_stream_keeps_the_signature_in_the_reasoning_item():
    out = run_stream(R_AN, ANTHROPIC_STREAM, R_AN.read(codex(tools=[SHELL])))
    final = out[-1][1]["response"]
    assert final["output"][0]["encrypted_content"] == "pp1:anthropic:EqQB"
    assert final["output"][1]["type"] == "function_call" and final["output"][1]["call_id"] == "toolu_1"
    assert final["usage"]["output_tokens"] == 9


def test_gemini_stream_whole_calls():
    parts = [{"text": "Run it."}, {"functionCall": {"name": "shell", "args": {"command": ["ls"]}}}]
    upstream = [("", {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}],
                      "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3, "totalTokenCount": 8},
                      "responseId": "g1"})]
    out = run_stream(R_GE, upstream, R_GE.read(codex(tools=[SHELL])))
    final = out[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["arguments"] == '{"command":["ls"]}'


def test_replayed_whole_answer_obeys_the_grammar():
    events = R_OA.replay(openai_answer(), "m", 0, R_OA.read(codex(tools=[SHELL, PATCH])))
    assert_responses_grammar(decoded(events))


# -- the Responses API as the upstream (wireApi "responses") ---------------------------

AN_R = proxypal.TRANSLATORS[("anthropic", "responses")]
OA_R = proxypal.TRANSLATORS[("openai", "responses")]
GE_R = proxypal.TRANSLATORS[("gemini", "responses")]


def test_claude_code_turn_as_a_responses_request():
    body = {"model": "m", "max_tokens": 32000, "stream": True,
            "system": [{"type": "text", "text": "You are Claude Code."}],
            "thinking": {"type": "enabled", "budget_tokens": 8000},
            "tools": [{"name": "Bash", "description": "Run", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "List files"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "ls", "signature": "pp1:responses:gAAAA-blob"},
                    {"type": "thinking", "thinking": "other", "signature": "EqQB-anthropic"},
                    {"type": "text", "text": "Listing."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"},
                    {"type": "text", "text": "Now read it"}]}]}
    assert AN_R.request(body) == {
        "model": "m", "instructions": "You are Claude Code.", "store": False,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List files"}]},
            {"type": "reasoning", "encrypted_content": "gAAAA-blob",
             "summary": [{"type": "summary_text", "text": "ls"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Listing."}]},
            {"type": "function_call", "call_id": "toolu_1", "name": "Bash", "arguments": '{"command":"ls"}'},
            {"type": "function_call_output", "call_id": "toolu_1", "output": "a.txt"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Now read it"}]}],
        "max_output_tokens": 32000, "stream": True,
        "tools": [{"type": "function", "name": "Bash", "description": "Run",
                   "parameters": {"type": "object", "properties": {}}, "strict": False}],
        "reasoning": {"effort": "medium", "summary": "auto"}, "include": ["reasoning.encrypted_content"]}


def test_openai_chat_request_with_schema_and_choice_as_responses():
    out = OA_R.request({"model": "m", "messages": [{"role": "system", "content": "Be brief"},
                                                   {"role": "user", "content": "Hi"}],
                        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                        "tool_choice": {"type": "function", "function": {"name": "f"}},
                        "response_format": {"type": "json_schema", "json_schema": {
                            "name": "o", "strict": True, "schema": {"type": "object"}}},
                        "max_completion_tokens": 50, "temperature": 0.2})
    assert out["input"][0] == {"type": "message", "role": "developer",
                               "content": [{"type": "input_text", "text": "Be brief"}]}
    assert out["tool_choice"] == {"type": "function", "name": "f"}
    assert out["text"] == {"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"},
                                      "strict": True}}
    assert out["max_output_tokens"] == 50 and out["temperature"] == 0.2 and "reasoning" not in out


RESPONSE = {"id": "resp_9", "object": "response", "status": "completed", "output": [
    {"id": "rs_1", "type": "reasoning", "encrypted_content": "gAAAA-blob",
     "summary": [{"type": "summary_text", "text": "Plan"}]},
    {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
     "content": [{"type": "output_text", "text": "Listing.", "annotations": []}]},
    {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "Bash",
     "arguments": '{"command":"ls"}'}],
    "usage": {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 7,
              "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 27}}


def test_responses_answer_for_an_anthropic_client():
    msg = AN_R.response(RESPONSE, "m")
    assert msg["content"] == [
        {"type": "thinking", "thinking": "Plan", "signature": "pp1:responses:gAAAA-blob"},
        {"type": "text", "text": "Listing."},
        {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}]
    assert msg["stop_reason"] == "tool_use"
    assert msg["usage"]["input_tokens"] == 15 and msg["usage"]["cache_read_input_tokens"] == 5


def r_event(kind: str, **fields: Any) -> Tuple[str, Any]:
    return kind, {"type": kind, **fields}


RESPONSES_STREAM = [
    r_event("response.created", response={"id": "resp_9", "status": "in_progress", "output": []}),
    r_event("response.in_progress", response={"id": "resp_9", "status": "in_progress", "output": []}),
    r_event("response.output_item.added", output_index=0, item={"id": "rs_1", "type": "reasoning", "summary": []}),
    r_event("response.reasoning_summary_text.delta", output_index=0, item_id="rs_1", summary_index=0, delta="Plan"),
    r_event("response.output_item.done", output_index=0, item=RESPONSE["output"][0]),
    r_event("response.output_item.added", output_index=1, item={"id": "msg_1", "type": "message", "content": []}),
    r_event("response.output_text.delta", output_index=1, item_id="msg_1", content_index=0, delta="List"),
    r_event("response.output_text.delta", output_index=1, item_id="msg_1", content_index=0, delta="ing."),
    r_event("response.output_item.done", output_index=1, item=RESPONSE["output"][1]),
    r_event("response.output_item.added", output_index=2, item=dict(RESPONSE["output"][2], arguments="")),
    r_event("response.function_call_arguments.delta", output_index=2, item_id="fc_1", delta='{"command":'),
    r_event("response.function_call_arguments.delta", output_index=2, item_id="fc_1", delta='"ls"}'),
    r_event("response.function_call_arguments.done", output_index=2, item_id="fc_1", arguments='{"command":"ls"}'),
    r_event("response.output_item.done", output_index=2, item=RESPONSE["output"][2]),
    r_event("response.completed", response=RESPONSE)]


def client_events(translator: Any, upstream: List[Tuple[str, Any]]) -> List[Tuple[str, Any]]:
    """The client's events for an upstream transcript, the same fed whole, bytewise and cut
    at every byte."""
    def parsed(events: List[Tuple[str, str]]) -> List[Tuple[str, Any]]:
        out = [(n, d if d.strip() == "[DONE]" else json.loads(d)) for n, d in events]
        for _, obj in out:
            if isinstance(obj, dict):
                obj.pop("created", None)           # the clock may tick between feeds
        return out
    return feed_all_ways(lambda: Pipe(translator, None), sse(upstream), lambda p: p.finish(), parsed)


def test_responses_stream_for_an_anthropic_client():
    out = client_events(AN_R, RESPONSES_STREAM)
    names = [n for n, _ in out]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    deltas = [d["delta"] for n, d in out if n == "content_block_delta"]
    assert deltas == [{"type": "thinking_delta", "thinking": "Plan"},
                      {"type": "signature_delta", "signature": "pp1:responses:gAAAA-blob"},
                      {"type": "text_delta", "text": "List"}, {"type": "text_delta", "text": "ing."},
                      {"type": "input_json_delta", "partial_json": '{"command":'},
                      {"type": "input_json_delta", "partial_json": '"ls"}'}]
    final = out[-2][1]
    assert final["delta"]["stop_reason"] == "tool_use" and final["usage"]["output_tokens"] == 7


def test_responses_stream_for_an_openai_client_and_its_cut():
    out = client_events(OA_R, RESPONSES_STREAM)
    assert out[-1] == ("", "[DONE]")
    finish = [c for _, c in out[:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish[0]["choices"][0]["finish_reason"] == "tool_calls"
    cut = client_events(OA_R, RESPONSES_STREAM[:8])
    assert "error" in cut[-1][1] and "response.completed" in cut[-1][1]["error"]["message"]


@pytest.mark.parametrize("terminal,status", [
    (r_event("response.failed", response={"id": "r", "status": "failed",
                                          "error": {"code": "rate_limit_exceeded", "message": "Slow down"}}), 429),
    (r_event("error", code="server_error", message="Boom"), 502)], ids=["failed", "error-event"])
def test_a_failed_responses_stream_fails_the_client_stream(terminal, status):
    out = client_events(GE_R, RESPONSES_STREAM[:7] + [terminal])
    assert out[-1][1]["error"]["code"] == status


def test_a_gemini_calls_own_signature_goes_to_codex_and_back():
    """Gemini 3 signs its functionCall parts; Codex keeps reasoning items, so the signature
    rides in one before the call and reaches Gemini again on that call."""
    answer = {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"id": "call_1", "name": "shell", "args": {"command": ["ls"]}},
         "thoughtSignature": "Zz"}]}, "index": 0, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}, "responseId": "r1"}
    whole = R_GE.response(answer, "m", R_GE.read(codex(tools=[SHELL])))["output"]
    streamed = [json.loads(d)["item"] for e, d in R_GE.replay(answer, "m", 0, R_GE.read(codex(tools=[SHELL])))
                if e == "response.output_item.done"]
    for output in (whole, streamed):
        assert [i["type"] for i in output] == ["reasoning", "function_call"]
        assert output[0]["encrypted_content"] == "pp1:gemini:Zz"
    history = codex(tools=[SHELL], input=[{"type": "message", "role": "user", "content": "ls"},
                                          *whole, {"type": "function_call_output", "call_id": "call_1",
                                                   "output": "a.txt"}])
    parts = R_GE.request(history)["contents"][1]["parts"]
    assert [p.get("thoughtSignature") for p in parts if "functionCall" in p] == ["Zz"]


@pytest.mark.parametrize("model, cap", [
    ("claude-sonnet-4-5-20250929", 64000), ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", 64000),
    ("claude-haiku-4-5", 64000), ("claude-opus-4-5-20251101", 64000),
    # before 4.5, input + max_tokens over the window is a 400: a larger default would end
    # long sessions early
    ("claude-sonnet-4-20250514", 8192), ("claude-3-7-sonnet-20250219", 8192), ("claude-opus-4-1-20250805", 8192),
    ("claude-3-5-haiku-20241022", 8192), ("anthropic.claude-3-haiku-20240307-v1:0", 4096),
    ("my-azure-deployment", 8192),
])
def test_a_request_without_a_cap_gets_the_models_own(model, cap):
    """Codex never sends max_output_tokens: a long apply_patch cut at 8192 tokens failed the
    turn on models that allow 64,000; a cap above a model's own is a 400."""
    assert R_AN.request(codex(model=model, tools=[SHELL, PATCH]))["max_tokens"] == cap
    assert proxypal.anthropic_default_cap(model) == cap


@pytest.mark.parametrize("model, json_mode", [("gemini-2.5-flash", False), ("gemini-3-pro-preview", True),
                                              ("my-gemini-compatible", True)])
def test_codex_output_schema_beside_tools_is_a_request_each_gemini_takes(model, json_mode):
    """`codex exec --output-schema` sends text.format json_schema with its tools; Gemini 2.x
    answers 400 to JSON mode beside function declarations, so there the schema goes in the
    instructions."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = R_GE.request(codex(model=model, tools=[SHELL], text={"format": {
        "type": "json_schema", "name": "codex_output_schema", "strict": True, "schema": schema}}))
    assert any("functionDeclarations" in t for t in out["tools"])
    config = out.get("generationConfig", {})
    assert (config.get("responseMimeType") == "application/json") == json_mode
    instructions = json.dumps(out["systemInstruction"])
    assert (json.dumps(json.dumps(schema, separators=(",", ":")))[1:-1] in instructions) != json_mode
