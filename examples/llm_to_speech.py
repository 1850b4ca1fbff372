"""Stream an OpenAI-compatible LLM's answer into speech while it is being written.

    pip install httpx
    python examples/llm_to_speech.py "Tell me about Paris." \\
        --llm http://127.0.0.1:8000/v1 --model my-model            # plays it
    python examples/llm_to_speech.py "..." --llm ... --out answer.wav

Any server with ``/v1/chat/completions`` and ``"stream": true`` works (OpenAI, vLLM,
llama.cpp, ``transformers serve``, ...). Each delta goes to voxlane as it arrives: speech
starts after the first clause, not after the whole answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator

import httpx

import voxlane


async def chat_deltas(
    base_url: str, model: str, prompt: str, api_key: str | None = None
) -> AsyncIterator[str]:
    """The text deltas of a streamed chat completion (server-sent events)."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=60) as http:
        url = base_url.rstrip("/") + "/chat/completions"
        async with http.stream("POST", url, json=body, headers=headers) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                choices = json.loads(data).get("choices") or [{}]
                if delta := choices[0].get("delta", {}).get("content"):
                    yield delta


async def run(args: argparse.Namespace) -> None:
    llm_key = args.llm_key or os.environ.get("OPENAI_API_KEY")
    async with voxlane.connect(args.url, api_key=args.api_key) as session:
        turn = session.speak(chat_deltas(args.llm, args.model, args.prompt, llm_key))
        if args.out:
            await voxlane.save_wav(args.out, turn)
        else:
            await voxlane.play(turn)
    spoken = turn.metrics.audio_s if turn.metrics else 0.0
    print(
        f"spoke {spoken:.2f} s; first audio {turn.time_to_first_audio_s * 1000:.0f} ms "
        "after the LLM's first delta"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--llm", default="http://127.0.0.1:8000/v1", help="OpenAI-style base URL")
    parser.add_argument("--model", default="default")
    parser.add_argument("--llm-key", help="the LLM's API key (default $OPENAI_API_KEY)")
    parser.add_argument("--out", help="write a WAV instead of playing")
    parser.add_argument("--url", help="voxlane server (default $VOXLANE_URL)")
    parser.add_argument("--api-key", help="voxlane API key (default $VOXLANE_API_KEY)")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
