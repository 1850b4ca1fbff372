"""Text side of the speech pipeline: cleaning and segmenting LLM text streams."""

from __future__ import annotations

from voxlane.server.text.cleaner import TextCleaner, clean_text
from voxlane.server.text.segmenter import Segment, Segmenter

__all__ = ["Segment", "Segmenter", "TextCleaner", "clean_text"]
