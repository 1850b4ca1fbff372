"""Clone a voice from a short recording, then speak new text with it.

    python examples/clone_voice.py me.wav "The words I say in me.wav." \\
        --say "Now I sound like you." --out cloned.wav

The reference is any WAV file (other formats need the ``audio`` extra: they are decoded
locally). Cloned voices belong to the session: reconnecting re-clones them (docs/sdk.md).
"""

from __future__ import annotations

import argparse
import asyncio

import voxlane


async def run(args: argparse.Namespace) -> None:
    async with voxlane.connect(args.url, api_key=args.api_key) as session:
        voice = await session.clone_voice(args.reference, args.transcript, name=args.name)
        print(f"cloned {voice.voice_id} from {voice.duration_s:.1f} s of audio")
        turn = session.speak(args.say, voice=voice.voice_id)
        if args.out:
            await voxlane.save_wav(args.out, turn)
            print(f"wrote {args.out}")
        else:
            await voxlane.play(turn)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="a recording of the voice (a few seconds)")
    parser.add_argument("transcript", help="the words spoken in the recording")
    parser.add_argument("--say", default="Now I sound like you.")
    parser.add_argument("--name", help="voice id to ask for")
    parser.add_argument("--out", help="write a WAV instead of playing")
    parser.add_argument("--url")
    parser.add_argument("--api-key")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
