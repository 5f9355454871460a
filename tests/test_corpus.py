"""Properties of the character corpus: article splitting, loading, vocabulary and batching."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from prob_attention.corpus import (
    BUNDLED_CORPUS,
    UNK,
    CharCorpus,
    CharVocab,
    bundled_articles,
    eval_windows,
    load_corpus,
    random_windows,
    split_articles,
)

SYNTHETIC = (
    " \n"
    " = First = \n"
    " \n"
    " Body with = signs = inside and 1 = 2 . \n"
    " = = Section = = \n"
    " More . \n"
    " = = = Subsection = = = \n"
    " Deep . \n"
    " = Second article = \n"
    " = <unk> not a heading \n"
    " = Third = \n"
    " End . \n"
)


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return bundled_articles()


@pytest.fixture(scope="module")
def corpus() -> CharCorpus:
    return load_corpus("bundled", seed=0)


def _article_multiset(texts: list[str]) -> Counter[str]:
    """Articles of the given texts, whitespace-trimmed (a file's leading blank line moves)."""
    return Counter(a.strip() for text in texts for a in split_articles(text))


# --- article splitting -------------------------------------------------------------------


def test_split_is_lossless_and_starts_each_article_at_a_top_level_heading() -> None:
    parts = split_articles(SYNTHETIC)
    assert "".join(parts) == SYNTHETIC
    assert [p.strip().splitlines()[0].strip() for p in parts] == [
        "= First =",
        "= Second article =",
        "= Third =",
    ]


def test_sub_headings_and_equals_signs_do_not_split() -> None:
    first = split_articles(SYNTHETIC)[0]
    assert "= = Section = =" in first and "= = = Subsection = = =" in first
    assert "1 = 2" in first
    assert "= <unk> not a heading" in split_articles(SYNTHETIC)[1]


@pytest.mark.parametrize("text", ["", " plain text without headings \n"])
def test_text_without_headings_is_at_most_one_article(text: str) -> None:
    assert split_articles(text) == ([text] if text else [])


def test_bundled_files_hold_122_articles(articles: list[str]) -> None:
    assert len(articles) == 122
    assert all(a.lstrip(" \n").startswith("= ") for a in articles)


# --- loading -----------------------------------------------------------------------------


def test_bundled_corpus_is_named_as_not_wikitext2(corpus: CharCorpus) -> None:
    assert corpus.name == BUNDLED_CORPUS == "wt2-valtest-offline"


def test_bundled_load_is_deterministic_for_a_seed(corpus: CharCorpus) -> None:
    assert load_corpus("bundled", seed=0) == corpus
    assert load_corpus("bundled", seed=1) != corpus


def test_bundled_splits_partition_the_articles(
    corpus: CharCorpus, articles: list[str]
) -> None:
    splits = [corpus.train, corpus.val, corpus.test]
    per_split = [_article_multiset([s]) for s in splits]
    assert all(per_split), "every split holds at least one article"
    assert sum(per_split, Counter()) == _article_multiset(articles)
    assert [sum(c.values()) for c in per_split] == [98, 12, 12]


def test_fractions_that_leave_a_split_empty_are_rejected() -> None:
    with pytest.raises(ValueError, match="fractions"):
        load_corpus("bundled", fractions=(1.0, 0.0, 0.0))


@pytest.mark.parametrize("ext", ["raw", "tokens"])
def test_local_folder_source_reads_the_three_files(tmp_path: Path, ext: str) -> None:
    texts = {"train": " = A = \n a \n", "valid": " = B = \n b \n", "test": " = C = \n c \n"}
    for split, text in texts.items():
        (tmp_path / f"wiki.{split}.{ext}").write_text(text, encoding="utf-8")
    loaded = load_corpus(str(tmp_path))
    assert (loaded.train, loaded.val, loaded.test) == tuple(texts.values())


def test_local_folder_missing_a_split_raises(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.raw").write_text("a", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="wiki.valid.raw"):
        load_corpus(tmp_path)


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n", "is not UTF-8 text (byte 0: invalid start byte)"),
    (b" = A = \n a\x00b \n", "holds NUL characters (the first at character 10)"),
])
def test_a_split_file_that_is_empty_or_not_text_is_refused_naming_the_file_and_split(
        tmp_path: Path, content: bytes, problem: str) -> None:
    for split in ("train", "valid", "test"):
        (tmp_path / f"wiki.{split}.raw").write_text(" = A = \n a \n", encoding="utf-8")
    (tmp_path / "wiki.valid.raw").write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_corpus(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'wiki.valid.raw'}: the validation split {problem}")


def test_a_split_shorter_than_one_window_is_refused_naming_it_and_its_file(tmp_path: Path) -> None:
    texts = {"train": "abcdefghij", "valid": "abcdefghij", "test": "abcde"}
    for split, text in texts.items():
        (tmp_path / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    corpus = load_corpus(tmp_path)
    corpus.require_windows(4)
    with pytest.raises(ValueError, match=r"^the test split \(.*wiki\.test\.raw\) holds 5 characters, fewer than one "
                                         r"window of block_size \+ 1 = 6$"):
        corpus.require_windows(5)


def test_characters_unseen_in_training_are_refused_naming_the_split_and_its_source() -> None:
    corpus = CharCorpus("slice", "abc", "abz", "abc")
    vocab = CharVocab.from_text(corpus.train, on_unknown="error")
    assert corpus.encode_split(vocab, "test").tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"^the validation split \(slice\): 1 character\(s\) not in the vocabulary: "
                                         r"'z' at position 2, unseen in the training split"):
        corpus.encode_split(vocab, "val")


def test_unknown_source_raises_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="bundled.*wikitext-2-raw"):
        load_corpus("wikitext-103")


def test_summary_reports_characters_and_vocab_size(corpus: CharCorpus) -> None:
    vocab = CharVocab.from_text(corpus.train)
    line = corpus.summary(vocab)
    assert f"{len(corpus.train):,}" in line and f"vocab {len(vocab)}" in line
    assert "vocab" not in corpus.summary()


# --- vocabulary --------------------------------------------------------------------------


def test_vocab_is_the_training_characters_plus_unk_at_zero() -> None:
    vocab = CharVocab.from_text("banana")
    assert vocab.chars == ("a", "b", "n")
    assert len(vocab) == 4
    assert vocab.decode([0]) == UNK
    assert vocab.encode("ab").tolist() == [1, 2]


def test_bundled_vocab_comes_from_train_only(corpus: CharCorpus) -> None:
    vocab = CharVocab.from_text(corpus.train)
    assert set(vocab.chars) == set(corpus.train)
    assert len(vocab) == len(set(corpus.train)) + 1


@pytest.mark.parametrize("text", ["", "hello world", "é\u00a0→ ✓\n\t"])
def test_encode_decode_round_trip(text: str) -> None:
    vocab = CharVocab.from_text("hello world é\u00a0→ ✓\n\t")
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert vocab.decode(ids) == text


def test_bundled_train_round_trips(corpus: CharCorpus) -> None:
    vocab = CharVocab.from_text(corpus.train)
    assert vocab.decode(vocab.encode(corpus.train)) == corpus.train


def test_unknown_character_raises_naming_it_and_its_first_position() -> None:
    vocab = CharVocab.from_text("abc", on_unknown="error")
    with pytest.raises(ValueError, match=r"'z' at position 1.*'é' at position 3"):
        vocab.encode("azbéz")


def test_unknown_character_maps_to_unk_in_unk_mode() -> None:
    vocab = CharVocab.from_text("abc", on_unknown="unk")
    assert vocab.encode("azb").tolist() == [1, 0, 2]
    assert vocab.decode(vocab.encode("azb")) == f"a{UNK}b"


def test_vocab_dict_round_trip() -> None:
    vocab = CharVocab.from_text("hello, wörld\n", on_unknown="unk")
    assert CharVocab.from_dict(vocab.to_dict()) == vocab


# --- batching ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,block_size", [(1, 1), (4, 8), (3, 99)])
def test_random_windows_are_shifted_slices(batch_size: int, block_size: int) -> None:
    data = torch.arange(100)
    x, y = random_windows(data, batch_size, block_size, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (batch_size, block_size)
    assert torch.equal(y, x + 1), "y is x shifted by one (data is arange)"
    assert torch.equal(x, x[:, :1] + torch.arange(block_size)), "each row is contiguous"


def test_random_windows_depend_only_on_the_generator() -> None:
    data = torch.arange(1000)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return random_windows(data, 8, 16, torch.Generator().manual_seed(0))

    torch.manual_seed(123)
    first = draw()
    torch.manual_seed(456)
    assert all(torch.equal(u, v) for u, v in zip(first, draw()))


@pytest.mark.parametrize("length,block_size", [(9, 4), (11, 5), (2, 1)])
def test_eval_windows_tile_the_data_without_overlap(length: int, block_size: int) -> None:
    data = torch.arange(length)
    x, y = eval_windows(data, block_size)
    n = (length - 1) // block_size
    assert x.shape == y.shape == (n, block_size)
    assert torch.equal(x.reshape(-1), data[: n * block_size])
    assert torch.equal(y, x + 1)


@pytest.mark.parametrize("length", [0, 4, 8])
def test_data_shorter_than_block_plus_one_raises(length: int) -> None:
    data = torch.arange(length)
    with pytest.raises(ValueError, match="shorter than block_size"):
        eval_windows(data, 8)
    with pytest.raises(ValueError, match="shorter than block_size"):
        random_windows(data, 2, 8, torch.Generator().manual_seed(0))
