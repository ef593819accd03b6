"""The sans-I/O HTTP/1.1 wire: head scanning and parsing, body framing, chunked
decoding and SSE splitting, each decoder fed whole, bytewise and cut everywhere."""
from __future__ import annotations

from typing import List

import pytest

from helpers import feed_all_ways, proxypal, splits

WireError = proxypal.WireError


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


GOOD = head("POST /v1/messages?beta=true HTTP/1.1", "Host: localhost",
            "Content-Type: application/json", "X-Api-Key:  k1 ", "Accept: a", "Accept: b")


def test_parse_request_head_fields():
    req = proxypal.parse_request_head(GOOD)
    assert (req.method, req.path, req.query, req.version) == ("POST", "/v1/messages", "beta=true",
                                                              "HTTP/1.1")
    assert req.headers["x-api-key"] == "k1"
    assert req.headers["accept"] == "a, b"
    assert req.keep_alive


FIELD_LINES = [
    "Host: localhost", "X:", "X: ", "X:\t", "X:v", "X:  spaced value \t ", "X: tab\tinside",
    "X: caf\xe9", "X: \xff\x80", "!#$%&'*+-.^_`|~09azAZ: v", "X: a:b: c", "X-Empty-Then:",
    " X: folded", "\tX: folded", "X : v", "X\t: v", ": v", "X v", "", "X: a\x00b", "X: a\x7fb",
    "X: a\x1bb", "X: a\x0bb", "X(y): v", "X: " + "v" * 20000,
]


@pytest.mark.parametrize("lines", [
    [a, b] for a in FIELD_LINES for b in ("Accept: */*", "X: last ", "Y: \x01")
], ids=lambda lines: repr(lines)[:40])
def test_field_block_and_lines_agree(lines):
    """Good field lines are checked as one block; the line-by-line check is the reference
    for what is accepted, the values kept and the error said."""
    data = head("GET / HTTP/1.0", *lines)      # HTTP/1.0: no Host needed
    encoded = [line.encode("latin-1") for line in lines]
    block = "\r\n".join(lines)
    try:
        expected = proxypal.header_fields(encoded)
    except WireError as exc:
        assert not (len(block) <= proxypal.MAX_HEADER_FIELD and proxypal._FIELDS.fullmatch(block))
        with pytest.raises(WireError) as info:
            proxypal.parse_request_head(data)
        assert (info.value.message, info.value.status) == (exc.message, exc.status)
    else:
        assert bool(proxypal._FIELDS.fullmatch(block)) == (len(block) <= proxypal.MAX_HEADER_FIELD)
        assert proxypal.parse_request_head(data).raw_headers == expected


@pytest.mark.parametrize("version,connection,keep", [
    ("HTTP/1.1", None, True), ("HTTP/1.1", "close", False),
    ("HTTP/1.0", None, False), ("HTTP/1.0", "keep-alive", True),
], ids=["1.1-default", "1.1-close", "1.0-default", "1.0-keep-alive"])
def test_keep_alive_rules(version, connection, keep):
    lines = [f"GET /health {version}", "Host: x"] + ([f"Connection: {connection}"] if connection else [])
    assert proxypal.parse_request_head(head(*lines)).keep_alive is keep


def test_scan_head_finds_end_every_way():
    data = GOOD + b"BODY"
    for pieces in splits(data):
        buf, found = b"", -1
        for piece in pieces:
            buf += piece
            found = proxypal.scan_head(buf)
            if found > 0:
                break
        assert found == len(GOOD)


BAD_HEADS = [
    ("bare-lf", b"GET / HTTP/1.1\nHost: x\n\n", 400),
    ("bare-lf-in-field", b"GET / HTTP/1.1\r\nHost: x\nY: z\r\n\r\n", 400),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n", 400),
    ("long-request-line", b"GET /" + b"a" * proxypal.MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n", 414),
    ("long-field", b"GET / HTTP/1.1\r\nX: " + b"a" * proxypal.MAX_HEADER_FIELD + b"\r\n\r\n", 431),
    ("big-block", b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 10000 + b"\r\n" * 1 + (b"Y: " + b"b" * 10000 + b"\r\n") * 6 + b"\r\n", 431),
    ("many-fields", b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431),
]


@pytest.mark.parametrize("data,status", [(d, s) for _, d, s in BAD_HEADS], ids=[n for n, _, _ in BAD_HEADS])
def test_bad_heads_refused_however_they_arrive(data, status):
    trickled = [data[i:i + 97] for i in range(0, len(data), 97)]
    for pieces in ([data], trickled):         # whole, and in small uneven pieces
        buf = b""
        with pytest.raises(WireError) as info:
            for piece in pieces:
                buf += piece
                if proxypal.scan_head(buf) > 0:
                    proxypal.parse_request_head(buf[:proxypal.scan_head(buf)])
                    break
        assert info.value.status == status


PARSE_ERRORS = [
    ("obs-fold", head("GET / HTTP/1.1", "X: a", " folded"), 400),
    ("space-before-colon", head("GET / HTTP/1.1", "Host : x"), 400),
    ("nul-in-value", head("GET / HTTP/1.1", "X: a\x00b"), 400),
    ("control-in-value", head("GET / HTTP/1.1", "X: a\x01b"), 400),
    ("no-colon", head("GET / HTTP/1.1", "Xyz"), 400),
    ("two-part-request-line", head("GET /"), 400),
    ("double-space", head("GET  / HTTP/1.1"), 400),
    ("bad-version", head("GET / HTTX/1.1"), 400),
    ("http2", head("GET / HTTP/2.0"), 505),
    ("no-host", head("GET / HTTP/1.1"), 400),
    ("bad-method", head("G(T / HTTP/1.1"), 400),
]


@pytest.mark.parametrize("data,status", [(d, s) for _, d, s in PARSE_ERRORS],
                         ids=[n for n, _, _ in PARSE_ERRORS])
def test_parse_errors(data, status):
    with pytest.raises(WireError) as info:
        proxypal.parse_request_head(data)
    assert info.value.status == status


FRAMING = [
    ("none", ["POST / HTTP/1.1"], ("none", 0)),
    ("length", ["POST / HTTP/1.1", "Content-Length: 12"], ("length", 12)),
    ("same-duplicates", ["POST / HTTP/1.1", "Content-Length: 5", "Content-Length: 5"], ("length", 5)),
    ("same-list", ["POST / HTTP/1.1", "Content-Length: 5, 5"], ("length", 5)),
    ("chunked", ["POST / HTTP/1.1", "Transfer-Encoding: Chunked"], ("chunked", 0)),
]


@pytest.mark.parametrize("lines,expected", [(l, e) for _, l, e in FRAMING], ids=[n for n, _, _ in FRAMING])
def test_body_framing(lines, expected):
    lines = lines[:1] + ["Host: x"] + lines[1:]
    assert proxypal.body_framing(proxypal.parse_request_head(head(*lines))) == expected


BAD_FRAMING = [
    ("cl-and-te", ["POST / HTTP/1.1", "Content-Length: 5", "Transfer-Encoding: chunked"]),
    ("differing-cl", ["POST / HTTP/1.1", "Content-Length: 5", "Content-Length: 6"]),
    ("te-gzip", ["POST / HTTP/1.1", "Transfer-Encoding: gzip, chunked"]),
    ("te-identity", ["POST / HTTP/1.1", "Transfer-Encoding: identity"]),
    ("te-on-1.0", ["POST / HTTP/1.0", "Transfer-Encoding: chunked"]),
    ("cl-negative", ["POST / HTTP/1.1", "Content-Length: -1"]),
    ("cl-plus", ["POST / HTTP/1.1", "Content-Length: +5"]),
    ("cl-hex", ["POST / HTTP/1.1", "Content-Length: 0x10"]),
    ("cl-overflow", ["POST / HTTP/1.1", "Content-Length: 99999999999999999999999"]),
    ("cl-unicode-digit", ["POST / HTTP/1.1", "Content-Length: \xb2"]),
]


@pytest.mark.parametrize("lines", [l for _, l in BAD_FRAMING], ids=[n for n, _ in BAD_FRAMING])
def test_bad_framing_is_400(lines):
    with pytest.raises(WireError) as info:
        proxypal.body_framing(proxypal.parse_request_head(head(*lines[:1], "Host: x", *lines[1:])))
    assert info.value.status == 400


def chunked_result(data: bytes, limit: int = 1 << 20):
    def finish(decoder):
        return [("done", decoder.done, decoder.unused)]

    def normalize(out):                    # piece boundaries follow the cuts; bytes must not
        return b"".join(x for x in out if isinstance(x, bytes)), out[-1]
    return feed_all_ways(lambda: proxypal.ChunkedDecoder(limit), data, finish, normalize)


def chunked_body(pieces, size=lambda n: b"%x" % n, last=b"0\r\n\r\n"):
    return b"".join(size(len(piece)) + b"\r\n" + piece + b"\r\n" for piece in pieces) + last


EVENTS = [b'data: {"choices":[{"delta":{"content":"token %d"}}]}\n\n' % i for i in range(60)]   # > 2 KB
CRLF_EVENTS = [event.replace(b"\n", b"\r\n") for event in EVENTS]
CHUNKED = [
    ("simple", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world", b""),
    ("extensions", b"5;name=value;flag\r\nhello\r\n0;x=\"q d\"\r\n\r\n", b"hello", b""),
    ("uppercase-hex", b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", b""),
    ("trailers", b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n", b"abc", b""),
    ("pipelined-rest", b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n", b"abc", b"GET / HTTP/1.1\r\n"),
    ("burst-with-extension", b"1\r\na\r\n2\r\nbc\r\n3;x=y\r\ndef\r\n1\r\ng\r\n0\r\n\r\n", b"abcdefg", b""),
    ("quoted-pair-obs-text", b'3;y="\\\x80"\r\nabc\r\n0\r\n\r\n', b"abc", b""),   # RFC 9110 5.6.4
    ("long-burst", chunked_body(EVENTS), b"".join(EVENTS), b""),
    ("long-burst-crlf-in-data", chunked_body(CRLF_EVENTS), b"".join(CRLF_EVENTS), b""),
    ("long-burst-upper-hex-and-zeros", chunked_body(EVENTS, lambda n: b"00%X" % n),
     b"".join(EVENTS), b""),
    ("long-burst-extension-midway", chunked_body(EVENTS[:30]).replace(b"\r\n0\r\n\r\n", b"\r\n")
     + b"%x;ext=1\r\n%s\r\n" % (len(EVENTS[30]), EVENTS[30]) + chunked_body(EVENTS[31:]),
     b"".join(EVENTS), b""),
    ("long-burst-trailer", chunked_body(EVENTS, last=b"0\r\nX-Usage: 1\r\n\r\n"), b"".join(EVENTS), b""),
    ("burst-of-events", b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in [b"data: %d\n\n" % i for i in range(12)])
     + b"0\r\n\r\n", b"".join(b"data: %d\n\n" % i for i in range(12)), b""),
]


@pytest.mark.parametrize("data,body,rest", [(d, b, r) for _, d, b, r in CHUNKED],
                         ids=[n for n, _, _, _ in CHUNKED])
def test_chunked_decoder(data, body, rest):
    got, (_, done, unused) = chunked_result(data)
    assert got == body and done and unused == rest


BAD_CHUNKED = [
    ("not-hex", b"zz\r\nhello\r\n0\r\n\r\n", 400),
    ("negative", b"-5\r\nhello\r\n0\r\n\r\n", 400),
    ("huge-size", b"fffffffffffffffff\r\n", 400),
    ("space-in-size", b"5 5\r\nhello\r\n", 400),
    ("bad-extension", b"5;=x\r\nhello\r\n0\r\n\r\n", 400),
    ("missing-crlf", b"5\r\nhelloXX0\r\n\r\n", 400),
    ("bare-lf-size", b"5\nhello\r\n", 400),
    ("over-limit", b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n", 413),
    ("long-burst-size-short-of-its-data", chunked_body(EVENTS).replace(b"%x\r\n%s" % (len(EVENTS[40]), EVENTS[40]),
                                                                     b"%x\r\n%s" % (len(EVENTS[40]) - 1, EVENTS[40])), 400),
    ("long-burst-over-limit", chunked_body(EVENTS), 413),
    ("over-limit-in-small-chunks", b"3\r\nabc\r\n" * 40 + b"0\r\n\r\n", 413),
    ("missing-crlf-after-whole-chunks", b"1\r\na\r\n1\r\nbXX0\r\n\r\n", 400),
    ("comma-in-a-size-of-a-burst", b"1,1\r\n" + b"q" * 2100 + b"\r\n0\r\n\r\n", 400),
    ("lf-before-the-crlf-of-a-size", b"5\n\r\nhello\r\n0\r\n\r\n", 400),
    ("lf-before-the-crlf-of-the-last-size", b"0\n\r\n\r\n", 400),
    ("size-line-over-limit", b"5;" + b"ext=val;" * 600 + b"x\r\nhello\r\n0\r\n\r\n", 400),
]


@pytest.mark.parametrize("data,status", [(d, s) for _, d, s in BAD_CHUNKED], ids=[n for n, _, _ in BAD_CHUNKED])
def test_chunked_decoder_refuses(data, status):
    for pieces in list(splits(data))[:2]:
        decoder = proxypal.ChunkedDecoder(100 if status == 413 else 1 << 20)
        with pytest.raises(WireError) as info:
            for piece in pieces:
                decoder.feed(piece)
        assert info.value.status == status


SSE = [
    ("lf", b"event: a\ndata: 1\n\ndata: 2\n\n", [b"event: a\ndata: 1\n\n", b"data: 2\n\n"], []),
    ("crlf", b"data: 1\r\n\r\ndata: 2\r\n\r\n", [b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"], []),
    ("cr", b"data: 1\r\rdata: 2\r\r", [b"data: 1\r\r", b"data: 2\r\r"], []),
    ("comment", b": OPENROUTER PROCESSING\n\ndata: {}\n\n", [b": OPENROUTER PROCESSING\n\n", b"data: {}\n\n"], []),
    ("no-final-blank", b"data: 1\n\ndata: 2\n", [b"data: 1\n\n"], [b"data: 2\n"]),
    ("multi-line-data", b"data: a\ndata: b\n\n", [b"data: a\ndata: b\n\n"], []),
    ("utf8-split", "data: héllo\n\n".encode(), ["data: héllo\n\n".encode()], []),
]


def sse_result(data: bytes):
    """What must not depend on how the bytes were cut: every byte comes out once, in
    order (events, then what is still pending at the end), and the same events parse
    from them. Block edges may move by a CR/LF that only ends an empty line."""
    def finish(splitter):
        pending = splitter.waiting
        return [("tail", pending, splitter.close())]

    def normalize(out):
        blocks, (_, pending, closed) = out[:-1], out[-1]
        parsed = [proxypal.parse_sse_event(b) for b in blocks + closed]
        return b"".join(blocks) + pending, [p for p in parsed if p]
    return feed_all_ways(proxypal.SSESplitter, data, finish, normalize)


@pytest.mark.parametrize("data,events,tail", [(d, e, t) for _, d, e, t in SSE], ids=[n for n, _, _, _ in SSE])
def test_sse_splitter(data, events, tail):
    relayed, parsed = sse_result(data)
    assert relayed == data
    assert parsed == [proxypal.parse_sse_event(e) for e in events + tail if proxypal.parse_sse_event(e)]
    whole = proxypal.SSESplitter()
    assert whole.feed(data) == events and whole.close() == tail


SSE_DECODED = [
    ("named-and-plain", b"event: a\ndata: 1\n\ndata: 2\n\n", [("a", "1"), ("message", "2")]),
    ("crlf", b"data: 1\r\n\r\ndata: 2\r\n\r\n", [("message", "1"), ("message", "2")]),
    ("comment-between", b"data: 1\n\n: ping\n\ndata: 2\n\n", [("message", "1"), ("message", "2")]),
    ("no-final-blank", b"data: 1\n\ndata: 2\n", [("message", "1"), ("message", "2")]),
    ("multi-line-data", b"data: a\ndata: b\n\n", [("message", "a\nb")]),
    ("field-between", b"event: a\nretry: 1\ndata: x\n\n", [("a", "x")]),
    ("id-first", b"id: 7\ndata: x\n\n", [("message", "x")]),
    ("extra-blank-lines", b"data: a\n\n\n\ndata: b\n\n\n", [("message", "a"), ("message", "b")]),
    ("no-space", b"data:x\n\nevent:y\ndata:\n\n", [("message", "x"), ("y", "")]),
    ("empty-event-field", b"event:\r\ndata: x\r\n\r\nevent\ndata: y\n\n", [("message", "x"), ("message", "y")]),
    ("bom", b"\xef\xbb\xbfdata: bom\n\n", [("message", "bom")]),
    ("utf8-and-invalid", "data: h\u00e9llo\n\ndata: \xff\n\n".encode("utf-8").replace(b"\xc3\xbf", b"\xff"),
     [("message", "h\u00e9llo"), ("message", "\ufffd")]),
]


@pytest.mark.parametrize("data,expected", [(d, e) for _, d, e in SSE_DECODED],
                         ids=[n for n, _, _ in SSE_DECODED])
def test_sse_decoder_reads_every_shape_however_cut(data, expected):
    """SSEDecoder takes runs of simple LF events at once and any other shape event by
    event: both must read the same events from every cut of the bytes."""
    got = feed_all_ways(proxypal.SSEDecoder, data, lambda decoder: decoder.close())
    assert got == expected


def test_sse_splitter_emits_each_event_when_complete():
    splitter = proxypal.SSESplitter()
    assert splitter.feed(b"data: 1\n") == []
    assert splitter.feed(b"\n") == [b"data: 1\n\n"]
    assert splitter.feed(b"data: 2\r\n\r") == [b"data: 2\r\n\r"]   # complete at the CR
    assert splitter.feed(b"\n") == [] and splitter.close() == []       # the LF is an empty line
    assert splitter.feed(b"data: 3\r\r") == [b"data: 3\r\r"]


@pytest.mark.parametrize("block,expected", [
    (b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n", ("message_stop", '{"type":"message_stop"}')),
    (b"data: a\ndata: b\n\n", ("message", "a\nb")),
    (b"data:no-space\n\n", ("message", "no-space")),
    (b": comment only\n\n", None),
    (b"\xef\xbb\xbfdata: bom\n\n", ("message", "bom")),
    (b"id: 7\nretry: 10\ndata: x\n\n", ("message", "x")),
], ids=["named", "multi-data", "no-space", "comment", "bom", "id-retry"])
def test_parse_sse_event(block, expected):
    assert proxypal.parse_sse_event(block) == expected


def test_response_head_and_chunk():
    assert proxypal.response_head(200, [("A", "1")], True) == b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n"
    assert proxypal.response_head(413, [], False).startswith(b"HTTP/1.1 413 Content Too Large\r\n") or \
        proxypal.response_head(413, [], False).startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert b"Connection: close" in proxypal.response_head(413, [], False)
    assert proxypal.chunk(b"hello") == b"5\r\nhello\r\n"


UPSTREAM_HEADS = [
    ("plain", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id:  r1 \r\n\r\n",
     ("HTTP/1.1", 200, [("content-type", "application/json"), ("x-request-id", "r1")])),
    ("no-reason", b"HTTP/1.0 204\r\n\r\n", ("HTTP/1.0", 204, [])),
    ("stray-crlf", b"\r\nHTTP/1.1 503 Busy\r\nRetry-After: 5\r\n\r\n",
     ("HTTP/1.1", 503, [("retry-after", "5")])),
    ("repeats-kept", b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n",
     ("HTTP/1.1", 200, [("set-cookie", "a=1"), ("set-cookie", "b=2")])),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n", ("HTTP/1.1", 200, [("x-a", "1")])),
    ("latin-1", b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\n\r\n", ("HTTP/1.1", 200, [("x-name", "caf\xe9")])),
    ("empty-value", b"HTTP/1.1 200 OK\r\nX-Empty:\r\n\r\n", ("HTTP/1.1", 200, [("x-empty", "")])),
    # left out: no colon, no name, folded, and any line with NUL or a bare CR/LF (a bare
    # LF could forge a second header); the lines around them are kept
    ("no-colon", b"HTTP/1.1 200 OK\r\nJunk\r\nA: 1\r\n\r\n", ("HTTP/1.1", 200, [("a", "1")])),
    ("no-name", b"HTTP/1.1 200 OK\r\n: v\r\nA: 1\r\n\r\n", ("HTTP/1.1", 200, [("a", "1")])),
    ("folded", b"HTTP/1.1 200 OK\r\nA: 1\r\n  more: x\r\n\r\n", ("HTTP/1.1", 200, [("a", "1")])),
    ("bare-lf", b"HTTP/1.1 200 OK\r\nA: 1\nSet-Cookie: x=1\r\nB: 2\r\n\r\n",
     ("HTTP/1.1", 200, [("b", "2")])),
    ("bare-cr", b"HTTP/1.1 200 OK\r\nA: 1\rB: 2\r\nC: 3\r\n\r\n", ("HTTP/1.1", 200, [("c", "3")])),
    ("nul", b"HTTP/1.1 200 OK\r\nA: x\x00y\r\nC: 3\r\n\r\n", ("HTTP/1.1", 200, [("c", "3")])),
    ("nul-in-reason", b"HTTP/1.1 200 O\x00K\r\nC: 3\r\n\r\n", ("HTTP/1.1", 200, [("c", "3")])),
]


@pytest.mark.parametrize("head,expected", [(h, e) for _, h, e in UPSTREAM_HEADS],
                         ids=[n for n, _, _ in UPSTREAM_HEADS])
def test_parse_response_head(head, expected):
    assert proxypal.parse_response_head(head) == expected


@pytest.mark.parametrize("head", [b"HTTP/2 200\r\n\r\n", b"HTTP/1.1\r\n\r\n", b"HTTP/1.1 OK\r\n\r\n",
                                  b"HTTP/1.1 2\xb2 OK\r\n\r\n", b"<html>\r\n\r\n"])
def test_parse_response_head_refuses_a_bad_status_line(head):
    with pytest.raises(proxypal.UpstreamError, match="malformed status line"):
        proxypal.parse_response_head(head)


def relay_all(data: bytes, pieces: List[bytes], committed: bool = False):
    pipe = proxypal.RelayPipe("anthropic", "p")
    if committed:
        pipe.committed()
    out = pipe.first(pieces[0]) + b"".join(pipe.feed(piece) for piece in pieces[1:])
    return out + pipe.close(), pipe


ANTHROPIC_CRLF = (b'event: message_start\r\ndata: {"type":"message_start","message":{"id":"m",'
                  b'"usage":{"input_tokens":10,"output_tokens":1}}}\r\n\r\n'
                  b'event: content_block_delta\r\ndata: {"type":"content_block_delta","index":0,'
                  b'"delta":{"type":"text_delta","text":"Hi"}}\r\n\r\n'
                  b'event: message_delta\r\ndata: {"type":"message_delta","delta":{"stop_reason":'
                  b'"end_turn"},"usage":{"output_tokens":7}}\r\n\r\n'
                  b'event: message_stop\r\ndata: {"type":"message_stop"}\r\n\r\n')


@pytest.mark.parametrize("after", [b"\r\n\r\n", b"\r\n\r\n: ping\r\n\r\n", b"\r\n" * 7])
def test_a_finished_relayed_stream_stays_finished_whatever_blank_lines_follow(after):
    data = ANTHROPIC_CRLF + after
    for pieces in list(splits(data))[:40]:
        out, pipe = relay_all(data, pieces)
        assert b"event: error" not in out and not pipe.failed, pieces
        assert out.startswith(ANTHROPIC_CRLF)


@pytest.mark.parametrize("form", ["crlf", "no-space", "lf"])
def test_a_committed_relay_drops_the_upstreams_opening_once_and_still_counts_its_usage(form):
    data = ANTHROPIC_CRLF
    if form == "no-space":
        data = data.replace(b"event: ", b"event:")
    elif form == "lf":
        data = data.replace(b"\r\n", b"\n")
    out, pipe = relay_all(data, [data], committed=True)
    assert b"message_start" not in out and b"message_stop" in out
    assert pipe.usage[:2] == (10, 7) and not pipe.failed


def test_a_last_event_without_its_blank_line_is_counted_too():
    data = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":4}}\n')
    pipe = proxypal.RelayPipe("openai", "p")
    out = pipe.first(data) + pipe.close()
    assert out == data + b"\n\n"            # relayed whole, a blank line to end it
    assert pipe.usage[:2] == (10, 4)


def test_an_empty_read_changes_nothing():
    for pieces in ([b"data: a\n", b"", b"\n"], [b"event:ping\n", b"", b"\ndata: x\n\n"]):
        whole = proxypal.SSEDecoder().feed(b"".join(pieces))
        decoder = proxypal.SSEDecoder()
        assert [e for piece in pieces for e in decoder.feed(piece)] == whole, pieces


@pytest.mark.parametrize("committed", [False, True])
def test_relayed_events_add_up_their_usage_even_the_ones_a_commit_drops(committed):
    """Bedrock's frames to an Anthropic client: message_start says the input tokens,
    message_delta the output ones; neither erases the other, a dropped opening included."""
    relay = proxypal.EventRelay("anthropic")
    if committed:
        relay.skip = list(relay.fmt.opening)
    relay.feed("message_start", '{"type":"message_start","message":{"usage":{"input_tokens":10,'
                                '"output_tokens":1}}}')
    relay.feed("message_delta", '{"type":"message_delta","usage":{"output_tokens":7}}')
    assert (relay.usage.input, relay.usage.output) == (10, 7)
