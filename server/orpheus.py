"""The Orpheus token layout: control tokens, audio tokens, prompts and SNAC frames.

Pure Python (no torch), so the layout can be checked anywhere.

An Orpheus speech LM speaks in *frames* of 7 audio tokens. Frame position ``p``
(0..6) owns its own block of 4,096 token ids::

    token = AUDIO_TOKEN_BASE + code + CODEBOOK_SIZE * p        code in 0..4095

and the 7 codes of one frame feed SNAC's three codebooks (coarse to fine)::

    position   0   1   2   3   4   5   6
    codebook   0   1   2   2   1   2   2

so a frame carries 1 code of codebook 0, 2 of codebook 1 and 4 of codebook 2,
which SNAC (24 kHz) turns into 2,048 samples.

In this module a *frame* is a tuple of 7 codes (0..4095), never token ids:
:func:`frame_to_tokens` and :func:`tokens_to_frames` convert.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

from voxlane.errors import InvalidTokenError

__all__ = [
    "AUDIO_TOKEN_BASE",
    "CODEBOOK_OF_POSITION",
    "CODEBOOK_SIZE",
    "END_OF_AI",
    "END_OF_HUMAN",
    "END_OF_SPEECH",
    "END_OF_TEXT",
    "FRAME_SIZE",
    "PAD",
    "SAMPLES_PER_FRAME",
    "SAMPLE_RATE",
    "START_OF_AI",
    "START_OF_HUMAN",
    "START_OF_SPEECH",
    "START_OF_TEXT",
    "VOCAB_SIZE",
    "Frame",
    "TextEncoder",
    "audio_token",
    "audio_token_range",
    "clone_prefix",
    "clone_prompt",
    "codebooks_to_frames",
    "finetuned_prompt",
    "frame_to_tokens",
    "frames_to_codebooks",
    "frames_to_tokens",
    "split_audio_token",
    "tokens_to_frames",
    "validate_frame",
]

# Llama-3 text specials.
START_OF_TEXT = 128000  # <|begin_of_text|>, the BOS the tokenizer adds
END_OF_TEXT = 128009  # <|eot_id|>

# Orpheus control tokens (<custom_token_1> .. <custom_token_7>).
START_OF_SPEECH = 128257
END_OF_SPEECH = 128258
START_OF_HUMAN = 128259
END_OF_HUMAN = 128260
START_OF_AI = 128261
END_OF_AI = 128262
PAD = 128263

AUDIO_TOKEN_BASE = 128266  # <custom_token_10>: code 0 at frame position 0
CODEBOOK_SIZE = 4096
FRAME_SIZE = 7
VOCAB_SIZE = AUDIO_TOKEN_BASE + FRAME_SIZE * CODEBOOK_SIZE + 2  # 156,940 rows in the LM head

SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 2048  # SNAC 24 kHz hop (512) x 4 finest-codebook steps per frame

#: SNAC codebook fed by each frame position.
CODEBOOK_OF_POSITION: tuple[int, ...] = (0, 1, 2, 2, 1, 2, 2)

Frame = tuple[int, int, int, int, int, int, int]
TextEncoder = Callable[[str], list[int]]
"""Text -> token ids, *including* the leading BOS (as the Orpheus tokenizer does); every
other id must be a text id (below :data:`START_OF_TEXT`), which the prompt builders check."""


def _as_int(value: object) -> int | None:
    """``value`` as a Python int (numpy and torch integers included); None if not an integer."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_code(code: int, where: str) -> int:
    value = _as_int(code)
    if value is None:
        raise InvalidTokenError(f"{where}: code {code!r} is not an integer")
    if not 0 <= value < CODEBOOK_SIZE:
        raise InvalidTokenError(f"{where}: code {code!r} is outside 0..{CODEBOOK_SIZE - 1}")
    return value


def _check_position(position: int) -> int:
    value = _as_int(position)
    if value is None or not 0 <= value < FRAME_SIZE:
        raise InvalidTokenError(f"frame position {position!r} is outside 0..{FRAME_SIZE - 1}")
    return value


def audio_token(code: int, position: int) -> int:
    """Token id of SNAC ``code`` at frame ``position``."""
    position = _check_position(position)
    code = _check_code(code, f"position {position}")
    return AUDIO_TOKEN_BASE + code + CODEBOOK_SIZE * position


def audio_token_range(position: int) -> range:
    """The 4,096 token ids legal at frame ``position`` (contiguous rows of the LM head)."""
    position = _check_position(position)
    start = AUDIO_TOKEN_BASE + CODEBOOK_SIZE * position
    return range(start, start + CODEBOOK_SIZE)


def split_audio_token(token: int, position: int) -> int:
    """Code carried by ``token``, which must be an audio token of frame ``position``.

    Raises :class:`~voxlane.errors.InvalidTokenError` if ``token`` is not an
    audio token, or belongs to another frame position.
    """
    position = _check_position(position)
    value = _as_int(token)
    if value is None:
        raise InvalidTokenError(f"token {token!r} is not an integer id")
    offset = value - AUDIO_TOKEN_BASE
    if not 0 <= offset < FRAME_SIZE * CODEBOOK_SIZE:
        raise InvalidTokenError(f"token {token} is not an audio token")
    actual, code = divmod(offset, CODEBOOK_SIZE)
    if actual != position:
        raise InvalidTokenError(
            f"token {token} belongs to frame position {actual}, found at position {position}"
        )
    return code


def validate_frame(frame: Sequence[int]) -> Frame:
    """Return ``frame`` as a :data:`Frame` tuple after checking its 7 codes."""
    try:
        length = len(frame)
    except TypeError:
        raise InvalidTokenError(
            f"a frame is a sequence of {FRAME_SIZE} codes, got {frame!r}"
        ) from None
    if length != FRAME_SIZE:
        raise InvalidTokenError(f"a frame has {FRAME_SIZE} codes, got {length}")
    return tuple(_check_code(code, f"position {p}") for p, code in enumerate(frame))  # type: ignore[return-value]


def frame_to_tokens(frame: Sequence[int]) -> list[int]:
    """The 7 token ids of one frame of codes."""
    codes = validate_frame(frame)
    return [AUDIO_TOKEN_BASE + c + CODEBOOK_SIZE * p for p, c in enumerate(codes)]


def frames_to_tokens(frames: Iterable[Sequence[int]]) -> list[int]:
    """Token ids of consecutive frames."""
    out: list[int] = []
    for frame in frames:
        out.extend(frame_to_tokens(frame))
    return out


def tokens_to_frames(tokens: Sequence[int]) -> list[Frame]:
    """Split audio token ids into frames of codes, checking every position.

    The length must be a whole number of frames; codes 0 and 4095 are valid.
    """
    if len(tokens) % FRAME_SIZE:
        raise InvalidTokenError(
            f"{len(tokens)} audio tokens is not a whole number of {FRAME_SIZE}-token frames"
        )
    frames: list[Frame] = []
    for start in range(0, len(tokens), FRAME_SIZE):
        frames.append(
            tuple(split_audio_token(tokens[start + p], p) for p in range(FRAME_SIZE))  # type: ignore[arg-type]
        )
    return frames


def frames_to_codebooks(
    frames: Iterable[Sequence[int]],
) -> tuple[list[int], list[int], list[int]]:
    """Pack frames into SNAC's three codebooks (lengths n, 2n, 4n)."""
    c0: list[int] = []
    c1: list[int] = []
    c2: list[int] = []
    for frame in frames:
        f = validate_frame(frame)
        c0.append(f[0])
        c1.extend((f[1], f[4]))
        c2.extend((f[2], f[3], f[5], f[6]))
    return c0, c1, c2


def codebooks_to_frames(c0: Sequence[int], c1: Sequence[int], c2: Sequence[int]) -> list[Frame]:
    """Inverse of :func:`frames_to_codebooks`."""
    n = len(c0)
    if len(c1) != 2 * n or len(c2) != 4 * n:
        raise InvalidTokenError(
            f"codebook lengths must be n, 2n, 4n; got {len(c0)}, {len(c1)}, {len(c2)}"
        )
    return [
        validate_frame(
            (
                c0[i],
                c1[2 * i],
                c2[4 * i],
                c2[4 * i + 1],
                c1[2 * i + 1],
                c2[4 * i + 2],
                c2[4 * i + 3],
            )
        )
        for i in range(n)
    ]


def _encode_text(encode: TextEncoder, text: str) -> list[int]:
    ids = list(encode(text))
    if not ids or ids[0] != START_OF_TEXT:
        # The Orpheus tokenizer adds BOS; a prompt without it is off-distribution.
        ids.insert(0, START_OF_TEXT)
    # Text must stay text: an encoder that matched "<custom_token_4>" or "<|eot_id|>" inside
    # it would end the human turn mid-prompt or inject audio. Refuse rather than speak that.
    if any(i >= START_OF_TEXT for i in ids[1:]):
        bad = next(i for i in ids[1:] if i >= START_OF_TEXT)
        raise InvalidTokenError(
            f"text encoded to control/audio id {bad}: prompts need an encoder that keeps "
            "text as text (voxlane.server.tokenizer.TextEncoder)"
        )
    return ids


def finetuned_prompt(encode: TextEncoder, voice: str | None, text: str) -> list[int]:
    """Prompt for a finetuned voice: ``[SOH] BOS "{voice}: {text}" [EOT, EOH, SOA, SOS]``.

    With ``voice`` None (or empty) the text is used as is (the base model's layout).
    """
    body = f"{voice}: {text}" if voice else text
    return [
        START_OF_HUMAN,
        *_encode_text(encode, body),
        END_OF_TEXT,
        END_OF_HUMAN,
        START_OF_AI,
        START_OF_SPEECH,
    ]


def clone_prefix(
    encode: TextEncoder, transcript: str, reference: Iterable[Sequence[int]]
) -> list[int]:
    """Zero-shot voice prefix: the reference transcript's turn followed by its audio.

    ``[SOH] BOS transcript [EOT, EOH, SOA, SOS] <reference audio tokens> [EOS, EOA]``.
    The target turn (:func:`clone_prompt`) follows it.
    """
    return [
        *finetuned_prompt(encode, None, transcript),
        *frames_to_tokens(reference),
        END_OF_SPEECH,
        END_OF_AI,
    ]


def clone_prompt(encode: TextEncoder, text: str) -> list[int]:
    """Target turn after a :func:`clone_prefix`: ``[SOH] BOS text [EOT, EOH, SOA, SOS]``."""
    return finetuned_prompt(encode, None, text)
