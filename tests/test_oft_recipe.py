"""The published OpenVLA-OFT(+SF) training recipe, exactly (issue 18).

1. LoRA: upstream's peft `all-linear` adapter over the timm towers (one A and one 3d-row B on each fused
   `attn.qkv`, and the patch-embedding convolutions) is the same function as ours, unmerged and merged;
   its `lora_adapter/` files load into our model and ours save in that layout; the parameter count.
2. The `oft*-libero-*` presets: global batch 64, accumulation from the number of processes.
3. Proprio normalisation: the training rule and upstream's evaluation rule, on a masked statistics file.

The upstream side is written here literally (peft 0.11.1's target rule, the LoRA maths, the merge) and
run through the independent upstream-layout oracle of `oft_upstream.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import oft_upstream as U  # noqa: E402

from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig  # noqa: E402
from spatial_forcing.normalize import load_dataset_statistics  # noqa: E402
from spatial_forcing.policies.oft.config import OFTConfig  # noqa: E402
from spatial_forcing.policies.oft.lora import adapter_parameter_count, load_lora_adapter, save_lora_adapter  # noqa: E402
from spatial_forcing.policies.oft.model import OFTModel  # noqa: E402
from spatial_forcing.policies.oft.policy import OFTPolicy  # noqa: E402
from spatial_forcing.policies.oft.processor import OFTProcessor, load_tokenizer  # noqa: E402
from spatial_forcing.policies.oft.weights import apply_lora, merge_lora  # noqa: E402
from spatial_forcing.train.config import SUITES, TrainConfig  # noqa: E402
from spatial_forcing.train.loop import merged_lora_state  # noqa: E402

R, ALPHA = 4, 8  # scaling alpha / r = 2 (the recipe's is 16 / 32; any scaling must fold the same way)
P = "base_model.model."


# ------------------------------------------------------------------------------------------ upstream, literally
def peft_all_linear_targets(sd: dict[str, torch.Tensor]) -> list[str]:
    """peft 0.11.1 `target_modules="all-linear"` on the upstream module tree: the base names of every
    Linear (a 2-D weight; `embed_tokens` is an Embedding), matched as suffixes of every module name.
    `lm_head` stays (peft subtracts its full name from the set of base names), and the patch-embedding
    convolutions match `.proj` (peft's Conv2d LoRA takes them)."""
    weights = {k[:-len(".weight")]: v for k, v in sd.items() if k.endswith(".weight")}
    base_names = {n.rsplit(".", 1)[-1] for n, w in weights.items() if w.ndim == 2 and not n.endswith("embed_tokens")}
    return sorted(n for n, w in weights.items() if n.rsplit(".", 1)[-1] in base_names and w.ndim in (2, 4))


def literal_adapter(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """What peft 0.11.1 `save_pretrained` writes after training: `lora_A` (r x in, or an r-channel conv
    with the patch kernel) and `lora_B` (out x r, or a 1x1 conv) per target, plus its copy of the frozen
    lm_head. Random values (a trained adapter, not the zero-B init)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in peft_all_linear_targets(sd):
        w = sd[name + ".weight"]
        fan_in = w[0].numel()
        a_shape, b_shape = (R, *w.shape[1:]), (w.shape[0], R) + (1, 1) * (w.ndim == 4)
        out[f"{P}{name}.lora_A.weight"] = torch.randn(a_shape, generator=g) / fan_in ** 0.5
        out[f"{P}{name}.lora_B.weight"] = torch.randn(b_shape, generator=g) * 0.1
    out[P + "language_model.lm_head.base_layer.weight"] = sd["language_model.lm_head.weight"].clone()
    return out


def literal_merge(sd: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`W + alpha / r * B @ A` on every target (for a conv, over the flattened kernel): upstream's weights."""
    merged = dict(sd)
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        name = key[len(P):-len(".lora_A.weight")]
        b = adapter[f"{P}{name}.lora_B.weight"]
        w = sd[name + ".weight"]
        merged[name + ".weight"] = w + (ALPHA / R) * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    return merged


class FusedQKVLoRA(nn.Module):
    """timm's `attn.qkv` with peft's LoRA on it, literally: one Linear(d, 3d), one A (r x d), one B (3d x r)."""

    def __init__(self, weight, bias, a, b):
        super().__init__()
        self.qkv = nn.Linear(weight.shape[1], weight.shape[0])
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False)
        with torch.no_grad():
            self.qkv.weight.copy_(weight)
            self.qkv.bias.copy_(bias)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)

    def forward(self, x):
        return self.qkv(x) + self.lora_B(self.lora_A(x)) * (ALPHA / R)

    def merged(self, x):
        return nn.functional.linear(x, self.qkv.weight + (ALPHA / R) * self.lora_B.weight @ self.lora_A.weight,
                                    self.qkv.bias)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return U.write_upstream_checkpoint(tmp_path_factory.mktemp("recipe") / "libero_spatial", dtype=torch.float32)


@pytest.fixture(scope="module")
def adapter_dir(ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe") / "lora_adapter"
    folder.mkdir()
    save_file(literal_adapter(ckpt["weights"]["model"]), str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "init_lora_weights": "gaussian",
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {},
        "alpha_pattern": {}, "task_type": None, "target_modules": ["qkv", "proj", "fc1", "fc2", "fc3", "q", "kv",
                                                                   "q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj", "lm_head"]}))
    return folder


def make_batch(ckpt, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask, lens = U.text_batch(ckpt["model_proto"], ["put the bowl on the plate", "open it"], ckpt["space_id"])
    return dict(pixel_values=torch.randn(2, 12, 224, 224, generator=g) * 1.5, input_ids=ids, attention_mask=mask,
                prompt_lens=lens, proprio=torch.rand(2, 8, generator=g) * 2 - 1)


def oracle(ckpt, model_sd, batch):
    weights = {**ckpt["weights"], "model": model_sd}
    return U.oracle_actions(weights, ckpt["dims"], batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                            batch["prompt_lens"], batch["proprio"])


def assert_matches(actual, expected, rel=1e-4):
    scale = expected.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)


# ------------------------------------------------------------------------------------------ 1. LoRA
def test_target_rule_of_the_recipe_adapts_the_fused_qkv_convs_lm_head_and_attn_pool(ckpt):
    targets = peft_all_linear_targets(ckpt["weights"]["model"])
    assert "vision_backbone.featurizer.patch_embed.proj" in targets
    assert "vision_backbone.fused_featurizer.patch_embed.proj" in targets
    assert "vision_backbone.featurizer.blocks.0.attn.qkv" in targets and "language_model.lm_head" in targets
    assert "vision_backbone.fused_featurizer.attn_pool.kv" in targets
    assert not any(t.endswith(("embed_tokens", "norm1", "ls1")) for t in targets)


def test_fused_qkv_adapter_is_one_shared_a_and_a_split_b():
    torch.manual_seed(0)
    model = OFTModel(OFTConfig.preset("mini")).eval()
    peft_model = apply_lora(model, r=R, alpha=ALPHA)
    trained = dict(peft_model.named_parameters())
    for attn, first in (("vision_backbone.featurizer.encoder.layer.0.attention", "q_proj"),
                        ("vision_backbone.fused_featurizer.encoder.layers.1.self_attn", "k_proj")):
        q, k, v = (model.get_submodule(f"{attn}.{x}_proj") for x in "qkv")
        assert q.lora_A["default"].weight is k.lora_A["default"].weight is v.lora_A["default"].weight
        a_names = [n for n in trained if n.startswith(P + attn) and ".lora_A." in n and "_proj" in n
                   and ".o_proj" not in n and ".out_proj" not in n]
        assert a_names == [f"{P}{attn}.{first}.lora_A.default.weight"]  # one A per block (the first module's name)
        for p in peft_model.parameters():
            if p.requires_grad and p.dim() == 2:
                torch.nn.init.normal_(p, std=0.2)
        d = q.base_layer.weight.shape[0]
        b = torch.cat([m.lora_B["default"].weight for m in (q, k, v)])
        literal = FusedQKVLoRA(torch.cat([m.base_layer.weight for m in (q, k, v)]),
                               torch.cat([m.base_layer.bias for m in (q, k, v)]), q.lora_A["default"].weight, b)
        assert b.shape == (3 * d, R) and literal.lora_A.weight.shape == (R, d)
        x = torch.randn(2, 5, d)
        with torch.no_grad():
            ours = torch.cat([q(x), k(x), v(x)], dim=-1)
            assert (ours - literal.qkv(x)).abs().max() > 0.05  # the adapter does something
            torch.testing.assert_close(ours, literal(x), rtol=1e-5, atol=1e-5)
    # after merging, the plain q, k, v Linears are the merged fused qkv
    with torch.no_grad():
        merged = merge_lora(peft_model)
        attn = "vision_backbone.fused_featurizer.encoder.layers.1.self_attn"
        x = torch.randn(2, 5, 64)
        ours = torch.cat([merged.get_submodule(f"{attn}.{n}_proj")(x) for n in "qkv"], dim=-1)
        torch.testing.assert_close(ours, literal.merged(x), rtol=1e-5, atol=1e-5)
    assert isinstance(merged.get_submodule(f"{attn}.q_proj"), nn.Linear)


def test_upstream_adapter_loads_and_is_the_same_function_before_and_after_merge(ckpt, adapter_dir, tmp_path):
    sd = ckpt["weights"]["model"]
    batch = make_batch(ckpt)
    want = oracle(ckpt, literal_merge(sd, load_file(str(adapter_dir / "adapter_model.safetensors"))), batch)
    assert (want - oracle(ckpt, sd, batch)).abs().max() > 0.05 * want.abs().max()  # the adapter matters

    policy = OFTPolicy.from_pretrained(ckpt["folder"], platform="libero")
    peft_model, report = load_lora_adapter(policy.model, adapter_dir)  # r and alpha from adapter_config.json
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (R, ALPHA)
    # every module OFT computes with is filled; the last blocks, attn_pool, lm_head (+ peft's lm_head copy) are read past
    dims = ckpt["dims"]
    assert len(report.loaded) == 2 + 4 * (dims["dino_depth"] - 1 + dims["siglip_depth"] - 1) + 3 + 7 * dims["layers"]
    assert sorted({k.rsplit(".lora_", 1)[0].split(".base_layer")[0][len(P):] for k in report.dropped}) == sorted(
        [f"vision_backbone.featurizer.blocks.{dims['dino_depth'] - 1}.{m}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        + [f"vision_backbone.fused_featurizer.blocks.{dims['siglip_depth'] - 1}.{m}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        + [f"vision_backbone.fused_featurizer.attn_pool.{m}" for m in ("q", "kv", "proj", "mlp.fc1", "mlp.fc2")]
        + ["language_model.lm_head"])
    with torch.no_grad():
        assert_matches(peft_model.get_base_model().predict_normalized(batch), want)  # unmerged
        exported = policy.with_state(merged_lora_state(peft_model))  # the trainer's export
        assert not any("lora" in k for k in exported.model.state_dict())
        assert_matches(exported.model.predict_normalized(batch), want)

    # ours -> upstream layout: the file's factors back exactly, zeros where OFT never runs, peft's config
    out = save_lora_adapter(peft_model, tmp_path / "ours")
    theirs, ours = load_file(str(adapter_dir / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert set(ours) == set(theirs) - {P + "language_model.lm_head.base_layer.weight"}
    dropped = set(report.dropped)
    for key, value in ours.items():
        assert torch.equal(value, torch.zeros_like(value) if key in dropped else theirs[key]), key
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"], config["init_lora_weights"]) == (R, ALPHA, "LORA", "gaussian")
    assert sorted(config["target_modules"]) == sorted(json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"])

    # upstream layout -> an existing LoRA model: the same tensors again
    with torch.no_grad():
        before = {n: p.clone() for n, p in peft_model.named_parameters() if "lora_" in n}
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.zero_()
    load_lora_adapter(peft_model, out)
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        assert_matches(merge_lora(peft_model).predict_normalized(batch), want)  # peft's own merge


@pytest.mark.parametrize("break_it,message", [
    ("extra", "vision_backbone.featurizer.blocks.0.attn.qkv.lora_C.weight"),
    ("missing", "projector.fc2.lora_B.weight"),
    ("shape", "blocks.0.attn.qkv.lora_B.weight: file (4, 4)"),
    ("rank", "adapter_config.json: r=4, lora_alpha=8, but the model's LoRA has r=8"),
])
def test_bad_adapters_are_refused_naming_the_file_and_key(ckpt, adapter_dir, tmp_path, break_it, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    qkv = P + "vision_backbone.featurizer.blocks.0.attn.qkv"
    if break_it == "extra":
        sd[qkv + ".lora_C.weight"] = torch.zeros(1)
    elif break_it == "missing":
        del sd[P + "projector.fc2.lora_B.weight"]
    elif break_it == "shape":
        sd[qkv + ".lora_B.weight"] = torch.zeros(4, 4)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    model = OFTPolicy.from_pretrained(ckpt["folder"], platform="libero").model
    target = apply_lora(model, r=8, alpha=8) if break_it == "rank" else model  # else: r, alpha from the file
    with pytest.raises(ValueError, match="adapter_(model.safetensors|config.json)") as err:
        load_lora_adapter(target, folder)
    assert message in str(err.value) and str(folder) in str(err.value)


def test_lora_parameter_count_of_openvla_7b():
    """Counted on the meta device, against the count by hand (r = 32)."""
    r = 32

    def lin(d_in, d_out):
        return r * (d_in + d_out)

    llm = 32 * (4 * lin(4096, 4096) + 2 * lin(4096, 11008) + lin(11008, 4096))
    projector = lin(2176, 8704) + lin(8704, 4096) + lin(4096, 4096)
    dino_block = lin(1024, 3 * 1024) + lin(1024, 1024) + lin(1024, 4096) + lin(4096, 1024)  # fused qkv: A r x d, B 3d x r
    siglip_block = lin(1152, 3 * 1152) + lin(1152, 1152) + lin(1152, 4304) + lin(4304, 1152)
    patch_convs = (r * 3 * 14 * 14 + 1024 * r) + (r * 3 * 14 * 14 + 1152 * r)
    used = llm + projector + 23 * dino_block + 26 * siglip_block + patch_convs
    never_run = (dino_block + siglip_block + lin(4096, 32064)  # last blocks, lm_head
                 + lin(1152, 1152) + lin(1152, 2304) + lin(1152, 1152) + lin(1152, 4304) + lin(4304, 1152))  # attn_pool
    assert used - patch_convs == 107_862_016 and used == 107_969_280
    assert used + never_run == 110_828_288  # upstream's whole adapter file (55,414,144 at r = 16)

    cfg = OFTConfig.preset("openvla-7b")
    with torch.device("meta"):
        model = OFTModel(cfg)
    peft_model = apply_lora(model, r=r)
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) == used
    assert peft_model.peft_config["default"].lora_alpha == 16
    assert adapter_parameter_count(cfg, r, used_only=True) == used
    assert adapter_parameter_count(cfg, r) == used + never_run


# ------------------------------------------------------------------------------------------ 2. global batch
@pytest.mark.parametrize("suite", SUITES)
def test_oft_presets_train_at_the_published_global_batch(suite):
    for name in (f"oft-sf-libero-{suite}", f"oft-libero-{suite}"):
        cfg = TrainConfig.preset(name)
        assert (cfg.batch_size, cfg.global_batch_size, cfg.lora_rank, cfg.lora_alpha) == (8, 64, 32, 16)
        assert [cfg.accumulation(world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
        for world in (3, 16):
            with pytest.raises(ValueError, match=f"does not divide into batch_size 8 per process x {world} "
                                                 r"processes \(with batch_size 8 it divides on 1, 2, 4, 8"):
                cfg.accumulation(world)
    assert TrainConfig.preset(name, global_batch_size=0, grad_accum=3).accumulation(8) == 3


# ------------------------------------------------------------------------------------------ 3. proprio rules
LO = [-1.0, 0.0, 0.0, 0.0, -2.0, 0.0, 0.0, 0.0]
HI = [1.0, 2.0, 4.0, 1.0, 2.0, 1.0, 1.0, 1.0]
MASK = [True, True, True, True, True, True, False, False]
STATE = [0.5, 3.0, -1.0, 0.25, 0.0, 0.75, 1.7, -0.4]
# by hand: 2 (x - lo) / (hi - lo) - 1 on the masked-in dims, clipped; dim 5 has min == max (constant)
TRAIN = [0.5, 1.0, -1.0, -0.5, 0.0, 0.0, 1.7, -0.4]  # masked-out dims untouched, constant dim -> 0
EVAL = [0.5, 1.0, -1.0, -0.5, 0.0, 0.5, 1.0, -0.4]  # upstream's eval: clip after the mask, no constant rule


@pytest.fixture()
def masked_stats(tmp_path):
    lo, hi = np.array(LO), np.array(HI)
    lo_ext, hi_ext = lo - 0.1, hi + 0.1
    lo_ext[5] = hi_ext[5] = 0.5
    action = {"mean": [0.0] * 7, "std": [1.0] * 7, "max": [1.0] * 7, "min": [-1.0] * 7, "q01": [-1.0] * 7,
              "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    proprio = {"mean": [0.0] * 8, "std": [1.0] * 8, "max": hi_ext.tolist(), "min": lo_ext.tolist(), "q01": LO,
               "q99": HI, "mask": MASK}
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps({"libero_spatial_no_noops": {"action": action, "proprio": proprio,
                                                            "num_transitions": 10, "num_trajectories": 1}}))
    return load_dataset_statistics(path)["libero_spatial_no_noops"]


class StateSource:
    """One 10-step episode whose every state is STATE (the training pipeline's input)."""

    cameras = ["agentview"]
    num_episodes = 1

    def episode_length(self, e):
        return 10

    def episode_arrays(self, e):
        return {"action": np.zeros((10, 7)), "observation.state": np.tile(STATE, (10, 1))}

    def task(self, e):
        return "task"

    def frame(self, e, t, keys=None):
        raise AssertionError("not needed")


def test_proprio_training_and_evaluation_rules_with_a_masked_statistics_file(masked_stats):
    assert masked_stats.proprio.mask.tolist() == MASK
    train = ChunkedDataset(StateSource(), masked_stats, PipelineConfig()).arrays[0]["observation.state"]
    np.testing.assert_allclose(train, np.tile(TRAIN, (10, 1)), atol=1e-6, rtol=0)
    processor = OFTProcessor(OFTConfig.preset("mini"), load_tokenizer("bytes"))
    got = processor.normalize_state(np.array(STATE), masked_stats)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), EVAL, atol=1e-6, rtol=0)
    batch = processor({"images": [np.zeros((32, 32, 3), np.uint8)] * 2, "state": STATE, "instruction": "go"},
                      stats=masked_stats)
    np.testing.assert_allclose(batch["proprio"][0].numpy(), EVAL, atol=1e-6, rtol=0)
