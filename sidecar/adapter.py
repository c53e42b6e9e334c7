"""aiohttp's side of a proxied call: its request as a ``Call``, its response as a ``Sink``, and
the sidecar's errors as aiohttp responses (for the proxy, the OAuth pages and the admin app)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from sidecar.deadlines import BodyOverdue
from sidecar.errors import (
    BadRequest,
    BodyTooLarge,
    ClientGone,
    ExpectationFailed,
    RequestTimeout,
    SidecarError,
)
from sidecar.replies import Call, Reply, error_reply
from sidecar.rules import api_path, show


def web_response(reply: Reply) -> web.Response:
    """Turn a whole reply into aiohttp's response."""
    response = web.Response(status=reply.status, reason=reply.reason or None, body=reply.body,
                            headers=CIMultiDict(reply.headers))
    if reply.status == 408:
        response.force_close()  # the rest of the request is not coming in time: no next one
    return response


def error_response(error: SidecarError, *, request_id: str | None = None) -> web.Response:
    """Answer an error of the sidecar's own, in Bitrix24's shape (aiohttp's response)."""
    return web_response(error_reply(error, request_id=request_id))


class AiohttpCall(Call):
    """A call read by aiohttp's server."""

    __slots__ = ("request",)

    def __init__(self, request: web.Request) -> None:
        super().__init__(request.method, request.raw_path, request.version, request.headers,
                         request.host, request.content_type, request.transport,
                         request.remote or "")
        self.request = request

    async def body(self, limit: int) -> bytes:
        request = self.request
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"the body is larger than the limit of {limit} bytes")
        if not request.body_exists:
            return b""
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the body is larger than the limit of {limit} bytes")
                chunks.append(chunk)
        except (RequestPayloadError, HttpProcessingError):
            raise BadRequest("the body cannot be read or decoded (bad framing or "
                             "Content-Encoding)") from None
        except ConnectionResetError:
            raise ClientGone("the client hung up in the middle of its body") from None
        except BodyOverdue as exc:  # the deadline's sweep stopped the stream
            exc.__traceback__ = None  # no cycle through the stream (see deadlines._tracked)
            raise RequestTimeout(str(exc)) from None
        return b"".join(chunks)


class AiohttpSink:
    """Streams an answer through aiohttp's StreamResponse."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]],
                    length: int | None) -> None:
        response = self.response = web.StreamResponse(status=status, reason=reason or None,
                                                      headers=CIMultiDict(headers))
        if length is not None:
            response.content_length = length
        await response.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def cut(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` as aiohttp does; refuse other expectations our way."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11:
        if expect.lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the body proper has not started
            return None
        # On a REST 3.0 path in REST 3.0's shape, as the proxy's other refusals there.
        return web_response(error_reply(ExpectationFailed(
            f"Expect: {show(expect)} is not supported (only 100-continue)"),
            api=api_path(request.raw_path)))
    return None
