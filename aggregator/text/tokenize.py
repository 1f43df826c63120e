"""The one tokenizer: used to index local sources and to rerank the merged pool.

English (and other space-separated scripts) is split into words, case-folded,
stripped of stop words and stemmed with the Snowball English stemmer, so that
"rotating" and "rotate" meet. Chinese and Japanese have no spaces between
words, so runs of Han, Hiragana and Katakana become overlapping character
bigrams ("密钥轮换" -> 密钥 钥轮 轮换), the approach of Lucene's CJK analyzer that
needs no dictionary. NFKC folds full-width forms first.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import Stemmer

_CJK = (
    "\u3040-\u309f"  # Hiragana
    "\u30a0-\u30ff\u31f0-\u31ff"  # Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # Han
    "\U00020000-\U0002ffff"  # Han, supplementary planes
)
_TOKEN = re.compile(rf"([{_CJK}]+)|([^\W_{_CJK}]+)")
_ASCII_WORD = re.compile(r"[a-z0-9]+")

# A short list: articles, auxiliaries, pronouns and prepositions that carry
# no topic. Kept small on purpose: "not", "off", "on" matter in queries.
STOP_WORDS = frozenset(
    """a an and are as at be been being but by did do does for from had has have
    he her his i if in into is it its me my of or our she so than that the their
    them then there these they this those to too was we were what when where which
    who whom why will with would you your""".split()
)

_stemmer = Stemmer.Stemmer("english")

#: Bump whenever `tokenize` gives other terms for some text: persisted indexes made with another
#: version are discarded and rebuilt (aggregator/state keeps this and a probe of the output).
TOKENIZER_VERSION = "1"


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    return _stemmer.stemWord(word)


def _cjk_bigrams(run: str) -> list[str]:
    if len(run) == 1:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)]


def tokenize(text: str) -> list[str]:
    """Split text into index terms. Deterministic; never raises on any str.

    Plain ASCII text (most English passages) takes a shorter path with the
    same result: NFKC and case folding are then just lower-casing, and a word
    is a run of letters and digits. It halves the cost of indexing.
    """
    if text.isascii():
        return [_stem(word) for word in _ASCII_WORD.findall(text.lower()) if word not in STOP_WORDS]
    return tokenize_unicode(text)


def tokenize_unicode(text: str) -> list[str]:
    """The general path of `tokenize`, for text with any non-ASCII character."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    terms: list[str] = []
    for cjk, word in _TOKEN.findall(folded):
        if cjk:
            terms.extend(_cjk_bigrams(cjk))
        elif word not in STOP_WORDS:
            terms.append(_stem(word))
    return terms
