"""A TCP relay that can go silent: a network partition without a reset, on loopback.

While ``silence()`` holds, and for good on every connection it caught, bytes stop flowing both
ways: the sockets stay open, writes succeed, nothing arrives and no FIN or RST is passed on. Only
connections made after ``restore()`` flow again (the caught ones are what a client must give up).
"""

from __future__ import annotations

import asyncio
import contextlib


class Blackhole:
    """Relay 127.0.0.1:``port`` (an ephemeral port) to 127.0.0.1:``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.silent = False
        self._epoch = 0  # moves at every silence(): a connection flows only in its own epoch
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Blackhole:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def silence(self) -> None:
        """Stop every byte, on the connections open now and on any made until restore()."""
        self.silent = True
        self._epoch += 1

    def restore(self) -> None:
        """Let new connections flow again."""
        self.silent = False

    def _flowing(self, epoch: int) -> bool:
        return not self.silent and epoch == self._epoch

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            epoch = self._epoch
            if not self._flowing(epoch):
                await _swallow(reader)
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            self._writers.append(up_writer)
            await asyncio.gather(self._pump(reader, up_writer, epoch),
                                 self._pump(up_reader, writer, epoch))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    epoch: int) -> None:
        while data := await reader.read(65536):
            if self._flowing(epoch):
                writer.write(data)
                await writer.drain()
        if self._flowing(epoch):
            writer.close()  # a close passes on only while the connection flows
        else:
            await asyncio.Event().wait()  # silent to the end: never tell the other side


async def _swallow(reader: asyncio.StreamReader) -> None:
    """Read and drop everything until the peer closes."""
    while await reader.read(65536):
        pass
    await asyncio.Event().wait()
