"""A fake OpenAI-compatible LLM on loopback, shared by the agent-mode tests (server, SDK,
LiveKit bridge): the exact streaming wire format (``data: {chat.completion.chunk}`` events,
``data: [DONE]``), scripted per request, able to fail in every way a real upstream can, and
recording whether the client hung up."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

#: What :meth:`FakeLLM.answer` streams unless told otherwise.
ANSWER = "Sure! Paris is the capital. It is lovely in spring."

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if text is None else {"content": text}
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


class FakeLLM:
    """An OpenAI-compatible ``/v1/chat/completions`` on loopback.

    Each request is answered by the next behaviour of :attr:`script`, then by :attr:`default`
    (:meth:`answer` of :data:`ANSWER`). :attr:`hung_up` is set when the client closed a
    connection while the answer was still streaming. Use it as ``async with FakeLLM() as llm``
    or with :meth:`start` and :meth:`close`.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.script: list[Behaviour] = []
        self.default: Behaviour = self.answer()
        self.hung_up = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FakeLLM:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
        return self

    @classmethod
    def barge_in(cls, endless: str, answer: str) -> FakeLLM:
        """One that streams ``endless`` to the first request until the client hangs up (a
        barge-in, recorded in :attr:`hung_up`), and answers every later one with ``answer``."""
        llm = cls()
        llm.script.append(llm.endless(endless))
        llm.default = cls.answer(answer)
        return llm

    async def __aenter__(self) -> FakeLLM:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            lines = head.split("\r\n")
            assert lines[0].startswith("POST /v1/chat/completions "), lines[0]
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            self.headers.append(headers)
            self.requests.append(
                json.loads(await reader.readexactly(int(headers["content-length"])))
            )
            behaviour = self.script.pop(0) if self.script else self.default
            await behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up.set()
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- behaviours ---------------------------------------------------------------------------

    @staticmethod
    def answer(text: str = ANSWER, step: int = 6, done: bytes = b"data: [DONE]\n\n") -> Behaviour:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(SSE_HEAD + chunk(None) + b": keep-alive comment\n\n")
            for i in range(0, len(text), step):
                writer.write(chunk(text[i : i + step]))
                await writer.drain()
                await asyncio.sleep(0.005)
            writer.write(chunk(None, "stop") + done)
            await writer.drain()

        return run

    def endless(self, sentence: str = "One two three four five. ") -> Behaviour:
        """Streams ``sentence`` forever, until the client hangs up."""

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(SSE_HEAD)
            eof = asyncio.ensure_future(reader.read())  # b"" once the client closes
            try:
                while not eof.done():
                    writer.write(chunk(sentence))
                    await writer.drain()
                    await asyncio.wait({eof}, timeout=0.05)
                self.hung_up.set()
            finally:
                eof.cancel()

        return run

    @staticmethod
    def status(code: int, body: bytes = b'{"error": {"message": "model overloaded"}}') -> Behaviour:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = f"HTTP/1.1 {code} Oops\r\nContent-Length: {len(body)}\r\nConnection: close"
            writer.write(head.encode() + b"\r\n\r\n" + body)
            await writer.drain()

        return run

    @staticmethod
    def raw(data: bytes, then_sleep: float = 0.0) -> Behaviour:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(SSE_HEAD + data)
            await writer.drain()
            await asyncio.sleep(then_sleep)

        return run
