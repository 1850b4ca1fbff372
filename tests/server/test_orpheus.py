"""The Orpheus token layout against the reference implementation's numbers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxlane.errors import InvalidTokenError
from voxlane.server import orpheus as o

codes = st.integers(min_value=0, max_value=o.CODEBOOK_SIZE - 1)
frame_st = st.tuples(*[codes] * o.FRAME_SIZE)
frames_st = st.lists(frame_st, max_size=12)

# "tara: Hello there, how are you today?" in the Llama-3 tokenizer, without BOS.
TARA_HELLO = [83, 5169, 25, 22691, 1070, 11, 1268, 527, 499, 3432, 30]


def test_layout_constants_match_orpheus_reference():
    # Orpheus names added token N `<custom_token_N>` at id 128256 + N; its decoder maps
    # custom token N at frame index i to code N - 10 - 4096 * (i % 7).
    assert (o.START_OF_TEXT, o.END_OF_TEXT) == (128000, 128009)
    controls = (o.START_OF_SPEECH, o.END_OF_SPEECH, o.START_OF_HUMAN, o.END_OF_HUMAN)
    controls += (o.START_OF_AI, o.END_OF_AI, o.PAD)
    assert controls == tuple(range(128257, 128264))
    assert o.AUDIO_TOKEN_BASE == 128256 + 10
    assert o.VOCAB_SIZE == 156_940
    frame_ms = o.SAMPLES_PER_FRAME * 1000 / o.SAMPLE_RATE
    assert frame_ms == pytest.approx(85.333, abs=1e-3)
    for n in (10, 4105, 4106, 28681):
        position = (n - 10) // 4096
        assert o.audio_token(n - 10 - 4096 * position, position) == 128256 + n


def test_audio_token_ranges_tile_the_audio_block():
    ranges = [o.audio_token_range(p) for p in range(o.FRAME_SIZE)]
    assert ranges[0].start == o.AUDIO_TOKEN_BASE
    for a, b in itertools.pairwise(ranges):
        assert a.stop == b.start and len(a) == o.CODEBOOK_SIZE
    # The last audio token is still inside the LM head (two spare rows follow it).
    assert ranges[-1].stop == o.VOCAB_SIZE - 2


def test_finetuned_prompt_is_the_reference_layout(orpheus_tokenizer):
    def encode(text: str) -> list[int]:
        return orpheus_tokenizer(text)["input_ids"]

    prompt = o.finetuned_prompt(encode, "tara", "Hello there, how are you today?")
    assert prompt == [128259, 128000, *TARA_HELLO, 128009, 128260, 128261, 128257]


def test_prompt_adds_bos_when_the_encoder_does_not(orpheus_tokenizer):
    def encode_without_bos(text: str) -> list[int]:
        return orpheus_tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = o.finetuned_prompt(encode_without_bos, "tara", "Hello there, how are you today?")
    assert prompt[:2] == [o.START_OF_HUMAN, o.START_OF_TEXT]
    assert prompt.count(o.START_OF_TEXT) == 1


def test_clone_prefix_then_target_turn(orpheus_tokenizer):
    def encode(text: str) -> list[int]:
        return orpheus_tokenizer(text)["input_ids"]

    reference = [(0, 1, 2, 3, 4, 5, 6), (4095, 4095, 4095, 4095, 4095, 4095, 4095)]
    prefix = o.clone_prefix(encode, "Reference words.", reference)
    transcript = encode("Reference words.")
    assert transcript[0] == 128000
    audio = [128266 + c + 4096 * p for f in reference for p, c in enumerate(f)]
    assert prefix == [128259, *transcript, 128009, 128260, 128261, 128257, *audio, 128258, 128262]
    target = o.clone_prompt(encode, "Hello there, how are you today?")
    assert target == [128259, 128000, 9906, 1070, 11, 1268, 527, 499, 3432, 30,
                      128009, 128260, 128261, 128257]  # fmt: skip


def test_voiceless_prompt_uses_text_alone():
    prompt = o.finetuned_prompt(lambda t: [128000, len(t)], None, "abc")
    assert prompt == [128259, 128000, 3, 128009, 128260, 128261, 128257]


@given(frames_st)
def test_frames_tokens_round_trip(frames):
    tokens = o.frames_to_tokens(frames)
    assert len(tokens) == o.FRAME_SIZE * len(frames)
    for i, token in enumerate(tokens):
        assert token in o.audio_token_range(i % o.FRAME_SIZE)
    assert o.tokens_to_frames(tokens) == frames


@given(frames_st)
def test_frames_codebooks_round_trip(frames):
    c0, c1, c2 = o.frames_to_codebooks(frames)
    assert (len(c0), len(c1), len(c2)) == (len(frames), 2 * len(frames), 4 * len(frames))
    assert o.codebooks_to_frames(c0, c1, c2) == frames


@given(frame_st)
def test_split_audio_token_inverts_audio_token(frame):
    for position, code in enumerate(frame):
        assert o.split_audio_token(o.audio_token(code, position), position) == code


def test_codebook_of_each_frame_position():
    # Position p carries code 100 + p, so each code says where it came from.
    frame = tuple(100 + p for p in range(7))
    c0, c1, c2 = o.frames_to_codebooks([frame, frame])
    assert c0 == [100, 100]
    assert c1 == [101, 104, 101, 104]
    assert c2 == [102, 103, 105, 106, 102, 103, 105, 106]
    assert o.CODEBOOK_OF_POSITION == (0, 1, 2, 2, 1, 2, 2)


def test_edge_codes_are_valid():
    frame = (0, 4095, 0, 4095, 0, 4095, 0)
    tokens = o.frame_to_tokens(frame)
    assert tokens[0] == o.AUDIO_TOKEN_BASE
    assert tokens[1] == o.AUDIO_TOKEN_BASE + 2 * 4096 - 1
    assert o.tokens_to_frames(tokens) == [frame]


def test_numpy_integers_are_accepted_as_codes_and_tokens():
    frame = tuple(np.arange(7, dtype=np.int64) * 600)
    tokens = o.frame_to_tokens(frame)
    assert all(type(t) is int for t in tokens)
    assert o.tokens_to_frames(np.array(tokens)) == [tuple(range(0, 4200, 600))]
    c0, c1, c2 = (np.array(c) for c in o.frames_to_codebooks([frame]))
    assert o.codebooks_to_frames(c0, c1, c2) == [tuple(range(0, 4200, 600))]


def test_token_at_the_wrong_position_is_rejected():
    tokens = o.frame_to_tokens((1, 2, 3, 4, 5, 6, 7))
    tokens[2], tokens[3] = tokens[3], tokens[2]
    with pytest.raises(InvalidTokenError, match="position 3, found at position 2"):
        o.tokens_to_frames(tokens)


@pytest.mark.parametrize(
    "token",
    [o.AUDIO_TOKEN_BASE - 1, o.END_OF_SPEECH, o.START_OF_TEXT, o.VOCAB_SIZE - 2, -1, 10**9],
)
def test_non_audio_token_is_rejected(token):
    with pytest.raises(InvalidTokenError, match="not an audio token"):
        o.split_audio_token(token, 0)


@pytest.mark.parametrize("token", [128266.0, "128266", True, None])
def test_non_integer_token_is_rejected(token):
    with pytest.raises(InvalidTokenError):
        o.split_audio_token(token, 0)


@pytest.mark.parametrize("code", [-1, 4096, 2.0, "1", True, None])
def test_bad_code_is_rejected(code):
    with pytest.raises(InvalidTokenError):
        o.audio_token(code, 0)
    with pytest.raises(InvalidTokenError):
        o.frame_to_tokens((0, 0, 0, code, 0, 0, 0))


@pytest.mark.parametrize("position", [-1, 7, 1.0, True])
def test_bad_position_is_rejected(position):
    with pytest.raises(InvalidTokenError):
        o.audio_token(0, position)
    with pytest.raises(InvalidTokenError):
        o.audio_token_range(position)


@pytest.mark.parametrize("length", [0, 6, 8])
def test_frame_of_wrong_length_is_rejected(length):
    with pytest.raises(InvalidTokenError, match="7 codes"):
        o.validate_frame([0] * length)


@pytest.mark.parametrize("count", [1, 6, 8, 13])
def test_partial_frame_of_tokens_is_rejected(count):
    tokens = o.frames_to_tokens([(0,) * 7, (1,) * 7])[:count]
    with pytest.raises(InvalidTokenError, match="whole number"):
        o.tokens_to_frames(tokens)


def test_codebooks_of_mismatched_lengths_are_rejected():
    with pytest.raises(InvalidTokenError, match="n, 2n, 4n"):
        o.codebooks_to_frames([0], [0, 0], [0, 0, 0])
    with pytest.raises(InvalidTokenError):
        o.codebooks_to_frames([0], [0, 4096], [0, 0, 0, 0])
