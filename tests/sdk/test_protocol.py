"""Protocol v1: message models, audio header, and the sans-I/O session core.

Byte-in/byte-out: text and bytes go in, JSON strings and audio frames come out, no
event loop and no socket.
"""

from __future__ import annotations

import json
import struct

import pytest

from voxlane.errors import (
    AudioFormatError,
    BadMessageError,
    EngineError,
    MessageTooLargeError,
    OutOfRangeError,
    UnknownMessageError,
    error_class_for_code,
)
from voxlane.protocol import (
    AUDIO_HEADER_SIZE,
    AudioFrame,
    AudioHeader,
    Limits,
    SampleFormatCode,
    SessionConfig,
    SessionConfigure,
    TurnDone,
    TurnMetrics,
    TurnStarted,
    dump_message,
    parse_client_message,
    parse_server_message,
)
from voxlane.session_protocol import (
    AppendText,
    CancelTurn,
    ClientSession,
    CloneVoice,
    CloseConnection,
    ConfigureSession,
    EndTurn,
    FlushTurn,
    ServerSession,
    StartTurn,
    TurnPhase,
)

# ------------------------------------------------------------------------- helpers


def msg(type_: str, **fields: object) -> str:
    return json.dumps({"type": type_, **fields})


def drain(session: ServerSession) -> list[dict | bytes]:
    """Outbound data with JSON decoded (bytes stay bytes)."""
    return [d if isinstance(d, bytes) else json.loads(d) for d in session.data_to_send()]


def texts_of(out: list[dict | bytes]) -> list[dict]:
    return [d for d in out if isinstance(d, dict)]


def errors_of(out: list[dict | bytes]) -> list[dict]:
    return [d for d in out if isinstance(d, dict) and d["type"] == "error"]


def new_session(**limits: object) -> ServerSession:
    session = ServerSession(limits=Limits(**limits), session_id="s-1")  # type: ignore[arg-type]
    session.data_to_send()  # session.ready
    return session


PCM = b"\x01\x00" * 480  # 480 s16 samples


# --------------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ("{not json", BadMessageError),
        ("[1, 2]", BadMessageError),
        ('"turn.start"', BadMessageError),
        ("{}", BadMessageError),
        ('{"type": 5}', BadMessageError),
        (msg("turn.explode"), UnknownMessageError),
        (msg("turn.append", turn_id="a"), BadMessageError),  # text missing
        (msg("turn.append", turn_id="a", text=5), BadMessageError),
        (msg("turn.append", turn_id="a", text="x", colour="red"), BadMessageError),
        (msg("turn.start", end="yes"), BadMessageError),
        (msg("session.configure", chunk_ms="40"), BadMessageError),
        (msg("session.configure", chunk_ms=10), OutOfRangeError),
        (msg("session.configure", chunk_ms=81), OutOfRangeError),
        (msg("session.configure", sample_rate=44100), OutOfRangeError),
        (msg("session.configure", sample_format="mp3"), OutOfRangeError),
        (msg("session.configure", sampling={"temperature": 0}), OutOfRangeError),
        (msg("session.configure", sampling={"top_p": 1.5}), OutOfRangeError),
        (msg("session.configure", sampling={"repetition_penalty": 2.5}), OutOfRangeError),
        (msg("session.configure", sampling={"max_frames": 0}), OutOfRangeError),
        (msg("session.configure", sampling={"seed": -1}), OutOfRangeError),
        (msg("session.configure", context_window=9), OutOfRangeError),
        (msg("turn.start", turn_id=""), OutOfRangeError),
        (msg("turn.start", turn_id="has space"), OutOfRangeError),
        (msg("turn.start", turn_id="x" * 65), OutOfRangeError),
    ],
)
def test_parse_maps_failures_to_typed_errors(data: str, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        parse_client_message(data)
    assert type(info.value) is error


def test_parse_rejects_oversize_before_decoding() -> None:
    with pytest.raises(MessageTooLargeError):
        parse_client_message(msg("turn.append", turn_id="a", text="x" * 2000), max_bytes=1024)


def test_parse_accepts_valid_messages_with_defaults() -> None:
    start = parse_client_message(msg("turn.start"))
    assert start.turn_id is None and start.text == "" and start.end is False
    conf = parse_client_message(msg("session.configure", sampling={"temperature": 1}))
    assert isinstance(conf, SessionConfigure)
    assert conf.sampling is not None and conf.sampling.temperature == 1.0


def test_config_update_merges_sampling_field_by_field() -> None:
    config = SessionConfig(sampling={"temperature": 0.9, "seed": 3})  # type: ignore[arg-type]
    update = parse_client_message(msg("session.configure", chunk_ms=20, sampling={"top_p": 0.5}))
    new = config.updated(update)  # type: ignore[arg-type]
    assert new.chunk_ms == 20 and new.voice == "tara"
    assert (new.sampling.temperature, new.sampling.top_p, new.sampling.seed) == (0.9, 0.5, 3)
    reset = new.updated(parse_client_message(msg("session.configure", sampling={"seed": None})))  # type: ignore[arg-type]
    assert reset.sampling.seed is None and reset.sampling.top_p == 0.5
    assert new.chunk_samples == 480


def test_server_messages_round_trip_and_ignore_new_fields() -> None:
    done = TurnDone(turn_id="a", reason="completed", metrics=TurnMetrics(audio_s=1.5))
    assert parse_server_message(dump_message(done)) == done
    data = json.loads(dump_message(done))
    data["added_in_v1_1"] = True
    assert parse_server_message(json.dumps(data)) == done
    with pytest.raises(UnknownMessageError):
        parse_server_message(msg("agent.added_later", text="hi"))


# ---------------------------------------------------------------------- audio header


def test_audio_header_layout_is_the_documented_one() -> None:
    header = AudioHeader(
        turn_number=7, sequence=3, sample_offset=2**40 + 5, sample_format=SampleFormatCode.PCM_F32LE
    )
    raw = header.pack()
    assert len(raw) == AUDIO_HEADER_SIZE == 20
    assert raw[0] == 1  # version
    assert raw[1] == 2  # pcm_f32le
    assert struct.unpack_from("<H", raw, 2) == (20,)
    assert struct.unpack_from("<I", raw, 4) == (7,)
    assert struct.unpack_from("<I", raw, 8) == (3,)
    assert struct.unpack_from("<Q", raw, 12) == (2**40 + 5,)
    assert AudioHeader.unpack(raw + b"\0" * 8) == (header, 20)


def test_audio_frame_round_trip_and_skips_a_longer_header() -> None:
    frame = AudioFrame(AudioHeader(1, 0, 0), PCM)
    assert AudioFrame.unpack(frame.pack()) == frame and frame.num_samples == 480
    longer = bytearray(frame.header.pack() + b"\xaa\xbb\xcc\xdd" + PCM)
    longer[2:4] = struct.pack("<H", 24)  # a future version's extra header field
    assert AudioFrame.unpack(bytes(longer)).pcm == PCM


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x01\x14\x00",  # short
        b"\x02\x01\x14\x00" + bytes(16),  # version 2
        b"\x01\x09\x14\x00" + bytes(16),  # sample format 9
        b"\x01\x01\x08\x00" + bytes(16),  # header size 8
        b"\x01\x01\x14\x00" + bytes(16) + b"\x01",  # half a sample
    ],
)
def test_malformed_audio_frames_are_bad_messages(data: bytes) -> None:
    with pytest.raises(BadMessageError):
        AudioFrame.unpack(data)


def test_audio_header_rejects_out_of_range_fields() -> None:
    with pytest.raises(OutOfRangeError):
        AudioHeader(turn_number=2**32, sequence=0, sample_offset=0).pack()


# ------------------------------------------------------------------ session basics


def test_session_ready_announces_config_limits_and_voices() -> None:
    session = ServerSession(limits=Limits(max_turns=2), session_id="abc")
    (ready,) = drain(session)
    assert ready["type"] == "session.ready" and ready["protocol"] == 1
    assert ready["session_id"] == "abc" and ready["limits"]["max_turns"] == 2
    assert ready["config"]["chunk_ms"] == 40 and "tara" in ready["voices"]


def test_configure_acknowledges_and_commands() -> None:
    session = new_session()
    commands = session.receive_text(msg("session.configure", voice="leo", sample_rate=16000))
    assert commands == [ConfigureSession(session.config)]
    (ack,) = drain(session)
    assert ack["type"] == "session.configured" and ack["config"]["voice"] == "leo"
    assert ack["config"]["sample_rate"] == 16000 and ack["config"]["chunk_ms"] == 40


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("{oops", "bad_message"),
        (msg("turn.launch"), "unknown_type"),
        (msg("session.configure", chunk_ms=100), "out_of_range"),
        (msg("session.configure", voice="nobody"), "unknown_voice"),
        (msg("turn.append", turn_id="ghost", text="hi"), "unknown_turn"),
        (msg("turn.cancel", turn_id="ghost"), "unknown_turn"),
        (b"\x00\x01", "bad_message"),  # binary without voice.clone
    ],
)
def test_client_mistakes_get_an_error_and_the_session_lives_on(
    data: str | bytes, code: str
) -> None:
    session = new_session()
    before = session.config
    commands = (
        session.receive_bytes(data) if isinstance(data, bytes) else session.receive_text(data)
    )
    assert commands == []
    (error,) = drain(session)
    assert error["type"] == "error" and error["code"] == code and error["fatal"] is False
    assert error_class_for_code(code).code == code
    assert session.config == before and not session.closed
    assert session.receive_text(msg("turn.start", turn_id="t"))[0] == StartTurn(
        "t", 1, session.config
    )


def test_error_names_the_turn_it_concerns() -> None:
    session = new_session()
    session.receive_text(msg("turn.append", turn_id="ghost", text="x"))
    assert drain(session)[0]["turn_id"] == "ghost"


def test_oversize_message_is_fatal_with_1009() -> None:
    session = new_session(max_message_bytes=1024)
    commands = session.receive_text(msg("turn.start", text="x" * 5000))
    assert commands == [CloseConnection(1009, commands[0].reason)]  # type: ignore[union-attr]
    (error,) = drain(session)
    assert error["code"] == "message_too_large" and error["fatal"] is True
    assert session.closed and session.close_code == 1009
    assert session.receive_text(msg("turn.start")) == []
    assert drain(session) == []


def test_too_many_errors_close_with_policy_violation() -> None:
    session = new_session(max_errors=3)
    for _ in range(3):
        assert session.receive_text("nope") == []
    commands = session.receive_text("nope")
    assert isinstance(commands[-1], CloseConnection) and commands[-1].code == 1008
    out = drain(session)
    assert [e["fatal"] for e in errors_of(out)] == [False, False, False, True]


# -------------------------------------------------------------------------- turns


def test_turn_lifecycle_commands_frames_marks_and_metrics() -> None:
    session = new_session()
    commands = session.receive_text(msg("turn.start", turn_id="a", text="Hello"))
    assert commands == [StartTurn("a", 1, session.config), AppendText("a", "Hello", 0)]
    assert session.receive_text(msg("turn.append", turn_id="a", text=" world.")) == [
        AppendText("a", " world.", 5)
    ]
    assert session.receive_text(msg("turn.flush", turn_id="a")) == [FlushTurn("a")]
    assert session.receive_text(msg("turn.end", turn_id="a")) == [EndTurn("a")]
    assert session.turn("a").phase is TurnPhase.ENDED

    assert session.send_mark("a", start=0, end=12, text="Hello world.")
    assert session.send_audio("a", PCM) and session.send_audio("a", PCM[:100])
    assert session.send_mark("a", start=12, end=12, text="again")
    assert session.turn_done("a", time_to_first_audio_s=0.2, generation_s=0.0106) == []

    out = drain(session)
    started, mark0, frame0, frame1, mark1, done = out
    assert started == {
        "type": "turn.started",
        "turn_id": "a",
        "turn_number": 1,
        "queued": False,
        "voice": "tara",
        "sample_rate": 24000,
        "sample_format": "pcm_s16le",
    }
    assert (mark0["segment"], mark0["sample"], mark0["end"]) == (0, 0, 12)
    h0, _ = AudioHeader.unpack(frame0)  # type: ignore[arg-type]
    h1, _ = AudioHeader.unpack(frame1)  # type: ignore[arg-type]
    assert (h0.turn_number, h0.sequence, h0.sample_offset) == (1, 0, 0)
    assert (h1.sequence, h1.sample_offset) == (1, 480)
    assert (mark1["segment"], mark1["sample"]) == (1, 530)
    assert done["type"] == "turn.done" and done["reason"] == "completed"
    metrics = done["metrics"]
    assert metrics["samples"] == 530 and metrics["segments"] == 2
    assert metrics["audio_s"] == pytest.approx(530 / 24000)
    assert metrics["rtf"] == pytest.approx(0.0106 / (530 / 24000))
    assert metrics["time_to_first_audio_s"] == 0.2
    assert session.open_turns == []


def test_turns_queue_in_order_and_replay_their_messages() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    assert session.receive_text(msg("turn.start", turn_id="b", text="B1")) == []
    assert session.receive_text(msg("turn.start", turn_id="c", text="C", end=True)) == []
    assert session.receive_text(msg("turn.append", turn_id="b", text="B2")) == []
    assert session.receive_text(msg("turn.flush", turn_id="b")) == []
    assert session.receive_text(msg("turn.end", turn_id="b")) == []
    assert [t.phase for t in session.open_turns] == [TurnPhase.ACTIVE, *[TurnPhase.QUEUED] * 2]
    started = [d for d in drain(session) if d["type"] == "turn.started"]  # type: ignore[index]
    assert [(s["turn_id"], s["queued"]) for s in started] == [  # type: ignore[index]
        ("a", False),
        ("b", True),
        ("c", True),
    ]
    assert not session.send_audio("b", PCM)  # not its turn yet

    config = session.config
    assert session.turn_done("a") == [
        StartTurn("b", 2, config),
        AppendText("b", "B1", 0),
        AppendText("b", "B2", 2),
        FlushTurn("b"),
        EndTurn("b"),
    ]
    assert session.active_turn is not None and session.active_turn.phase is TurnPhase.ENDED
    assert session.turn_done("b") == [
        StartTurn("c", 3, config),
        AppendText("c", "C", 0),
        EndTurn("c"),
    ]


def test_turn_snapshots_config_and_takes_a_voice_override() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a", voice="zoe"))
    session.receive_text(msg("session.configure", sample_format="pcm_f32le"))
    assert session.turn("a").config.voice == "zoe"
    assert session.turn("a").config.sample_format == "pcm_s16le"
    with pytest.raises(Exception, match="whole pcm_s16le samples"):
        session.send_audio("a", b"\x00")
    session.receive_text(msg("turn.start", turn_id="b", voice="ghost"))
    assert errors_of(drain(session))[0]["code"] == "unknown_voice"


def test_too_many_turns() -> None:
    session = new_session(max_turns=2)
    session.receive_text(msg("turn.start", turn_id="a"))
    session.receive_text(msg("turn.start", turn_id="b"))
    session.receive_text(msg("turn.start", turn_id="c"))
    error = errors_of(drain(session))[0]
    assert error["code"] == "too_many_turns" and error["turn_id"] == "c"
    session.turn_done("a")
    session.receive_text(msg("turn.start", turn_id="c"))
    assert errors_of(drain(session)) == []


def test_duplicate_turn_ids_are_refused_even_after_done() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    session.receive_text(msg("turn.start", turn_id="a"))
    assert errors_of(drain(session))[0]["code"] == "duplicate_turn"
    session.turn_done("a")
    session.receive_text(msg("turn.start", turn_id="a"))
    assert errors_of(drain(session))[0]["code"] == "duplicate_turn"


def test_server_chosen_turn_ids_avoid_client_ones() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="turn-1"))
    (command,) = session.receive_text(msg("turn.start", end=True))[:1] or [None]
    ids = [t.turn_id for t in session.open_turns]
    assert ids == ["turn-1", "turn-2"] and command is None  # queued


@pytest.mark.parametrize("closing", ["turn.end", "turn.cancel"])
def test_text_after_end_or_cancel_is_turn_closed(closing: str) -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    session.receive_text(msg(closing, turn_id="a"))
    drain(session)
    for late in ("turn.append", "turn.flush", "turn.end"):
        extra = {"text": "late"} if late == "turn.append" else {}
        assert session.receive_text(msg(late, turn_id="a", **extra)) == []
    assert [e["code"] for e in errors_of(drain(session))] == ["turn_closed"] * 3


def test_turn_text_limit_rejects_the_append_only() -> None:
    session = new_session(max_turn_chars=10)
    session.receive_text(msg("turn.start", turn_id="a", text="12345"))
    assert session.receive_text(msg("turn.append", turn_id="a", text="678901")) == []
    assert errors_of(drain(session))[0]["code"] == "message_too_large"
    assert session.receive_text(msg("turn.append", turn_id="a", text="67890")) == [
        AppendText("a", "67890", 5)
    ]
    assert not session.closed


# ------------------------------------------------------------------------- cancel


def test_no_audio_of_a_cancelled_turn_after_the_ack() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a", text="Hi there."))
    session.receive_text(msg("turn.start", turn_id="b", text="Next.", end=True))
    assert session.send_audio("a", PCM)
    assert session.receive_text(msg("turn.cancel", turn_id="a")) == [CancelTurn("a")]
    # The pipeline is still finishing a step: everything it emits now is dropped.
    assert not session.send_audio("a", PCM)
    assert not session.send_mark("a", start=0, end=1, text="x")
    assert session.turn_done("a", generation_s=0.5)[0] == StartTurn("b", 2, session.config)
    assert session.send_audio("b", PCM)

    out = drain(session)
    ack = next(
        i for i, d in enumerate(out) if isinstance(d, dict) and d["type"] == "turn.cancelled"
    )
    assert out[ack]["sample"] == 480  # type: ignore[index]
    frames_after = [AudioHeader.unpack(d)[0] for d in out[ack:] if isinstance(d, bytes)]
    assert [h.turn_number for h in frames_after] == [2]
    done = next(d for d in out if isinstance(d, dict) and d["type"] == "turn.done")
    assert done["reason"] == "cancelled" and done["metrics"]["samples"] == 480


def test_cancel_of_a_queued_turn_finishes_it_without_commands() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    session.receive_text(msg("turn.start", turn_id="b", text="never spoken"))
    drain(session)
    assert session.receive_text(msg("turn.cancel", turn_id="b")) == []
    cancelled, done = drain(session)
    assert cancelled["type"] == "turn.cancelled" and cancelled["sample"] == 0  # type: ignore[index]
    assert done["type"] == "turn.done" and done["reason"] == "cancelled"  # type: ignore[index]
    assert session.turn_done("a") == []  # b never starts
    assert not session.send_audio("b", PCM)


def test_second_cancel_and_cancel_after_done() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    session.receive_text(msg("turn.cancel", turn_id="a"))
    session.receive_text(msg("turn.cancel", turn_id="a"))
    session.turn_done("a")
    session.receive_text(msg("turn.cancel", turn_id="a"))
    assert [e["code"] for e in errors_of(drain(session))] == ["turn_closed", "unknown_turn"]


def test_failed_turn_sends_error_then_done() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a", text="x", end=True))
    drain(session)
    session.turn_done("a", error=EngineError("out of memory"))
    error, done = drain(session)
    assert error == {
        "type": "error",
        "code": "engine_error",
        "message": "out of memory",
        "turn_id": "a",
        "request_id": None,
        "fatal": False,
    }
    assert done["reason"] == "error"  # type: ignore[index]


def test_turn_done_for_a_turn_that_is_not_active_is_a_server_bug() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    session.receive_text(msg("turn.start", turn_id="b"))
    with pytest.raises(Exception, match="not the active turn"):
        session.turn_done("b")


# ------------------------------------------------------------------ close and loss


def test_fail_cancels_the_active_turn_and_closes_with_1011() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    session.receive_text(msg("turn.start", turn_id="b"))
    drain(session)
    commands = session.fail(EngineError("engine crashed"))
    assert commands[0] == CancelTurn("a") and commands[1].code == 1011  # type: ignore[union-attr]
    (error,) = drain(session)
    assert error["fatal"] is True and error["code"] == "engine_error"
    assert not session.send_audio("a", PCM)
    assert session.turn_done("a") == [] and drain(session) == []


def test_connection_lost_cancels_the_active_turn() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    assert session.connection_lost() == [CancelTurn("a")]
    assert session.closed and session.close_code is None
    assert session.connection_lost() == []


def test_close_going_away() -> None:
    session = new_session()
    assert session.close(1001, "restart") == [CloseConnection(1001, "restart")]
    assert drain(session) == []


# -------------------------------------------------------------------- voice clone


def clone_msg(**fields: object) -> str:
    base: dict[str, object] = {"request_id": "r1", "transcript": "Hello there.", "audio_bytes": 4}
    return msg("voice.clone", **{**base, **fields})


def test_voice_clone_announce_then_binary() -> None:
    session = new_session()
    assert session.receive_text(clone_msg(name="me")) == []
    (command,) = session.receive_bytes(b"RIFF")
    assert command == CloneVoice("r1", "me", "Hello there.", b"RIFF", "wav", None)
    session.voice_cloned("r1", "me-1", 3.5)
    assert drain(session) == [
        {"type": "voice.cloned", "request_id": "r1", "voice_id": "me-1", "duration_s": 3.5}
    ]
    assert session.receive_text(msg("session.configure", voice="me-1"))
    assert session.config.voice == "me-1"


@pytest.mark.parametrize(
    ("announce", "binary", "code"),
    [
        (clone_msg(audio_bytes=10**9), None, "bad_audio"),
        (clone_msg(audio_format="pcm_s16le"), None, "bad_message"),  # no sample_rate
        (
            clone_msg(audio_format="pcm_s16le", sample_rate=8000, audio_bytes=8000 * 2 * 31),
            None,
            "bad_audio",
        ),
        (clone_msg(), b"12345", "bad_audio"),  # length differs from the announcement
        (clone_msg(transcript=""), None, "out_of_range"),
    ],
)
def test_voice_clone_limits(announce: str, binary: bytes | None, code: str) -> None:
    session = new_session(max_clone_bytes=1_000_000)
    session.receive_text(announce)
    if binary is not None:
        assert session.receive_bytes(binary) == []
    (error,) = errors_of(drain(session))
    assert error["code"] == code and error["fatal"] is False


def test_text_instead_of_clone_audio_aborts_the_clone_and_is_still_handled() -> None:
    session = new_session()
    session.receive_text(clone_msg())
    commands = session.receive_text(msg("turn.start", turn_id="a"))
    assert isinstance(commands[0], StartTurn)
    out = drain(session)
    assert out[0]["code"] == "bad_message" and out[0]["request_id"] == "r1"  # type: ignore[index]
    assert session.receive_bytes(b"RIFF") == []  # no clone pending any more


# ----------------------------------------------------------------- client counterpart


def test_client_session_decodes_what_the_server_sends() -> None:
    server = ServerSession(session_id="s")
    client = ClientSession()
    server.receive_text(msg("turn.start", turn_id="a", text="Hi.", end=True))
    server.send_mark("a", start=0, end=3, text="Hi.")
    server.send_audio("a", PCM)
    server.send_audio("a", PCM)
    server.turn_done("a")
    received = []
    for data in server.data_to_send():
        received.append(
            client.receive_bytes(data) if isinstance(data, bytes) else client.receive_text(data)
        )
    assert client.ready is not None and client.ready.session_id == "s"
    assert isinstance(received[1], TurnStarted)
    chunks = received[3:5]
    assert [(c.turn_id, c.sequence, c.sample_offset) for c in chunks] == [  # type: ignore[union-attr]
        ("a", 0, 0),
        ("a", 1, 480),
    ]
    assert isinstance(received[-1], TurnDone)


def test_client_session_detects_a_lost_frame_and_unknown_turns() -> None:
    server = ServerSession()
    client = ClientSession()
    server.receive_text(msg("turn.start", turn_id="a"))
    server.send_audio("a", PCM)
    server.send_audio("a", PCM)
    ready, started, _first, second = server.data_to_send()
    client.receive_text(ready)  # type: ignore[arg-type]
    with pytest.raises(BadMessageError, match="unknown turn"):
        client.receive_bytes(second)  # type: ignore[arg-type]
    client.receive_text(started)  # type: ignore[arg-type]
    with pytest.raises(BadMessageError, match="expected"):
        client.receive_bytes(second)  # type: ignore[arg-type]


def test_protocol_modules_import_without_numpy_or_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, voxlane.protocol, voxlane.session_protocol; "
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------- hostile input (issue 22)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _start_with_text(raw_json: str) -> str:
    return '{"type":"turn.start","text":' + raw_json + "}"


@pytest.mark.parametrize("depth", [33, 800, 1000, 100_000])
@pytest.mark.parametrize("where", ["message", "field"])
def test_deeply_nested_json_is_a_bad_message_not_a_crash(depth: int, where: str) -> None:
    session = new_session()
    data = _nested(depth) if where == "message" else _start_with_text(_nested(depth))
    assert session.receive_text(data) == []
    (error,) = drain(session)
    assert (error["code"], error["fatal"]) == ("bad_message", False)  # type: ignore[index]
    if where == "field":
        assert "deeper than 32" in error["message"]  # type: ignore[index]
    assert session.receive_text(msg("turn.start", turn_id="t"))[0] == StartTurn(
        "t", 1, session.config
    )


def test_nesting_within_the_bound_is_judged_by_its_fields() -> None:
    session = new_session()
    session.receive_text(_start_with_text(_nested(31)))
    (error,) = drain(session)
    assert error["code"] == "bad_message" and "text" in error["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    "data",
    [
        r'{"type":"turn.start","turn_id":"a","text":"hi \ud800 there"}',
        r'{"type":"turn.start","turn_id":"a","text":"\udc00"}',
        r'{"type":"turn.start","turn_id":"a","text":"end \ud83d"}',
        r'{"type":"turn.start","turn_id":"a","text":"x","\ud800":1}',
        '{"type":"turn.start","turn_id":"a","text":"raw \ud800"}',  # a str that holds one
    ],
)
def test_lone_surrogates_are_refused_at_the_door(data: str) -> None:
    session = new_session()
    assert session.receive_text(data) == []
    (error,) = drain(session)
    assert (error["code"], error["fatal"]) == ("bad_message", False)  # type: ignore[index]
    assert "surrogate" in error["message"]  # type: ignore[index]
    assert session.open_turns == []


def test_lone_surrogates_are_refused_in_appended_text_too() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="a"))
    drain(session)
    assert session.receive_text(r'{"type":"turn.append","turn_id":"a","text":"\ud800"}') == []
    (error,) = drain(session)
    assert (error["code"], error["turn_id"]) == ("bad_message", "a")  # type: ignore[index]
    assert session.turn("a").chars == 0


def test_a_surrogate_pair_is_text() -> None:
    session = new_session()
    commands = session.receive_text(r'{"type":"turn.start","turn_id":"a","text":"hi \ud83d\ude00"}')
    assert AppendText("a", "hi \U0001f600", 0) in commands


REFUSED_CLONES = [
    pytest.param(clone_msg(audio_bytes=600_000), "bad_audio", id="too-large"),
    pytest.param(
        clone_msg(audio_format="pcm_s16le", sample_rate=8000, audio_bytes=8000 * 2 * 31),
        "bad_audio",
        id="too-long",
    ),
    pytest.param(
        clone_msg(audio_format="pcm_s16le", sample_rate=8000, audio_bytes=300_001),
        "bad_audio",
        id="odd-pcm",
    ),
    pytest.param(
        clone_msg(audio_format="pcm_s16le", sample_rate=16000, audio_bytes=2),
        "bad_audio",
        id="one-sample-pcm",
    ),
    pytest.param(clone_msg(audio_format="pcm_s16le"), "bad_message", id="no-rate"),
    pytest.param(clone_msg(name="tara"), "duplicate_voice", id="builtin-name"),
    pytest.param(clone_msg(sample_rate=4000), "out_of_range", id="bad-field"),
    pytest.param(clone_msg(transcript="x" * 2001), "out_of_range", id="long-transcript"),
    pytest.param(clone_msg(colour="red"), "bad_message", id="unknown-field"),
]


@pytest.mark.parametrize(("announce", "code"), REFUSED_CLONES)
def test_a_refused_clone_is_one_error_and_its_audio_is_dropped(announce: str, code: str) -> None:
    session = new_session(max_message_bytes=4096, max_clone_bytes=500_000)
    assert session.receive_text(announce) == []
    (error,) = drain(session)
    assert (error["code"], error["request_id"], error["fatal"]) == (code, "r1", False)  # type: ignore[index]
    # The client sent its audio before it could read the refusal: larger than
    # max_message_bytes, yet part of the refused request, not a stray message.
    assert session.receive_bytes(b"\x00" * 300_001) == []
    assert drain(session) == [] and not session.closed and session.errors == 1
    # The next binary message is stray again.
    session.receive_bytes(b"\x00\x01")
    assert errors_of(drain(session))[0]["code"] == "bad_message"


def test_a_refused_clone_followed_by_text_handles_the_text() -> None:
    session = new_session(max_clone_bytes=100)
    session.receive_text(clone_msg(audio_bytes=101))
    commands = session.receive_text(msg("turn.start", turn_id="a"))
    assert isinstance(commands[0], StartTurn)
    assert [e["code"] for e in errors_of(drain(session))] == ["bad_audio"]
    session.receive_bytes(b"RIFF")  # stray now
    assert [e["code"] for e in errors_of(drain(session))] == ["bad_message"]


def test_clone_names_never_shadow_or_reuse_a_voice() -> None:
    session = new_session()
    for builtin in ("tara", "leo", "zoe"):
        session.receive_text(clone_msg(name=builtin))
        (error,) = errors_of(drain(session))
        assert error["code"] == "duplicate_voice" and "built-in" in error["message"]
        assert session.receive_bytes(b"RIFF") == []  # dropped with its announcement
    session.receive_text(clone_msg(name="me"))
    assert isinstance(session.receive_bytes(b"RIFF")[0], CloneVoice)
    # While "me" is being cloned its name is taken ...
    session.receive_text(clone_msg(request_id="r2", name="me"))
    (error,) = errors_of(drain(session))
    assert (error["code"], error["request_id"]) == ("duplicate_voice", "r2")
    session.receive_bytes(b"RIFF")
    session.voice_cloned("r1", "me", 2.0, name="me")
    drain(session)
    # ... and once cloned it stays taken.
    session.receive_text(clone_msg(request_id="r3", name="me"))
    (error,) = errors_of(drain(session))
    assert error["code"] == "duplicate_voice" and "already a cloned voice" in error["message"]
    session.receive_bytes(b"RIFF")
    assert session.errors == 5
    assert error_class_for_code("duplicate_voice").__name__ == "DuplicateVoiceError"


def test_a_failed_clone_frees_its_name() -> None:
    session = new_session()
    session.receive_text(clone_msg(name="me"))
    (command,) = session.receive_bytes(b"RIFF")
    assert isinstance(command, CloneVoice)
    session.clone_failed(command, AudioFormatError("reference audio is silent"))
    (error,) = errors_of(drain(session))
    assert (error["code"], error["request_id"]) == ("bad_audio", "r1")
    session.receive_text(clone_msg(request_id="r2", name="me"))
    assert session.receive_bytes(b"RIFF")[0].name == "me"  # type: ignore[union-attr]
    # A clone aborted by a wrong length frees its name too.
    session.receive_text(clone_msg(request_id="r3", name="you"))
    session.receive_bytes(b"RIFFF")
    session.receive_text(clone_msg(request_id="r4", name="you"))
    assert session.receive_bytes(b"RIFF")[0].name == "you"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "turn_id", "request_id"),
    [
        (msg("turn.append", turn_id="a", text=5), "a", None),
        (msg("turn.start", turn_id="b", text="x", end="yes"), "b", None),
        (clone_msg(request_id="r5", transcript=""), None, "r5"),
        (clone_msg(request_id="r6", audio_bytes="10"), None, "r6"),
        (clone_msg(request_id="bad id!", transcript=""), None, None),  # not an identifier
    ],
)
def test_errors_name_the_turn_or_request_of_a_malformed_message(
    data: str, turn_id: str | None, request_id: str | None
) -> None:
    session = new_session()
    session.receive_text(data)
    (error,) = errors_of(drain(session))
    assert (error["turn_id"], error["request_id"]) == (turn_id, request_id)
