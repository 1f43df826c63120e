"""Split a document into passages of about `chunk_chars` characters.

Passages end at paragraph boundaries when they can, else at sentence ends,
and only as a last resort in the middle of a sentence. Each passage after the
first repeats the tail of the one before (at most `overlap_chars`, whole
sentences when possible) so that an answer straddling a boundary stays findable.
"""

from __future__ import annotations

import re

DEFAULT_CHUNK_CHARS = 1500
DEFAULT_OVERLAP_CHARS = 150

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A sentence ends at . ! ? followed by space, or right after CJK full stops.
_CJK_STOPS = "。！？；"
_SENTENCE_END = re.compile(rf"(?<=[.!?])\s+|(?<=[{_CJK_STOPS}])")


def _join(left: str, right: str) -> str:
    """Join two sentences the way the script writes them: CJK needs no space."""
    if not left:
        return right
    return left + ("" if left[-1] in _CJK_STOPS else " ") + right


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _split_long(text: str, limit: int) -> list[str]:
    """Break one paragraph that is over the limit into pieces of whole sentences."""
    pieces: list[str] = []
    current = ""
    for sentence in _sentences(text):
        while len(sentence) > limit:  # a sentence longer than a passage: cut it, at a space if one is near
            cut = sentence.rfind(" ", limit // 2, limit)
            cut = cut if cut > 0 else limit
            if current:
                pieces.append(current)
                current = ""
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        joined = _join(current, sentence)
        if len(joined) <= limit:
            current = joined
        else:
            pieces.append(current)
            current = sentence
    if current:
        pieces.append(current)
    return pieces


def _tail(text: str, overlap: int) -> str:
    """The last whole sentences of `text`'s last paragraph that fit in `overlap` characters."""
    tail = ""
    for sentence in reversed(_sentences(_PARAGRAPH_BREAK.split(text)[-1])):
        candidate = _join(sentence, tail) if tail else sentence
        if len(candidate) > overlap:
            break
        tail = candidate
    return tail


def split_passages(
    text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS, overlap_chars: int = DEFAULT_OVERLAP_CHARS
) -> list[str]:
    """Return the passages of `text`, in order; an empty or blank text gives none."""
    if chunk_chars <= 0:
        raise ValueError("chunk_chars must be positive")
    overlap_chars = min(overlap_chars, chunk_chars // 4)
    units: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        units.extend([paragraph] if len(paragraph) <= chunk_chars else _split_long(paragraph, chunk_chars))

    passages: list[str] = []
    current = ""
    for unit in units:
        joined = f"{current}\n\n{unit}" if current else unit
        if len(joined) <= chunk_chars:
            current = joined
            continue
        passages.append(current)
        carry = _tail(current, overlap_chars)
        current = f"{carry}\n\n{unit}" if carry and len(carry) + len(unit) + 2 <= chunk_chars else unit
    if current:
        passages.append(current)
    return passages
