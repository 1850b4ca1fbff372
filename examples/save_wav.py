"""Speak a sentence and save it to a WAV file.

    voxlane serve --demo tiny --api-key secret &     # or any voxlane server; see docs/sdk.md
    python examples/save_wav.py "Hello from voxlane!" --out hello.wav --api-key secret

The server URL and API key come from --url/--api-key or $VOXLANE_URL/$VOXLANE_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio

import voxlane


async def run(args: argparse.Namespace) -> None:
    async with voxlane.connect(args.url, api_key=args.api_key) as session:
        turn = session.speak(args.text, voice=args.voice)
        wav = await voxlane.save_wav(args.out, turn)
    print(
        f"wrote {args.out}: {wav.duration_s:.2f} s, first audio after "
        f"{turn.time_to_first_audio_s * 1000:.0f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default="Hello from voxlane!")
    parser.add_argument("--out", default="hello.wav")
    parser.add_argument("--voice")
    parser.add_argument("--url")
    parser.add_argument("--api-key")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
