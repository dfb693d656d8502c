"""The HTTP connection layer: uvicorn's h11 protocol with a header timeout.

uvicorn cuts idle keep-alive connections but has no limit on how long a client may take to send a
request's headers: a client that connects and sends nothing, or half a request line, holds its socket
forever. `HeaderTimeoutProtocol` starts a timer when a connection opens and whenever a new request
begins on a kept-alive one; if the headers are not complete when it fires, the client gets a 408 in
OpenAI's error shape and the connection is closed. The body has its own limit (ServeConfig's
body_timeout_s, enforced by serve.app.Guard).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(ApiError(408, f"the request headers did not arrive within {seconds:g} s",
                               None, "request_timeout", "invalid_request_error").body()).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol whose connections must deliver each request's headers within `header_timeout_s`."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm()  # a new request starts: its headers are now on the clock
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # the headers arrived; the body is Guard's business

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.write(_timeout_response(self.header_timeout_s))
            self.transport.close()


def uvicorn_config(app: Any, host: str, port: int, header_timeout_s: float, **kwargs: Any):
    """A uvicorn.Config serving `app` with HeaderTimeoutProtocol (h11) at `header_timeout_s`."""
    import uvicorn

    protocol = type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, http=protocol, **kwargs)
