"""Streaming removal of what must not be spoken: markdown, code, emoji.

:class:`TextCleaner` consumes raw LLM text in deltas of any size and emits the
speakable characters, each with the offset of the raw character it came from. It
holds text back only while a construct is undecided (an open link, inline code, a
tag), so the output does not depend on how the text was split into deltas.

What it does:

* code blocks (```` ``` ```` / ``~~~`` fences) and inline code are dropped;
* ``**bold**``, ``_em_``, ``~~strike~~``, headers, block quotes, list markers,
  horizontal rules and table rules lose their markup and keep their words;
* ``[text](url)`` keeps ``text``; images and HTML tags are dropped, and so are spellings
  of the speech LM's special tokens (``<|eot_id|>``, ``<custom_token_4>``);
  ``<https://...>`` keeps the URL;
* Orpheus emotion tags (``<laugh>``, ``<sigh>`` ...) are kept verbatim;
* emoji and lone UTF-16 surrogates are dropped;
* whitespace collapses to one space, line breaks to one ``"\\n"``; a line that ends
  without punctuation gets a ``"."`` so headers and list items end as sentences.
"""

from __future__ import annotations

import re

from voxlane.protocol import EMOTION_TAGS

__all__ = ["TextCleaner", "clean_text", "is_emoji"]

_TAGS = "|".join(EMOTION_TAGS)
_EMOTION = re.compile(rf"<({_TAGS})>")
_AUTOLINK = re.compile(r"<(https?://[^>\s]{1,500})>")
_AUTOLINK_PREFIX = re.compile(r"<(?:https?://[^>\s]{0,500}|h|ht|htt|https?|https?:|https?:/)\Z")
# Every *_PREFIX pattern matches exactly the texts that a longer text could complete to
# a match of its full pattern: same limits, so decisions do not depend on delta splits.
# Tags, and the spellings of the speech LM's special tokens (``<|eot_id|>``,
# ``<custom_token_4>``): markup, not words (the encoder keeps them text ids anyway).
_HTML_TAG = re.compile(
    r"</?[A-Za-z][A-Za-z0-9_-]{0,20}(?:[ \t/][^<>\n]{0,100})?>|<\|[A-Za-z0-9_]{1,40}\|>"
)
_ANGLE_PREFIX = re.compile(
    r"</?(?:[A-Za-z][A-Za-z0-9_-]{0,20}(?:[ \t/][^<>\n]{0,100})?)?\Z|<\|[A-Za-z0-9_]{0,40}\|?\Z"
)
_LINK = re.compile(r"\[([^\[\]\n]{0,300})\]\(([^()\s]{0,500})\)")
_LINK_PREFIX = re.compile(r"\[[^\[\]\n]{0,300}(?:\](?:\([^()\s]{0,500})?)?\Z")
_IMAGE = re.compile(r"!\[[^\[\]\n]{0,300}\]\([^()\s]{0,500}\)")
_IMAGE_PREFIX = re.compile(r"!(?:\[[^\[\]\n]{0,300}(?:\](?:\([^()\s]{0,500})?)?)?\Z")
_HEADER = re.compile(r"#{1,6}(?=[ \t])")
_BULLET = re.compile(r"(?:[-*+]|\d{1,3}[.)])(?=[ \t])")
_BULLET_PREFIX = re.compile(r"(?:[-*+]|\d{1,3}[.)]?)\Z")
_RULE_LINE = re.compile(
    r"(?:[-*_=][ \t]*){3,}(?:\n|\Z)"  # --- *** ___ ===
    r"|\|?[ \t]*:?-{2,}:?[ \t]*(?:\|[ \t]*:?-{1,}:?[ \t]*)*\|?[ \t]*(?:\n|\Z)"  # |---|:--|
)
_INLINE_MARKUP = re.compile(r"[*`]|(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])|~~")

_CODE_WINDOW = 500  # inline code longer than this is not code but a stray backtick
_SENTENCE_END = ".!?:;,…"


def is_emoji(ch: str) -> bool:
    """True for emoji, pictographs and their modifiers (joiners, skin tones, flags)."""
    o = ord(ch)
    return (
        0x1F000 <= o <= 0x1FAFF  # pictographs, emoticons, transport, flags, symbols
        or 0x2600 <= o <= 0x27BF  # misc symbols, dingbats
        or 0x2B00 <= o <= 0x2BFF  # arrows and stars (⭐)
        or 0x2300 <= o <= 0x23FF  # ⌚ ⏰ ⏳
        or o in (0x200D, 0xFE0E, 0xFE0F, 0x20E3)  # ZWJ, variation selectors, keycap
        or 0xE0020 <= o <= 0xE007F  # tag characters of subdivision flags
    )


def _unspeakable(ch: str) -> bool:
    # Lone surrogates (an LLM's unpaired "\\ud800" escape) are not text at all.
    return is_emoji(ch) or "\ud800" <= ch <= "\udfff"


class TextCleaner:
    """Incremental cleaner: :meth:`feed` raw deltas, get ``(char, raw_offset)`` pairs.

    Offsets count code points from the start of everything fed. The output never
    starts or ends with whitespace; whitespace is emitted only once the next
    speakable character is known.
    """

    def __init__(self) -> None:
        self._buf = ""  # raw text not consumed yet
        self._base = 0  # raw offset of _buf[0]
        self._line_start = True
        self._in_fence = False
        self._prev_raw = ""  # last consumed raw character
        self._last = ""  # last emitted character
        self._ws: tuple[str, int] | None = None  # whitespace waiting for the next char
        self._out: list[tuple[str, int]] = []

    @property
    def consumed(self) -> int:
        """Raw characters consumed (everything fed minus what is held back)."""
        return self._base

    def feed(self, delta: str, *, final: bool = False) -> list[tuple[str, int]]:
        """Add raw text; returns the speakable characters it settles.

        ``final`` settles everything held back (the stream paused or ended): an open
        link or inline code is then taken literally, a trailing space dropped.
        """
        self._buf += delta
        i = 0
        buf = self._buf
        while i < len(buf):
            step = self._step(buf, i, final)
            if step is None:
                break
            if step > 0:
                self._prev_raw = buf[i + step - 1]
            i += step
        self._buf = buf[i:]
        self._base += i
        if final:
            self._ws = None
        out, self._out = self._out, []
        return out

    # ---------------------------------------------------------------- emission

    def _emit(self, ch: str, pos: int) -> None:
        if ch in " \n":
            # Keep the strongest pending break; a line break beats a space.
            if self._last and (self._ws is None or (ch == "\n" and self._ws[0] == " ")):
                self._ws = (ch, pos)
            return
        if ch in "!?,;:" and self._ws is not None and self._ws[0] == " ":
            self._ws = None  # "great 😀!" -> "great!"
        if self._ws is not None:
            self._out.append(self._ws)
            self._ws = None
        self._out.append((ch, pos))
        self._last = ch

    def _emit_text(self, text: str, pos: int) -> None:
        # Link text and the like: drop inline markup, keep offsets of kept characters.
        keep = [True] * len(text)
        for m in _INLINE_MARKUP.finditer(text):
            for k in range(m.start(), m.end()):
                keep[k] = False
        for k, ch in enumerate(text):
            if keep[k] and not _unspeakable(ch):
                self._emit(" " if ch in "\t\r" else ch, pos + k)

    # ------------------------------------------------------------------ scanner

    def _step(self, buf: str, i: int, final: bool) -> int | None:
        """Consume from ``buf[i]``: returns characters consumed, or None to wait."""
        pos = self._base + i
        if self._in_fence:
            return self._fence_body(buf, i, final)
        if self._line_start:
            step = self._line_prefix(buf, i, final)
            if step != 0:
                return step
            self._line_start = False
        c = buf[i]
        if c == "\n":
            if self._last and self._last not in _SENTENCE_END:
                self._ws = None  # "cell |\n" -> "cell."
                self._emit(".", pos)
            self._emit("\n", pos)
            self._line_start = True
            return 1
        if c in " \t\r\f\v\u00a0":
            self._emit(" ", pos)
            return 1
        if c == "`":
            return self._backticks(buf, i, final)
        if c == "*":
            return 1
        if c == "_":
            if i + 1 >= len(buf) and not final:
                return None
            nxt = buf[i + 1] if i + 1 < len(buf) else ""
            if self._prev_raw.isalnum() and nxt.isalnum():
                self._emit("_", pos)  # snake_case stays
            return 1
        if c == "~":
            if i + 1 >= len(buf) and not final:
                return None
            if buf.startswith("~~", i):
                return 2
            self._emit("~", pos)
            return 1
        if c == "[":
            return self._match(buf, i, final, _LINK, _LINK_PREFIX, keep_group=1)
        if c == "]":
            return 1
        if c == "|":  # table cell separator
            self._emit(" ", pos)
            return 1
        if c == "!" and (i + 1 >= len(buf) or buf[i + 1] == "["):
            step = self._match(buf, i, final, _IMAGE, _IMAGE_PREFIX, keep_group=None)
            if step is None or step > 0:
                return step
            self._emit("!", pos)
            return 1
        if c == "<":
            return self._angle(buf, i, final)
        if _unspeakable(c):
            return 1
        self._emit(c, pos)
        return 1

    def _match(
        self,
        buf: str,
        i: int,
        final: bool,
        full: re.Pattern[str],
        prefix: re.Pattern[str],
        keep_group: int | None,
    ) -> int | None:
        m = full.match(buf, i)
        if m:
            if keep_group is not None:
                self._emit_text(m.group(keep_group), self._base + m.start(keep_group))
            return m.end() - i
        if not final and prefix.match(buf, i):
            return None
        return 1 if keep_group is not None else 0  # "[" alone is dropped; "!" decided by caller

    def _angle(self, buf: str, i: int, final: bool) -> int | None:
        pos = self._base + i
        m = _EMOTION.match(buf, i)
        if m:
            for k, ch in enumerate(m.group(0)):
                self._emit(ch, pos + k)
            return m.end() - i
        m = _AUTOLINK.match(buf, i)
        if m:
            self._emit_text(m.group(1), pos + 1)
            return m.end() - i
        m = _HTML_TAG.match(buf, i)
        if m:
            return m.end() - i
        if not final and any(p.match(buf, i) for p in (_ANGLE_PREFIX, _AUTOLINK_PREFIX)):
            return None
        self._emit("<", pos)
        return 1

    def _backticks(self, buf: str, i: int, final: bool) -> int | None:
        n = 0
        while i + n < len(buf) and buf[i + n] == "`":
            n += 1
        if i + n >= len(buf) and not final:
            return None  # the run may grow
        if n >= 3:
            return self._open_fence(buf, i, final)
        end_of_line = buf.find("\n", i + n)
        limit = i + n + _CODE_WINDOW
        window_end = min(end_of_line if end_of_line >= 0 else len(buf), limit, len(buf))
        closer = re.compile(rf"(?<!`){'`' * n}(?!`)")
        m = closer.search(buf, i + n, window_end)
        if m and m.end() == len(buf) and not final:
            return None  # the closing run may still grow into a longer one
        if m:
            self._emit(" ", self._base + i)
            return m.end() - i
        decided = final or end_of_line >= 0 or len(buf) >= limit
        return n if decided else None  # a stray backtick run: dropped

    def _open_fence(self, buf: str, i: int, final: bool) -> int | None:
        # The info string ("python") is part of the fence line: wait for its end.
        step = self._skip_line(buf, i, final)
        if step is not None:
            self._in_fence = True
        return step

    def _skip_line(self, buf: str, i: int, final: bool) -> int | None:
        end = buf.find("\n", i)
        if end < 0:
            if not final:
                return None
            return len(buf) - i
        self._line_start = True
        return end + 1 - i

    def _fence_body(self, buf: str, i: int, final: bool) -> int | None:
        if self._line_start:
            j = i
            while j < len(buf) and buf[j] in " \t":
                j += 1
            rest = buf[j : j + 3]
            if rest in ("```", "~~~"):
                step = self._skip_line(buf, i, final)
                if step is not None:
                    self._in_fence = False
                    if self._last and self._last not in _SENTENCE_END:
                        self._emit(".", self._base + i)
                    self._emit("\n", self._base + i)
                return step
            maybe_fence = "```".startswith(rest) or "~~~".startswith(rest)
            if maybe_fence and j + 3 > len(buf) and not final:
                return None
        step = self._skip_line(buf, i, final)
        if step is None:
            # Drop the partial line of code now; only its line start matters.
            self._line_start = False
            return len(buf) - i
        return step

    def _line_prefix(self, buf: str, i: int, final: bool) -> int | None:
        """Markup at the start of a line; 0 when there is none."""
        c = buf[i]
        if c in " \t":
            return 1
        if c in "`~":
            n = 0
            while i + n < len(buf) and buf[i + n] == c:
                n += 1
            if n >= 3:
                return self._open_fence(buf, i, final)
            if i + n >= len(buf) and not final:
                return None
            return 0
        if c in "-*_=|:":
            # A horizontal rule or a table rule is dropped as a whole line.
            m = _RULE_LINE.match(buf, i)
            if m and (m.group(0).endswith("\n") or final):
                return m.end() - i
            end = buf.find("\n", i)
            if end < 0 and not final and re.fullmatch(r"[-*_=|: \t]*", buf[i:]):
                return None
        if c == "#":
            m = _HEADER.match(buf, i)
            if m:
                return m.end() - i
            if not final and re.fullmatch(r"#{1,6}", buf[i:]):
                return None
            return 0
        if c == ">":
            return 1
        if c in "-*+" or c.isdigit():
            m = _BULLET.match(buf, i)
            if m:
                return m.end() - i
            if not final and _BULLET_PREFIX.fullmatch(buf, i):
                return None
        return 0


def clean_text(text: str) -> str:
    """Clean a whole text at once (see :class:`TextCleaner`); line breaks become spaces."""
    return "".join(ch for ch, _ in TextCleaner().feed(text, final=True)).replace("\n", " ")
