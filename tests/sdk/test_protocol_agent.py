"""Agent mode of the sans-I/O session core, byte-in/byte-out: ``agent.respond``,
``agent.text_delta``, barge-in, truncation of the answer to what was heard, history limits."""

from __future__ import annotations

import json

import pytest

from voxlane.errors import LLMError
from voxlane.protocol import Limits, parse_server_message
from voxlane.session_protocol import (
    AgentOptions,
    CancelTurn,
    ServerSession,
    StartAgentResponse,
    StartTurn,
    heard_text,
)

RATE = 24000
PCM_100 = b"\x00\x00" * 100  # 100 s16 samples


def msg(type_: str, **fields: object) -> str:
    return json.dumps({"type": type_, **fields})


def drain(session: ServerSession) -> list[dict]:
    """Outbound JSON messages (audio frames dropped)."""
    return [json.loads(d) for d in session.data_to_send() if isinstance(d, str)]


def new_session(**options: object) -> ServerSession:
    agent = AgentOptions(model="tiny", system_prompt="Be brief.", **options)  # type: ignore[arg-type]
    session = ServerSession(session_id="s", agent=agent, limits=Limits(max_turn_chars=200))
    session.data_to_send()
    return session


def speak(session: ServerSession, turn_id: str, pieces: list[tuple[str, int]]) -> None:
    """Stream ``(text, samples)`` pieces: each piece is one delta, one segment (a mark
    over the delta's text) and its audio."""
    for text, samples in pieces:
        offset = len(session.turn(turn_id).text)
        assert session.send_text_delta(turn_id, text)
        session.send_mark(turn_id, start=offset, end=offset + len(text), text=text.strip())
        for _ in range(samples // 100):
            session.send_audio(turn_id, PCM_100)


def respond(session: ServerSession, text: str, turn_id: str) -> list[object]:
    return session.receive_text(msg("agent.respond", text=text, turn_id=turn_id))


# ------------------------------------------------------------------------ basic flow


def test_agent_off_answers_unknown_type_and_ready_announces_agent_mode() -> None:
    plain = ServerSession(session_id="s")
    ready = json.loads(plain.data_to_send()[0])
    assert ready["agent"] is None
    assert plain.receive_text(msg("agent.respond", text="hi")) == []
    error = drain(plain)[0]
    assert error["code"] == "unknown_type" and "agent mode is off" in error["message"]

    session = ServerSession(session_id="s", agent=AgentOptions(model="m", max_history_messages=6))
    ready = parse_server_message(session.data_to_send()[0])
    assert ready.agent is not None and ready.agent.model == "m"
    assert ready.agent.max_history_messages == 6


def test_respond_starts_a_turn_whose_text_comes_from_the_llm() -> None:
    session = new_session()
    commands = respond(session, "What is the capital of France?", "a1")
    assert isinstance(commands[0], StartTurn) and commands[0].turn_id == "a1"
    request = commands[-1]
    assert isinstance(request, StartAgentResponse) and request.turn_id == "a1"
    assert request.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    )
    assert [m["type"] for m in drain(session)] == ["turn.started"]

    # The client cannot write into an agent turn.
    session.receive_text(msg("turn.append", turn_id="a1", text="x"))
    assert drain(session)[0]["code"] == "turn_closed"

    speak(session, "a1", [("Paris. ", 2000), ("It is lovely.", 3000)])
    out = drain(session)
    deltas = [m for m in out if m["type"] == "agent.text_delta"]
    assert [(d["text"], d["offset"]) for d in deltas] == [("Paris. ", 0), ("It is lovely.", 7)]

    session.turn_done("a1")
    out = drain(session)
    assert [m["type"] for m in out] == ["agent.message", "turn.done"]
    assert out[0] == {
        "type": "agent.message",
        "turn_id": "a1",
        "role": "assistant",
        "text": "Paris. It is lovely.",
        "truncated": False,
        "sample": 5000,
    }
    assert session.history == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris. It is lovely."},
    ]
    # The next request carries the dialogue.
    request = respond(session, "And of Spain?", "a2")[-1]
    assert isinstance(request, StartAgentResponse)
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[-1]["content"] == "And of Spain?"


# -------------------------------------------------------------------------- barge-in


def test_new_user_message_interrupts_and_history_keeps_what_was_sent() -> None:
    session = new_session()
    respond(session, "Tell me a story.", "a1")
    speak(session, "a1", [("Once upon a time. ", 4800), ("There was a fox. ", 4800)])
    session.send_text_delta("a1", "It ran away.")  # generated, never marked: not heard
    drain(session)

    commands = respond(session, "Stop, tell me a joke.", "a2")
    # The old answer is cancelled like a turn.cancel, the new turn waits for it.
    assert commands == [CancelTurn("a1")]
    out = drain(session)
    assert [m["type"] for m in out] == ["turn.cancelled", "turn.started"]
    assert out[0]["sample"] == 9600 and out[1]["queued"] is True
    # Nothing of the cancelled answer goes out any more.
    assert not session.send_text_delta("a1", " More.")
    assert not session.send_audio("a1", PCM_100)

    commands = session.turn_done("a1")
    out = drain(session)
    # No playback report: the cut is the audio sent. The second segment's audio end is
    # unknown (generation stopped in it): at 2.5 words/s... but measured from segment 0:
    # 4 words in 4800 samples, so 4800 samples of segment 1 hold its 4 words.
    assert out[0]["type"] == "agent.message"
    assert out[0]["text"] == "Once upon a time. There was a fox."
    assert out[0]["truncated"] is True
    assert out[1]["reason"] == "cancelled"
    assert isinstance(commands[0], StartTurn) and commands[0].turn_id == "a2"
    request = commands[-1]
    assert isinstance(request, StartAgentResponse)
    assert [m["content"] for m in request.messages[1:]] == [
        "Tell me a story.",
        "Once upon a time. There was a fox.",
        "Stop, tell me a joke.",
    ]


def test_reported_playback_cuts_proportionally_by_words() -> None:
    session = new_session()
    respond(session, "Count.", "a1")
    speak(session, "a1", [("One two three four. ", 4000), ("Five six seven eight. ", 4000)])
    # The client heard segment 0 and 3/4 of segment 1 (whose end is known: segment 2's mark).
    speak(session, "a1", [("Nine ten.", 1000)])
    session.receive_text(msg("turn.playback", turn_id="a1", sample=7000))
    session.receive_text(msg("turn.cancel", turn_id="a1"))
    session.turn_done("a1")
    message = drain(session)[-2]
    assert message["type"] == "agent.message"
    assert message["text"] == "One two three four. Five six seven"
    assert message["sample"] == 7000
    assert session.history[-1]["content"] == "One two three four. Five six seven"


def test_playback_after_done_cuts_the_last_answer_again() -> None:
    # Generation outruns playback: the turn is done while the client is still playing.
    session = new_session()
    respond(session, "Hi.", "a1")
    speak(session, "a1", [("Hello there. ", 2400), ("How are you today? ", 2400)])
    drain(session)
    session.turn_done("a1")
    assert drain(session)[0]["truncated"] is False
    assert session.history[-1]["content"] == "Hello there. How are you today?"

    # The user interrupts after 1.5 segments: the answer in history shrinks.
    session.receive_text(msg("turn.playback", turn_id="a1", sample=3600))
    message = drain(session)[0]
    assert message == {
        "type": "agent.message",
        "turn_id": "a1",
        "role": "assistant",
        "text": "Hello there. How are",
        "truncated": True,
        "sample": 3600,
    }
    assert session.history[-1]["content"] == "Hello there. How are"
    # Heard nothing: the answer leaves the history, the question stays.
    session.receive_text(msg("turn.playback", turn_id="a1", sample=0))
    assert drain(session)[0]["text"] == ""
    assert session.history == [{"role": "user", "content": "Hi."}]
    # Playback never lengthens an answer again.
    session.receive_text(msg("turn.playback", turn_id="a1", sample=4800))
    assert drain(session) == []

    # Once the next answer is requested, the old one is final.
    request = respond(session, "Again.", "a2")[-1]
    assert isinstance(request, StartAgentResponse)
    assert [m["content"] for m in request.messages[1:]] == ["Hi.", "Again."]
    session.receive_text(msg("turn.playback", turn_id="a1", sample=0))
    assert drain(session)[-1]["code"] == "unknown_turn"


def test_plain_turns_are_not_interrupted_and_agent_turns_queue_behind_them() -> None:
    session = new_session()
    session.receive_text(msg("turn.start", turn_id="p", text="Plain text.", end=True))
    commands = respond(session, "Hi.", "a1")
    assert commands == []  # queued behind the plain turn
    assert [m["type"] for m in drain(session)] == ["turn.started", "turn.started"]
    commands = session.turn_done("p")
    assert [type(c) for c in commands] == [StartTurn, StartAgentResponse]


def test_upstream_error_is_reported_and_the_session_goes_on() -> None:
    session = new_session()
    respond(session, "Hi.", "a1")
    speak(session, "a1", [("Hello. ", 2400)])
    drain(session)
    session.turn_done("a1", error=LLMError("upstream answered HTTP 500"))
    out = drain(session)
    assert [m["type"] for m in out] == ["error", "agent.message", "turn.done"]
    assert out[0]["code"] == "llm_error" and out[0]["fatal"] is False
    assert out[1]["text"] == "Hello."  # what was spoken before the failure stays
    assert out[2]["reason"] == "error"
    commands = respond(session, "Still there?", "a2")
    assert isinstance(commands[-1], StartAgentResponse)


# ---------------------------------------------------------------------- history limits


def test_history_drops_oldest_exchanges_past_the_message_limit() -> None:
    session = new_session(max_history_messages=3)
    for n in range(3):
        respond(session, f"question {n}", f"a{n}")
        speak(session, f"a{n}", [(f"answer {n}", 200)])
        session.turn_done(f"a{n}")
    # Limits apply when a request is built: the last one held 5 messages, 3 were kept (from a
    # user message on), then the answer was added.
    assert [m["content"] for m in session.history] == [
        "question 1",
        "answer 1",
        "question 2",
        "answer 2",
    ]
    request = respond(session, "question 3", "a3")[-1]
    assert isinstance(request, StartAgentResponse)
    assert [m["content"] for m in request.messages] == [
        "Be brief.",
        "question 2",
        "answer 2",
        "question 3",
    ]


def test_history_char_limit_keeps_the_newest_user_message() -> None:
    session = new_session(max_history_chars=30)
    respond(session, "x" * 20, "a1")
    speak(session, "a1", [("y" * 20, 200)])
    session.turn_done("a1")
    request = respond(session, "z" * 50, "a2")[-1]
    assert isinstance(request, StartAgentResponse)
    assert request.messages[1:] == ({"role": "user", "content": "z" * 50},)
    assert session.history == [{"role": "user", "content": "z" * 50}]


def test_refused_user_message_interrupts_nothing() -> None:
    session = new_session()
    respond(session, "Hi.", "a1")
    drain(session)
    assert respond(session, "x" * 201, "a2") == []  # over max_turn_chars
    session.receive_text(msg("agent.respond", text="Hi.", turn_id="a3", voice="nobody"))
    assert [m["code"] for m in drain(session)] == ["message_too_large", "unknown_voice"]
    assert session.active_turn is not None and session.active_turn.turn_id == "a1"
    assert session.history == [{"role": "user", "content": "Hi."}]


def test_barge_in_works_with_a_single_open_turn_allowed() -> None:
    agent = AgentOptions(model="m")
    session = ServerSession(session_id="s", agent=agent, limits=Limits(max_turns=1))
    respond(session, "One.", "a1")
    assert respond(session, "Two.", "a2") == [CancelTurn("a1")]
    assert [m["type"] for m in drain(session)][-2:] == ["turn.cancelled", "turn.started"]
    commands = session.turn_done("a1")
    assert isinstance(commands[-1], StartAgentResponse) and commands[-1].turn_id == "a2"


# ------------------------------------------------------------------- truncation rule


TEXT = "One two. **Three** four five six. Seven."
MARKS = [(0, 0, 9), (1000, 9, 34), (3000, 34, len(TEXT))]


@pytest.mark.parametrize(
    ("heard", "total", "expected"),
    [
        (0, 4000, ""),  # nothing heard, not even the first sample
        (1, 4000, ""),  # segment 0 started, no whole word of it heard
        (500, 4000, "One"),
        (1000, 4000, "One two."),  # exactly segment 0
        (2000, 4000, "One two. **Three** four"),  # half of segment 1: 2 of 4 words
        (2999, 4000, "One two. **Three** four five"),
        (3000, 4000, "One two. **Three** four five six."),
        (3999, 4000, "One two. **Three** four five six."),
        (4000, 4000, TEXT),
        (9999, 4000, TEXT),
    ],
)
def test_heard_text_cuts_at_marks_and_by_words(heard: int, total: int, expected: str) -> None:
    assert heard_text(TEXT, MARKS, heard=heard, total=total, samples_per_word=500) == expected


def test_heard_text_estimates_the_end_of_an_unfinished_segment() -> None:
    # Segment 2 was being generated: its length is unknown. Segments 0-1 took 3000 samples
    # for 6 words, so 500 samples a word; 499 heard samples of it are not a whole word.
    kw = {"total": None, "samples_per_word": 10_000}
    assert heard_text(TEXT, MARKS, heard=3499, **kw) == "One two. **Three** four five six."
    assert heard_text(TEXT, MARKS, heard=3500, **kw) == TEXT
    # With no segment heard whole, the configured speaking rate is used.
    assert heard_text("a b c d", [(0, 0, 7)], heard=2000, total=None, samples_per_word=1000) == (
        "a b"
    )
    assert heard_text("a b c d", [], heard=2000, total=None, samples_per_word=1000) == ""


def test_llm_text_with_lone_surrogates_travels_as_replacement_characters() -> None:
    # An upstream LLM may send an unpaired "\\ud800" escape; it cannot be sent as JSON.
    session = new_session()
    respond(session, "Hi?", "a1")
    drain(session)
    assert session.send_text_delta("a1", "x\ud800y")
    (delta,) = drain(session)
    assert (delta["text"], delta["offset"]) == ("x\ufffdy", 0)
    assert session.send_text_delta("a1", " z")
    assert drain(session)[0]["offset"] == 3
