"""Amazon Bedrock: SigV4 known answers (PROTOCOLS.md F.4, and cases computed with
botocore's SigV4Auth with the clock fixed at 2025-01-01T00:00:00Z), the event-stream
frame of F.6 decoded every way with CRCs checked, body and error mapping."""
from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib

import pytest

from helpers import feed_all_ways, proxypal

BODY = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":16,"messages":[{"role":"user","content":"Hi"}]}'
CREDS = proxypal.AwsCredentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
HOST = "https://bedrock-runtime.{}.amazonaws.com"

SIGV4 = [
    ("protocols-f4", "us-east-1",
     HOST.format("us-east-1") + "/model/anthropic.claude-3-5-sonnet-20240620-v1:0/invoke",
     {"Content-Type": "application/json", "Accept": "application/json",
      "X-Amz-Content-SHA256": hashlib.sha256(BODY).hexdigest()}, "EXAMPLESESSIONTOKEN",
     "accept;content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token",
     "f1a372ce7e27c6a23c7d749f41605588eb048fe72a747e25f69428299751f753"),
    ("no-session-token", "us-west-2",
     HOST.format("us-west-2") + "/model/us.anthropic.claude-sonnet-4-20250514-v1:0/invoke-with-response-stream",
     {"Content-Type": "application/json"}, "", "content-type;host;x-amz-date",
     "de2cac9bb3fd2b613ec28de6eb2cd57ecfc1823df4e97ff7577c90400da516b1"),
    ("query-string", "us-west-2",
     HOST.format("us-west-2") + "/model/anthropic.claude-3-haiku-20240307-v1:0/invoke?b=2&a=x%20y&a=1",
     {"Content-Type": "application/json", "Accept": "application/json"}, "TOKEN2",
     "accept;content-type;host;x-amz-date;x-amz-security-token",
     "6c0c58f40edfbb8e9ef85acd7386611979e7f839ee9aa0a9040db17e47cc7658"),
    ("arn-model-id", "us-west-2",
     HOST.format("us-west-2") + "/model/" + proxypal.urllib.parse.quote(
         "arn:aws:bedrock:us-west-2:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0",
         safe=":") + "/invoke",
     {"Content-Type": "application/json"}, "", "content-type;host;x-amz-date",
     "c30df76a8361bb85fa4c41ab9aa463fffc9433d8211743a2dff3905e9c302637"),
]


@pytest.mark.parametrize("region,url,headers,token,signed,signature",
                         [c[1:] for c in SIGV4], ids=[c[0] for c in SIGV4])
def test_sigv4_known_answers(region, url, headers, token, signed, signature):
    creds = proxypal.AwsCredentials(CREDS.access_key, CREDS.secret_key, token)
    added = proxypal.sigv4_sign("POST", url, headers, BODY, creds, region, "20250101T000000Z")
    assert added["x-amz-date"] == "20250101T000000Z"
    assert added.get("x-amz-security-token", "") == token
    assert added["authorization"] == (
        f"AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20250101/{region}/bedrock/aws4_request, "
        f"SignedHeaders={signed}, Signature={signature}")


def test_bedrock_path_encodes_model_as_one_segment():
    assert proxypal.bedrock_path("anthropic.claude-3-opus-20240229-v1:0", "messages", False) == \
        "/model/anthropic.claude-3-opus-20240229-v1:0/invoke"
    assert proxypal.bedrock_path("us.anthropic.claude-sonnet-4-20250514-v1:0", "messages", True) == \
        "/model/us.anthropic.claude-sonnet-4-20250514-v1:0/invoke-with-response-stream"
    assert proxypal.bedrock_path("arn:aws:bedrock:us-east-1:1:inference-profile/x", "messages", False) == \
        "/model/arn:aws:bedrock:us-east-1:1:inference-profile%2Fx/invoke"
    assert proxypal.bedrock_path("m", "count", False) == "/model/m/count-tokens"


def test_bedrock_body():
    body = {"model": "claude-x", "stream": True, "max_tokens": 5, "messages": [], "system": "s"}
    out = proxypal.bedrock_body(body, "interleaved-thinking-2025-05-14, claude-code-20250219,oauth-2025-04-20")
    assert out == {"max_tokens": 5, "messages": [], "system": "s",
                   "anthropic_version": "bedrock-2023-05-31",
                   "anthropic_beta": ["interleaved-thinking-2025-05-14"]}
    assert "anthropic_beta" not in proxypal.bedrock_body(body, "")
    # Claude Code's betas for context_management and output_config.effort go along, tool
    # search under Bedrock's own name; the rest would be a 400 ValidationException
    claude_code = ("claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
                   "effort-2025-11-24,advanced-tool-use-2025-11-20,prompt-caching-scope-2026-01-05")
    assert proxypal.bedrock_body(body, claude_code)["anthropic_beta"] == [
        "interleaved-thinking-2025-05-14", "context-management-2025-06-27", "effort-2025-11-24",
        "tool-search-tool-2025-10-19"]
    counted = proxypal.bedrock_count_body({"model": "m", "messages": []}, "")
    inner = json.loads(base64.b64decode(counted["input"]["invokeModel"]["body"]))
    assert inner == {"messages": [], "max_tokens": 1, "anthropic_version": "bedrock-2023-05-31"}


@pytest.mark.parametrize("headers,environ,expected", [
    ((("x-amz-access-key", "AK"), ("x-amz-secret-key", "SK"), ("x-amz-region", "eu-west-1")), {},
     proxypal.AwsCredentials("AK", "SK", "")),
    ((("X-Amz-Access-Key", "AK"), ("X-Amz-Secret-Key", "SK"), ("x-amz-session-token", "T")), {"AWS_ACCESS_KEY_ID": "E"},
     proxypal.AwsCredentials("AK", "SK", "T")),
    ((), {"AWS_ACCESS_KEY_ID": "EA", "AWS_SECRET_ACCESS_KEY": "ES", "AWS_SESSION_TOKEN": "ET"},
     proxypal.AwsCredentials("EA", "ES", "ET")),
    ((), {}, None),
], ids=["headers", "headers-beat-env", "env", "none"])
def test_aws_credentials(headers, environ, expected):
    assert proxypal.aws_credentials(headers, environ) == expected


@pytest.mark.parametrize("base,headers,region", [
    ("https://bedrock-runtime.us-east-1.amazonaws.com", (), "us-east-1"),
    ("https://bedrock-runtime.eu-central-1.amazonaws.com", (("x-amz-region", "eu-west-3"),), "eu-west-3"),
    ("https://vpce-1.bedrock-runtime.us-west-2.vpce.amazonaws.com", (), "us-west-2"),
    ("https://api.anthropic.com", (), ""),
], ids=["host", "header-wins", "vpc-endpoint", "not-bedrock"])
def test_bedrock_region(base, headers, region):
    assert proxypal.bedrock_region(base, headers) == region


# PROTOCOLS.md F.6, byte for byte.
FRAME = bytes.fromhex(
    "000000d70000004bbff9e4380b3a6576656e742d747970650700056368756e6b0d3a636f6e74656e742d7479"
    "70650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b"
    "226279746573223a2265794a306558426c496a6f695932397564475675644639696247396a6131396b5a5778"
    "3059534973496d6c755a475634496a6f774c434a6b5a5778305953493665794a306558426c496a6f69644756"
    "346446396b5a57783059534973496e526c654851694f694a4961534a3966513d3d227d4b8e9495")
INNER = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}'


def make_frame(headers, payload: bytes) -> bytes:
    raw = b"".join(bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode()
                   for k, v in headers)
    prelude = struct.pack(">II", 12 + len(raw) + len(payload) + 4, len(raw))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw + payload
    return message + struct.pack(">I", zlib.crc32(message))


CHUNK_HEADERS = [(":event-type", "chunk"), (":content-type", "application/json"), (":message-type", "event")]


def test_worked_frame_matches_protocols():
    payload = b'{"bytes":"' + base64.b64encode(INNER) + b'"}'
    assert make_frame(CHUNK_HEADERS, payload) == FRAME
    assert len(FRAME) == 215 and FRAME[8:12].hex() == "bff9e438" and FRAME[-4:].hex() == "4b8e9495"


def test_event_stream_decoded_every_way():
    throttle = make_frame([(":exception-type", "throttlingException"), (":content-type", "application/json"),
                           (":message-type", "exception")],
                          b'{"message":"Too many requests, please wait before trying again."}')
    assert len(throttle) == 178
    out = feed_all_ways(proxypal.EventStreamDecoder, FRAME + FRAME + throttle)
    assert len(out) == 3
    headers, payload = out[0]
    assert headers == {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    assert proxypal.bedrock_event(headers, payload) == ("content_block_delta", INNER.decode())
    event, data = proxypal.bedrock_event(*out[2])
    assert event == "error" and json.loads(data) == {"type": "error", "error": {
        "type": "rate_limit_error",
        "message": "throttlingException: Too many requests, please wait before trying again."}}


@pytest.mark.parametrize("offset", [2, 9, 50, 213], ids=["prelude-length", "prelude-crc", "payload", "message-crc"])
def test_corrupt_frames_rejected(offset):
    bad = bytearray(FRAME)
    bad[offset] ^= 0x01
    decoder = proxypal.EventStreamDecoder()
    with pytest.raises(proxypal.UpstreamError) as info:
        decoder.feed(bytes(bad))
        decoder.feed(FRAME)                  # a corrupt length may need more bytes to show
    assert "corrupt Bedrock event stream" in info.value.message


def test_good_frames_before_a_corrupt_one_still_reach_the_client():
    """As botocore's decoder does: the good messages of a read go out, then the error."""
    bad = bytearray(FRAME)
    bad[-1] ^= 0x01
    decoder = proxypal.BedrockDecoder()
    assert decoder.feed(FRAME * 3 + bytes(bad)) == [("content_block_delta", INNER.decode())] * 3
    with pytest.raises(proxypal.UpstreamError, match="message CRC mismatch"):
        decoder.close()


def test_a_chunk_of_pretty_printed_json_stays_one_sse_data_line():
    inner = b'{\n  "type": "content_block_delta",\n  "delta": {"type": "text_delta", "text": "hi"}\n}'
    frame = make_frame(CHUNK_HEADERS, b'{"bytes":"' + base64.b64encode(inner) + b'"}')
    [(event, data)] = proxypal.BedrockDecoder().feed(frame)
    assert event == "content_block_delta" and "\n" not in data
    assert json.loads(data) == json.loads(inner)


def test_aws_credentials_from_the_environment_are_trimmed_as_the_sdks_trim_them():
    creds = proxypal.aws_credentials([], {"AWS_ACCESS_KEY_ID": "AKID ", "AWS_SECRET_ACCESS_KEY":
                                          " SECRET", "AWS_SESSION_TOKEN": "TOKEN \n"})
    assert (creds.access_key, creds.secret_key, creds.session_token) == ("AKID", "SECRET", "TOKEN")


@pytest.mark.parametrize("status,header,body,new_status,err_type", [
    (400, "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/", b'{"message":"bad"}', 400, "invalid_request_error"),
    (403, "UnrecognizedClientException:http://x/", b'{"Message":"bad key"}', 401, "authentication_error"),
    (403, "AccessDeniedException", b'{"message":"no access"}', 403, "permission_error"),
    (429, "ThrottlingException", b'{"message":"slow"}', 429, "rate_limit_error"),
    (503, "ServiceUnavailableException", b'{"message":"busy"}', 529, "overloaded_error"),
    (404, "", b'{"__type":"com.amazon#ResourceNotFoundException","message":"no model"}', 404, "not_found_error"),
    (424, "ModelErrorException", b"{}", 500, "api_error"),
], ids=["validation", "iam", "access", "throttle", "unavailable", "type-in-body", "model-error"])
def test_bedrock_errors_map_to_anthropic(status, header, body, new_status, err_type):
    got_status, out = proxypal.bedrock_error(status, header, body)
    err = json.loads(out)
    assert got_status == new_status and err["type"] == "error" and err["error"]["type"] == err_type


# -- end to end through a mock Bedrock that checks the signature --------------------


from helpers import ANTHROPIC_STREAM, anthropic_stream_named, request, send  # noqa: E402

ACCESS, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def verify_sigv4(rec, secret: str) -> bool:
    """Recompute the signature from exactly what arrived (signed headers, path, body)."""
    auth = rec.headers.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return False
    fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(","))
    access, date, region, service, _ = fields["Credential"].split("/")
    names = fields["SignedHeaders"].split(";")
    signed = {n: rec.headers[n] for n in names if n not in ("x-amz-date", "x-amz-security-token")}
    creds = proxypal.AwsCredentials(access, secret, rec.headers.get("x-amz-security-token", ""))
    url = "https://" + rec.headers["host"] + proxypal.urllib.parse.urlsplit(rec.path).path
    again = proxypal.sigv4_sign("POST", url, signed, rec.body, creds, region, rec.headers["x-amz-date"], service)
    return again["authorization"] == auth and service == "bedrock"


def mock_bedrock(handler, rec):
    if not verify_sigv4(rec, SECRET):
        send(handler, 403, b'{"message":"The request signature we calculated does not match."}',
             headers=(("x-amzn-ErrorType", "InvalidSignatureException:http://internal.amazon.com/coral/"),))
        return
    path = proxypal.urllib.parse.urlsplit(rec.path).path
    if path.endswith("/invoke"):
        send(handler, 200, json.dumps({"id": "msg_bdrk_1", "type": "message", "role": "assistant",
                                       "model": "anthropic.claude-3-opus-20240229-v1:0",
                                       "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                                       "stop_sequence": None,
                                       "usage": {"input_tokens": 3, "output_tokens": 1}}).encode())
    elif path.endswith("/count-tokens"):
        send(handler, 200, b'{"inputTokens": 42}')
    else:
        frames = b"".join(make_frame(CHUNK_HEADERS, b'{"bytes":"' + base64.b64encode(
            e.split(b"data: ", 1)[1].strip()) + b'"}') for e in ANTHROPIC_STREAM)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/vnd.amazon.eventstream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for i in range(0, len(frames), 100):          # frames split across TCP writes
            piece = frames[i:i + 100]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")


def bedrock_config(mock_url, secret=SECRET, **extra):
    return dict({"proxyUrl": mock_url, "claudeApiKeys": [{
        "apiKey": "your-aws-secret-access-key",
        "baseUrl": "http://bedrock-runtime.us-east-1.amazonaws.com",
        "headers": {"x-amz-access-key": ACCESS, "x-amz-secret-key": secret, "x-amz-region": "us-east-1"},
        "models": [{"name": "anthropic.claude-3-opus-20240229-v1:0", "alias": "claude-opus-4-5-20251101"},
                   {"name": "us.anthropic.claude-sonnet-4-20250514-v1:0", "alias": "claude-sonnet-4-5-20250929"}]}]},
        **extra)


HEADERS = {"x-api-key": "proxypal-local", "anthropic-version": "2023-06-01",
           "anthropic-beta": "interleaved-thinking-2025-05-14,claude-code-20250219"}


def ask(model, **extra):
    return dict({"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "Hello"}]}, **extra)


def test_bedrock_non_stream_signed_and_aliased(upstream, proxy):
    mock = upstream(mock_bedrock)
    p = proxy(bedrock_config(mock.url))
    status, _, body = request(p, "POST", "/v1/messages", ask("claude-opus-4-5-20251101"), HEADERS, key=None)
    assert status == 200, body
    assert json.loads(body)["model"] == "claude-opus-4-5-20251101"
    rec = mock.last()
    assert rec.path == "http://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-opus-20240229-v1:0/invoke"
    assert json.loads(rec.body) == {"max_tokens": 100, "messages": [{"role": "user", "content": "Hello"}],
                                    "anthropic_version": "bedrock-2023-05-31",
                                    "anthropic_beta": ["interleaved-thinking-2025-05-14"]}
    assert not [h for h in rec.headers if h.startswith("x-amz-") and h not in ("x-amz-date",)]
    assert "x-api-key" not in rec.headers and "anthropic-version" not in rec.headers


def test_bedrock_stream_decoded_to_anthropic_sse(upstream, proxy):
    mock = upstream(mock_bedrock)
    p = proxy(bedrock_config(mock.url))
    status, headers, body = request(p, "POST", "/v1/messages", ask("claude-sonnet-4-5-20250929", stream=True),
                                    HEADERS, key=None)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert body == b"".join(anthropic_stream_named("claude-sonnet-4-5-20250929"))
    rec = mock.last()
    assert rec.path.endswith("/model/us.anthropic.claude-sonnet-4-20250514-v1:0/invoke-with-response-stream")
    assert rec.headers["x-amzn-bedrock-accept"] == "application/json"


def test_bedrock_count_tokens(upstream, proxy):
    mock = upstream(mock_bedrock)
    p = proxy(bedrock_config(mock.url))
    status, _, body = request(p, "POST", "/v1/messages/count_tokens",
                              {"model": "claude-opus-4-5-20251101", "messages": [{"role": "user", "content": "Hi"}]},
                              HEADERS, key=None)
    assert (status, json.loads(body)) == (200, {"input_tokens": 42})


def test_bedrock_wrong_secret_is_an_auth_error(upstream, proxy):
    mock = upstream(mock_bedrock)
    p = proxy(bedrock_config(mock.url, secret="not-the-secret"))
    status, _, body = request(p, "POST", "/v1/messages", ask("claude-opus-4-5-20251101"), HEADERS, key=None)
    err = json.loads(body)
    assert status == 401 and err["error"]["type"] == "authentication_error"
    assert "InvalidSignatureException" in err["error"]["message"]
    assert "not-the-secret" not in body.decode()


def test_bedrock_api_key_as_bearer(upstream, proxy):
    seen = []

    def respond(handler, rec):
        seen.append(rec)
        send(handler, 200, json.dumps({"id": "m", "type": "message", "role": "assistant", "model": "x",
                                       "content": [], "stop_reason": "end_turn", "usage": {}}).encode())
    mock = upstream(respond)
    p = proxy({"proxyUrl": mock.url, "claudeApiKeys": [{"apiKey": "bedrock-api-key-123",
               "baseUrl": "http://bedrock-runtime.eu-west-1.amazonaws.com", "models": ["anthropic.claude-x"]}]},
              environ={})
    assert request(p, "POST", "/v1/messages", ask("anthropic.claude-x"), HEADERS, key=None)[0] == 200
    assert seen[0].headers["authorization"] == "Bearer bedrock-api-key-123"


def test_bedrock_exception_in_stream_becomes_error_event(upstream, proxy):
    def respond(handler, rec):
        first = make_frame(CHUNK_HEADERS, b'{"bytes":"' + base64.b64encode(
            ANTHROPIC_STREAM[0].split(b"data: ", 1)[1].strip()) + b'"}')
        boom = make_frame([(":exception-type", "modelStreamErrorException"), (":content-type", "application/json"),
                           (":message-type", "exception")], b'{"message":"model failed"}')
        send(handler, 200, first + boom, "application/vnd.amazon.eventstream")
    mock = upstream(respond)
    p = proxy(bedrock_config(mock.url))
    status, _, body = request(p, "POST", "/v1/messages", ask("claude-opus-4-5-20251101", stream=True), HEADERS, key=None)
    assert status == 200
    events = body.split(b"\n\n")
    assert events[0].startswith(b"event: message_start")
    assert events[1].startswith(b"event: error") and b"modelStreamErrorException: model failed" in events[1]


def test_bedrock_throttled_before_stream_is_http_429(upstream, proxy):
    def respond(handler, rec):
        boom = make_frame([(":exception-type", "throttlingException"), (":content-type", "application/json"),
                           (":message-type", "exception")], b'{"message":"Too many requests"}')
        send(handler, 200, boom, "application/vnd.amazon.eventstream")
    mock = upstream(respond)
    p = proxy(bedrock_config(mock.url))
    status, _, body = request(p, "POST", "/v1/messages", ask("claude-opus-4-5-20251101", stream=True), HEADERS, key=None)
    err = json.loads(body)
    assert status == 429 and err["error"]["type"] == "rate_limit_error"


def test_openai_client_reaches_bedrock_stream(upstream, proxy):
    """Translation and Bedrock together: an OpenAI-format client streams from Bedrock."""
    mock = upstream(mock_bedrock)
    p = proxy(bedrock_config(mock.url))
    status, _, body = request(p, "POST", "/v1/chat/completions", {
        "model": "claude-sonnet-4-5-20250929", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    chunks = [block.split(b"data: ", 1)[1] for block in body.split(b"\n\n") if block.strip()]
    assert status == 200 and chunks[-1] == b"[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"]) == "Hello"
    sent = json.loads(mock.last().body)
    assert sent["anthropic_version"] == "bedrock-2023-05-31" and "model" not in sent and "stream" not in sent
    assert sent["messages"][0]["role"] == "user" and sent["max_tokens"] > 0
