"""π0 parts of the inference and training benchmarks (`inference.py --policy pi0`, `train.py --policy ...`).

- `inference(preset, device, dtype, ...)`: `Pi0Policy.predict_action_chunk` end to end (openpi's processor:
  resize-with-pad, [-1, 1], prompt, z-score state; the prefix once into the KV cache, 10 Euler steps of the
  action expert; un-normalisation) on 2 fresh uint8 256x256 cameras + an 8-D state per call, and the model
  alone (`predict_normalized`). Random weights: timing does not depend on their values. Full size has no
  PaliGemma tokenizer offline: a stand-in maps the prompt to `prompt_tokens` ids (LIBERO prompts are
  ~10-20 SentencePiece pieces + BOS + "\\n"); the sequence length is then the real model's.
- `train_cpu(dataset, ...)`: samples/s of `sf train` with `pi0-mini` (SF with the geometry teacher and
  without, frames in memory), and fwd+bwd of one batch of 2 (2 cameras at 112) alone.
- `train_models(preset, device, ...)`: one SF training step of π0 (full size, bf16 autocast) with LoRA and
  with full fine-tuning: step time and peak memory, (a) no SF, (b) SF with the online VGGT teacher.
"""

from __future__ import annotations

import gc
import statistics
import time
import zlib

import numpy as np
import torch

from common import percentile, sync

INSTRUCTION = "put both the alphabet soup and the tomato sauce in the basket"


class PromptStandIn:
    """A tokenizer stand-in giving `[BOS] + (n - 2) ids + [newline]`: the prompt length of the real model."""

    kind = "stand-in"

    def __init__(self, pieces: int, vocab: int) -> None:
        self.pieces, self.vocab = max(1, pieces), vocab

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if text == "\n":
            return [108]
        data = text.encode()
        step = max(1, len(data) // self.pieces)
        ids = [3 + zlib.crc32(data[i:i + step]) % (self.vocab - 4) for i in range(0, step * self.pieces, step)]
        return ([2] if add_bos else []) + ids[:self.pieces]

    def save(self, folder) -> None:
        pass


def stats(action_dim: int = 7, state_dim: int = 8):
    from spatial_forcing.normalize import ArrayStats, DatasetStats

    def one(n):
        return ArrayStats(q01=-np.ones(n), q99=np.ones(n), min=-np.ones(n), max=np.ones(n), mean=np.zeros(n),
                          std=np.full(n, 0.5), mask=np.ones(n, bool))
    return DatasetStats(action=one(action_dim), proprio=one(state_dim))


def build_policy(preset: str, device: torch.device, dtype: torch.dtype, prompt_tokens: int = 16, **overrides):
    """A randomly initialised π0 policy of `preset` on `device` in `dtype` (full size: built on the device)."""
    from spatial_forcing.policies.pi0.config import Pi0Config
    from spatial_forcing.policies.pi0.model import Pi0Model
    from spatial_forcing.policies.pi0.policy import Pi0Policy
    from spatial_forcing.policies.pi0.processor import BytePromptTokenizer, Pi0Processor

    cfg = Pi0Config.preset(preset, **overrides)
    tok = BytePromptTokenizer() if cfg.tokenizer == "bytes" else PromptStandIn(prompt_tokens - 2, cfg.vocab_size)
    with torch.device(device):
        model = Pi0Model(cfg)
    model = model.to(dtype)
    return Pi0Policy(model, Pi0Processor(cfg, tok), {"bench": stats(cfg.action_dim, cfg.state_dim)}, "bench")


def _summary(times: list[float]) -> dict:
    return {"median_ms": round(1e3 * statistics.median(times), 2), "p10_ms": round(1e3 * percentile(times, 10), 2),
            "p90_ms": round(1e3 * percentile(times, 90), 2), "n": len(times)}


def inference(preset: str, device: torch.device, dtype: torch.dtype, warmup: int, repeat: int,
              prompt_tokens: int = 16, seed: int = 0) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    policy = build_policy(preset, device, dtype, prompt_tokens).eval()
    sync(device)
    build_s = time.perf_counter() - t0
    cfg = policy.config
    rng = np.random.default_rng(seed)

    def obs():
        return {"images": [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(cfg.num_images)],
                "state": rng.uniform(-1, 1, cfg.state_dim), "instruction": INSTRUCTION}

    for _ in range(warmup):
        policy.predict_action_chunk(obs())
    sync(device)
    e2e, model_only = [], []
    for _ in range(repeat):
        o = obs()
        t = time.perf_counter()
        policy.predict_action_chunk(o)
        sync(device)
        e2e.append(time.perf_counter() - t)
    batch = {k: v.to(device) for k, v in policy.processor(obs(), policy.dataset_stats()).items()}
    for _ in range(repeat):
        t = time.perf_counter()
        policy.model.predict_normalized(batch)
        sync(device)
        model_only.append(time.perf_counter() - t)
    seq = int(batch["input_ids"].shape[1])
    out = {"preset": preset, "dtype": str(dtype).replace("torch.", ""),
           "params_m": round(sum(p.numel() for p in policy.model.parameters()) / 1e6, 1), "build_s": round(build_s, 1),
           "prefix_tokens": seq, "chunk": cfg.chunk_len, "euler_steps": cfg.num_steps, "end_to_end": _summary(e2e),
           "model_only": _summary(model_only),
           "actions_per_s": round(cfg.chunk_len / statistics.median(e2e), 1),
           "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None}
    del policy, batch
    gc.collect()
    return out


def train_cpu(dataset: str, steps: int, warmup: int, output: str) -> dict:
    """pi0-mini through `Trainer`: samples/s with SF (geometry teacher) and without, and one batch of 2."""
    from spatial_forcing.train.config import TrainConfig
    from spatial_forcing.train.loop import Trainer

    result: dict = {"policy": "pi0-mini", "dataset": dataset}
    base = dict(dataset=dataset, logger="none", val_every=0, save_every=10**9, val_episodes=0, data_mode="memory")
    frames = None
    for name, extra in (("sf", {}), ("no_sf", {"sf": False})):
        import tempfile

        cfg = TrainConfig.preset("pi0-mini-sf", **base, **extra, output_dir=tempfile.mkdtemp(prefix=f"sf_pi0_{name}_"))
        trainer = Trainer(cfg, progress=False, frames=frames)
        frames = trainer.frames
        loader = iter(trainer._make_loader(0))
        for _ in range(warmup):
            trainer.train_step([next(loader)])
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step([next(loader)])
        sec = time.perf_counter() - t0
        result[name] = {"batch_size": cfg.batch_size, "steps": steps, "seconds": round(sec, 2),
                        "samples_per_s": round(steps * cfg.batch_size / sec, 1)}
        if name == "sf":
            result["parameters"] = sum(p.numel() for p in trainer.policy.parameters())
            policy = trainer.policy
        del trainer, loader
    result["sf_over_no_sf_time"] = round(result["no_sf"]["samples_per_s"] / result["sf"]["samples_per_s"], 3)
    # the issue's yardstick: forward + backward of a batch of 2 with 2 cameras at 112 px
    g = torch.Generator().manual_seed(0)
    inputs = policy.training_inputs(torch.rand(2, 2, 3, 112, 112, generator=g), ["pick up the soup"] * 2,
                                    torch.randn(2, 8, generator=g), torch.randn(2, policy.config.chunk_len, 7, generator=g))
    times = []
    for i in range(warmup + 10):
        t = time.perf_counter()
        out = policy.model(inputs, align_layer=4)
        (out.action_loss + out.visual_hidden.float().square().mean()).backward()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    result["fwd_bwd_batch2_ms"] = _summary(times)
    result["threads"] = torch.get_num_threads()
    return result


def train_models(preset: str, vggt: str, device: torch.device, batch: int, steps: int, warmup: int,
                 modes: list[str], settings: list[str], grad_checkpointing: bool, lora_rank: int = 16) -> dict:
    """π0 training steps with random weights: `modes` "lora" (frozen base in bf16, adapters fp32) and/or
    "full" (fp32 master weights); bf16 autocast on CUDA; `settings` (a) no SF, (b) SF + online VGGT."""
    from spatial_forcing.align.config import AlignConfig
    from spatial_forcing.align.module import SpatialForcing
    from spatial_forcing.policies.pi0.policy import Pi0Policy
    from spatial_forcing.teachers.vggt import VGGTConfig, VGGTTeacher
    from spatial_forcing.train.loop import TrainModule, enable_grad_checkpointing

    cuda = device.type == "cuda"
    vcfg = VGGTConfig.preset(vggt)
    results = {}
    for mode in modes:
        for setting in settings:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(0)
            policy = build_policy(preset, device, torch.float32)
            cfg = policy.config
            layer = min(12, cfg.depth)
            model = policy.model
            if mode == "lora":
                model = Pi0Policy.apply_lora(model, r=lora_rank, alpha=lora_rank)
                if cuda:
                    for p in model.parameters():
                        if not p.requires_grad:
                            p.data = p.data.to(torch.bfloat16)
            if grad_checkpointing:
                enable_grad_checkpointing(model)
            sf = teacher = None
            if setting == "b":
                sf = SpatialForcing(AlignConfig.preset("pi0-sf"), cfg.width, vcfg.feature_dim)
                teacher = VGGTTeacher.from_config(vcfg).to(device).freeze()
            module = TrainModule(model, sf, 0.5, layer).to(device)
            params = [p for p in module.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=2.5e-5, betas=(0.9, 0.95), weight_decay=1e-10)
            g = torch.Generator().manual_seed(0)
            images01 = torch.rand(batch, cfg.num_images, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
            inputs = policy.training_inputs(images01, [INSTRUCTION] * batch, torch.randn(batch, cfg.state_dim).to(device),
                                            torch.randn(batch, cfg.chunk_len, cfg.action_dim).to(device))

            def step():
                grid = None
                if teacher is not None:
                    with torch.no_grad():
                        grid = teacher.features(images01)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss, _ = module(inputs, grid)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(warmup):
                step()
            sync(device)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                step()
                sync(device)
                times.append(time.perf_counter() - t)
            results[f"{mode} ({setting}) {'SF, online VGGT' if setting == 'b' else 'no SF'}"] = {
                **_summary(times), "trained_params_m": round(sum(p.numel() for p in params) / 1e6, 1),
                "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None}
            del policy, model, module, opt, teacher, sf, inputs, params
    return {"preset": preset, "vggt": vggt, "batch": batch, "images": 2, "lora_rank": lora_rank,
            "grad_checkpointing": grad_checkpointing, "steps": results}
