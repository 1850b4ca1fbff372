"""Agent mode: the server asks an upstream LLM for the answer and speaks it as a turn.

:class:`LLMClient` streams chat completions from any OpenAI-compatible endpoint
(``POST {base_url}/chat/completions`` with ``"stream": true``; Server-Sent Events of
``chat.completion.chunk`` objects, ended by ``data: [DONE]`` or a ``finish_reason``).
:class:`AgentResponse` runs one answer: it feeds the LLM's deltas into the turn's
:class:`~voxlane.server.pipeline.TurnPipeline` and to the client (``agent.text_delta``), and
closes the upstream request when the turn is cancelled (barge-in).

The dialogue history, barge-in and the truncation of an interrupted answer to what was heard
are protocol state: they live in the sans-I/O :class:`~voxlane.session_protocol.ServerSession`
(see docs/agent.md). This module is only the I/O: HTTP upstream, deltas into the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from voxlane.errors import LLMError
from voxlane.session_protocol import AgentOptions, ServerSession, StartAgentResponse

__all__ = ["AgentResponse", "LLMClient", "LLMConfig"]

log = logging.getLogger("voxlane.server.agent")


@dataclass(frozen=True)
class LLMConfig:
    """The upstream LLM of agent mode (``voxlane serve --llm-url ...``)."""

    base_url: str
    """Base URL of an OpenAI-compatible API, e.g. ``http://127.0.0.1:8000/v1``; requests go
    to ``{base_url}/chat/completions``."""
    model: str
    api_key: str | None = None
    """Sent as ``Authorization: Bearer``."""
    system_prompt: str | None = None
    timeout_s: float = 30.0
    """Connect timeout, and the longest wait for the first and for each next chunk."""
    max_response_s: float = 120.0
    """Longest time one answer may stream."""
    max_tokens: int | None = 512
    temperature: float | None = None
    max_history_messages: int = 32
    max_history_chars: int = 32_000

    def agent_options(self) -> AgentOptions:
        """The session-core options (system prompt, history limits) of this configuration."""
        return AgentOptions(
            model=self.model,
            system_prompt=self.system_prompt,
            max_history_messages=self.max_history_messages,
            max_history_chars=self.max_history_chars,
        )


class LLMClient:
    """Streams chat completions over SSE with httpx; one connection pool per server."""

    def __init__(self, config: LLMConfig, *, transport: Any = None) -> None:
        import httpx

        self.config = config
        headers = {"Accept": "text/event-stream"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s),
            headers=headers,
            transport=transport,
        )
        self._url = config.base_url.rstrip("/") + "/chat/completions"

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def stream(self, messages: Sequence[dict[str, str]]) -> AsyncIterator[str]:
        """The answer to ``messages`` as text deltas, as the upstream streams them.

        Raises :class:`LLMError` for a refused connection, an HTTP error status, a timeout
        (``timeout_s`` without a chunk, or ``max_response_s`` in all), malformed SSE or JSON,
        an ``error`` object in the stream, or a stream that ends without ``[DONE]`` or a
        ``finish_reason``. Closing the generator early (``aclose``, or cancelling the task
        iterating it) closes the HTTP request, so the upstream stops generating.
        """
        import httpx

        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": list(messages),
            "stream": True,
        }
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        deadline = time.monotonic() + self.config.max_response_s
        try:
            async with self._client.stream("POST", self._url, json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace").strip()[:300]
                    raise LLMError(
                        f"the LLM at {self._url} answered HTTP {response.status_code}: {detail}"
                    )
                async for delta in self._deltas(response.aiter_lines(), deadline):
                    yield delta
        except httpx.TimeoutException as exc:
            raise LLMError(
                f"the LLM at {self._url} timed out ({type(exc).__name__}, "
                f"{self.config.timeout_s:g} s without data)"
            ) from None
        except httpx.HTTPError as exc:
            raise LLMError(f"the LLM request to {self._url} failed: {exc!r}") from None

    async def _deltas(self, lines: AsyncIterator[str], deadline: float) -> AsyncIterator[str]:
        finished = False
        data: list[str] = []
        async for line in lines:
            if time.monotonic() > deadline:
                raise LLMError(f"the LLM answer took longer than {self.config.max_response_s:g} s")
            if line:
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                continue  # comments (":"), event:, id:, retry: carry nothing we use
            if not data:
                continue
            # A blank line ends an event; its data lines join with newlines (SSE).
            payload, data = "\n".join(data), []
            if payload.strip() == "[DONE]":
                return
            for text, done in _parse_chunk(payload):
                finished = finished or done
                if text:
                    yield text
        if data:  # an event not terminated by a blank line: still parse it
            payload = "\n".join(data)
            if payload.strip() == "[DONE]":
                return
            for text, done in _parse_chunk(payload):
                finished = finished or done
                if text:
                    yield text
        if not finished:
            raise LLMError("the LLM stream ended before [DONE] or a finish_reason")


def _parse_chunk(payload: str) -> list[tuple[str, bool]]:
    """``(content delta, finished)`` of each choice of one ``chat.completion.chunk``."""
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise LLMError(f"malformed SSE data from the LLM: {payload[:120]!r}") from None
    if not isinstance(chunk, dict):
        raise LLMError(f"malformed chunk from the LLM: {payload[:120]!r}")
    if chunk.get("error"):
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise LLMError(f"the LLM reported an error: {message}")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise LLMError(f"a chunk from the LLM has no choices: {payload[:120]!r}")
    out: list[tuple[str, bool]] = []
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content is not None and not isinstance(content, str):
            raise LLMError(f"a chunk from the LLM has non-text content: {payload[:120]!r}")
        out.append((content or "", bool(choice.get("finish_reason"))))
    return out


class AgentResponse:
    """One answer of agent mode: LLM deltas -> ``agent.text_delta`` + the turn pipeline.

    The text is ended when the stream ends, fails, or reaches ``max_chars`` (the session's
    ``max_turn_chars``), so the pipeline speaks what arrived and the turn completes; a
    failure is kept in :attr:`error` for the turn's ``turn.done``. :meth:`cancel` (barge-in)
    closes the upstream request.
    """

    def __init__(
        self,
        llm: LLMClient,
        session: ServerSession,
        pipeline: Any,
        command: StartAgentResponse,
        *,
        flush: Callable[[], Awaitable[None]],
        max_chars: int,
    ) -> None:
        self.llm = llm
        self.session = session
        self.pipeline = pipeline
        self.command = command
        self.flush = flush
        self.max_chars = max_chars
        self.error: LLMError | None = None
        """Why the upstream failed, if it did (set before the turn's text is ended)."""
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Stream the answer into the turn (run it as a task; see :meth:`cancel`)."""
        turn_id = self.command.turn_id
        chars = 0
        try:
            stream = self.llm.stream(self.command.messages)
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    delta = delta[: self.max_chars - chars]
                    if not delta or not self.session.send_text_delta(turn_id, delta):
                        break  # cancelled (the session dropped it) or long enough
                    chars += len(delta)
                    self.pipeline.push_text(delta)
                    await self.flush()
        except LLMError as exc:
            log.warning("turn %s: %s", turn_id, exc)
            self.error = exc
        except Exception as exc:  # a bug here must not leave the turn open forever
            log.exception("turn %s: agent response failed", turn_id)
            self.error = LLMError(f"agent response failed: {exc!r}")
        # Not on cancel (CancelledError skips this): a cancelled pipeline takes no more text.
        with contextlib.suppress(RuntimeError):
            self.pipeline.end_text()

    async def cancel(self) -> None:
        """Stop now: the upstream HTTP request is closed; returns once it is."""
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
