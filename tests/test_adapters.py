"""Upstream adapters (section 9.3): the request each dialect builds, its errors and hints,
its decoder and its `check` probe, without sockets."""
from __future__ import annotations

import json

import pytest

from helpers import proxypal

CLIENT = {"anthropic-version": "2023-06-01", "anthropic-beta": "b1", "user-agent": "ua/1",
          "authorization": "Bearer proxypal-local", "x-api-key": "proxypal-local",
          "openai-beta": "assistants=v2", "accept": "text/event-stream"}


def upstream(section: str, entry: dict, environ: dict = None):
    config = proxypal.parse_config({section: [entry]})
    return list(proxypal.make_upstreams(config, environ or {}).values())[0]


def test_openai_compatible_request():
    up = upstream("ampOpenaiProviders", {"name": "Groq", "baseUrl": "https://api.groq.com/openai/v1/",
                                         "apiKey": "gsk", "models": ["m"], "headers": {"X-Title": "me"}})
    req = up.request("generate", "llama", {"model": "alias", "messages": []}, True, CLIENT)
    assert req.url == "https://api.groq.com/openai/v1/chat/completions"
    assert json.loads(req.body) == {"model": "llama", "messages": []}
    assert req.headers["authorization"] == "Bearer gsk" and req.headers["x-title"] == "me"
    assert req.headers["openai-beta"] == "assistants=v2" and req.headers["user-agent"] == "ua/1"
    assert "x-api-key" not in req.headers and "anthropic-version" not in req.headers
    assert up.serves("embeddings") and not up.serves("count")
    empty = upstream("ampOpenaiProviders", {"name": "Ollama", "baseUrl": "http://localhost:11434/v1",
                                            "models": ["m"]})
    assert "authorization" not in empty.request("generate", "m", {}, False, {}).headers


def test_api_openai_com_gets_max_completion_tokens_and_no_reasoning_content_when_translated():
    up = upstream("ampOpenaiProviders", {"name": "OpenAI", "baseUrl": "https://api.openai.com/v1",
                                         "apiKey": "sk", "models": ["o3"]})
    body = {"max_tokens": 10, "messages": [{"role": "assistant", "content": "x", "reasoning_content": "r"}]}
    sent = json.loads(up.request("generate", "o3", dict(body), False, {}, translated=True).body)
    assert sent == {"model": "o3", "max_completion_tokens": 10,
                    "messages": [{"role": "assistant", "content": "x"}]}
    relayed = json.loads(up.request("generate", "o3", {"max_tokens": 10}, False, {}, translated=False).body)
    assert relayed == {"max_tokens": 10, "model": "o3"}


def test_anthropic_request_headers_and_beta_query():
    up = upstream("claudeApiKeys", {"apiKey": "sk-ant"})
    req = up.request("generate", "claude-x", {"model": "a", "max_tokens": 5}, True, CLIENT, "beta=true")
    assert req.url == "https://api.anthropic.com/v1/messages?beta=true"
    assert req.headers["x-api-key"] == "sk-ant" and req.headers["anthropic-version"] == "2023-06-01"
    assert req.headers["anthropic-beta"] == "b1" and "authorization" not in req.headers
    assert json.loads(req.body)["model"] == "claude-x"
    assert up.request("count", "c", {}, False, {}).url.endswith("/v1/messages/count_tokens")
    assert up.request("generate", "c", {}, False, {}).headers["anthropic-version"] == "2023-06-01"


def test_configured_authorization_replaces_the_key_and_configured_headers_win():
    up = upstream("claudeApiKeys", {"apiKey": "unused", "baseUrl": "https://r.services.ai.azure.com/anthropic/v1",
                                    "headers": {"Authorization": "Bearer entra", "anthropic-version": "2099-01-01"}})
    assert isinstance(up, proxypal.AzureUpstream)
    req = up.request("generate", "claude-x", {}, False, CLIENT)
    assert req.url == "https://r.services.ai.azure.com/anthropic/v1/messages"
    assert req.headers["authorization"] == "Bearer entra"
    assert "x-api-key" not in req.headers and "api-key" not in req.headers
    assert req.headers["anthropic-version"] == "2099-01-01"


def test_azure_sends_both_key_headers_and_explains_unknown_deployments():
    up = upstream("claudeApiKeys", {"apiKey": "az", "baseUrl": "https://r.services.ai.azure.com/anthropic"})
    headers = up.request("generate", "claude-opus-4-5", {}, False, {}).headers
    assert headers["x-api-key"] == headers["api-key"] == "az"
    for body in (b'{"error":{"code":"DeploymentNotFound","message":"no"}}', b"Not Found"):
        hint = up.hint(404, "u", body, "claude-opus-4-5", "claude-opus-4-5-20251101")
        assert "add model aliasing" in hint and "claude-opus-4-5-20251101" in hint


def test_bedrock_request_is_signed_and_keeps_aws_headers_private():
    entry = {"apiKey": "x", "baseUrl": "https://bedrock-runtime.us-west-2.amazonaws.com",
             "headers": {"x-amz-access-key": "AKID", "x-amz-secret-key": "SECRET", "X-Amzn-Bedrock-Trace": "ENABLED"}}
    up = upstream("claudeApiKeys", entry)
    assert isinstance(up, proxypal.BedrockUpstream)
    req = up.request("generate", "anthropic.claude-x-v1:0", {"model": "a", "stream": True, "max_tokens": 5,
                                                             "messages": []}, True, CLIENT)
    assert req.url == "https://bedrock-runtime.us-west-2.amazonaws.com/model/anthropic.claude-x-v1:0/invoke-with-response-stream"
    assert req.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKID/")
    assert "/us-west-2/bedrock/aws4_request" in req.headers["authorization"]
    assert not any(k.startswith("x-amz-") and k not in ("x-amz-date",) for k in req.headers)
    assert "SECRET" not in json.dumps(req.headers) and req.headers["x-amzn-bedrock-trace"] == "ENABLED"
    body = json.loads(req.body)
    assert "model" not in body and "stream" not in body
    assert body["anthropic_version"] == "bedrock-2023-05-31"
    keyed = upstream("claudeApiKeys", {"apiKey": "brk", "baseUrl": entry["baseUrl"]})
    assert keyed.request("generate", "m", {}, False, {}, ).headers["authorization"] == "Bearer brk"
    assert isinstance(up.decoder("application/vnd.amazon.eventstream"), proxypal.BedrockDecoder)


def test_bedrock_errors_and_count_answers_are_anthropic_shaped():
    up = upstream("claudeApiKeys", {"apiKey": "brk", "baseUrl": "https://bedrock-runtime.eu-west-1.amazonaws.com"})
    status, body = up.error(400, [("x-amzn-errortype", "ThrottlingException:http://x")], b'{"message":"slow"}')
    assert status == 429 and json.loads(body)["error"]["type"] == "rate_limit_error"
    assert json.loads(up.answer("count", b'{"inputTokens": 12}')) == {"input_tokens": 12}


def test_gemini_request_url_and_key():
    up = upstream("geminiApiKeys", {"apiKey": "AIza", "baseUrl": "https://generativelanguage.googleapis.com/v1beta/"})
    req = up.request("generate", "gemini-2.5-flash", {"contents": []}, True, CLIENT)
    assert req.url == ("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
                       ":streamGenerateContent?alt=sse")
    assert req.headers["x-goog-api-key"] == "AIza" and "authorization" not in req.headers
    assert json.loads(req.body) == {"contents": []}
    assert up.request("generate", "a/b", {}, False, {}).url.endswith("/models/a%2Fb:generateContent")
    assert up.request("count", "g", {}, False, {}).url.endswith("/models/g:countTokens")


@pytest.mark.parametrize("section,entry,url,method", [
    ("ampOpenaiProviders", {"name": "o", "baseUrl": "http://h/v1", "models": ["a", "b"]}, "http://h/v1/models", "GET"),
    ("geminiApiKeys", {"apiKey": "k"}, "https://generativelanguage.googleapis.com/v1beta/models?pageSize=1000", "GET"),
    ("claudeApiKeys", {"apiKey": "k"}, "https://api.anthropic.com/v1/models?limit=1000", "GET"),
    ("claudeApiKeys", {"apiKey": "k", "baseUrl": "https://r.services.ai.azure.com/anthropic",
                       "models": [{"name": "d", "alias": "c"}]},
     "https://r.services.ai.azure.com/anthropic/v1/messages", "POST"),
])
def test_check_probes(section, entry, url, method):
    probes = upstream(section, entry).probes()
    names, req = probes[0]
    assert req.url == url and req.method == method
    if method == "GET" and section == "claudeApiKeys":
        assert req.headers["anthropic-version"] == "2023-06-01"
    if method == "POST":
        assert json.loads(req.body) == {"max_tokens": 1, "messages": [{"role": "user", "content": "ping"}],
                                        "model": "d"}


def test_hints_follow_the_dialect():
    openai = upstream("ampOpenaiProviders", {"name": "o", "baseUrl": "http://h", "models": ["m"]})
    assert "check the apiKey of provider 'o'" in openai.hint(401, "u", b"", "m", "m")
    assert "must include the version segment" in openai.hint(404, "http://h/chat/completions", b"<html>", "m", "m")
    assert "does not know model 'm'" in openai.hint(404, "u", b'{"error":{"message":"model not found"}}', "m", "m")
    anthropic = upstream("claudeApiKeys", {"apiKey": "k", "baseUrl": "https://x.test/v1"})
    assert "without /v1" in anthropic.hint(404, "u", b"", "m", "m")
    assert openai.hint(500, "u", b"", "m", "m") == ""
