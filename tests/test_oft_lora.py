"""LoRA through peft: targets, trainable set, merge-and-export leaves outputs unchanged."""

import torch

from spatial_forcing.policies.oft.config import OFTConfig
from spatial_forcing.policies.oft.model import OFTModel
from spatial_forcing.policies.oft.weights import apply_lora, merge_lora
from test_oft_model import make_batch


def test_lora_targets_trainable_set_and_merge():
    torch.manual_seed(0)
    model = OFTModel(OFTConfig.preset("mini")).eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        base = model.predict_normalized(batch)
    peft_model = apply_lora(model, r=8)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("language_model.layers.0.self_attn.q_proj.lora_A" in n for n in trainable)
    assert any("vision_backbone.featurizer.encoder.layer.0.attention.q_proj.lora_B" in n for n in trainable)
    assert any("projector.fc1.lora_A" in n for n in trainable)
    assert any(n.endswith("action_head.model.fc1.weight") for n in trainable)      # heads fully trained
    assert any(n.endswith("proprio_projector.fc1.weight") for n in trainable)
    assert not any(n.endswith("language_model.layers.0.self_attn.q_proj.base_layer.weight") for n in trainable)
    assert not any("action_head" in n and "lora" in n for n in trainable)          # heads get no adapters
    lora_cfg = peft_model.peft_config["default"]
    assert lora_cfg.lora_alpha == 8 and lora_cfg.lora_dropout == 0.0 and lora_cfg.init_lora_weights == "gaussian"
    # Gaussian init: B = 0, so the adapters start as the identity; give them a non-zero B, then merge.
    with torch.no_grad():
        assert torch.equal(peft_model.base_model.model.predict_normalized(batch), base)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
        with_adapters = peft_model.base_model.model.predict_normalized(batch)
        merged = merge_lora(peft_model)
        after = merged.predict_normalized(batch)
    assert isinstance(merged, OFTModel)
    assert not any("lora" in k for k in merged.state_dict())
    assert (with_adapters - base).abs().max() > 1e-4
    assert torch.allclose(after, with_adapters, atol=1e-5)
    assert apply_lora(OFTModel(OFTConfig.preset("mini")), r=32).peft_config["default"].lora_alpha == 16  # min(r, 16)
