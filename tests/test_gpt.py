"""SmallGPT: shapes, the embed/decode split, causality, incremental decoding, the loss at init, units, bad input,
param groups."""

import math

import pytest
import torch

from prob_attention.gpt import GPTConfig, SmallGPT, bits_per_char, configure_param_groups

CONFIG = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model() -> SmallGPT:
    torch.manual_seed(0)
    return SmallGPT(CONFIG).eval()


def tokens(batch: int, time: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, time), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("time", [1, 7, CONFIG.block_size])
def test_shapes(model, time):
    idx = tokens(3, time)
    x = model.embed(idx)
    assert x.shape == (3, time, CONFIG.n_embd)
    logits, loss = model(idx)
    assert logits.shape == (3, time, CONFIG.vocab_size)
    assert loss is None
    _, loss = model(idx, targets=idx)
    assert loss.shape == ()


def test_forward_is_decode_of_embed(model):
    idx = tokens(2, 9)
    torch.testing.assert_close(model(idx)[0], model.decode(model.embed(idx)), rtol=0, atol=0)


def test_embed_is_token_plus_position_embedding(model):
    idx = tokens(2, 5)
    torch.testing.assert_close(model.embed(idx), model.wte.weight[idx] + model.wpe.weight[:5])


def test_lm_head_is_tied_to_token_embedding(model):
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("t", [0, 4, 10])
def test_changing_a_future_token_never_changes_earlier_logits(model, t):
    idx = tokens(2, 12)
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % CONFIG.vocab_size
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
    assert not torch.allclose(before[:, t], after[:, t])


def test_perturbing_a_future_embedding_never_changes_earlier_logits(model):
    x = model.embed(tokens(1, 8))
    noisy = x.clone()
    noisy[:, 5:] += torch.randn_like(noisy[:, 5:])
    torch.testing.assert_close(model.decode(x)[:, :5], model.decode(noisy)[:, :5], rtol=0, atol=0)


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1], [9]], ids=["one-by-one", "mixed", "all-at-once"])
def test_cached_decoding_equals_decoding_the_whole_sequence(chunks):
    torch.manual_seed(0)
    model = SmallGPT(CONFIG).double().eval()
    x = model.embed(tokens(3, sum(chunks))) + 0.1 * torch.randn(3, sum(chunks), CONFIG.n_embd, dtype=torch.float64)
    cache, pieces, start = model.new_cache(), [], 0
    for n in chunks:
        pieces.append(model.decode(x[:, start:start + n], cache))
        start += n
        assert len(cache) == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), model.decode(x), rtol=1e-12, atol=1e-12)


def test_reordered_cache_decodes_the_reordered_rows(model):
    x = model.embed(tokens(4, 6))
    cache = model.new_cache()
    model.decode(x[:, :5], cache)
    index = torch.tensor([2, 2, 0, 3, 1])  # resampling: repeats, a different batch size
    cache.reorder(index)
    torch.testing.assert_close(model.decode(x[index, 5:], cache), model.decode(x[index])[:, 5:])


def test_cache_of_another_batch_or_model_raises(model):
    cache = model.new_cache()
    model.decode(model.embed(tokens(2, 3)), cache)
    with pytest.raises(ValueError, match="rows"):
        model.decode(model.embed(tokens(3, 1)), cache)
    with pytest.raises(ValueError, match="layers"):
        model.decode(model.embed(tokens(2, 1)), SmallGPT(GPTConfig(vocab_size=13, n_layer=1, n_head=2, n_embd=32)).new_cache())


def test_loss_at_init_is_close_to_log_vocab():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=123)  # the default sizes
    seq = torch.randint(0, 123, (8, config.block_size + 1))
    _, loss = SmallGPT(config)(seq[:, :-1], targets=seq[:, 1:])
    assert abs(loss.item() - math.log(123)) < 0.1 * math.log(123)


def test_bits_per_char_is_nats_over_ln2(model):
    idx = tokens(4, 10)
    logits, loss = model(idx, targets=idx.roll(1, dims=1))
    torch.testing.assert_close(bits_per_char(logits, idx.roll(1, dims=1)), loss / math.log(2))


def test_uniform_logits_give_log2_vocab_bits():
    logits = torch.zeros(2, 3, 8)
    assert bits_per_char(logits, torch.zeros(2, 3, dtype=torch.long)).item() == pytest.approx(3.0)


def test_default_config_parameter_count():
    assert SmallGPT(GPTConfig(vocab_size=123)).num_params() == 428_928


def test_residual_projections_have_scaled_init():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, n_layer=8, n_embd=256)
    model = SmallGPT(config)
    expected = 0.02 / math.sqrt(2 * config.n_layer)
    assert model.blocks[0].mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.zeros(8, dtype=torch.long), ValueError),  # rank 1
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError),  # rank 3
        (torch.zeros(2, 4), TypeError),  # float ids
        (torch.zeros(2, 4, dtype=torch.bool), TypeError),
        (torch.zeros(1, CONFIG.block_size + 1, dtype=torch.long), ValueError),  # too long
        (torch.full((1, 4), CONFIG.vocab_size), ValueError),  # id out of range
        (torch.full((1, 4), -1), ValueError),
    ],
    ids=["rank1", "rank3", "float", "bool", "too-long", "id-too-large", "id-negative"],
)
def test_bad_token_ids_raise(model, bad, error):
    with pytest.raises(error):
        model(bad)


@pytest.mark.parametrize("shape", [(2, 4, CONFIG.n_embd + 1), (4, CONFIG.n_embd)], ids=["wrong-dim", "rank2"])
def test_bad_embeddings_raise(model, shape):
    with pytest.raises(ValueError, match="embeddings"):
        model.decode(torch.zeros(shape))


def test_mismatched_targets_raise(model):
    with pytest.raises(ValueError, match="targets"):
        model(tokens(2, 4), targets=tokens(2, 5))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_embd": 30, "n_head": 4}, "divisible"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"block_size": -1}, "block_size"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": 0}, "n_head"),
        ({"n_embd": 2.5}, "n_embd"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{"vocab_size": 10, **kwargs})


def test_config_dict_round_trip():
    assert GPTConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.from_dict({**CONFIG.to_dict(), "n_embed": 32})


@pytest.mark.parametrize("bias", [True, False])
def test_param_groups_cover_every_parameter_exactly_once(bias):
    model = torch.nn.ModuleDict(
        {"gpt": SmallGPT(GPTConfig(vocab_size=7, block_size=4, n_embd=8, n_head=2, bias=bias)),
         "extra": torch.nn.Linear(3, 3)}
    )
    groups = configure_param_groups(model, weight_decay=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    decay = next(g for g in groups if g["weight_decay"] == 0.1)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model["gpt"].wte.weight for p in decay["params"])
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)
    assert all(p.dim() < 2 for p in no_decay["params"])
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


def test_param_groups_reject_negative_decay():
    with pytest.raises(ValueError):
        configure_param_groups(torch.nn.Linear(2, 2), weight_decay=-1.0)


def test_dropout_only_acts_in_training():
    torch.manual_seed(0)
    model = SmallGPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.5))
    idx = torch.randint(0, 5, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
