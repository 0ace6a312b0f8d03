#!/usr/bin/env python
"""Benchmark of `sf train`.

CPU (default), on locally collected LIBERO-Object data with the geometry teacher, in one run:
- samples/s of the whole loop (batches + step) for the quickstart setting before this change (OFT
  `mini`, per-sample decode in 2 worker processes, batch 8) and now (the compact CNN, frames decoded
  once into memory and augmented a batch at a time, batch 32), and their ratio (target >= 150 samples/s);
- FLOPs per sample (torch's FlopCounterMode) against what the cores deliver (a large matmul and a
  convolution, measured here), and where a step's time goes (batch, teacher, forward+backward, optimiser);
- the ratio of the step time with SF to without, on the same batches, interleaved (target <= 1.10).

Models (`--models`, default on CUDA): the training step of the published recipe's shapes — OpenVLA-7B
architecture + VGGT-1B, random weights, LoRA r=32 (frozen base in bf16, bf16 autocast), batch 8,
2 images + proprio, chunk 8 — in three settings: (a) no SF, (b) SF with the online VGGT teacher,
(c) SF with cached features (fp16 grids `[8, 2, 37, 37, 2048]` coming from host memory each step,
as the data loader delivers them). Step time (median), peak memory (`max_memory_allocated`) and
model FLOPs utilisation (4 FLOPs per frozen parameter and token: forward + activation gradients;
VGGT forward 2 FLOPs per MAC, VGGT.md §7.1). Targets on an H100: (c)/(a) <= 1.03, (b)/(a) reported
(FLOP estimate ~1.25), peak <= 62 GB for (a) and (c). `--arch mini --vggt tiny` runs the same code
on the CPU (for checking the benchmark itself).

    PYTHONPATH=src python benchmarks/train.py                    # CPU: quickstart
    PYTHONPATH=src python benchmarks/train.py --models           # GPU: (a) (b) (c)
    PYTHONPATH=src python benchmarks/train.py --policy pi0-mini  # CPU: π0-mini samples/s (pi0_bench.py)
    PYTHONPATH=src python benchmarks/train.py --models --policy pi0 --grad-checkpointing --batch 4   # GPU: π0
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, device_name, git_commit, percentile, sync, write_result  # noqa: E402

from spatial_forcing.train.config import TrainConfig  # noqa: E402
from spatial_forcing.train.loop import Trainer  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16 FLOP/s


# ------------------------------------------------------------------------------------------ CPU
def quickstart_data(path: str | None, episodes: int) -> str:
    if path:
        return path
    from spatial_forcing.cli import main as sf_main

    out = Path(tempfile.mkdtemp(prefix="sf_bench_")) / "libero_expert"
    code = sf_main(["collect", "libero", "--suite", "libero_object", "--tasks", "0", "--episodes",
                    str(episodes), "--out", str(out), "--jobs", "2"])
    if code:
        raise SystemExit("collecting the quickstart data failed")
    return str(out)


# The quickstart's training setting before this benchmark's change (OFT `mini`, per-sample decode in 2
# worker processes, batch 8), and now (the compact CNN, frames in memory, batch 32).
BEFORE = dict(policy="mini", batch_size=8, data_mode="stream", num_workers=2, teacher_cache="",
              align={"student_layer": 2, "use_pos_embed": False, "coeff": 0.5})
AFTER: dict = {}


def loop_throughput(trainer: Trainer, steps: int, warmup: int) -> dict:
    """samples/s of the whole loop (batches from the trainer's own loader + the step) after a warm-up."""
    loader = iter(trainer._make_loader(0))
    for _ in range(warmup):
        trainer.train_step([next(loader)])
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([next(loader)])
    seconds = time.perf_counter() - t0
    stop_workers(loader)
    return {"steps": steps, "batch_size": trainer.cfg.batch_size, "seconds": round(seconds, 2),
            "samples_per_s": round(steps * trainer.cfg.batch_size / seconds, 1),
            "data_mode": "memory" if trainer.in_memory else f"stream, {trainer.cfg.num_workers} workers"}


def stop_workers(loader) -> None:
    """Shut a DataLoader iterator's worker processes down now (persistent workers otherwise keep decoding
    ahead, on the same cores as the next measurement)."""
    shutdown = getattr(loader, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    gc.collect()


def phase_profile(trainer: Trainer, steps: int) -> dict:
    """Where one step's time goes: building the batch (in memory: gather + augmentation), the teacher,
    forward + backward, the optimiser (ms per step, medians)."""
    from spatial_forcing.train.loop import prepare_batch

    loader = iter(trainer._make_loader(0))
    phases: dict[str, list[float]] = {k: [] for k in ("batch", "teacher", "forward_backward", "optimizer")}
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        inputs = prepare_batch(batch, trainer.cfg.cameras, trainer.policy, trainer.device)
        grid = trainer.teacher_grid(batch, inputs.teacher)
        t2 = time.perf_counter()
        loss, _ = trainer.wrapped(inputs.policy, grid)
        loss.backward()
        t3 = time.perf_counter()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for k, a, b in (("batch", t0, t1), ("teacher", t1, t2), ("forward_backward", t2, t3), ("optimizer", t3, t4)):
            phases[k].append(1e3 * (b - a))
    del loader
    return {k: round(statistics.median(v), 1) for k, v in phases.items()}


def step_flops(trainer: Trainer) -> float:
    """FLOPs of one training step's forward + backward (torch's FlopCounterMode: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    from spatial_forcing.train.loop import prepare_batch

    loader = iter(trainer._make_loader(0))
    batch = next(loader)
    stop_workers(loader)
    inputs = prepare_batch(batch, trainer.cfg.cameras, trainer.policy, trainer.device)
    grid = trainer.teacher_grid(batch, inputs.teacher)
    with FlopCounterMode(display=False) as counter:
        loss, _ = trainer.wrapped(inputs.policy, grid)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def machine_gflops() -> dict:
    """What these cores deliver: a large fp32 matmul and a mid-size convolution forward + backward."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    matmul = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(32, 64, 24, 24, requires_grad=True)
    for _ in range(2):
        conv(x).sum().backward()
    t = time.perf_counter()
    for _ in range(5):
        conv(x).sum().backward()
    flops = 3 * 2 * 32 * 64 * 24 * 24 * 64 * 9  # forward + input and weight gradients
    return {"matmul_2048_gflops": round(matmul, 1), "conv3x3_64ch_fwd_bwd_gflops": round(5 * flops / (time.perf_counter() - t) / 1e9, 1)}


def cpu_benchmark(args: argparse.Namespace) -> dict:
    dataset = quickstart_data(args.dataset, args.episodes)
    out = Path(tempfile.mkdtemp(prefix="sf_bench_run_"))
    base = dict(dataset=dataset, logger="none", val_every=0, save_every=10**9, val_episodes=0)
    result: dict = {"dataset": dataset, "machine": machine_gflops()}
    trainers = {}
    for name, extra in (("before", BEFORE), ("after", AFTER)):
        t0 = time.perf_counter()
        trainer = Trainer(TrainConfig.preset("quickstart", **base, **extra, output_dir=str(out / name)), progress=False)
        build = time.perf_counter() - t0
        flops = step_flops(trainer) / trainer.cfg.batch_size
        loop = loop_throughput(trainer, args.steps if name == "after" else max(4, args.steps // 4), args.warmup)
        result[name] = {"policy": trainer.cfg.policy, "parameters": sum(p.numel() for p in trainer.policy.parameters()),
                        "build_s": round(build, 1), "loop": loop, "gflop_per_sample": round(flops / 1e9, 3),
                        "achieved_gflops": round(flops * loop["samples_per_s"] / 1e9, 1)}
        trainers[name] = trainer
        if name == "after":
            result["after"]["profile_ms_per_step"] = phase_profile(trainer, args.profile_steps)
        gc.collect()
    result["speedup_after_over_before"] = round(result["after"]["loop"]["samples_per_s"] /
                                                result["before"]["loop"]["samples_per_s"], 2)
    result["target_samples_per_s"] = 150
    # SF vs no SF on the same batches, interleaved (the compact student now)
    sf = trainers["after"]
    loader = iter(sf._make_loader(0))
    batches = [next(loader) for _ in range(args.ratio_batches)]
    del loader, trainers["before"]
    plain = Trainer(TrainConfig.preset("quickstart", **base, sf=False, output_dir=str(out / "plain")), progress=False,
                    frames=sf.frames)
    times: dict[str, list[float]] = {"sf": [], "no_sf": []}
    for rep in range(args.ratio_reps):
        for b in batches:
            for name, trainer in (("sf", sf), ("no_sf", plain)) if rep % 2 == 0 else (("no_sf", plain), ("sf", sf)):
                t = time.perf_counter()
                trainer.train_step([b])
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result["step_ms"] = {k: {"median": round(1e3 * m, 1), "p10": round(1e3 * percentile(times[k], 10), 1),
                             "p90": round(1e3 * percentile(times[k], 90), 1), "n": len(times[k])} for k, m in med.items()}
    result["sf_over_no_sf"] = round(med["sf"] / med["no_sf"], 3)
    result["target_sf_over_no_sf"] = 1.10
    return result


# ---------------------------------------------------------------------------------------- models
def synthetic_inputs(cfg, batch: int, device: torch.device, prompt_tokens: int = 30) -> dict[str, torch.Tensor]:
    """The policy's inputs as the processor makes them (shapes of the LIBERO setting)."""
    g = torch.Generator().manual_seed(0)
    length = prompt_tokens + cfg.num_action_tokens + 1
    ids = torch.randint(3, min(cfg.vocab_size, 32000), (batch, length), generator=g)
    return {"pixel_values": torch.randn(batch, 6 * cfg.num_images, cfg.image_size, cfg.image_size, generator=g).to(device),
            "input_ids": ids.to(device), "attention_mask": torch.ones(batch, length, dtype=torch.bool, device=device),
            "prompt_lens": torch.full((batch,), prompt_tokens - 1, device=device),
            "proprio": torch.randn(batch, cfg.proprio_dim, generator=g).to(device),
            "actions": torch.rand(batch, cfg.chunk_len, cfg.action_dim, generator=g).to(device) * 2 - 1}


def model_flops(model, cfg, inputs: dict, vggt_flops: float, setting: str) -> float:
    """4 FLOPs per frozen parameter per token it processes (forward + activation gradients)."""
    b = inputs["input_ids"].shape[0]
    patches = (cfg.image_size // cfg.patch_size) ** 2
    vis = sum(p.numel() for p in model.vision_backbone.parameters()) * patches * cfg.num_images
    proj = sum(p.numel() for p in model.projector.parameters()) * patches * cfg.num_images
    llm_tokens = inputs["input_ids"].shape[1] + patches * cfg.num_images + 1
    llm = sum(p.numel() for p in model.language_model.parameters() if p.dim() > 1 and p.shape[0] != cfg.vocab_size)
    flops = 4.0 * b * (vis + proj + llm * llm_tokens)
    return flops + (b * vggt_flops if setting == "b" else 0.0)


def one_step(module, opt, teacher, grid_host, inputs, images01, device) -> None:
    """One training step as `Trainer.train_step` takes it: teacher grid (online or from host memory),
    loss under bf16 autocast on CUDA, backward, AdamW."""
    from spatial_forcing.teachers.base import TeacherGrid

    grid = None
    if teacher is not None:
        with torch.no_grad():
            grid = teacher.features(images01)
    elif grid_host is not None:
        feats = grid_host.to(device, non_blocking=True).float()
        grid = TeacherGrid(feats, torch.ones(feats.shape[:4], dtype=torch.bool, device=device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = module(inputs, grid)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def models_benchmark(args: argparse.Namespace, device: torch.device) -> dict:
    from teacher import config_flops

    from spatial_forcing.align.config import AlignConfig
    from spatial_forcing.align.module import SpatialForcing
    from spatial_forcing.policies.oft.config import OFTConfig
    from spatial_forcing.policies.oft.model import OFTModel
    from spatial_forcing.policies.oft.weights import apply_lora
    from spatial_forcing.teachers.vggt import VGGTConfig, VGGTTeacher
    from spatial_forcing.train.loop import TrainModule, enable_grad_checkpointing

    cuda = device.type == "cuda"
    results = {}
    pcfg = OFTConfig.preset(args.arch, visual_token_shift=1)
    vcfg = VGGTConfig.preset(args.vggt)
    layer = 24 if args.arch.startswith("openvla") else 2
    for setting in args.settings:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        with torch.device(device):
            model = OFTModel(pcfg)
        model = apply_lora(model, r=32, alpha=16)
        if cuda:
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        if args.grad_checkpointing:
            enable_grad_checkpointing(model)
        teacher = sf = grid_host = None
        if setting in ("b", "c"):
            sf = SpatialForcing(AlignConfig.preset("openvla-oft-sf"), pcfg.hidden_size, vcfg.feature_dim)
        if setting == "b":
            teacher = VGGTTeacher.from_config(vcfg).to(device).freeze()
        side = vcfg.img_size // vcfg.patch_size
        if setting == "c":  # the loader's output: fp16 grids in (pinned) host memory
            grid_host = torch.randn(args.batch, pcfg.num_images, side, side, vcfg.feature_dim).half()
            grid_host = grid_host.pin_memory() if cuda else grid_host
        module = TrainModule(model, sf, 0.5, layer).to(device)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-4)
        inputs = synthetic_inputs(pcfg, args.batch, device)
        images01 = torch.rand(args.batch, pcfg.num_images, 3, pcfg.image_size, pcfg.image_size, device=device)

        state = (module, opt, teacher, grid_host, inputs, images01, device)
        for _ in range(args.warmup):
            one_step(*state)
        sync(device)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            one_step(*state)
            sync(device)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        flops = model_flops(model.get_base_model(), pcfg, inputs, config_flops(vcfg, pcfg.num_images, side, side), setting)
        peak = next((v for k, v in PEAK_BF16.items() if k in device_name(device)), None) if cuda else None
        results[setting] = {"step_ms": round(1e3 * med, 1), "p90_ms": round(1e3 * percentile(times, 90), 1),
                            "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None,
                            "model_tflop_per_step": round(flops / 1e12, 2),
                            "mfu": round(flops / med / peak, 3) if peak else None}
        del model, module, opt, teacher, sf, grid_host, state
    names = {"a": "no SF", "b": "SF, online VGGT", "c": "SF, cached features"}
    out = {"arch": args.arch, "vggt": args.vggt, "batch": args.batch, "lora_rank": 32, "images": pcfg.num_images,
           "grad_checkpointing": args.grad_checkpointing,
           "settings": {f"({k}) {names[k]}": v for k, v in results.items()}}
    if "a" in results:
        for k in ("b", "c"):
            if k in results:
                out[f"{k}_over_a"] = round(results[k]["step_ms"] / results["a"]["step_ms"], 3)
    out["targets"] = {"c_over_a": 1.03, "peak_memory_gb_a_c": 62, "b_over_a_flop_estimate": 1.25}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", action="store_true", help="the (a)/(b)/(c) model-step benchmark (default on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dataset", help="CPU: a LeRobot dataset (default: collect a small LIBERO-Object one)")
    p.add_argument("--episodes", type=int, default=8, help="CPU: episodes to collect when --dataset is not given")
    p.add_argument("--profile-steps", type=int, default=10, help="CPU: steps of the phase profile")
    p.add_argument("--steps", type=int, default=None, help="timed steps (CPU loop 40, models 20)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ratio-batches", type=int, default=6)
    p.add_argument("--ratio-reps", type=int, default=4)
    p.add_argument("--arch", default=None, help="models: OFT preset (default openvla-7b on CUDA, mini on CPU)")
    p.add_argument("--vggt", default=None, help="models: VGGT preset (default vggt-1b on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--settings", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--policy", default=None,
                   help="a π0 preset: CPU: pi0-mini samples/s with and without SF (pipeline + step) and fwd+bwd of "
                        "a batch of 2; --models: the π0 step (default preset pi0, full size, bf16 autocast) with "
                        "LoRA and full fine-tuning (pi0_bench.py)")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"],
                   help="--policy with --models: fine-tuning modes")
    p.add_argument("--out", help="result JSON (default benchmarks/results/train_<cpu|device>.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    models = args.models or device.type == "cuda"
    doc = {"benchmark": "train", "date": _dt.date.today().isoformat(), "device": device_name(device),
           "torch": torch.__version__, "commit": git_commit()}
    if args.policy and models:
        import pi0_bench

        args.vggt = args.vggt or ("vggt-1b" if device.type == "cuda" else "tiny")
        args.steps = args.steps or 10
        doc["pi0_models"] = pi0_bench.train_models(args.policy, args.vggt, device, args.batch, args.steps, args.warmup,
                                                   args.modes, [s for s in args.settings if s in ("a", "b")],
                                                   args.grad_checkpointing)
        name = f"train_models_{'gpu' if device.type == 'cuda' else 'cpu'}_{args.policy}.json"
    elif args.policy:
        import pi0_bench

        args.steps = args.steps or 20
        doc["cpu_pi0"] = pi0_bench.train_cpu(quickstart_data(args.dataset, args.episodes), args.steps, args.warmup,
                                             tempfile.mkdtemp(prefix="sf_bench_pi0_"))
        name = f"train_cpu_{args.policy}.json"
    elif models:
        args.arch = args.arch or ("openvla-7b" if device.type == "cuda" else "mini")
        args.vggt = args.vggt or ("vggt-1b" if device.type == "cuda" else "tiny")
        args.steps = args.steps or 20
        doc["models"] = models_benchmark(args, device)
        name = f"train_models_{'gpu' if device.type == 'cuda' else 'cpu'}_{args.arch}.json"
    else:
        args.steps = args.steps or 40
        doc["cpu"] = cpu_benchmark(args)
        name = "train_cpu_quickstart.json"
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    write_result(path, doc)
    import json

    print(json.dumps(doc, indent=2))
    print(f"written to {path}")
    return doc


if __name__ == "__main__":
    main()
