"""OFT network: bidirectional attention, padding, read-out shift, visual grid, hidden capture."""

import pytest
import torch

from spatial_forcing.policies.oft.config import OFTConfig
from spatial_forcing.policies.oft.model import OFTModel, bidirectional_mask


def mini(**kw) -> OFTConfig:
    return OFTConfig.preset("mini", **kw)


def make_batch(cfg: OFTConfig, prompt_lens=(5, 9), seed=0, pad_to=None):
    """Right-padded text ids: [BOS, prompt (P-1 ids), space, K*A placeholders, EOS, pads]."""
    g = torch.Generator().manual_seed(seed)
    rows, lens = [], []
    for p in prompt_lens:
        prompt = torch.randint(40, 200, (p - 1,), generator=g).tolist() + [cfg.prompt_space_id]
        rows.append([cfg.bos_token_id] + prompt + [cfg.bos_token_id] * cfg.num_action_tokens + [cfg.eos_token_id])
        lens.append(p)
    width = max(pad_to or 0, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), cfg.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    b = len(rows)
    return dict(pixel_values=torch.randn(b, 6 * cfg.num_images, cfg.image_size, cfg.image_size, generator=g),
                input_ids=ids, attention_mask=mask, prompt_lens=torch.tensor(lens),
                proprio=torch.randn(b, cfg.proprio_dim, generator=g),
                actions=torch.rand(b, cfg.chunk_len, cfg.action_dim, generator=g) * 2 - 1)


def select(batch, i):
    n = int(batch["attention_mask"][i].sum())
    out = {k: v[i:i + 1] for k, v in batch.items()}
    out["input_ids"], out["attention_mask"] = out["input_ids"][:, :n], out["attention_mask"][:, :n]
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OFTModel(mini()).eval()


def test_sizes_of_the_published_architecture():
    with torch.device("meta"):
        big = OFTModel(OFTConfig.preset("openvla-7b"))
    sd = big.state_dict()
    assert sum(v.numel() for k, v in sd.items() if k.startswith("action_head.")) == 151_117_831
    assert sum(v.numel() for k, v in sd.items() if k.startswith("proprio_projector.")) == 16_818_176
    assert len(big.vision_backbone.featurizer.encoder.layer) == 23  # block 24 is never read
    assert len(big.vision_backbone.fused_featurizer.encoder.layers) == 26
    assert big.language_model.config.rms_norm_eps == 1e-6 and big.language_model.config.vocab_size == 32064
    assert big.vision_backbone.fused_featurizer.config.hidden_act == "gelu"  # erf, not tanh
    assert sd["projector.fc1.weight"].shape == (8704, 2176) and sd["projector.fc3.weight"].shape == (4096, 4096)
    assert OFTConfig.preset("openvla-7b").num_prefix_tokens == 513


def test_mini_is_a_few_million_parameters():
    n = sum(p.numel() for p in OFTModel(mini()).parameters())
    assert 2e6 < n < 20e6


def test_mask_is_key_only_additive():
    real = torch.tensor([[True, True, False]])
    m = bidirectional_mask(real, torch.float32)
    assert m.shape == (1, 1, 3, 3)
    assert torch.all(m[0, 0, :, :2] == 0) and torch.all(m[0, 0, :, 2] == torch.finfo(torch.float32).min)


def test_later_tokens_change_earlier_outputs(model):
    """Bidirectional: perturbing the last placeholder / EOS changes the first read-out position."""
    cfg = model.config
    batch = select(make_batch(cfg), 0)
    embeds, real = model.embed(batch)
    last, _ = model.run_llm(embeds, real)
    for pos in (embeds.shape[1] - 1, embeds.shape[1] - 2):  # EOS, last placeholder
        bumped = embeds.clone()
        bumped[:, pos] += 1.0
        other, _ = model.run_llm(bumped, real)
        assert (other[:, 5] - last[:, 5]).abs().max() > 1e-4
    # Guard: a causal mask gives a different result, so the test above can fail.
    causal = model.language_model(inputs_embeds=embeds, attention_mask=real.long()).last_hidden_state
    assert (causal[:, 5] - last[:, 5]).abs().max() > 1e-4


def test_padding_never_changes_real_tokens_and_batch_equals_single(model):
    cfg = model.config
    batch = make_batch(cfg, prompt_lens=(4, 11, 7), pad_to=90)
    with torch.no_grad():
        together = model.predict_normalized(batch)
        alone = torch.cat([model.predict_normalized(select(batch, i)) for i in range(3)])
        assert torch.allclose(together, alone, atol=1e-5)
        # Garbage in pad ids changes nothing.
        noisy = dict(batch)
        noisy["input_ids"] = torch.where(batch["attention_mask"], batch["input_ids"], torch.randint_like(batch["input_ids"], 3, 250))
        assert torch.allclose(model.predict_normalized(noisy), together, atol=1e-6)


def test_readout_is_shifted_one_position_before_the_placeholders(model):
    cfg = model.config
    s = cfg.num_prefix_tokens
    last = torch.arange(200.0)[None, :, None].repeat(2, 1, 3)  # value = position
    h = model.action_hidden(last, torch.tensor([5, 9]))
    assert h[0, :, 0].tolist() == list(range(s + 5, s + 5 + 56))  # starts at the space token (S+P)
    assert h[1, 0, 0].item() == s + 9
    # Perturbing the hidden state of the last placeholder or EOS leaves the actions unchanged.
    batch = select(make_batch(cfg), 0)
    embeds, real = model.embed(batch)
    out, _ = model.run_llm(embeds, real)
    a = model.action_head.predict_action(model.action_hidden(out, batch["prompt_lens"]))
    out2 = out.clone()
    out2[:, -2:] += 5.0  # last placeholder and EOS
    b = model.action_head.predict_action(model.action_hidden(out2, batch["prompt_lens"]))
    assert torch.equal(a, b)


def test_sequence_layout_and_zero_placeholders(model):
    cfg = model.config
    batch = select(make_batch(cfg, prompt_lens=(6,)), 0)
    embeds, real = model.embed(batch)
    s, p, k = cfg.num_prefix_tokens, 6, cfg.num_action_tokens
    assert embeds.shape[1] == 1 + s + p + k + 1 and real.all()
    tok = model.language_model.embed_tokens(batch["input_ids"])
    assert torch.equal(embeds[0, 0], tok[0, 0])                      # BOS
    assert torch.equal(embeds[0, s + 1:s + 1 + p], tok[0, 1:1 + p])  # prompt ids[1:], ending with the space id
    assert torch.all(embeds[0, 1 + s + p:1 + s + p + k] == 0)          # placeholders are zero vectors
    assert torch.equal(embeds[0, -1], tok[0, -1])                     # EOS keeps its embedding
    proprio = model.proprio_projector(batch["proprio"])
    assert torch.allclose(embeds[0, s], proprio[0])                   # proprio right after the patches


def test_visual_hidden_grid_and_shift():
    torch.manual_seed(0)
    for shift in (0, 1):
        m = OFTModel(mini(visual_token_shift=shift)).eval()
        hidden = torch.arange(300.0)[None, :, None].repeat(1, 1, 4)
        grid = m.visual_grid(hidden)
        g = m.config.grid_size
        assert grid.shape == (1, 2, g, g, 4)
        assert grid[0, 0, 0, 0, 0].item() == 1 + shift
        assert grid[0, 1, g - 1, g - 1, 0].item() == 2 * g * g + shift  # last wrist token (or proprio with shift)


@pytest.mark.parametrize("layer", [0, 2, 4, -1])
def test_hidden_capture_matches_output_hidden_states(model, layer):
    batch = select(make_batch(model.config), 1)
    embeds, real = model.embed(batch)
    with torch.no_grad():
        _, captured = model.run_llm(embeds, real, capture_layer=layer)
        ref = model.language_model(inputs_embeds=embeds, attention_mask=bidirectional_mask(real, embeds.dtype),
                                   output_hidden_states=True).hidden_states[layer]
    assert torch.allclose(captured, ref, atol=1e-6)


def test_forward_loss_gradients_and_shapes(model):
    m = OFTModel(mini(visual_token_shift=1))
    batch = make_batch(m.config)
    out = m(batch, align_layer=2)
    assert out.visual_hidden.shape == (2, 2, 8, 8, 256) and out.actions.shape == (2, 8, 7)
    manual = (out.actions - batch["actions"]).abs().mean()
    assert out.action_loss.item() == pytest.approx(manual.item(), rel=1e-6)
    (out.action_loss + out.visual_hidden.square().mean()).backward()
    assert m.vision_backbone.featurizer.embeddings.patch_embeddings.projection.weight.grad is not None
    assert m.proprio_projector.fc1.weight.grad is not None
    with pytest.raises(ValueError, match="chunk_len, action_dim"):
        m({**batch, "actions": torch.zeros(2, 5, 7)})


def test_diffusion_and_film_variants_run():
    torch.manual_seed(0)
    for cfg in (mini(action_head="diffusion", diffusion_infer_steps=3), mini(use_film=True)):
        m = OFTModel(cfg)
        batch = make_batch(cfg)
        out = m(batch, align_layer=1)
        out.action_loss.backward()
        assert torch.isfinite(out.action_loss)
        assert m.predict_normalized(batch).shape == (2, 8, 7)
    # FiLM conditions the vision features on the prompt: another instruction changes the patches.
    m = OFTModel(mini(use_film=True)).eval()
    with torch.no_grad():
        for f in m.vision_backbone.film.modules():
            if isinstance(f, torch.nn.Linear):
                f.weight.normal_(0, 0.1)
    a, b = make_batch(m.config, seed=0), make_batch(m.config, seed=0)
    b["input_ids"][:, 2] = 99
    with torch.no_grad():
        ea, _ = m.embed(a)
        eb, _ = m.embed(b)
    assert (ea[:, 1:10] - eb[:, 1:10]).abs().max() > 1e-4
