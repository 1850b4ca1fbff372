"""Segmenter: where a streamed LLM text is cut into spoken segments."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxlane.server.text import Segment, Segmenter, clean_text


def run(parts: list[str], **options: object) -> list[Segment]:
    """Push every part at t=0 (no deadline passes), then flush."""
    seg = Segmenter(**options)  # type: ignore[arg-type]
    out: list[Segment] = []
    for part in parts:
        out += seg.push(part, now=0.0)
    return out + seg.flush()


def tokens(text: str) -> list[str]:
    """Split like an LLM tokenizer would: words with their leading space, punctuation apart."""
    return re.findall(r" ?[A-Za-z']+| ?\d+|\s+|.", text, flags=re.S)


def texts(segments: list[Segment]) -> list[str]:
    return [s.text for s in segments]


LLM_ANSWERS = [
    "Sure! Dr. Smith paid $1,000.50 for 3.14 kg of coffee, e.g. the U.S. kind, at 10:30 a.m. "
    "on Monday... Then he visited https://example.com/a.b?c=d. It was great 😀! "
    "Mail me at john.doe@example.com. Bye.",
    "## Steps\n1. Preheat the oven to 180°C.\n2. Mix **flour** and _sugar_.\n"
    "3. Bake for 25–30 minutes.\n\nEnjoy <laugh> your cake!",
    "Here is the code:\n```python\nprint('Hello. World')\n```\nRun it with `python x.py`. "
    "It prints a greeting; that's all, really.",
    "Well, I think the answer, in short, is yes. But it depends on the weather and the time "
    "of day, which nobody can predict... <sigh> Anyway, J. K. Rowling wrote it in 1997.",
    "The ratio is 1.5:1 — roughly. Version 2.0.1 shipped on Jan. 5, and v3 follows. "
    "See [the changelog](https://x.org/changes) for more. Really? Yes!",
]


@pytest.mark.parametrize("answer", LLM_ANSWERS)
def test_token_by_token_equals_whole_text(answer: str) -> None:
    whole = run([answer])
    assert run(tokens(answer)) == whole
    assert run(list(answer)) == whole


@pytest.mark.parametrize("answer", LLM_ANSWERS)
def test_segments_cover_the_raw_text_and_speak_all_of_it(answer: str) -> None:
    segments = run(tokens(answer))
    assert [s.index for s in segments] == list(range(len(segments)))
    assert segments[0].start == 0 and segments[-1].end == len(answer)
    for before, after in itertools.pairwise(segments):
        assert before.end == after.start
    assert " ".join(texts(segments)) == clean_text(answer)


def test_first_segment_goes_at_a_clause_after_enough_words() -> None:
    out = run(tokens("Well, I think that the answer, in short, is yes and no. Bye now."))
    assert out[0].text == "Well, I think that the answer,"
    assert out[0].reason == "clause"


def test_first_segment_does_not_cut_a_clause_of_too_few_words() -> None:
    seg = Segmenter(first_min_words=4)
    assert seg.push("Well, I see,", now=0.0) == []  # "Well," has 1 word, "Well, I see," 3
    assert texts(seg.push(" so it goes, fine", now=0.0)) == ["Well, I see, so it goes,"]


def test_first_segment_goes_at_a_short_sentence() -> None:
    seg = Segmenter()
    out: list[Segment] = []
    for tok in ["Hi", "!", " How", " are", " you", "?"]:
        out += seg.push(tok, now=0.0)
    assert texts(out) == ["Hi!"]  # "How are you?" waits: later sentences need min_chars


def test_later_segments_end_at_sentences_and_join_short_ones() -> None:
    text = "Hello there. Yes. No. This is the second sentence here. And a third one follows."
    assert texts(run(tokens(text), min_chars=24)) == [
        "Hello there.",
        "Yes. No. This is the second sentence here.",
        "And a third one follows.",
    ]
    assert all(s.reason == "sentence" for s in run(tokens(text))[:2])


def test_long_sentence_splits_at_clause_then_word_boundary() -> None:
    text = (
        "Okay. This sentence keeps going without punctuation because the model likes to "
        "talk, and it also has a clause here, and another one there, and it goes on and on "
        "and on until the end"
    )
    out = run(tokens(text), max_chars=80)
    assert texts(out) == [
        "Okay.",
        "This sentence keeps going without punctuation because the model likes to talk,",
        "and it also has a clause here, and another one there,",
        "and it goes on and on and on until the end",
    ]
    assert [s.reason for s in out] == ["sentence", "length", "length", "flush"]
    no_clause = run(tokens("Okay. " + "Word " * 30), max_chars=40)
    assert [len(s.text) for s in no_clause] == [5, 39, 39, 39, 29]  # 8 + 8 + 8 + 6 words


def test_a_giant_word_is_never_cut() -> None:
    url = "https://example.com/" + "a" * 120
    out = run(tokens(f"Open {url} now please."), max_chars=40)
    assert any(url in s.text for s in out)


@pytest.mark.parametrize(
    "text",
    [
        "The value of pi is 3.14159 and it matters.",
        "We sold 1,000,000 units at 10:30 sharp.",
        "Dr. Watson met Mrs. Hudson on Baker St. today.",
        "Bring fruit, e.g. apples or pears, i.e. anything sweet.",
        "She lives in the U.S. and works at 9 a.m. daily.",
        "J. R. R. Tolkien wrote it.",
        "Visit https://docs.example.com/v1.2/index.html?q=a.b for docs.",
        "Write to first.last@mail.example.org today.",
        "It costs .99 cents, no more.",
        "Hmm... let me think about that.",
        "Python 3.12.1 is out.",
        "See section no. 5 of the report.",
    ],
)
def test_never_splits_inside_numbers_abbreviations_urls(text: str) -> None:
    out = run(tokens(text), first_min_words=50, min_chars=0)
    assert texts(out) == [text]


def test_splits_after_url_number_and_unit_at_real_sentence_ends() -> None:
    text = "Go to https://a.io/x. Then pay $3.50. It is 5 ft. tall or 1,083 ft. The end etc. Yes."
    assert texts(run(tokens(text), min_chars=0)) == [
        "Go to https://a.io/x.",
        "Then pay $3.50.",
        "It is 5 ft. tall or 1,083 ft.",
        "The end etc.",
        "Yes.",
    ]


def test_emotion_tags_are_kept_and_markdown_dropped() -> None:
    out = run(tokens("<laugh> That is **so** funny! `code` [Really](http://x.y) 🙂 <sigh> yes."))
    assert texts(out) == ["<laugh> That is so funny!", "Really <sigh> yes."]


def test_first_segment_released_after_max_delay_at_a_whole_word() -> None:
    seg = Segmenter(first_max_delay=0.3)
    assert seg.push("So the main thi", now=10.0) == []
    assert seg.next_deadline() == pytest.approx(10.3)
    assert seg.poll(10.29) == []
    out = seg.poll(10.3)
    assert texts(out) == ["So the main"] and out[0].reason == "delay"
    assert seg.pending_text == "thi"
    assert texts(seg.push("ng is", now=10.4)) == []
    assert texts(seg.flush()) == ["thing is"]


def test_no_deadline_without_a_whole_word() -> None:
    seg = Segmenter()
    seg.push("Hel", now=0.0)
    assert seg.next_deadline() is None
    assert seg.poll(100.0) == []


def test_later_segments_wait_max_delay() -> None:
    seg = Segmenter(max_delay=1.0)
    assert texts(seg.push("First sentence. And then a long pause here", now=0.0)) == [
        "First sentence."
    ]
    assert seg.next_deadline() == pytest.approx(1.0)
    assert texts(seg.poll(1.0)) == ["And then a long pause"]
    seg_no_delay = Segmenter(max_delay=None)
    seg_no_delay.push("First sentence. And then a long pause here", now=0.0)
    assert seg_no_delay.next_deadline() is None


def test_flush_mid_stream_then_continue() -> None:
    seg = Segmenter()
    seg.push("Hold on", now=0.0)
    first = seg.flush()
    assert texts(first) == ["Hold on"] and first[0].reason == "flush"
    rest = seg.push(" please. Thanks a lot for waiting so long!", now=0.0) + seg.flush()
    assert texts(rest) == ["please. Thanks a lot for waiting so long!"]
    assert rest[0].start == first[0].end == 7


def test_flush_of_unspeakable_text_gives_nothing() -> None:
    seg = Segmenter()
    seg.push("```\nprint(1)\n```\n", now=0.0)
    assert seg.flush() == []
    assert run(["  😀  "]) == []


def test_offsets_name_the_source_text() -> None:
    raw = "**Hello** there, my friend. How are you doing on this fine day?"
    out = run(tokens(raw))
    assert [raw[s.start : s.end] for s in out] == [
        "**Hello** there, my friend.",
        " How are you doing on this fine day?",
    ]


def test_rejects_nonsense_options() -> None:
    with pytest.raises(ValueError):
        Segmenter(max_chars=5)


WORDS = [
    "Hello",
    "world",
    "Dr.",
    "e.g.",
    "3.14",
    "1,000",
    "U.S.",
    "https://a.b/c.d",
    "a@b.co",
    "**bold**",
    "`code`",
    "[link](http://x.y)",
    "<laugh>",
    "😀",
    "...",
    "—",
    "10:30",
    "J.",
    "Yes!",
    "why?",
    "end.",
    "clause,",
    "semi;",
    "\n",
    "\n- item",
    "## Head\n",
    "The",
    "value",
]


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.sampled_from(WORDS), max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    max_chars=st.sampled_from([40, 80, 260]),
)
def test_any_split_into_deltas_gives_the_same_segments(
    words: list[str], cuts: list[int], max_chars: int
) -> None:
    text = " ".join(words)
    points = sorted({c % (len(text) + 1) for c in cuts})
    parts = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    whole = run([text], max_chars=max_chars)
    assert run(parts, max_chars=max_chars) == whole
    if whole:
        assert all(len(s.text) <= max_chars or " " not in s.text for s in whole)
