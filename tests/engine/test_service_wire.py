"""The service on the wire: uvicorn on a free local port, raw HTTP requests.  The bearer token and the body limit
are decided on the headers, before any body is read or ``100 Continue`` invited; a chunked body is cut at the limit
while it streams in, with bounded memory; the Authorization header is checked strictly and safely; the docs follow
the token unless made public."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from facesearch.engine.search import SearchEngine
from facesearch.engine.service import create_app
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

TOKEN = "s3cret"
LIMIT = 256 << 10  # max_bytes of the served app


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> SearchEngine:
    root = tmp_path_factory.mktemp("wire")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=200, dim=16, identities=20, dtype="float32"))
    build_index(root / "s", root / "i", IndexConfig(kind="flat", recall_sample=0))
    return SearchEngine.open(root / "i")


@contextmanager
def live(app: object) -> Iterator[int]:
    """Serve ``app`` with uvicorn in a thread; yields the port.  The socket listens before the thread starts, so
    connections made at once wait in its backlog: nothing to wait for."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def port(engine: SearchEngine) -> Iterator[int]:
    with live(create_app(engine, token=TOKEN, max_bytes=LIMIT)) as p:
        yield p


def _head(port: int, headers: list[tuple[str, str]], path: str = "/search/embedding") -> socket.socket:
    """Open a connection and send a POST's request line and headers only."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"POST {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers), "", ""]
    conn.sendall("\r\n".join(lines).encode())
    return conn


def _first_response(conn: socket.socket) -> tuple[int, bytes]:
    """Status and raw text of the first response (an interim ``100 Continue`` counts) on ``conn``, read within
    the connection's timeout."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            break
        data += part
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    if status >= 200 and b"content-length:" in data.lower():  # read the body too, for its message
        head, _, body = data.partition(b"\r\n\r\n")
        size = int(
            next(v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length")
        )
        while len(body) < size:
            part = conn.recv(65536)
            if not part:
                break
            body += part
        data = head + b"\r\n\r\n" + body
    return status, data


def _request(port: int, path: str, headers: dict[str, str | bytes], body: bytes = b"", method: str = "POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path)
    for k, v in {"Content-Length": str(len(body)), **headers}.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    res = conn.getresponse()
    out = res.status, res.read().decode("utf-8", "replace")
    conn.close()
    return out


def test_unauthenticated_request_is_refused_before_its_body(port):
    """A chunked body without a token gets its 401 on the headers alone (the server never waits for the body),
    and a client asking ``Expect: 100-continue`` is never invited to send a body that would be refused."""
    conn = _head(port, [("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")])
    status, text = _first_response(conn)  # no byte of the body was sent
    conn.close()
    assert status == 401, text
    big = str(100 << 20)
    conn = _head(port, [("Content-Length", big), ("Expect", "100-continue"), ("Authorization", "Bearer nope")])
    status, text = _first_response(conn)
    conn.close()
    assert status == 401 and b"100 Continue" not in text, text


def test_oversized_content_length_is_refused_before_100_continue(port):
    conn = _head(port, [("Content-Length", str(LIMIT + 1)), ("Expect", "100-continue"),
                        ("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json")])  # fmt: skip
    status, text = _first_response(conn)
    conn.close()
    assert status == 413 and b"exceeds the limit" in text, text


def test_accepted_request_still_gets_100_continue(port, engine):
    body = json.dumps({"embedding": engine.vectors([3])[0].tolist(), "k": 2}).encode()
    conn = _head(port, [("Content-Length", str(len(body))), ("Expect", "100-continue"),
                        ("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json")])  # fmt: skip
    status, _ = _first_response(conn)
    assert status == 100
    conn.sendall(body)
    status, text = _first_response(conn)
    conn.close()
    assert status == 200 and b'"id":3' in text.replace(b" ", b""), text


def test_chunked_body_is_cut_at_the_limit_with_bounded_memory(port):
    """A chunked body (no Content-Length) is counted as it streams in: 413 as soon as it passes the limit, while
    the client is still sending, and the process holds a small multiple of the limit, not the body."""
    conn = _head(port, [("Transfer-Encoding", "chunked"), ("Authorization", f"Bearer {TOKEN}"),
                        ("Content-Type", "application/json")])  # fmt: skip
    chunk = b"1" * 65536
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent, most = 0, 32 << 20
    tracemalloc.start()
    try:
        while sent < most and not select.select([conn], [], [], 0)[0]:  # until the server answers
            try:
                conn.sendall(framed)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, text = _first_response(conn)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        conn.close()
    assert status == 413 and b"exceeds the limit" in text, (status, text[:300])
    assert sent < most // 2, f"the server read {sent:,} bytes before refusing"
    # the server buffers at most the limit plus a chunk; the rest is the kernel's and the client's
    assert peak < 8 * LIMIT + (4 << 20), f"peak traced memory {peak:,} bytes"


def test_authorization_header_is_strict_and_never_a_500(port, engine):
    body = json.dumps({"embedding": engine.vectors([1])[0].tolist(), "k": 1}).encode()
    json_type = {"Content-Type": "application/json"}
    for value in (TOKEN, f"Token {TOKEN}", f"Bearer {TOKEN}x", "Bearer", b"Bearer \xc3\xa9t\xc3\xa9", b"\xff\xfe"):
        status, text = _request(port, "/search/embedding", {**json_type, "Authorization": value}, body)
        assert status == 401 and "bearer" in text.lower(), (value, status, text)
    for value in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN} "):
        status, text = _request(port, "/search/embedding", {**json_type, "Authorization": value}, body)
        assert status == 200, (value, status, text)


def test_docs_need_the_token_unless_public(engine, port):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert _request(port, path, {}, method="GET")[0] == 401, path
        assert _request(port, path, {"Authorization": f"Bearer {TOKEN}"}, method="GET")[0] == 200, path
    assert _request(port, "/health", {}, method="GET")[0] == 200
    with live(create_app(engine, token=TOKEN, public_docs=True)) as public:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert _request(public, path, {}, method="GET")[0] == 200, path
        assert _request(public, "/search/embedding", {}, b"{}")[0] == 401
