"""Cut a streamed LLM text into segments the speech LM can speak.

:class:`Segmenter` is sans-I/O: the caller passes the time (``now``, seconds on any
monotonic clock) and asks for the next deadline, so it runs the same under an event
loop, in a thread or in a test::

    seg = Segmenter()
    for delta in llm_stream:
        speak(seg.push(delta, now=clock()))
        # and when no text arrives: at seg.next_deadline(), speak(seg.poll(clock()))
    speak(seg.flush())

Rules, in order of precedence:

* The **first** segment goes out early, for a short time to first audio: at the first
  sentence end, or at the first clause boundary (``,;:`` dash, ellipsis) once it
  holds ``first_min_words`` words, or -- when the text stalls -- ``first_max_delay``
  seconds after its first character arrived (cut at the last whole word).
* **Later** segments end at sentence ends once at least ``min_chars`` long, or after
  ``max_delay`` seconds of stalling.
* No segment grows beyond ``max_chars``: a long sentence is cut at its last clause
  boundary, else at its last word boundary.
* Never inside numbers (``3.14``, ``1,000``, ``10:30``), abbreviations (``Dr.``,
  ``e.g.``, ``U.S.``), initials, URLs, e-mail addresses or ellipses: a boundary needs
  whitespace after the punctuation, and a single ``.`` also a next word that does not
  start in lower case or with a digit.
* Text is cleaned first (:mod:`voxlane.server.text.cleaner`): markdown, code and
  emoji are removed, Orpheus emotion tags kept.

Decisions depend only on the text (plus the clock for the delay rules), never on how
it was split into deltas: feeding token by token gives the same segments as feeding
the whole text, as long as no deadline passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from voxlane.protocol import EMOTION_TAGS
from voxlane.server.text.cleaner import TextCleaner

__all__ = ["ABBREVIATIONS", "Segment", "SegmentReason", "Segmenter"]

SegmentReason = Literal["clause", "sentence", "length", "delay", "flush"]

#: Words that end in "." without ending the sentence even before a capital or a digit
#: (lower case, without the dot): titles before names, and labels before numbers.
#: Dotted forms (e.g., i.e., U.S., a.m., Ph.D.) and single initials are recognised by
#: shape; abbreviations that often end a sentence (etc., Inc., ft.) are left out, since
#: a lower-case next word already keeps "5 ft. tall" together.
ABBREVIATIONS = frozenset(
    """mr mrs ms mx dr prof sr jr st mt vs gen col lt sgt capt cmdr rev hon gov sen rep
    pres supt cf fig figs vol vols ch sec eq no nos pp approx dept""".split()  # noqa: SIM905
)

_SENTENCE_PUNCT = ".!?…"
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_EMOTION_TAG = re.compile("<(?:" + "|".join(EMOTION_TAGS) + ")>")
_CLOSERS = "\"')]}”’»"
_CLAUSE_PUNCT = ",;:"
_DASHES = "—–"


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of text to speak.

    ``text`` is cleaned and whitespace-normalised. ``start``/``end`` are offsets (code
    points) into the raw text pushed for the turn; consecutive segments' spans touch,
    so they cover the raw text (markup included) up to the last segment.
    """

    index: int
    text: str
    start: int
    end: int
    reason: SegmentReason


def _is_abbreviation(token: str) -> bool:
    word = token.lstrip("\"'([{“‘«")
    if not word:
        return False
    if len(word) == 1 and word.isalpha():
        return True  # an initial: "J. K. Rowling"
    if "." in word:
        parts = word.split(".")
        # e.g, U.S, a.m, Ph.D: short letter groups joined by dots (not example.com).
        return all(0 < len(p) <= 2 and p.isalpha() for p in parts)
    return word.lower() in ABBREVIATIONS


def _count_words(chars: list[str], end: int) -> int:
    # Emotion tags are sounds, not words: "<laugh> Ha" has one word.
    return len(_WORD.findall(_EMOTION_TAG.sub(" ", "".join(chars[:end]))))


def _speakable(chars: list[str], end: int) -> bool:
    return any(ch.isalnum() for ch in chars[:end])


class Segmenter:
    """Streaming segmenter for one turn (see the module docstring for the rules)."""

    def __init__(
        self,
        *,
        first_min_words: int = 4,
        first_max_delay: float = 0.35,
        min_chars: int = 24,
        max_chars: int = 260,
        max_delay: float | None = 1.5,
    ) -> None:
        """Create a segmenter.

        Args:
            first_min_words: words before a clause boundary may end the first segment.
            first_max_delay: seconds the first segment may wait for a boundary.
            min_chars: shortest later segment a sentence end releases (shorter
                sentences join the next one).
            max_chars: longest segment.
            max_delay: seconds a later segment may wait; ``None`` waits for text.
        """
        if first_min_words < 1 or min_chars < 0 or max_chars < 16:
            raise ValueError("first_min_words >= 1, min_chars >= 0 and max_chars >= 16")
        self.first_min_words = first_min_words
        self.first_max_delay = first_max_delay
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.max_delay = max_delay
        self._cleaner = TextCleaner()
        self._chars: list[str] = []  # cleaned text of the open segment
        self._pos: list[int] = []  # raw offset of each cleaned character
        self._scan = 0  # _chars[:_scan] are decided
        self._clause_cut: int | None = None
        self._word_cut: int | None = None
        self._since: float | None = None  # when the open segment's first text arrived
        self._start = 0  # raw offset where the open segment starts
        self._raw_len = 0
        self._index = 0

    # ------------------------------------------------------------------ public

    @property
    def pending_text(self) -> str:
        """Cleaned text received but not yet released."""
        return "".join(self._chars).replace("\n", " ")

    def push(self, delta: str, now: float = 0.0) -> list[Segment]:
        """Add a text delta; returns the segments it completes (often none)."""
        self._raw_len += len(delta)
        self._take(self._cleaner.feed(delta), now)
        out = self._scan_boundaries(False, now)
        return out + self.poll(now)

    def poll(self, now: float) -> list[Segment]:
        """Release text that waited too long (call at :meth:`next_deadline`)."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        cut = self._last_word_cut()
        if cut is None:
            return []
        return [self._release(cut, "delay", now)]

    def next_deadline(self) -> float | None:
        """When :meth:`poll` would release text, or None if no text waits."""
        delay = self.first_max_delay if self._index == 0 else self.max_delay
        if delay is None or self._since is None or self._last_word_cut() is None:
            return None
        return self._since + delay

    def flush(self, now: float = 0.0) -> list[Segment]:
        """Release everything buffered (``turn.flush`` or the end of the text)."""
        self._take(self._cleaner.feed("", final=True), now)
        out = self._scan_boundaries(True, now)
        # What is left fits max_chars (the scan split longer text), unless it is one
        # giant word. A bare "." or dash left over is not worth a segment.
        if _speakable(self._chars, len(self._chars)):
            out.append(self._release(len(self._chars), "flush", now, end=self._raw_len))
        else:
            self._chars.clear()
            self._pos.clear()
            self._scan = 0
            self._since = None
        return out

    # --------------------------------------------------------------- internals

    def _take(self, pairs: list[tuple[str, int]], now: float) -> None:
        if pairs and self._since is None:
            self._since = now
        for ch, pos in pairs:
            self._chars.append(ch)
            self._pos.append(pos)

    def _last_word_cut(self) -> int | None:
        # The text after the last space may be a word still being streamed.
        for k in range(len(self._chars) - 1, 0, -1):
            if self._chars[k] in " \n":
                return k if _count_words(self._chars, k) > 0 else None
        return None

    def _scan_boundaries(self, final: bool, now: float) -> list[Segment]:
        out: list[Segment] = []
        chars = self._chars
        while self._scan < len(chars):
            found = self._boundary(self._scan, final)
            if found is None:
                break  # the next characters decide
            kind, cut, nxt = found
            if kind is not None and cut > self.max_chars:
                split = self._split_long(now, force=True)  # too long to cut here
                if split:
                    out += split
                    chars = self._chars
                    continue
            if kind == "word":
                self._word_cut = cut
            elif kind is not None:
                self._word_cut = cut
                if self._releases(kind, cut):
                    out.append(self._release(cut, kind, now))
                    chars = self._chars
                    continue
                if kind == "clause":
                    self._clause_cut = cut
            self._scan = nxt
            if self._scan > self.max_chars:
                out += self._split_long(now)
                chars = self._chars
        return out

    def _boundary(self, j: int, final: bool) -> tuple[str | None, int, int] | None:
        """Classify position ``j``: ``(kind, cut, next_scan)``, or None to wait."""
        chars = self._chars
        n = len(chars)
        c = chars[j]
        if c in " \n":
            return ("sentence" if c == "\n" else "word"), j, j + 1
        if c in _SENTENCE_PUNCT:
            k = j
            while k < n and chars[k] in _SENTENCE_PUNCT:
                k += 1
            m = k
            while m < n and chars[m] in _CLOSERS:
                m += 1
            if m + 1 >= n and not final:
                return None  # need the whitespace and the next character
            if m >= n:
                return "sentence", m, m  # end of text at a flush
            if chars[m] not in " \n":
                return None, k, k  # 3.14, e.g.,  example.com
            nxt = chars[m + 1] if m + 1 < n else ""
            run = "".join(chars[j:k])
            if chars[m] == "\n" or "!" in run or "?" in run:
                kind = "sentence"
            elif run == ".":
                token = self._token_before(j)
                if _is_abbreviation(token) or nxt.islower() or nxt.isdigit():
                    kind = None
                else:
                    kind = "sentence"
            else:  # ellipsis
                kind = "clause"
            return kind, m, m
        if c in _CLAUSE_PUNCT or c in _DASHES or c == "-":
            if j + 1 >= n and not final:
                return None
            nxt = chars[j + 1] if j + 1 < n else " "
            prev = chars[j - 1] if j > 0 else " "
            if c in _DASHES:
                if prev.isdigit() and nxt.isdigit():
                    return None, j + 1, j + 1  # a range: 10–20
                return "clause", j + 1, j + 1
            if nxt not in " \n" or (c == "-" and prev != " "):
                return None, j + 1, j + 1
            return ("sentence" if nxt == "\n" else "clause"), j + 1, j + 1
        return None, j + 1, j + 1

    def _token_before(self, j: int) -> str:
        k = j
        while k > 0 and self._chars[k - 1] not in " \n":
            k -= 1
        return "".join(self._chars[k:j])

    def _releases(self, kind: str, cut: int) -> bool:
        if self._index == 0:
            words = _count_words(self._chars, cut)
            if kind == "sentence":
                return words >= 1
            return words >= self.first_min_words
        if kind != "sentence" or _count_words(self._chars, cut) == 0:
            return False
        return cut >= self.min_chars

    def _split_long(self, now: float, force: bool = False) -> list[Segment]:
        if not force and self._scan <= self.max_chars:
            return []
        cut = None
        if self._clause_cut is not None and self._clause_cut >= self.max_chars // 3:
            cut = self._clause_cut
        elif self._word_cut is not None and _speakable(self._chars, self._word_cut):
            cut = self._word_cut
        if cut is None:
            return []  # one giant word (a long URL): wait for its end
        return [self._release(cut, "length", now)]

    def _release(
        self, cut: int, reason: SegmentReason, now: float, end: int | None = None
    ) -> Segment:
        text = "".join(self._chars[:cut]).replace("\n", " ").strip()
        if end is None:
            end = self._pos[cut - 1] + 1
        segment = Segment(self._index, text, self._start, end, reason)
        self._index += 1
        self._start = end
        rest = cut
        while rest < len(self._chars) and self._chars[rest] in " \n":
            rest += 1
        del self._chars[:rest], self._pos[:rest]
        self._scan = 0
        self._clause_cut = self._word_cut = None
        self._since = now if self._chars else None
        return segment
