"""Hypothesis strategies of protocol-v1 client input, shared by the fuzzers of the sans-I/O
core (tests/sdk/test_session_protocol_fuzz.py) and of the server over a real socket
(tests/server/test_app_fuzz.py)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from voxlane.errors import AudioFormatError, ProtocolError
from voxlane.protocol import BUILTIN_VOICES


def _subclasses(cls: type) -> list[type]:
    out: list[type] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


# Error codes a client may cause. Anything else (internal_error, engine_error, ...) from the
# session core means an input slipped through as a server fault.
CLIENT_CODES = {c.code for c in (ProtocolError, AudioFormatError, *_subclasses(ProtocolError))}

# ------------------------------------------------------------------------------ strategies

# Every code point, lone surrogates (U+D800-U+DFFF) included: a JSON text may carry them as
# raw characters or as "\ud800" escapes.
surrogate = st.integers(0xD800, 0xDFFF).map(chr)
any_char = st.one_of(st.characters(), surrogate)
any_text = st.text(any_char, max_size=40)
ids = st.one_of(
    st.sampled_from(["a", "b", "c", "turn-1", "x" * 64, "x" * 65, "", "bad id!", "\ud800"]),
    st.from_regex(r"[A-Za-z0-9_.:-]{1,8}", fullmatch=True),
    any_text,
)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)
    ),
    max_leaves=12,
)
# Field values: mostly plausible, sometimes anything.
field_values: dict[str, Any] = {
    "turn_id": ids,
    "request_id": ids,
    "name": ids,
    "text": st.one_of(any_text, st.text(max_size=300)),
    "end": st.one_of(st.booleans(), json_value),
    "voice": st.one_of(st.sampled_from(sorted(BUILTIN_VOICES)), any_text),
    "chunk_ms": st.one_of(st.sampled_from([20, 40, 80]), st.integers(-5, 500), json_value),
    "sample_rate": st.one_of(st.sampled_from([8000, 16000, 24000, 48000]), json_value),
    "sample_format": st.sampled_from(["pcm_s16le", "pcm_f32le", "mp3", ""]),
    "context_window": st.one_of(st.integers(-2, 10), json_value),
    "sampling": st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(-1, 3),
                "top_p": st.floats(-1, 2),
                "max_frames": st.integers(-1, 10_000),
                "seed": st.one_of(st.integers(-(2**64), 2**64), json_value),
                "repetition_penalty": st.floats(0, 3),
            },
        ),
        json_value,
    ),
    "transcript": any_text,
    "audio_bytes": st.one_of(st.integers(-1, 64), st.integers(), json_value),
    "audio_format": st.sampled_from(["wav", "pcm_s16le", "flac"]),
    "sample": st.one_of(st.integers(-1, 10**6), json_value),
}
TYPES = [
    "session.configure",
    "voice.clone",
    "turn.start",
    "turn.append",
    "turn.flush",
    "turn.end",
    "turn.cancel",
    "turn.playback",
    "agent.respond",
    "turn.dance",
]


@st.composite
def shaped_message(draw: st.DrawFn) -> str:
    """A protocol message of a known (or unknown) type with fuzzed fields."""
    message: dict[str, Any] = {"type": draw(st.sampled_from(TYPES))}
    names = draw(st.lists(st.sampled_from(sorted(field_values)), max_size=4, unique=True))
    for name in names:
        message[name] = draw(field_values[name])
    if draw(st.booleans()):
        message[draw(any_text)] = draw(json_value)  # an unknown field
    return json.dumps(message, ensure_ascii=draw(st.booleans()))


pool_ids = st.sampled_from(["a", "b", "c", "d"])
short_text = st.sampled_from(["", "Hello.", "Hi there, ", "a" * 150, "[laugh] <|audio|>"])
valid_messages = st.one_of(
    st.builds(
        lambda i, t, e, v: {"type": "turn.start", "turn_id": i, "text": t, "end": e, **v},
        pool_ids,
        short_text,
        st.booleans(),
        st.sampled_from([{}, {"voice": "leo"}]),
    ),
    st.builds(lambda i, t: {"type": "turn.append", "turn_id": i, "text": t}, pool_ids, short_text),
    st.builds(lambda i: {"type": "turn.flush", "turn_id": i}, pool_ids),
    st.builds(lambda i: {"type": "turn.end", "turn_id": i}, pool_ids),
    st.builds(lambda i: {"type": "turn.cancel", "turn_id": i}, pool_ids),
    st.builds(
        lambda i, n: {"type": "turn.playback", "turn_id": i, "sample": n},
        pool_ids,
        st.integers(0, 5000),
    ),
    st.builds(
        lambda f, r: {"type": "session.configure", "sample_format": f, "sample_rate": r},
        st.sampled_from(["pcm_s16le", "pcm_f32le"]),
        st.sampled_from([16000, 24000]),
    ),
    st.builds(
        lambda n, fmt: {
            "type": "voice.clone",
            "request_id": "r",
            "transcript": "Hi.",
            "audio_bytes": n,
            "audio_format": fmt,
            "sample_rate": 16000,
        },
        st.integers(0, 8),
        st.sampled_from(["wav", "pcm_s16le"]),
    ),
).map(json.dumps)


@st.composite
def deep_json(draw: st.DrawFn) -> str:
    """Deeply nested arrays or objects, alone or as a field of a valid message."""
    # The deepest fits the default 256 KiB message limit (6 bytes per object level).
    depth = draw(st.sampled_from([50, 999, 1_000, 5_000, 40_000]))
    inner = (
        "[" * depth + "]" * depth if draw(st.booleans()) else '{"a":' * depth + "1" + "}" * depth
    )
    where = draw(st.sampled_from(["bare", "text", "sampling", "unknown"]))
    if where == "bare":
        return inner
    if where == "unknown":
        return '{"type":"turn.start","nested":' + inner + "}"
    kind = "turn.start" if where == "text" else "session.configure"
    return f'{{"type":"{kind}","{where}":{inner}}}'
