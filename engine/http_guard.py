"""A pure ASGI middleware that decides on a request's headers, before its body is read: the bearer token, the body
size, and whether the service has room for it.

The server answers ``100 Continue`` (to a client that sent ``Expect: 100-continue``) when the application first
asks for the body, and it reads a body as the application asks for it.  So :class:`RequestGuard` refuses on the
headers alone, before it ever calls ``receive()``: a missing or wrong ``Authorization: Bearer <token>`` (401), a
``Content-Length`` over ``max_bytes`` (413), and a search while the service is saturated (503 with
``Retry-After``); the client is never invited to send a body that would be refused, and none of it is read.  A body
without a length (``Transfer-Encoding: chunked``) is counted as it streams in, and the request is answered 413 as
soon as the count passes ``max_bytes``, before anything parses it.  Refusals of a request whose body is still
coming close the connection, so the server does not keep reading it.

Tokens are compared as bytes in constant time (:func:`hmac.compare_digest`); the header must read
``Bearer <token>`` (the scheme in any case): a bare token, another scheme, repeated or non-ASCII headers are 401s.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class Refusal:
    """A response decided on the headers: status, one-line message, extra headers."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


class _BodyTooLarge(Exception):
    """Raised into the application by ``receive()`` once the body passes the limit (the guard answers 413)."""


async def _reply(send: Send, refusal: Refusal, close: bool) -> None:
    body = json.dumps({"detail": refusal.message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in refusal.headers]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware in front of ``app`` (see the module doc).

    ``token``: the bearer token every path but ``open_paths`` needs (None: no authentication).  ``max_bytes``: the
    largest request body.  ``busy``: called with the path of each POST that passed the checks above; a
    :class:`Refusal` it returns is sent instead of running the request (e.g. 503 while the search queue is full)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        token: str | None = None,
        open_paths: Iterable[str] = (),
        busy: Callable[[str], Refusal | None] | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app, self.max_bytes, self.busy = app, max_bytes, busy
        self._token = None if token is None else token.encode("utf-8")
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers", ()))
        length = [value for name, value in headers if name == b"content-length"]
        has_body = any(name == b"transfer-encoding" for name, _ in headers) or any(v.strip() != b"0" for v in length)
        refusal = self._check(scope, headers, length)
        if refusal is not None:
            await _reply(send, refusal, close=has_body)
            return
        await self._run(scope, receive, send)

    def _check(self, scope: Scope, headers: list[tuple[bytes, bytes]], length: list[bytes]) -> Refusal | None:
        if self._token is not None and scope["path"] not in self.open_paths and not self._authorized(headers):
            return Refusal(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                           (("WWW-Authenticate", "Bearer"),))  # fmt: skip
        if length:
            if len(length) > 1 or not length[0].strip().isdigit():
                return Refusal(400, "malformed Content-Length header")
            size = int(length[0])
            if size > self.max_bytes:
                return Refusal(413, f"request body of {size:,} bytes exceeds the limit of {self.max_bytes:,}")
        if self.busy is not None and scope.get("method") == "POST":
            return self.busy(scope["path"])
        return None

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        assert self._token is not None, "only called with a token"
        given = [value for name, value in headers if name == b"authorization"]
        if len(given) != 1:
            return False
        scheme, _, credentials = given[0].strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the application with a ``receive`` that counts the body and a ``send`` that, once the body passed
        the limit, drops the application's own answer to the error, for the 413 sent here."""
        seen, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise _BodyTooLarge(f"request body exceeds {self.max_bytes} bytes")
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            if over and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except Exception:
            if not over:
                raise
        if over and not started:
            limit = f"request body exceeds the limit of {self.max_bytes:,} bytes (read {seen:,} so far)"
            await _reply(send, Refusal(413, limit), close=True)


__all__ = ["Refusal", "RequestGuard"]
