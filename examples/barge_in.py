"""Barge-in: stop speaking the moment the user talks, and know what they heard.

    python examples/barge_in.py --after 1.5

Plays a long answer and interrupts it after ``--after`` seconds of sound (a stand-in for
a voice-activity detector firing). Interrupting is two calls: ``player.flush()`` silences
the speaker at once, ``turn.cancel()`` stops the server (no audio of the turn arrives after
it returns). The turn's marks and the player's position tell which text was heard, which
an agent needs to truncate its chat history.
"""

from __future__ import annotations

import argparse
import asyncio

import voxlane

ANSWER = (
    "Paris is the capital of France. It has about two million inhabitants. "
    "The city is known for its museums, its cafes and its river. "
    "Many visitors start with the Louvre, then walk along the Seine."
)


async def run(args: argparse.Namespace) -> None:
    async with voxlane.connect(args.url, api_key=args.api_key) as session:
        rate = session.config.sample_rate
        player = voxlane.Player(rate, lead_ms=args.lead_ms, device=args.device)
        marks: list[voxlane.Mark] = []
        dropped = 0
        turn = session.speak(ANSWER)

        async def speak() -> None:
            async for event in turn:
                if isinstance(event, voxlane.Mark):
                    marks.append(event)
                else:
                    player.feed(event)
            await player.drain()

        async def user_starts_talking() -> None:
            nonlocal dropped
            while player.played_samples < args.after * rate:
                await asyncio.sleep(0.01)
            dropped = player.flush()  # silence now ...
            await turn.cancel()  # ... and stop the server (a no-op if it finished generating)

        async with player:
            speaker = asyncio.create_task(speak())
            listener = asyncio.create_task(user_starts_talking())
            await asyncio.wait({speaker, listener}, return_when=asyncio.FIRST_COMPLETED)
            await speaker
            listener.cancel()
        heard = player.played_samples
        said = [m.text for m in marks if m.sample < heard]
        # Generation usually runs ahead of playback: the turn may be complete on the server while
        # seconds of it are still queued in the player. Either way the user stopped hearing it.
        interrupted = turn.cancelled or dropped > 0
        print(f"interrupted after {heard / rate:.2f} s" if interrupted else "not interrupted")
        print(f"heard (at least the start of): {' '.join(said)!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=float, default=1.5, help="seconds of sound before")
    parser.add_argument("--lead-ms", type=float, default=120.0)
    parser.add_argument("--device", help="output device (name or index)")
    parser.add_argument("--url")
    parser.add_argument("--api-key")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
