"""Protocol fuzzer over the sans-I/O core (:class:`ServerSession`), no socket, no model.

Hypothesis feeds a session any mix of raw text, raw bytes, arbitrary JSON, deeply nested JSON,
lone surrogates and well-shaped protocol messages with fuzzed fields, while a small driver plays
the server's part (it runs the returned commands: sends audio for the active turn and reports
turns done). After every step the invariants a server relies on must hold:

- nothing raises out of the session: client mistakes become typed ``error`` messages whose code
  belongs to a client-side error class (never ``internal_error``), and the session lives on
  unless it closed with the documented code (1008 too many errors, 1009 too large);
- everything it queues is valid server JSON or a valid audio frame (``ClientSession`` checks
  frame continuity), and no audio of a turn follows that turn's ``turn.cancelled``;
- its turn book-keeping stays consistent (the active turn first, the queue in order, at most
  ``max_turns`` open turns, phases matching their place);
- a session that did not close still speaks a valid turn afterwards.

``.ci/run`` sets ``HYPOTHESIS_PROFILE=ci`` (derandomized, see tests/conftest.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from voxlane.errors import VoxlaneError, error_class_for_code
from voxlane.protocol import (
    CloseCode,
    ErrorMessage,
    Limits,
    TurnCancelled,
    TurnDone,
    TurnStarted,
)
from voxlane.session_protocol import (
    AppendText,
    CancelTurn,
    ClientSession,
    CloseConnection,
    EndTurn,
    ServerSession,
    StartTurn,
    TurnPhase,
)

from ..protocol_fuzz import (
    CLIENT_CODES,
    any_char,
    any_text,
    deep_json,
    json_value,
    shaped_message,
    surrogate,
    valid_messages,
)

# Default message size (256 KiB): deep nesting must fit in a message to be tried at all.
LIMITS = Limits(max_turns=3, max_turn_chars=200, max_errors=24)


# --------------------------------------------------------------------------------- steps


@dataclass
class Step:
    kind: str  # "text" | "bytes" | "audio" | "done"
    data: Any = None


steps = st.one_of(
    valid_messages.map(lambda s: Step("text", s)),
    valid_messages.map(lambda s: Step("text", s)),
    valid_messages.map(lambda s: Step("text", s)),
    shaped_message().map(lambda s: Step("text", s)),
    json_value.map(lambda v: Step("text", json.dumps(v))),
    any_text.map(lambda s: Step("text", s)),
    deep_json().map(lambda s: Step("text", s)),
    st.binary(max_size=64).map(lambda b: Step("bytes", b)),
    st.just(Step("audio")),
    st.just(Step("audio")),
    st.just(Step("done")),
    st.just(Step("done")),
)

# --------------------------------------------------------------------------------- driver


@dataclass
class Driver:
    """Plays the server: runs commands the way app.py's _Connection does, checks outputs."""

    session: ServerSession
    client: ClientSession = field(default_factory=ClientSession)
    active: str | None = None  # the turn a StartTurn gave the "pipeline"
    ended: bool = False
    cancelled: set[str] = field(default_factory=set)  # turn ids acked with turn.cancelled
    numbers: dict[int, str] = field(default_factory=dict)
    closed_with: int | None = None
    errors: list[ErrorMessage] = field(default_factory=list)
    done: dict[str, str] = field(default_factory=dict)  # turn id -> turn.done reason

    def run(self, commands: list[Any]) -> None:
        for command in commands:
            if isinstance(command, StartTurn):
                assert self.active is None, "a turn started while another is active"
                self.active, self.ended = command.turn_id, False
            elif isinstance(command, (AppendText, EndTurn)):
                assert command.turn_id == self.active, f"{command} for a turn not active"
                self.ended |= isinstance(command, EndTurn)
            elif isinstance(command, CancelTurn):
                assert command.turn_id == self.active, f"{command} for a turn not active"
            elif isinstance(command, CloseConnection):
                assert self.closed_with is None
                self.closed_with = command.code
        self.check_output()

    def check_output(self) -> None:
        for item in self.session.data_to_send():
            assert self.closed_with is None or isinstance(item, str), "audio after close"
            if isinstance(item, bytes):
                chunk = self.client.receive_bytes(item)  # raises on a gap
                assert chunk.turn_id not in self.cancelled, "audio after turn.cancelled"
                continue
            message = self.client.receive_text(item)
            if isinstance(message, ErrorMessage):
                assert message.code in CLIENT_CODES, f"server-side error for client input: {item}"
                assert error_class_for_code(message.code) is not VoxlaneError
                self.errors.append(message)
            elif isinstance(message, TurnCancelled):
                self.cancelled.add(message.turn_id)
            elif isinstance(message, TurnStarted):
                self.numbers[message.turn_number] = message.turn_id
            elif isinstance(message, TurnDone):
                self.done[message.turn_id] = message.reason

    def pipeline_audio(self) -> None:
        if self.active is not None:
            self.session.send_audio(self.active, b"\x01\x00" * 960)
            self.session.send_mark(self.active, start=0, end=0, text="")
            self.check_output()

    def pipeline_done(self) -> None:
        """The pipeline finishes the active turn if it was ended or cancelled."""
        turn_id = self.active
        if turn_id is None:
            return
        turn = next((t for t in self.session.open_turns if t.turn_id == turn_id), None)
        if turn is not None and not (self.ended or turn.phase is TurnPhase.CANCELLED):
            return
        self.active = None
        self.run(self.session.turn_done(turn_id, generation_s=0.1))


def check_state(session: ServerSession, driver: Driver) -> None:
    """The session's turn book-keeping is consistent with what it told the driver."""
    open_turns = session.open_turns
    assert len(open_turns) <= session.limits.max_turns + 1  # +1: a cancelled one finishing
    assert len({t.turn_id for t in open_turns}) == len(open_turns)
    active = session.active_turn
    if session.closed:
        assert driver.closed_with is not None or session.close_code is None
        assert all(t.phase is not TurnPhase.QUEUED for t in open_turns)
        return
    assert (active.turn_id if active else None) == driver.active
    for turn in open_turns:
        if turn is active:
            assert turn.phase in (TurnPhase.ACTIVE, TurnPhase.ENDED, TurnPhase.CANCELLED)
        else:
            assert turn.phase is TurnPhase.QUEUED, turn
            assert active is not None, "a turn is queued behind no active turn"
    if active is not None:
        assert open_turns[0] is active


def drive(steps_: list[Step], *, limits: Limits = LIMITS) -> Driver:
    session = ServerSession(limits=limits)
    driver = Driver(session)
    driver.check_output()  # session.ready
    for step in steps_:
        if step.kind == "text":
            driver.run(session.receive_text(step.data))
        elif step.kind == "bytes":
            driver.run(session.receive_bytes(step.data))
        elif step.kind == "audio":
            driver.pipeline_audio()
        else:
            driver.pipeline_done()
        check_state(session, driver)
        if session.closed:
            assert driver.closed_with in (
                CloseCode.POLICY_VIOLATION,
                CloseCode.MESSAGE_TOO_BIG,
            ), f"closed with {driver.closed_with}"
            assert session.receive_text('{"type":"turn.start"}') == []
            assert session.data_to_send() == []
            break
    return driver


def speaks_after(driver: Driver) -> None:
    """A session that survived the fuzzing still speaks a fresh turn to its end."""
    session = driver.session
    if session.closed:
        return
    for turn in reversed(session.open_turns):  # queued ones first, then the active one
        if turn.phase is not TurnPhase.CANCELLED:
            driver.run(
                session.receive_text(json.dumps({"type": "turn.cancel", "turn_id": turn.turn_id}))
            )
    driver.pipeline_done()
    assert session.open_turns == []
    start = {"type": "turn.start", "turn_id": "zz-after", "text": "Hello.", "end": True}
    driver.errors.clear()
    driver.run(session.receive_text(json.dumps(start)))
    # (A voice.clone still waiting for its audio is refused first: that error names the clone.)
    assert [e for e in driver.errors if e.request_id is None] == []
    assert driver.active == "zz-after"
    driver.pipeline_audio()
    driver.pipeline_done()
    assert driver.done["zz-after"] == "completed"
    assert not session.open_turns


# ---------------------------------------------------------------------------------- tests


@settings(max_examples=300)
@given(st.lists(steps, min_size=8, max_size=40))
def test_any_input_gives_typed_errors_and_a_consistent_session(steps_: list[Step]) -> None:
    driver = drive(steps_)
    speaks_after(driver)


@settings(max_examples=60)
@given(deep_json())
def test_deeply_nested_json_is_a_typed_error(text: str) -> None:
    session = ServerSession(limits=LIMITS)
    session.data_to_send()
    assert session.receive_text(text) == []
    (reply,) = session.data_to_send()
    error = ClientSession().receive_text(reply)
    assert isinstance(error, ErrorMessage) and error.code == "bad_message" and not error.fatal


@settings(max_examples=100)
@given(st.tuples(st.text(max_size=10), surrogate, st.text(any_char, max_size=10)).map("".join))
def test_lone_surrogates_are_refused_or_spoken_never_a_crash(text: str) -> None:
    """Raw or escaped ("\\udxxx") lone surrogates: a typed error, or a turn that starts."""
    for wire in (
        json.dumps({"type": "turn.start", "turn_id": "a", "text": text}, ensure_ascii=False),
        json.dumps({"type": "turn.start", "turn_id": "a", "text": text}),
        text,
    ):
        session = ServerSession(limits=LIMITS)
        driver = Driver(session)
        driver.check_output()
        driver.run(session.receive_text(wire))
        assert not session.closed
        if driver.errors:
            assert [e.code for e in driver.errors] in (["bad_message"], ["out_of_range"]), wire
        else:
            assert driver.active == "a", wire
            # Text the core accepted comes back in marks: it must still encode as UTF-8,
            # which is what websockets does with every text message the server sends. (What
            # was accepted is the decoded text: an escaped high+low pair is one character.)
            accepted = json.loads(wire)["text"]
            session.send_mark("a", start=0, end=len(accepted), text=accepted)
            for item in session.data_to_send():
                if isinstance(item, str):
                    item.encode()
