"""The out-of-domain English text the robustness study scores every model on: Shakespeare's *The Tempest*.

The models are trained on Wikipedia articles in WikiText's tokenisation; the play is English in another
register, layout and spelling (``prob_attention/data/SOURCE-tempest.md`` says where it comes from, under which
licence, and why it was chosen). It is bundled with the package, so the study needs no network. It is scored
like a split: consecutive windows of the model's context length, at window level, each character the model
has never seen read as its unknown symbol.
"""

from __future__ import annotations

import lzma
from importlib import resources

from torch import Tensor

from inference.map import TrainedModel
from prob_attention.corpus import CharVocab, eval_windows

__all__ = ["OUT_OF_DOMAIN", "out_of_domain_text", "out_of_domain_windows"]

OUT_OF_DOMAIN = "tempest"
"""The name the study gives the out-of-domain condition's text."""


def out_of_domain_text() -> str:
    """The bundled text of *The Tempest* (98,439 characters), exactly as shipped."""
    return lzma.decompress(resources.files("prob_attention").joinpath("data/tempest.txt.xz").read_bytes()).decode()


def out_of_domain_windows(trained: TrainedModel) -> tuple[Tensor, Tensor]:
    """The text as the run's non-overlapping ``(inputs, targets)`` windows ``(n, block_size)``, encoded with the
    run's vocabulary (a character outside it is the unknown symbol, whatever the run's ``on_unknown``)."""
    vocab = CharVocab(trained.vocab.chars, on_unknown="unk")
    return eval_windows(vocab.encode(out_of_domain_text()), trained.gpt_config.block_size)
