"""The posteriors read the embeddings they are given: the characters' own by default, noisy ones when asked."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_model

from inference.posterior import SVIConfig
from inference.smc import TrajectorySMC
from inference.svi_filter import SVIFilter

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = torch.tensor([1, 2, 3, 4, 0])


def _filters(tm):
    return {"smc": lambda: TrajectorySMC(tm, num_particles=8, seed=3),
            "svi": lambda: SVIFilter(tm, SVIConfig(guide="normal", steps=3, seed=3), num_samples=8)}


@pytest.mark.parametrize("method", ["smc", "svi"])
def test_reading_the_characters_own_embeddings_is_the_default(method: str) -> None:
    tm = random_model(weight_scale=0.5)
    make = _filters(tm)[method]
    default, given = make().run(TEXT), make().run(TEXT, anchors=tm.anchors(TEXT))
    for a, b in zip(default, given):
        torch.testing.assert_close(a.probs, b.probs)


@pytest.mark.parametrize("method", ["smc", "svi"])
def test_noisy_embeddings_change_the_predictive(method: str) -> None:
    tm = random_model(weight_scale=0.5)
    make = _filters(tm)[method]
    noisy = tm.anchors(TEXT) + 0.5 * torch.randn(TEXT.shape[0], tm.dim, generator=torch.Generator().manual_seed(0))
    default, given = make().run(TEXT), make().run(TEXT, anchors=noisy)
    assert not torch.allclose(default[-1].probs, given[-1].probs)


@pytest.mark.parametrize("bad", [torch.zeros(4, 4), torch.zeros(5, 3), torch.full((5, 4), float("nan"))])
def test_anchors_of_the_wrong_shape_or_not_finite_are_rejected(bad: torch.Tensor) -> None:
    tm = random_model()
    with pytest.raises(ValueError, match="anchors"):
        TrajectorySMC(tm, num_particles=4).run(TEXT, anchors=bad)
    with pytest.raises(ValueError, match="anchors"):
        tm.model(TEXT, anchors=bad)
