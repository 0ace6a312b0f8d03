"""Test helpers: a tiny OpenVLA-OFT checkpoint in the exact upstream file layout, and an oracle.

`write_upstream_checkpoint(folder)` writes what a fine-tuned LIBERO repo
(`moojink/openvla-7b-oft-finetuned-libero-*`, `haofuly/spatial-forcing-7b-finetuned-libero-*`)
ships (OPENVLA_OFT.md §7.1-§7.2, §9), at toy width but at the real image size (224 px, patch 14,
256 patches per view) and the real vocab size (32064):

    config.json                         model_type "openvla", explicit tiny text_config
    generation_config.json, processor_config.json (upstream PrismaticProcessor, not the project's)
    preprocessor_config.json            tvf_normalize_params with the bf16-rounded DINOv2 statistics
    configuration_prismatic.py, modeling_prismatic.py, processing_prismatic.py   (remote-code stubs)
    tokenizer.model                     a tiny SentencePiece BPE (byte fallback) trained here
    tokenizer_config.json, special_tokens_map.json, added_tokens.json ({"<PAD>": 32000})
    model-0000k-of-0000n.safetensors + model.safetensors.index.json        (bf16)
    action_head--{step}_checkpoint.pt   (bf16, `module.` keys)
    proprio_projector--{step}_checkpoint.pt (fp32, `module.` keys)
    dataset_statistics.json             {"libero_spatial_no_noops": {...}}
    lora_adapter/adapter_config.json    (stub; the merged weights are what is loaded)

`oracle_actions(...)` is an independent plain-torch forward pass written from the spec (§2-§4) that
reads the ORIGINAL upstream key names (timm ViTs with fused qkv and LayerScale `scale_factor`,
HF-layout Llama, the fork's mask rule implemented literally). It deliberately imports nothing from
`spatial_forcing`.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

DINO_PREFIX = "vision_backbone.featurizer."
SIGLIP_PREFIX = "vision_backbone.fused_featurizer."
LLM_PREFIX = "language_model.model."
IMAGE_SIZE = 224
PATCH = 14
VOCAB = 32064
PAD_ID = 32000
BOS_ID, EOS_ID = 1, 2
UNNORM_KEY = "libero_spatial_no_noops"
PROMPT_TEMPLATE = "In: What action should the robot take to {}?\nOut:"

# bf16-rounded ImageNet statistics as stored in the released preprocessor_config.json (§9).
DINO_MEAN_BF16 = [0.484375, 0.455078125, 0.40625]
DINO_STD_BF16 = [0.228515625, 0.2236328125, 0.224609375]

# Example LIBERO-Spatial action statistics from §7.2.
ACTION_Q01 = [-0.7455, -0.6616, -0.9375, -0.1071, -0.2068, -0.1843, 0.0]
ACTION_Q99 = [0.9375, 0.8759, 0.9321, 0.1039, 0.1768, 0.1457, 1.0]

TOKENIZER_SENTENCES = [
    "In: What action should the robot take to pick up the black bowl between the plate and the ramekin and "
    "place it on the plate?",
    "In: What action should the robot take to put the bowl on the plate?",
    "In: What action should the robot take to pick up the alphabet soup and place it in the basket?",
    "In: What action should the robot take to open the middle drawer of the cabinet?",
    "In: What action should the robot take to turn on the stove and put the moka pot on it?",
    "In: What action should the robot take to put both the cream cheese box and the butter in the basket?",
    "In: What action should the robot take to push the plate to the front of the stove?",
    "In: What action should the robot take to put the wine bottle on top of the cabinet?",
    "Out: the robot moves the gripper to the left of the bowl and closes it.",
    "pick up the ketchup and place it in the basket, then put the black bowl in the bottom drawer 2 3 45",
]


# ============================================================================================ fixture
def _randn(g: torch.Generator | None, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    if g is None:  # shapes only (the full-size layout on the meta device)
        return torch.empty(*shape, device="meta")
    return torch.randn(*shape, generator=g) * std + mean


def _rand(g: torch.Generator | None, *shape: int, lo: float, hi: float) -> torch.Tensor:
    if g is None:
        return torch.empty(*shape, device="meta")
    return torch.rand(*shape, generator=g) * (hi - lo) + lo


def _linear(sd: dict, name: str, g: torch.Generator, out_dim: int, in_dim: int, *, bias: bool = True,
            gain: float = 1.0) -> None:
    sd[f"{name}.weight"] = _randn(g, out_dim, in_dim, std=gain / math.sqrt(in_dim))
    if bias:
        sd[f"{name}.bias"] = _randn(g, out_dim, std=0.05)


def _layernorm(sd: dict, name: str, g: torch.Generator, dim: int, *, bias: bool = True) -> None:
    sd[f"{name}.weight"] = _randn(g, dim, std=0.1, mean=1.0)
    if bias:
        sd[f"{name}.bias"] = _randn(g, dim, std=0.05)


def _vit_block(sd: dict, p: str, g: torch.Generator, dim: int, mlp: int, layer_scale: bool) -> None:
    _layernorm(sd, p + "norm1", g, dim)
    _linear(sd, p + "attn.qkv", g, 3 * dim, dim, gain=1.5)
    _linear(sd, p + "attn.proj", g, dim, dim)
    if layer_scale:
        sd[p + "ls1.scale_factor"] = _rand(g, dim, lo=0.1, hi=1.0)
    _layernorm(sd, p + "norm2", g, dim)
    _linear(sd, p + "mlp.fc1", g, mlp, dim)
    _linear(sd, p + "mlp.fc2", g, dim, mlp)
    if layer_scale:
        sd[p + "ls2.scale_factor"] = _rand(g, dim, lo=0.1, hi=1.0)


def make_upstream_state_dict(dims: dict, seed: int | None = 0) -> tuple[dict, dict, dict]:
    """(model state dict with upstream keys, action head dict, proprio projector dict), fp32 values.

    Key order follows the upstream module tree (vision backbone, projector, language model).
    `seed=None` gives empty tensors on the meta device (for checking the full-size layout).
    """
    g = None if seed is None else torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    n = (IMAGE_SIZE // PATCH) ** 2
    # DINOv2 (timm vit_*_reg4_dinov2): cls, registers, pos_embed for the patches only, LayerScale.
    d, p = dims["dino_hidden"], DINO_PREFIX
    sd[p + "cls_token"] = _randn(g, 1, 1, d, std=0.5)
    sd[p + "reg_token"] = _randn(g, 1, dims["dino_registers"], d, std=0.5)
    sd[p + "pos_embed"] = _randn(g, 1, n, d, std=0.2)
    sd[p + "patch_embed.proj.weight"] = _randn(g, d, 3, PATCH, PATCH, std=1 / math.sqrt(3 * PATCH * PATCH))
    sd[p + "patch_embed.proj.bias"] = _randn(g, d, std=0.05)
    for i in range(dims["dino_depth"]):
        _vit_block(sd, f"{p}blocks.{i}.", g, d, dims["dino_mlp"], layer_scale=True)
    _layernorm(sd, p + "norm", g, d)
    # SigLIP (timm vit_so400m_patch14_siglip_224): no CLS, no LayerScale, attention-pool head.
    d, p, m = dims["siglip_hidden"], SIGLIP_PREFIX, dims["siglip_mlp"]
    sd[p + "pos_embed"] = _randn(g, 1, n, d, std=0.2)
    sd[p + "patch_embed.proj.weight"] = _randn(g, d, 3, PATCH, PATCH, std=1 / math.sqrt(3 * PATCH * PATCH))
    sd[p + "patch_embed.proj.bias"] = _randn(g, d, std=0.05)
    for i in range(dims["siglip_depth"]):
        _vit_block(sd, f"{p}blocks.{i}.", g, d, m, layer_scale=False)
    _layernorm(sd, p + "norm", g, d)
    sd[p + "attn_pool.latent"] = _randn(g, 1, 1, d, std=0.5)
    _linear(sd, p + "attn_pool.q", g, d, d)
    _linear(sd, p + "attn_pool.kv", g, 2 * d, d)
    _linear(sd, p + "attn_pool.proj", g, d, d)
    _layernorm(sd, p + "attn_pool.norm", g, d)
    _linear(sd, p + "attn_pool.mlp.fc1", g, m, d)
    _linear(sd, p + "attn_pool.mlp.fc2", g, d, m)
    # Projector.
    fused, h = dims["dino_hidden"] + dims["siglip_hidden"], dims["hidden"]
    _linear(sd, "projector.fc1", g, 4 * fused, fused)
    _linear(sd, "projector.fc2", g, h, 4 * fused)
    _linear(sd, "projector.fc3", g, h, h)
    # Llama.
    p, inter, hd = LLM_PREFIX, dims["intermediate"], h // dims["heads"]
    sd[p + "embed_tokens.weight"] = _randn(g, dims["vocab"], h, std=0.5)
    for i in range(dims["layers"]):
        q = f"{p}layers.{i}."
        _linear(sd, q + "self_attn.q_proj", g, h, h, bias=False, gain=2.0)
        _linear(sd, q + "self_attn.k_proj", g, dims["kv_heads"] * hd, h, bias=False, gain=2.0)
        _linear(sd, q + "self_attn.v_proj", g, dims["kv_heads"] * hd, h, bias=False)
        _linear(sd, q + "self_attn.o_proj", g, h, h, bias=False)
        _linear(sd, q + "mlp.gate_proj", g, inter, h, bias=False)
        _linear(sd, q + "mlp.up_proj", g, inter, h, bias=False)
        _linear(sd, q + "mlp.down_proj", g, h, inter, bias=False)
        _layernorm(sd, q + "input_layernorm", g, h, bias=False)
        _layernorm(sd, q + "post_attention_layernorm", g, h, bias=False)
    _layernorm(sd, p + "norm", g, h, bias=False)
    sd["language_model.lm_head.weight"] = _randn(g, dims["vocab"], h, std=0.02)
    # Heads (upstream DDP state dicts: `module.` prefix).
    a = dims["action_dim"]
    head: dict[str, torch.Tensor] = {}
    _layernorm(head, "module.model.layer_norm1", g, a * h)
    _linear(head, "module.model.fc1", g, h, a * h)
    for i in range(2):
        _layernorm(head, f"module.model.mlp_resnet_blocks.{i}.ffn.0", g, h)
        _linear(head, f"module.model.mlp_resnet_blocks.{i}.ffn.1", g, h, h)
    _layernorm(head, "module.model.layer_norm2", g, h)
    _linear(head, "module.model.fc2", g, a, h)
    proprio: dict[str, torch.Tensor] = {}
    _linear(proprio, "module.fc1", g, h, dims["proprio_dim"])
    _linear(proprio, "module.fc2", g, h, h)
    return sd, head, proprio


def published_dims() -> dict:
    """`dims` of the released OpenVLA-OFT LIBERO checkpoints (§1, §5)."""
    return dict(dino_hidden=1024, dino_depth=24, dino_heads=16, dino_registers=4, dino_mlp=4096,
                siglip_hidden=1152, siglip_depth=27, siglip_heads=16, siglip_mlp=4304, hidden=4096, layers=32,
                heads=32, kv_heads=32, intermediate=11008, vocab=VOCAB, rms_eps=1e-6, rope_theta=10000.0,
                vit_eps=1e-6, head_eps=1e-5, proprio_dim=8, action_dim=7, chunk_len=8, image_size=IMAGE_SIZE,
                patch=PATCH)


def _stat_entry(g: torch.Generator, q01: list[float], q99: list[float], mask: list[bool] | None) -> dict:
    lo, hi = torch.tensor(q01, dtype=torch.float64), torch.tensor(q99, dtype=torch.float64)
    span = hi - lo
    entry = {"mean": ((lo + hi) / 2).tolist(), "std": (span / 4).tolist(),
             "max": (hi + 0.1 * span).tolist(), "min": (lo - 0.1 * span).tolist(), "q01": list(q01),
             "q99": list(q99)}
    if mask is not None:
        entry["mask"] = list(mask)
    return entry


def dataset_statistics(proprio_dim: int = 8, action_dim: int = 7) -> dict:
    """The `dataset_statistics.json` content (§7.2 format), action stats from the spec's example."""
    g = torch.Generator().manual_seed(1234)
    if action_dim == 7:
        q01, q99 = ACTION_Q01, ACTION_Q99
    else:
        q01 = [-1.0 + 0.01 * i for i in range(action_dim)]
        q99 = [1.0 - 0.02 * i for i in range(action_dim)]
    p_q01 = [round(-0.5 - 0.1 * i, 4) for i in range(proprio_dim)]
    p_q99 = [round(0.4 + 0.15 * i, 4) for i in range(proprio_dim)]
    return {UNNORM_KEY: {
        "action": _stat_entry(g, q01, q99, [True] * (action_dim - 1) + [False]),
        "proprio": _stat_entry(g, p_q01, p_q99, None),
        "num_transitions": 52970, "num_trajectories": 432}}


def _oxe_norm_stats() -> dict:
    """A small OXE-like `norm_stats` (what the real config.json still carries; never used by OFT)."""
    entry = _stat_entry(torch.Generator(), [-0.03, -0.04, -0.03, -0.07, -0.09, -0.15, 0.0],
                        [0.03, 0.04, 0.04, 0.08, 0.08, 0.15, 1.0], [True] * 6 + [False])
    prop = _stat_entry(torch.Generator(), [0.0] * 7, [0.0] * 7, None)
    return {"bridge_orig": {"action": entry, "proprio": prop, "num_transitions": 2135463,
                            "num_trajectories": 60064},
            "fractal20220817_data": {"action": entry, "proprio": prop, "num_transitions": 3786400,
                                     "num_trajectories": 87212}}


def train_tokenizer(folder: Path, vocab_size: int = 400) -> dict:
    """Train a tiny Llama-style SentencePiece BPE model (byte fallback, unk/bos/eos = 0/1/2), write
    `tokenizer.model` and the upstream tokenizer json files. Returns ids of interest."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_SENTENCES), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>",
        eos_piece="</s>", num_threads=1, minloglevel=2)
    model = buf.getvalue()
    (folder / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    space_id = sp.piece_to_id("\u2581")
    if space_id == sp.unk_id():
        raise RuntimeError("the tiny tokenizer has no lone '▁' piece")
    pad = {"content": "<PAD>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
           "special": True}
    special = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                         "single_word": False}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {
            "0": {**special("<unk>"), "special": True}, "1": {**special("<s>"), "special": True},
            "2": {**special("</s>"), "special": True}, str(PAD_ID): pad},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
        "model_max_length": 2048, "pad_token": "<PAD>", "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False},
        indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": special("<s>"), "eos_token": special("</s>"), "pad_token": special("<PAD>"),
        "unk_token": special("<unk>")}, indent=2) + "\n")
    (folder / "added_tokens.json").write_text(json.dumps({"<PAD>": PAD_ID}, indent=2) + "\n")
    return {"space_id": int(space_id), "sp_vocab_size": int(sp.get_piece_size()), "model_proto": model}


def sp_prompt_ids(model_proto: bytes, instruction: str) -> list[int]:
    """`[BOS] + sentencepiece(prompt)` straight from the SentencePiece runtime (the 4.40.1 behaviour)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    return [BOS_ID] + sp.encode(PROMPT_TEMPLATE.format(instruction.lower()))


def _save_shards(sd: dict, folder: Path, shards: int, dtype: torch.dtype) -> list[str]:
    from safetensors.torch import save_file

    keys = list(sd)
    item = torch.empty((), dtype=dtype).element_size()
    total = sum(sd[k].numel() * item for k in keys)  # bytes on disk, as HF's index records
    target = total / shards
    groups: list[list[str]] = [[]]
    acc = 0
    for k in keys:
        size = sd[k].numel() * item
        if groups[-1] and acc + size > target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(k)
        acc += size
    while len(groups) < shards:  # fewer tensors than shards is impossible here, but stay exact
        groups.append([groups[-2].pop()])
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k].to(dtype).contiguous() for k in group}, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return names


def upstream_config_json(dims: dict, explicit_text_config: bool = True) -> dict:
    """`config.json` of an OFT fine-tune (§7.1). The released file leaves the Llama dims at their
    defaults (only vocab/pad/dtype in `text_config`); the tiny one must spell them out."""
    config = {
        "_name_or_path": "openvla/openvla-7b",
        "architectures": ["OpenVLAForActionPrediction"],
        "arch_specifier": "no-align+fused-gelu-mlp",
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [IMAGE_SIZE, IMAGE_SIZE],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "norm_stats": _oxe_norm_stats(),
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": PAD_ID,
        "text_config": {"model_type": "llama", "vocab_size": dims["vocab"], "pad_token_id": PAD_ID,
                        "torch_dtype": "bfloat16"},
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }
    if explicit_text_config:
        config["text_config"].update(hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                                     num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                                     num_key_value_heads=dims["kv_heads"])
    return config


def write_upstream_checkpoint(folder, seed: int = 0, *, dino=(128, 3, 4), siglip=(144, 3, 40),
                              llm=(64, 2, 4, 128, VOCAB), proprio_dim: int = 8, action_dim: int = 7,
                              step: int = 150000, shards: int = 2, with_lora_stub: bool = True,
                              dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write a tiny OFT fine-tuned LIBERO checkpoint folder in the upstream layout; see the module doc.

    `dino = (width, depth, registers)` with width a multiple of 64 (heads = width / 64);
    `siglip = (width, depth, mlp)` with width a multiple of 72 (heads = width / 72);
    `llm = (hidden, layers, heads, intermediate, vocab)`.

    Returns a dict with `weights` = {"model": upstream-key state dict, "action_head": ...,
    "proprio_projector": ...} holding fp32 copies of exactly the values on disk (bf16-rounded where
    stored in bf16), `dims` for `oracle_actions`, `stats` (the statistics json content), `space_id`
    (the id of the lone "▁" piece of the tiny vocab), `model_proto` (the SentencePiece model bytes),
    `files` (the file names written), `step`, and `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dino_w, dino_depth, regs = dino
    sig_w, sig_depth, sig_mlp = siglip
    hidden, layers, heads, inter, vocab = llm
    if dino_w % 64 or sig_w % 72:
        raise ValueError("DINOv2 width must be a multiple of 64 and SigLIP a multiple of 72 (head widths)")
    dims = dict(dino_hidden=dino_w, dino_depth=dino_depth, dino_heads=dino_w // 64, dino_registers=regs,
                dino_mlp=4 * dino_w, siglip_hidden=sig_w, siglip_depth=sig_depth, siglip_heads=sig_w // 72,
                siglip_mlp=sig_mlp, hidden=hidden, layers=layers, heads=heads, kv_heads=heads,
                intermediate=inter, vocab=vocab, rms_eps=1e-6, rope_theta=10000.0, vit_eps=1e-6,
                head_eps=1e-5, proprio_dim=proprio_dim, action_dim=action_dim, chunk_len=8,
                image_size=IMAGE_SIZE, patch=PATCH)
    sd, head, proprio = make_upstream_state_dict(dims, seed)
    # Round to what is on disk: model + action head in `dtype` (bf16), proprio projector fp32.
    sd = {k: v.to(dtype).float() for k, v in sd.items()}
    head = {k: v.to(dtype).float() for k, v in head.items()}

    files = _save_shards(sd, folder, shards, dtype)
    torch.save({k: v.to(dtype) for k, v in head.items()}, folder / f"action_head--{step}_checkpoint.pt")
    torch.save({k: v.float() for k, v in proprio.items()}, folder / f"proprio_projector--{step}_checkpoint.pt")
    files += ["model.safetensors.index.json", f"action_head--{step}_checkpoint.pt",
              f"proprio_projector--{step}_checkpoint.pt"]

    config = upstream_config_json(dims)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
         "transformers_version": "4.40.1"}, indent=2) + "\n")
    (folder / "processor_config.json").write_text(json.dumps(
        {"auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
         "processor_class": "PrismaticProcessor"}, indent=2) + "\n")
    resize = {"antialias": True, "interpolation": 3, "max_size": None, "size": [IMAGE_SIZE, IMAGE_SIZE]}
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                     "AutoProcessor": "processing_prismatic.PrismaticProcessor"},
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, IMAGE_SIZE, IMAGE_SIZE], [3, IMAGE_SIZE, IMAGE_SIZE]],
        "interpolations": ["bicubic", "bicubic"],
        "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
        "processor_class": "PrismaticProcessor",
        "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
        "tvf_crop_params": [{"output_size": [IMAGE_SIZE, IMAGE_SIZE]}, {"output_size": [IMAGE_SIZE, IMAGE_SIZE]}],
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": DINO_MEAN_BF16, "std": DINO_STD_BF16},
                                 {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}],
        "tvf_resize_params": [resize, resize],
        "use_fused_vision_backbone": True}, indent=2) + "\n")
    for name in ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py"):
        (folder / name).write_text("# remote-code stub of the upstream repo; must never be executed\n"
                                   "raise RuntimeError('remote code must not be imported')\n")
    tok = train_tokenizer(folder)
    stats = dataset_statistics(proprio_dim, action_dim)
    (folder / "dataset_statistics.json").write_text(json.dumps(stats, indent=2) + "\n")
    files += ["config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
              "configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py",
              "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "dataset_statistics.json"]
    if with_lora_stub:
        (folder / "lora_adapter").mkdir(exist_ok=True)
        (folder / "lora_adapter" / "adapter_config.json").write_text(json.dumps({
            "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "openvla/openvla-7b",
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": "gaussian",
            "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
            "loftq_config": {}, "lora_alpha": 16, "lora_dropout": 0.0, "megatron_config": None,
            "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": 32,
            "rank_pattern": {}, "revision": None, "target_modules": "all-linear", "task_type": None,
            "use_dora": False, "use_rslora": False}, indent=2) + "\n")
        files.append("lora_adapter/adapter_config.json")
    return {"folder": folder, "weights": {"model": sd, "action_head": head, "proprio_projector": proprio},
            "dims": dims, "stats": stats, "space_id": tok["space_id"], "model_proto": tok["model_proto"],
            "sp_vocab_size": tok["sp_vocab_size"], "files": sorted(files), "step": step}


def unused_upstream_keys(sd_keys, dims: dict) -> set[str]:
    """The source keys OFT never reads (§7.1): DINOv2 last block + norm, SigLIP last block + norm +
    attn_pool, lm_head."""
    last_dino = f"{DINO_PREFIX}blocks.{dims['dino_depth'] - 1}."
    last_sig = f"{SIGLIP_PREFIX}blocks.{dims['siglip_depth'] - 1}."
    prefixes = (last_dino, DINO_PREFIX + "norm.", last_sig, SIGLIP_PREFIX + "norm.", SIGLIP_PREFIX + "attn_pool.")
    return {k for k in sd_keys if k.startswith(prefixes) or k == "language_model.lm_head.weight"}


# ============================================================================================ oracle
def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _gelu(x, tanh: bool = False):
    return F.gelu(x, approximate="tanh" if tanh else "none")


def timm_attention(x, sd, p, heads):
    """timm `Attention`: fused qkv -> (3, B, H, N, hd), softmax(q k^T * hd^-0.5) v, proj."""
    b, n, c = x.shape
    hd = c // heads
    qkv = _lin(x, sd, p + "attn.qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
    out = attn.softmax(-1) @ v
    return _lin(out.transpose(1, 2).reshape(b, n, c), sd, p + "attn.proj")


def timm_block(x, sd, p, heads, eps=1e-6, layer_scale=True, tanh_gelu=False):
    """Pre-norm timm block: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x)) (ls = identity for SigLIP)."""
    y = timm_attention(_ln(x, sd, p + "norm1", eps), sd, p, heads)
    x = x + (y * sd[p + "ls1.scale_factor"] if layer_scale else y)
    y = _lin(_gelu(_lin(_ln(x, sd, p + "norm2", eps), sd, p + "mlp.fc1"), tanh_gelu), sd, p + "mlp.fc2")
    return x + (y * sd[p + "ls2.scale_factor"] if layer_scale else y)


def patchify(img, sd, p):
    """Conv patch embedding -> (B, 256, D), row-major patches."""
    x = F.conv2d(img, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    return x.flatten(2).transpose(1, 2)


def dino_embed(img, sd):
    """timm `_pos_embed` with no_embed_class: pos_embed on the patches, then [CLS, reg x R, patches]."""
    p = DINO_PREFIX
    x = patchify(img, sd, p) + sd[p + "pos_embed"]
    b = x.shape[0]
    return torch.cat([sd[p + "cls_token"].expand(b, -1, -1), sd[p + "reg_token"].expand(b, -1, -1), x], dim=1)


def dino_features(img, sd, dims, variant=None):
    """Output of block depth-2 (no final norm), CLS + registers dropped -> (B, 256, D)."""
    p = DINO_PREFIX
    x = dino_embed(img, sd)
    upto = dims["dino_depth"] - (0 if variant == "last_block" else 1)
    for i in range(upto):
        x = timm_block(x, sd, f"{p}blocks.{i}.", dims["dino_heads"], dims["vit_eps"], layer_scale=True)
    if variant == "last_block":
        x = _ln(x, sd, p + "norm", dims["vit_eps"])
    return x[:, 1 + dims["dino_registers"]:]


def siglip_features(img, sd, dims, variant=None):
    """SigLIP: patches + pos_embed, blocks 0..depth-2 with erf GELU, no final norm -> (B, 256, D)."""
    p = SIGLIP_PREFIX
    x = patchify(img, sd, p) + sd[p + "pos_embed"]
    for i in range(dims["siglip_depth"] - 1):
        x = timm_block(x, sd, f"{p}blocks.{i}.", dims["siglip_heads"], dims["vit_eps"], layer_scale=False,
                       tanh_gelu=variant == "tanh_gelu")
    return x


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    """Rotate-half RoPE on (B, H, L, hd)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def fork_attention_mask(real: torch.Tensor, dtype, causal_only: bool = False) -> torch.Tensor:
    """transformers 4.40.1 `_update_causal_mask` + the fork's edit, literally:

    causal (B,1,L,L) with dtype-min above the diagonal; padding keys set to min where the causal mask
    is 0; then the fork copies the LAST query row to every row (`causal_only` skips that edit)."""
    b, length = real.shape
    min_v = torch.finfo(dtype).min
    causal = torch.full((length, length), min_v, dtype=dtype).triu(1)
    mask = causal[None, None].expand(b, 1, -1, -1).clone()
    padding = mask.eq(0.0) & (~real.bool())[:, None, None, :]
    mask = mask.masked_fill(padding, min_v)
    if causal_only:
        return mask
    return mask[:, :, -1:, :].expand(b, 1, length, length)


def llama_forward(embeds, real, sd, dims, variant=None):
    """Llama body on inputs_embeds with positions arange(L); returns the final-normed states."""
    p, eps = LLM_PREFIX, dims["rms_eps"]
    b, length, h = embeds.shape
    heads, kvh = dims["heads"], dims["kv_heads"]
    hd = h // heads
    positions = torch.arange(length)
    mask = fork_attention_mask(real, embeds.dtype, causal_only=variant == "causal")
    x = embeds
    for i in range(dims["layers"]):
        q_ = f"{p}layers.{i}."
        y = rms_norm(x, sd[q_ + "input_layernorm.weight"], eps)
        q = F.linear(y, sd[q_ + "self_attn.q_proj.weight"]).view(b, length, heads, hd).transpose(1, 2)
        k = F.linear(y, sd[q_ + "self_attn.k_proj.weight"]).view(b, length, kvh, hd).transpose(1, 2)
        v = F.linear(y, sd[q_ + "self_attn.v_proj.weight"]).view(b, length, kvh, hd).transpose(1, 2)
        q, k = rope(q, positions, dims["rope_theta"]), rope(k, positions, dims["rope_theta"])
        if kvh != heads:
            k, v = k.repeat_interleave(heads // kvh, 1), v.repeat_interleave(heads // kvh, 1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd) + mask
        att = scores.softmax(-1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(b, length, h), sd[q_ + "self_attn.o_proj.weight"])
        y = rms_norm(x, sd[q_ + "post_attention_layernorm.weight"], eps)
        y = F.linear(F.silu(F.linear(y, sd[q_ + "mlp.gate_proj.weight"])) * F.linear(y, sd[q_ + "mlp.up_proj.weight"]),
                     sd[q_ + "mlp.down_proj.weight"])
        x = x + y
    return rms_norm(x, sd[p + "norm.weight"], eps)


def mlp_resnet(x, head, eps=1e-5):
    """Upstream MLPResNet: LN -> fc1 -> ReLU -> 2 x [x + ReLU(Linear(LN x))] -> LN -> fc2."""
    hd = {k.removeprefix("module."): v for k, v in head.items()}
    x = F.relu(_lin(_ln(x, hd, "model.layer_norm1", eps), hd, "model.fc1"))
    i = 0
    while f"model.mlp_resnet_blocks.{i}.ffn.0.weight" in hd:
        x = x + F.relu(_lin(_ln(x, hd, f"model.mlp_resnet_blocks.{i}.ffn.0", eps), hd,
                            f"model.mlp_resnet_blocks.{i}.ffn.1"))
        i += 1
    return _lin(_ln(x, hd, "model.layer_norm2", eps), hd, "model.fc2")


def oracle_vision_tokens(weights: dict, dims: dict, pixel_values: torch.Tensor, variant=None) -> torch.Tensor:
    """(B, 6V, 224, 224) -> projected patch tokens (B, 256V, hidden)."""
    sd = weights["model"]
    b, c = pixel_values.shape[:2]
    feats = []
    for v in range(c // 6):
        block = pixel_values[:, 6 * v:6 * v + 6]
        feats.append(torch.cat([dino_features(block[:, :3], sd, dims, variant),
                                siglip_features(block[:, 3:], sd, dims, variant)], dim=-1))
    x = torch.cat(feats, dim=1)
    return _lin(_gelu(_lin(_gelu(_lin(x, sd, "projector.fc1")), sd, "projector.fc2")), sd, "projector.fc3")


def oracle_actions(weights: dict, dims: dict, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, prompt_lens, proprio: torch.Tensor | None,
                   *, dtype: torch.dtype = torch.float32, variant: str | None = None,
                   return_hidden: bool = False):
    """Normalised actions (B, K, A) of the upstream OFT L1 policy, computed from upstream keys.

    `input_ids` are right-padded text ids `[BOS, prompt..., space, 56 placeholders, EOS, pad...]`,
    `prompt_lens[b]` = P_b (ids after BOS up to and including the space id), `proprio` normalised
    (B, A_p) or None (no proprio token). `variant` deliberately breaks one rule (for guard tests):
    "causal" (no last-row copy), "tanh_gelu" (SigLIP tanh GELU), "no_shift" (read the placeholders
    themselves), "last_block" (read DINOv2's last block + final norm), "keep_placeholders" (do not
    zero the placeholder embeddings).
    """
    w = {part: {k: v.to(dtype) for k, v in sd.items()} for part, sd in weights.items()}
    sd = w["model"]
    pixel_values = pixel_values.to(dtype)
    b = input_ids.shape[0]
    prompt_lens = [int(p) for p in prompt_lens]
    k_a = dims["chunk_len"] * dims["action_dim"]
    patches = oracle_vision_tokens(w, dims, pixel_values, variant)
    tok = F.embedding(input_ids, sd[LLM_PREFIX + "embed_tokens.weight"])
    keep = torch.ones(input_ids.shape, dtype=dtype)
    if variant != "keep_placeholders":
        for i, p in enumerate(prompt_lens):
            keep[i, 1 + p:1 + p + k_a] = 0.0
    tok = tok * keep[..., None]
    prefix = [patches]
    if proprio is not None:
        pp = w["proprio_projector"]
        pp = {k.removeprefix("module."): v for k, v in pp.items()}
        prefix.append(_lin(_gelu(_lin(proprio.to(dtype), pp, "fc1")), pp, "fc2")[:, None])
    prefix = torch.cat(prefix, dim=1)
    s = prefix.shape[1]
    embeds = torch.cat([tok[:, :1], prefix, tok[:, 1:]], dim=1)
    am = attention_mask.bool()
    real = torch.cat([am[:, :1], torch.ones(b, s, dtype=torch.bool), am[:, 1:]], dim=1)
    last = llama_forward(embeds, real, sd, dims, variant)
    shift = 1 if variant == "no_shift" else 0
    rows = torch.stack([last[i, s + p + shift:s + p + shift + k_a] for i, p in enumerate(prompt_lens)])
    x = rows.reshape(b, dims["chunk_len"], dims["action_dim"] * last.shape[-1])
    actions = mlp_resnet(x, w["action_head"], dims["head_eps"])
    return (actions, last) if return_hidden else actions


def unnormalize_q99(actions, stats_entry: dict):
    """`0.5 (a + 1)(q99 - q01 + 1e-8) + q01` on masked dims, raw value elsewhere (float64)."""
    import numpy as np

    a = np.asarray(actions, dtype=np.float64)
    lo, hi = np.asarray(stats_entry["q01"], np.float64), np.asarray(stats_entry["q99"], np.float64)
    mask = np.asarray(stats_entry.get("mask", [True] * len(lo)), bool)
    return np.where(mask, 0.5 * (a + 1) * (hi - lo + 1e-8) + lo, a)


def normalize_q99(x, stats_entry: dict):
    """`clip(2 (x - q01)/(q99 - q01 + 1e-8) - 1, -1, 1)` on masked dims (float64)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.asarray(stats_entry["q01"], np.float64), np.asarray(stats_entry["q99"], np.float64)
    mask = np.asarray(stats_entry.get("mask", [True] * len(lo)), bool)
    return np.where(mask, np.clip(2 * (x - lo) / (hi - lo + 1e-8) - 1, -1, 1), x)


def text_batch(model_proto: bytes, instructions, space_id: int, chunk_len: int = 8, action_dim: int = 7):
    """Right-padded inference ids built straight from SentencePiece: `[1] + sp(prompt) (+ space)
    + [1] * K*A + [2]`, pad 32000. Returns (input_ids, attention_mask, prompt_lens)."""
    rows, lens = [], []
    for text in instructions:
        ids = sp_prompt_ids(model_proto, text)
        if ids[-1] != space_id:
            ids.append(space_id)
        lens.append(len(ids) - 1)
        rows.append(ids + [BOS_ID] * (chunk_len * action_dim) + [EOS_ID])
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return input_ids, mask, torch.tensor(lens)
