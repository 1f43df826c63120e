"""Tokenizer and chunker: what makes English, Chinese and Japanese text findable."""

from __future__ import annotations

from aggregator.text.chunking import split_passages
from aggregator.text.tokenize import tokenize


def test_english_words_are_case_folded_and_stemmed_so_forms_meet():
    assert tokenize("Rotating KEYS") == tokenize("rotate key")


def test_stop_words_carry_no_weight():
    assert tokenize("the keys of the kingdom") == tokenize("keys kingdom")


def test_chinese_is_split_without_spaces():
    terms = tokenize("签名密钥轮换")
    assert len(terms) >= 4  # not one opaque token
    assert set(tokenize("密钥")) <= set(terms)  # a word inside the run is found
    assert not set(tokenize("报销")) & set(terms)


def test_japanese_kana_and_kanji_are_split_too():
    terms = tokenize("設定する方法")
    assert set(tokenize("方法")) <= set(terms)
    assert len(terms) >= 3


def test_mixed_scripts_and_full_width_forms():
    terms = tokenize("ＶＰＮ设置 VPN 设置")
    assert terms.count(tokenize("vpn")[0]) == 2  # full-width letters fold to ASCII
    assert set(tokenize("设置")) <= set(terms)


def test_punctuation_and_underscores_split_words():
    assert tokenize("api_token,user-name") == tokenize("api token user name")


def test_empty_and_symbol_only_text():
    assert tokenize("") == []
    assert tokenize("!!! ... ---") == []


def test_short_document_is_one_passage():
    assert split_passages("Just one line.") == ["Just one line."]
    assert split_passages("  \n\n ") == []


def test_passages_respect_the_size_and_keep_every_paragraph():
    paragraphs = [f"Paragraph {i} talks about topic number {i}." * 3 for i in range(40)]
    passages = split_passages("\n\n".join(paragraphs), chunk_chars=400)
    assert len(passages) > 5
    assert all(len(p) <= 400 for p in passages)
    for paragraph in paragraphs:
        assert any(paragraph in p for p in passages)


def test_long_paragraph_splits_at_sentence_ends():
    text = " ".join(f"Sentence number {i} ends here." for i in range(100))
    passages = split_passages(text, chunk_chars=300)
    assert all(len(p) <= 300 for p in passages)
    assert all(p.endswith(".") for p in passages)


def test_chinese_text_splits_at_full_stops():
    text = "这是一个关于密钥轮换的句子。" * 60
    passages = split_passages(text, chunk_chars=200)
    assert len(passages) > 3
    assert all(len(p) <= 200 and p.endswith("。") for p in passages)


def test_consecutive_passages_overlap():
    text = "\n\n".join(f"Paragraph {i}. It has a second sentence {i}." for i in range(30))
    passages = split_passages(text, chunk_chars=300, overlap_chars=80)
    tail = passages[0].split("\n\n")[-1]
    assert passages[1].startswith(tail)


def test_a_sentence_longer_than_a_passage_is_cut():
    text = "word " * 1000
    passages = split_passages(text, chunk_chars=500)
    assert all(len(p) <= 500 for p in passages)
    assert sum(p.count("word") for p in passages) >= 1000
