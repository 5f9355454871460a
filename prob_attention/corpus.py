"""Character-level corpora for the small char GPT: loading, vocabulary and batching.

The paper trains on WikiText-2 at character level. Three sources are supported:

* ``"bundled"``: the validation and test files of WikiText-2 (tokenized v1), shipped with the
  package in ``prob_attention/data/`` because the training split is not available offline.
  Their 122 articles are shuffled and re-split *by article* into train / val / test. The
  result is named :data:`BUNDLED_CORPUS` so that no number computed on it is reported as
  "WikiText-2".
* ``"wikitext-2-raw"``: the real split, ``wikitext-2-raw-v1`` through Hugging Face
  ``datasets`` (needs network or a populated cache).
* a local folder holding ``wiki.{train,valid,test}.raw`` (or ``.tokens``).

Example:
    >>> corpus = load_corpus("bundled", seed=0)
    >>> vocab = CharVocab.from_text(corpus.train)
    >>> data = vocab.encode(corpus.train)
    >>> x, y = random_windows(data, 4, 64, torch.Generator().manual_seed(0))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([4, 64]), True)
"""

from __future__ import annotations

import lzma
import os
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

BUNDLED_CORPUS = "wt2-valtest-offline"
"""Name of the bundled corpus: WikiText-2 validation + test articles, re-split by article."""

UNK = "\ufffd"
"""The unknown-character symbol; it always has index 0 in a :class:`CharVocab`."""

_BUNDLED_FILES = ("wiki.valid.tokens.xz", "wiki.test.tokens.xz")
_SPLITS = ("train", "valid", "test")

# A top-level WikiText heading is a whole line " = Title = ": exactly one '=' on each side,
# so the title neither starts nor ends with '=' (sub-headings read " = = Section = = ").
_ARTICLE_HEADING = re.compile(r"^[ \t]*= [^=\n](?:[^\n]*[^=\n])? =[ \t\r]*$", re.MULTILINE)

OnUnknown = Literal["error", "unk"]


def split_articles(text: str) -> list[str]:
    """Split WikiText text into articles, each starting at its top-level heading line.

    A top-level heading is a line `` = Title = `` with exactly one ``=`` on each side;
    section headings (`` = = Section = = `` and deeper) stay inside their article. Text before
    the first heading (WikiText files open with a blank line) is kept with the first article,
    so the split is lossless: ``"".join(split_articles(text)) == text``. Text without any
    heading is a single article; the empty string has none.

    Example:
        >>> split_articles(" = A = \\n a \\n = = S = = \\n b \\n = B = \\n c \\n")
        [' = A = \\n a \\n = = S = = \\n b \\n', ' = B = \\n c \\n']
    """
    cuts = [m.start() for m in _ARTICLE_HEADING.finditer(text)][1:]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass
class CharVocab:
    """A character vocabulary built from a training text.

    Index 0 is always the unknown symbol :data:`UNK` (``"\\ufffd"``); the sorted characters of
    the training text take indices ``1..len(chars)``, so ``len(vocab) == len(chars) + 1``.
    ``on_unknown`` says what :meth:`encode` does with a character outside the vocabulary:
    ``"error"`` raises ``ValueError``, ``"unk"`` maps it to index 0. A literal ``UNK`` in the
    training text is not a separate entry: it is index 0 too.

    Example:
        >>> vocab = CharVocab.from_text("hello")
        >>> len(vocab), vocab.encode("hole").tolist(), vocab.decode([2, 1, 3, 3, 4])
        (5, [2, 4, 3, 1], 'hello')
    """

    chars: tuple[str, ...]
    on_unknown: OnUnknown = "error"
    _codes: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.on_unknown not in ("error", "unk"):
            raise ValueError(f"on_unknown must be 'error' or 'unk', got {self.on_unknown!r}")
        self.chars = tuple(self.chars)
        if any(len(c) != 1 for c in self.chars) or UNK in self.chars:
            raise ValueError("chars must be single characters, not including UNK")
        if list(self.chars) != sorted(set(self.chars)):
            raise ValueError("chars must be sorted and distinct")
        # Single characters sort by code point, so encoding is a binary search on these.
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str, on_unknown: OnUnknown = "error") -> CharVocab:
        """The vocabulary of the distinct characters of ``text`` (pass the training split only)."""
        return cls(tuple(sorted(set(text) - {UNK})), on_unknown)

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        """Encode ``text`` as a 1-D ``LongTensor`` of indices (shape ``(len(text),)``).

        Raises:
            ValueError: with ``on_unknown="error"``, if ``text`` holds characters outside the
                vocabulary; the message names each one (``repr``) and its first position.
        """
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        pos = np.searchsorted(self._codes, codes)
        known = np.zeros(codes.shape, dtype=bool)
        inside = pos < len(self._codes)
        known[inside] = self._codes[pos[inside]] == codes[inside]
        if self.on_unknown == "error" and not known.all():
            first: dict[str, int] = {}
            for i in np.flatnonzero(~known).tolist():
                first.setdefault(text[i], i)
            listed = ", ".join(f"{c!r} at position {i}" for c, i in first.items())
            raise ValueError(f"{len(first)} character(s) not in the vocabulary: {listed}")
        return torch.from_numpy(np.where(known, pos + 1, 0).astype(np.int64))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Decode indices back to text, read in flattened order (index 0 decodes to :data:`UNK`)."""
        ids_list = torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()
        bad = [i for i in ids_list if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"indices out of range [0, {len(self)}): {bad[:5]}")
        itos = (UNK, *self.chars)
        return "".join(itos[i] for i in ids_list)

    def to_dict(self) -> dict[str, str]:
        """A JSON-serialisable description; :meth:`from_dict` inverts it."""
        return {"chars": "".join(self.chars), "on_unknown": self.on_unknown}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> CharVocab:
        """Rebuild a vocabulary saved with :meth:`to_dict`."""
        return cls(tuple(d["chars"]), d["on_unknown"])  # type: ignore[arg-type]


SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
"""The splits of a :class:`CharCorpus` (its field names) and how messages name them."""


@dataclass
class CharCorpus:
    """The three text splits of a character corpus, its name (for labelling results) and, for a corpus read
    from files, the file of each split (``"train"``, ``"val"``, ``"test"`` -> path; for messages)."""

    name: str
    train: str
    val: str
    test: str
    files: dict[str, Path] = field(default_factory=dict)

    def where(self, split: str) -> str:
        """How a message names ``split``: ``"the validation split (folder/wiki.valid.raw)"``, or with the corpus's
        name where the split has no file of its own."""
        return f"the {SPLIT_NAMES[split]} split ({self.files.get(split, self.name)})"

    def encode_split(self, vocab: CharVocab, split: str) -> torch.Tensor:
        """``split`` encoded with ``vocab``; a character outside it (with ``on_unknown="error"``) is a
        ``ValueError`` naming the split and its file."""
        try:
            return vocab.encode(getattr(self, split))
        except ValueError as err:
            raise ValueError(f"{self.where(split)}: {err}, unseen in the training split (on_unknown='unk' maps "
                             "such characters to UNK)") from err

    def require_windows(self, block_size: int) -> None:
        """Raise ``ValueError`` naming the split and its file when a split is shorter than one window of
        ``block_size`` characters and its next character."""
        for split in SPLIT_NAMES:
            length = len(getattr(self, split))
            if length < block_size + 1:
                raise ValueError(f"{self.where(split)} holds {length} characters, fewer than one window of "
                                 f"block_size + 1 = {block_size + 1}")

    def summary(self, vocab: CharVocab | None = None) -> str:
        """One line: characters per split and, given a vocabulary, its size (UNK included)."""
        line = (
            f"{self.name}: train {len(self.train):,} / val {len(self.val):,} / "
            f"test {len(self.test):,} characters"
        )
        return line if vocab is None else f"{line}; vocab {len(vocab)} (incl. UNK)"


def bundled_articles() -> list[str]:
    """The articles of the bundled files (WikiText-2 validation, then test), in file order."""
    data = resources.files("prob_attention") / "data"
    articles: list[str] = []
    for name in _BUNDLED_FILES:
        with (data / name).open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as f:
            articles += split_articles(f.read())
    return articles


def _split_by_article(
    articles: list[str], seed: int, fractions: tuple[float, float, float]
) -> tuple[str, str, str]:
    """Shuffle ``articles`` with ``random.Random(seed)`` and join them into three splits.

    Validation and test get ``round(fraction * n)`` articles (at least one each), train the rest.
    """
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    order = list(articles)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val, n_test = (max(1, round(f * n)) for f in fractions[1:])
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} articles are too few for three non-empty splits {fractions}")
    return (
        "".join(order[:n_train]),
        "".join(order[n_train : n_train + n_val]),
        "".join(order[n_train + n_val :]),
    )


def _load_wikitext2_raw() -> CharCorpus:
    """The real WikiText-2 (raw) split through Hugging Face ``datasets``."""
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1")
        train, val, test = ("".join(ds[s]["text"]) for s in ("train", "validation", "test"))
    except Exception as err:
        raise RuntimeError(
            "could not load wikitext-2-raw-v1 through `datasets` (it needs network or a "
            f"populated cache): {err}. Offline, use source='bundled' ({BUNDLED_CORPUS}) or a "
            "local folder holding wiki.train.raw, wiki.valid.raw and wiki.test.raw."
        ) from err
    return CharCorpus("wikitext-2-raw-v1", train, val, test)


def _load_folder(folder: Path) -> CharCorpus:
    """Read ``wiki.{train,valid,test}.raw`` (or ``.tokens``) from ``folder`` as the splits."""
    files: dict[str, Path] = {}
    for split, file_split in zip(SPLIT_NAMES, _SPLITS):
        candidates = [folder / f"wiki.{file_split}.{ext}" for ext in ("raw", "tokens")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            names = " nor ".join(p.name for p in candidates)
            raise FileNotFoundError(f"{folder} holds neither {names}")
        files[split] = path
    texts = [_read_split(path, split) for split, path in files.items()]
    return CharCorpus(f"local:{folder}", *texts, files=files)


def _read_split(path: Path, split: str) -> str:
    """The text of the file of ``split``; ``ValueError`` naming the file and the split when it is empty or not
    text (not UTF-8, or holding NUL characters)."""
    name = f"{path}: the {SPLIT_NAMES[split]} split"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} is not UTF-8 text (byte {err.start}: {err.reason}); is it a binary file?") from err
    nul = text.find("\x00")
    if nul >= 0:
        raise ValueError(f"{name} holds NUL characters (the first at character {nul}): a binary file, not text")
    if not text:
        raise ValueError(f"{name} is empty")
    return text


def load_corpus(
    source: str | os.PathLike[str] = "bundled",
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> CharCorpus:
    """Load a character corpus.

    Args:
        source: ``"bundled"`` (offline; named :data:`BUNDLED_CORPUS`), ``"wikitext-2-raw"``
            (the paper's split, via ``datasets``), or a folder holding
            ``wiki.{train,valid,test}.raw`` (or ``.tokens``).
        seed: seeds the article shuffle of the bundled corpus (ignored by the other sources).
        fractions: train / val / test shares of the bundled corpus's articles (by count).

    Raises:
        RuntimeError: ``"wikitext-2-raw"`` could not be loaded (e.g. offline).
        ValueError: ``source`` is none of the above, or a folder's file is empty or not text (the message names
            the file and its split).

    The bundled corpus is deterministic for a given seed and fractions.
    """
    if source == "bundled":
        return CharCorpus(BUNDLED_CORPUS, *_split_by_article(bundled_articles(), seed, fractions))
    if source == "wikitext-2-raw":
        return _load_wikitext2_raw()
    if Path(source).is_dir():
        return _load_folder(Path(source))
    raise ValueError(
        f"unknown corpus source {str(source)!r}: expected 'bundled', 'wikitext-2-raw' or a "
        "folder holding wiki.{train,valid,test}.raw (or .tokens)"
    )


def _check_length(data: torch.Tensor, block_size: int) -> None:
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(
            f"data of length {len(data)} is shorter than block_size + 1 = {block_size + 1}"
        )


def random_windows(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of windows at uniformly random offsets, drawn from ``generator``.

    Returns ``(x, y)``, each ``(batch_size, block_size)`` on ``data``'s device, with
    ``y[b, t] == data[i_b + t + 1]`` the next character after ``x[b, t] == data[i_b + t]``.
    """
    _check_length(data, block_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    starts = torch.randint(
        len(data) - block_size, (batch_size,), generator=generator, device=generator.device
    ).to(data.device)
    idx = starts[:, None] + torch.arange(block_size, device=data.device)  # (B, T)
    return data[idx], data[idx + 1]


def eval_windows(data: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive non-overlapping windows over ``data`` for bits-per-character evaluation.

    Returns ``(x, y)``, each ``(n, block_size)`` with ``n = (len(data) - 1) // block_size``:
    window ``k`` reads ``data[k*T : (k+1)*T]`` and predicts ``data[k*T + 1 : (k+1)*T + 1]``.
    The ragged tail (fewer than ``block_size`` targets) is dropped.
    """
    _check_length(data, block_size)
    n = (len(data) - 1) // block_size
    x = data[: n * block_size].view(n, block_size)  # (n, T)
    y = data[1 : n * block_size + 1].view(n, block_size)  # (n, T)
    return x, y


def window_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of at most ``batch_size`` windows from ``(inputs, targets)``, each ``(n, T)``.

    Raises ``ValueError`` when there is no window to score (an empty split, or a cap of 0 windows).
    """
    if inputs.shape[0] == 0:
        raise ValueError("no windows to score: the split is shorter than one window, or the cap is 0")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, inputs.shape[0], batch_size):
        yield inputs[start : start + batch_size], targets[start : start + batch_size]
