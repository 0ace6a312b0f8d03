#!/usr/bin/env python
"""Benchmark of OpenVLA-OFT inference: `OFTPolicy.predict_action_chunk` latency and action throughput.

Two input settings (`--configs`): "1img" = one third-person image, no proprio (the paper's Table II
throughput setting); "2img+proprio" = third-person + wrist image + 8-D proprio (the LIBERO setting).
Each builds its own model (random weights: timing does not depend on their values), L1 head, chunk 8.

What one timed end-to-end call covers (what a robot client pays per chunk): `predict_action_chunk(obs)`
with `obs = {"images": [uint8 256x256x3 frames], "state": 8 floats, "instruction": str}` = processor
(centre crop 0.9 + resample to the model's image size, /255, DINOv2 + SigLIP normalisation -> pixel_values;
prompt formatting + tokenisation -> ids; proprio normalisation), the copy to the model's device and dtype,
`OFTModel.predict_normalized` (vision backbone, projector, Llama body, action head), and the float64
un-normalisation back to robot units (numpy). Frames (uniform random uint8) and states (uniform in the
proprio q01..q99 box) are drawn fresh for every call, outside the timed region.

A second loop runs the same steps one by one (the body of `predict_action_chunk`) and times each stage:
preprocess, to_device, model (`predict_normalized` alone: the model-forward-only figure; CUDA events on
CUDA) and unnormalize.

Tokenizer. `mini` uses its byte tokenizer (`load_tokenizer("bytes")`, ~110 prompt ids). For `openvla-7b` no
Llama tokenizer is available offline, so a byte-level stand-in (`LlamaLengthStandIn`) is used: it splits the
prompt's UTF-8 bytes into `--prompt-tokens - 2` contiguous runs and maps each run to an id in [3, 32000) by
CRC32; with BOS and the "▁" (29871) the processor appends, the prompt is `--prompt-tokens` ids (default 30:
BOS + ~28 Llama-2 pieces for the LIBERO prompt "In: What action should the robot take to put both the
alphabet soup and the tomato sauce in the basket?\nOut:" + "▁"; an estimate, the real tokenizer is not
available offline to confirm it). Sequence lengths are therefore those of the real model (2img+proprio: 1 + 512 + 1 + 29 + 56 + 1 = 600; 1img: 343); only the cost of a
real BPE tokenizer differs (~0.03 ms per prompt for this project's Llama tokenizer wrapper on a small test
vocabulary). `--llama-tokenizer DIR` uses a real tokenizer folder instead.

    PYTHONPATH=src python benchmarks/inference.py                       # CPU, mini, fp32, both configs
    PYTHONPATH=src python benchmarks/inference.py --device cuda         # GPU, openvla-7b, bf16
    PYTHONPATH=src python benchmarks/inference.py --device cuda --compile --compile-mode reduce-overhead

Memory. CUDA: `torch.cuda.max_memory_allocated` over the timed calls of one config after
`reset_peak_memory_stats` (weights + activations held by PyTorch's allocator; CUDA context and allocator
cache excluded), GB = 1e9 bytes. CPU: the process's peak RSS (`ru_maxrss`: Python, libraries, weights,
activations) over warm-up + timed calls of one config, reset per config through /proc/self/clear_refs on
Linux (elsewhere the process-lifetime peak; the JSON says which).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
from common import (current_rss_bytes, device_name, git_commit, peak_rss_bytes, percentile,  # noqa: E402
                    reset_peak_rss, sync)

try:
    from spatial_forcing.policies.oft.config import OFTConfig
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
    from spatial_forcing.policies.oft.config import OFTConfig
from spatial_forcing.policies.oft.model import OFTModel
from spatial_forcing.normalize import DatasetStats
from spatial_forcing.policies.oft.policy import OFTPolicy
from spatial_forcing.policies.oft.processor import OFTProcessor, load_tokenizer

GB = 1e9  # all memory figures are in GB = 1e9 bytes

CONFIGS = {  # name -> OFTConfig overrides (on top of the preset)
    "1img": {"num_images": 1, "use_proprio": False},
    "2img+proprio": {"num_images": 2, "use_proprio": True},
}
INSTRUCTION = "put both the alphabet soup and the tomato sauce in the basket"  # a LIBERO-10 task
FRAME_SIZE = 256  # LIBERO renders 256x256 camera frames
UNNORM_KEY = "libero_spatial_no_noops"

# OpenVLA-OFT paper figures quoted in the issue: one A100, bf16, L1 head, parallel decoding, chunk 8.
PUBLISHED = {
    "source": "OpenVLA-OFT paper (Kim et al. 2025) as quoted in the issue: one A100, bf16, L1 head, chunk 8",
    "configs": {"1img": {"actions_per_s": 109.7, "latency_s": 8 / 109.7},
                "2img+proprio": {"actions_per_s": 71.4, "latency_s": 0.112}},
    "memory_gb": 16.0,
    "memory_note": "'about 16 GB' (issue text; unit not stated)",
}
TARGET = {"description": "H100, openvla-7b in bf16, 2 images + proprio: >= 150 actions/s, i.e. <= 53 ms per "
                         "8-action chunk (end-to-end median), with <= 16 GB peak",
          "config": "2img+proprio", "max_ms": 53.0, "min_actions_per_s": 150.0, "max_peak_gb": 16.0}


# ----------------------------------------------------------------------------- dataset statistics
def _entry(q01: list[float], q99: list[float], mask: list[bool] | None, mean: list[float] | None = None) -> dict:
    lo, hi = np.asarray(q01, np.float64), np.asarray(q99, np.float64)
    span = hi - lo
    d = {"mean": ((lo + hi) / 2).tolist() if mean is None else mean, "std": (span / 4).tolist(),
         "max": (hi + 0.05 * span).tolist(), "min": (lo - 0.05 * span).tolist(), "q01": q01, "q99": q99}
    if mask is not None:
        d["mask"] = mask
    return d


def libero_like_stats() -> DatasetStats:
    """Synthetic LIBERO-like statistics. Actions (7): the LIBERO-Spatial q01/q99 example of OPENVLA_OFT.md
    §7.2 (also in tests/oft_upstream.py): EEF delta xyz, delta axis-angle, gripper in [0, 1] (not
    normalised: mask False). Proprio (8): plausible LIBERO ranges, not copied from a released file: EEF
    position (m, world frame), EEF axis-angle (rad), two gripper finger positions (m)."""
    action_q01 = [-0.7455, -0.6616, -0.9375, -0.1071, -0.2068, -0.1843, 0.0]
    action_q99 = [0.9375, 0.8759, 0.9321, 0.1039, 0.1768, 0.1457, 1.0]
    proprio_q01 = [-0.16, -0.25, 0.90, 2.40, -1.10, -0.60, 0.001, -0.040]
    proprio_q99 = [0.14, 0.29, 1.24, 3.27, 0.47, 0.31, 0.040, -0.001]
    return DatasetStats.from_dict({
        "action": _entry(action_q01, action_q99, [True] * 6 + [False]),
        "proprio": _entry(proprio_q01, proprio_q99, None),
        "num_transitions": 52970, "num_trajectories": 432})


# ------------------------------------------------------------------------------------ tokenizer
class LlamaLengthStandIn:
    """Timing stand-in for the Llama-2 tokenizer (no tokenizer files offline): byte-level, Llama-sized ids.

    `encode(text)` = `[BOS] + ids`, where the UTF-8 bytes of `text` are split into `pieces` contiguous runs
    of near-equal length (fewer if the text is shorter) and run `r` becomes `3 + crc32(r) % 31997`, i.e. an
    id in [3, 32000) (never the "▁" id, so the processor always appends it). Deterministic; the ids carry no
    meaning (the weights are random anyway); only the prompt length matters for timing.
    """

    kind = "llama"
    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 32000
    first_id, end_id = 3, 32000

    def __init__(self, pieces: int, space_id: int = 29871) -> None:
        if pieces < 1:
            raise ValueError(f"pieces must be >= 1, got {pieces}")
        self.pieces = pieces
        self.space_id = space_id

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        n = max(1, min(self.pieces, len(data)))
        cuts = [round(i * len(data) / n) for i in range(n + 1)]
        ids = []
        for a, b in zip(cuts, cuts[1:]):
            i = self.first_id + zlib.crc32(data[a:b]) % (self.end_id - self.first_id)
            ids.append(i + 1 if i == self.space_id else i)
        return [self.bos_token_id] + ids

    def decode(self, ids) -> str:
        return f"<{len(ids)} stand-in ids>"

    def save(self, folder) -> None:
        raise NotImplementedError("the benchmark's tokenizer stand-in is not meant to be saved")


def make_tokenizer(cfg: OFTConfig, prompt_tokens: int, llama_dir: Path | None):
    """(tokenizer, description) for `cfg.tokenizer`."""
    if cfg.tokenizer == "bytes":
        return load_tokenizer("bytes"), "ByteTokenizer (the mini preset's own: one id per UTF-8 byte)"
    if llama_dir is not None:
        return load_tokenizer("llama", llama_dir), f"Llama tokenizer from --llama-tokenizer ({llama_dir.name})"
    return (LlamaLengthStandIn(prompt_tokens - 2, cfg.prompt_space_id),
            f"LlamaLengthStandIn: byte-level stand-in, prompt = BOS + {prompt_tokens - 2} CRC32 ids in [3, 32000) "
            f"+ '▁' ({cfg.prompt_space_id}) = {prompt_tokens} ids (estimated Llama-2 length of this prompt: ~30)")


# ---------------------------------------------------------------------------------------- model
def build_model(cfg: OFTConfig, device: torch.device, dtype: torch.dtype) -> OFTModel:
    """Random-weight `OFTModel` created directly on `device` in `dtype` (no fp32 copy, no CPU copy: the
    7B model is ~15 GB in bf16). Non-persistent buffers come out right because construction runs on a
    real device (on the meta device they would have to be rebuilt, as `weights.build_model` does): the Llama
    rotary `inv_freq` is computed in fp32 explicitly (it stays fp32 under a bf16 default dtype) and the
    SigLIP `position_ids` are int64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OFTModel(cfg)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device).eval().requires_grad_(False)  # a no-op unless something was made elsewhere
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.device.type != device.type or (t.is_floating_point() and t.dtype != dtype and "inv_freq" not in n)]
    if bad:
        raise RuntimeError(f"tensors not on {device} in {dtype}: {bad[:8]}")
    return model


COMPILED_PARTS = ("vision_backbone", "projector", "language_model", "proprio_projector", "action_head")


def compile_model(model: OFTModel, mode: str) -> list[str]:
    """`nn.Module.compile` (in place, parameter names unchanged) on the forward pieces; static shapes."""
    done = []
    for name in COMPILED_PARTS:
        part = getattr(model, name, None)
        if part is not None:
            part.compile(mode=None if mode == "default" else mode, dynamic=False)
            done.append(name)
    return done


# ------------------------------------------------------------------------------------------ misc
def summary(times: list[float]) -> dict:
    return {"median_ms": percentile(times, 50), "p10_ms": percentile(times, 10), "p90_ms": percentile(times, 90),
            "p99_ms": percentile(times, 99), "min_ms": min(times), "max_ms": max(times),
            "mean_ms": sum(times) / len(times)}


def sdpa_backends() -> dict | None:
    if not torch.cuda.is_available():
        return None
    b = torch.backends.cuda
    return {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
            "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: None)(), "math": b.math_sdp_enabled()}


# ------------------------------------------------------------------------------------ benchmark
class Observations:
    """Fresh observations: uniform random uint8 frames, states uniform in the proprio q01..q99 box."""

    def __init__(self, cfg: OFTConfig, stats: DatasetStats, seed: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.lo, self.hi = stats.proprio.q01, stats.proprio.q99

    def __call__(self) -> dict:
        obs = {"images": [self.rng.integers(0, 256, (FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
                          for _ in range(self.cfg.num_images)],
               "instruction": INSTRUCTION}
        if self.cfg.use_proprio:
            obs["state"] = self.rng.uniform(self.lo, self.hi)
        return obs


def staged_call(policy: OFTPolicy, obs: dict, device: torch.device, cuda_timing: bool) -> tuple[np.ndarray, dict]:
    """The body of `OFTPolicy.predict_action_chunk`, one stage at a time, with per-stage ms."""
    stats = policy.dataset_stats()
    param = next(policy.model.parameters())
    t0 = time.perf_counter()
    batch = policy.processor(obs, stats=stats)
    t1 = time.perf_counter()
    batch = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
    sync(device)
    t2 = time.perf_counter()
    if cuda_timing:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.no_grad():
            normed = policy.model.predict_normalized(batch)[0]
        end.record()
        end.synchronize()
        model_ms = start.elapsed_time(end)
    else:
        with torch.no_grad():
            normed = policy.model.predict_normalized(batch)[0]
    t3 = time.perf_counter()
    actions = policy.processor.unnormalize_actions(normed, stats)
    t4 = time.perf_counter()
    stages = {"preprocess": (t1 - t0) * 1e3, "to_device": (t2 - t1) * 1e3,
              "model": model_ms if cuda_timing else (t3 - t2) * 1e3, "model_wall": (t3 - t2) * 1e3,
              "unnormalize": (t4 - t3) * 1e3}
    return actions, stages


def mark_step(cudagraphs: bool) -> None:
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()


def run_config(name: str, policy: OFTPolicy, device: torch.device, warmup: int, repeat: int, seed: int,
               cudagraphs: bool, profile: bool) -> dict:
    cfg = policy.config
    make_obs = Observations(cfg, policy.dataset_stats(), seed)
    t_cfg = time.perf_counter()
    first_ms = None
    for i in range(warmup):  # includes compilation / autotuning / CUDA-graph capture when --compile
        mark_step(cudagraphs)
        t0 = time.perf_counter()
        policy.predict_action_chunk(make_obs())
        if i == 0:
            first_ms = (time.perf_counter() - t0) * 1e3
    # Sanity: the staged loop computes what predict_action_chunk computes.
    obs = make_obs()
    mark_step(cudagraphs)
    ref = policy.predict_action_chunk(obs)
    mark_step(cudagraphs)
    staged, _ = staged_call(policy, obs, device, False)
    batch = policy.processor(obs, stats=policy.dataset_stats())
    seq_len = batch["input_ids"].shape[1] + cfg.num_prefix_tokens

    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    e2e, last = [], None
    for _ in range(repeat):
        obs = make_obs()
        mark_step(cudagraphs)
        sync(device)
        t0 = time.perf_counter()
        last = policy.predict_action_chunk(obs)  # returns numpy: the device work is finished
        e2e.append((time.perf_counter() - t0) * 1e3)
    stage_times: dict[str, list[float]] = {}
    for _ in range(repeat):
        obs = make_obs()
        mark_step(cudagraphs)
        sync(device)
        _, st = staged_call(policy, obs, device, device.type == "cuda")
        for k, v in st.items():
            stage_times.setdefault(k, []).append(v)
    sync(device)

    e2e_sum = summary(e2e)
    model_sum = summary(stage_times["model"])
    r = {"config": name, "num_images": cfg.num_images, "use_proprio": cfg.use_proprio,
         "chunk_len": cfg.chunk_len, "action_dim": cfg.action_dim,
         "prompt_ids": int(batch["prompt_lens"][0]) + 1, "text_ids": int(batch["input_ids"].shape[1]),
         "prefix_tokens": cfg.num_prefix_tokens, "sequence_length": int(seq_len),
         "warmup": warmup, "repeat": repeat, "first_call_ms": first_ms,
         "end_to_end": {**e2e_sum, "times_ms": e2e},
         "model_only": {**model_sum, "times_ms": stage_times["model"],
                        "timer": "torch.cuda.Event around predict_normalized" if device.type == "cuda"
                        else "time.perf_counter around predict_normalized"},
         "stages_median_ms": {k: percentile(v, 50) for k, v in stage_times.items()},
         "actions_per_s": cfg.chunk_len / (e2e_sum["median_ms"] / 1e3),
         "actions_per_s_model_only": cfg.chunk_len / (model_sum["median_ms"] / 1e3),
         "chunks_per_s": 1e3 / e2e_sum["median_ms"],
         "staged_vs_predict_max_abs_diff": float(np.max(np.abs(ref - staged))),
         "actions_finite": bool(np.isfinite(last).all()),
         "actions_shape": list(last.shape)}
    if device.type == "cuda":
        r["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / GB
        r["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
        r["peak_memory_kind"] = "torch.cuda.max_memory_allocated over the timed calls (weights + activations)"
    else:
        r["peak_memory_gb"] = peak_rss_bytes() / GB
    if profile:
        r["profile_top_ops"] = profile_call(policy, make_obs(), device, cudagraphs)
    r["wall_s"] = time.perf_counter() - t_cfg
    return r


def profile_call(policy: OFTPolicy, obs: dict, device: torch.device, cudagraphs: bool, rows: int = 20) -> list[dict]:
    """Top ops of one `predict_action_chunk` call by self device time (CUDA) or self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    mark_step(cudagraphs)
    sync(device)
    with profile(activities=acts) as prof:
        policy.predict_action_chunk(obs)
        sync(device)
    out = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        out.append({"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                    "self_device_ms": (dev or 0.0) / 1e3})
    key = "self_device_ms" if device.type == "cuda" else "self_cpu_ms"
    return sorted(out, key=lambda d: d[key], reverse=True)[:rows]


def pi0_main(args: argparse.Namespace) -> dict:
    """`--policy pi0 | pi0-mini`: π0 inference latency (2 cameras at 256 -> 224 / 112, 8-D state, 10 Euler steps)."""
    import pi0_bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    small = args.policy == "pi0-mini" or args.device == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if small else 1)
    repeat = args.repeat if args.repeat is not None else (50 if small else 3)
    r = pi0_bench.inference(args.policy, device, getattr(torch, dtype_name), warmup, repeat, seed=args.seed)
    doc = {"benchmark": "inference", "date": _dt.date.today().isoformat(), "device": device_name(device),
           "torch": torch.__version__, "commit": git_commit(), "pi0": r}
    out = args.out or ROOT / "benchmarks" / "results" / f"inference_{args.device}_{args.policy}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(f"written to {out}")
    return doc


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", choices=("mini", "openvla-7b"), default=None,
                   help="default: mini on cpu, openvla-7b on cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and activations; default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per config before timing (compilation happens here); default: 10 on cuda; "
                        "on cpu 5 (mini) or 1 (7b)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per loop (end-to-end, then staged); default: 200 on cuda; on cpu 100 (mini) "
                        "or 3 (7b)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward pieces (vision, projector, Llama body, heads)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode; reduce-overhead / max-autotune add CUDA graphs on cuda")
    p.add_argument("--prompt-tokens", type=int, default=30,
                   help="openvla-7b stand-in tokenizer: prompt ids incl. BOS and the trailing '▁' (default 30)")
    p.add_argument("--llama-tokenizer", type=Path, default=None,
                   help="openvla-7b: folder with a real Llama tokenizer (tokenizer.json / .model) instead of the "
                        "stand-in")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="also profile one call per config (top ops in the JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/inference_<device>_<preset>[_<dtype>][_compile].json)")
    p.add_argument("--policy", choices=("pi0", "pi0-mini"), default=None,
                   help="time a π0 preset instead of OFT (pi0_bench.py): predict_action_chunk end to end and the "
                        "model alone; default dtype bfloat16 on cuda")
    args = p.parse_args(argv)
    if args.policy:
        return pi0_main(args)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    cuda = args.device == "cuda"
    preset = args.preset or ("openvla-7b" if cuda else "mini")
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    mini = preset == "mini"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 5 if mini else 1)
    repeat = args.repeat if args.repeat is not None else (200 if cuda else 100 if mini else 3)
    if repeat < 1 or warmup < 0 or args.prompt_tokens < 3:
        p.error("--repeat must be >= 1, --warmup >= 0, --prompt-tokens >= 3")
    if mini and args.llama_tokenizer is not None:
        p.error("--llama-tokenizer applies to openvla-7b; mini uses its byte tokenizer")
    default_dtype = "bfloat16" if cuda else "float32"
    suffix = ("" if dtype_name == default_dtype else "_" + ("bf16" if dtype_name == "bfloat16" else "fp32"))
    suffix += f"_compile-{args.compile_mode}" if args.compile else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"inference_{args.device}_{preset}{suffix}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cudagraphs = cuda and args.compile and args.compile_mode in ("reduce-overhead", "max-autotune")
    stats = libero_like_stats()

    print(f"inference benchmark: {device_name(device)} | torch {torch.__version__} | preset {preset} | "
          f"{dtype_name} | configs {' '.join(args.configs)} | warmup {warmup} repeat {repeat}"
          f"{' | compile ' + args.compile_mode if args.compile else ''}", flush=True)

    results, build_info, tok_desc = [], {}, None
    rss_scope = None
    for name in args.configs:
        cfg = OFTConfig.preset(preset, **CONFIGS[name])
        if cuda:
            torch.cuda.empty_cache()
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        model = build_model(cfg, device, dtype)
        sync(device)
        build_s = time.perf_counter() - t0
        n_params = sum(t.numel() for t in model.parameters())
        weights_gb = sum(t.numel() * t.element_size() for t in model.parameters()) / GB
        compiled = compile_model(model, args.compile_mode) if args.compile else []
        tokenizer, tok_desc = make_tokenizer(cfg, args.prompt_tokens, args.llama_tokenizer)
        policy = OFTPolicy(model, OFTProcessor(cfg, tokenizer), {UNNORM_KEY: stats}, unnorm_key=UNNORM_KEY)
        if not cuda:
            rss_scope = ("per config: warm-up + timed calls" if reset_peak_rss()
                         else "process lifetime (peak could not be reset)")
        rss_model = current_rss_bytes()
        print(f"  {name}: {n_params / 1e6:.1f} M params, {weights_gb:.3f} GB weights, built in {build_s:.1f} s"
              f"{', compiled ' + '+'.join(compiled) if compiled else ''}", flush=True)
        r = run_config(name, policy, device, warmup, repeat, args.seed, cudagraphs, args.profile)
        r.update(params_m=n_params / 1e6, weights_gb=weights_gb, build_s=build_s, compiled_parts=compiled)
        if not cuda:
            r["peak_memory_kind"] = f"process peak RSS (ru_maxrss), {rss_scope}"
            if rss_model is not None:
                r["rss_after_model_gb"] = rss_model / GB
        pub = PUBLISHED["configs"][name]
        if cuda and not mini:
            r["vs_published_a100"] = {
                "actions_per_s_ratio": r["actions_per_s"] / pub["actions_per_s"],
                "latency_ratio": r["end_to_end"]["median_ms"] / 1e3 / pub["latency_s"],
                "memory_ratio": r["peak_memory_gb"] / PUBLISHED["memory_gb"],
                "note": "ratio > 1 for actions/s = faster than the paper's A100; our dtype is " + dtype_name}
        results.append(r)
        e, m = r["end_to_end"], r["model_only"]
        mem = f"peak alloc {r['peak_memory_gb']:.3f} GB" if cuda else f"peak RSS {r['peak_memory_gb']:.3f} GB"
        print(f"  {name}: seq {r['sequence_length']} | end-to-end p50 {e['median_ms']:.2f} ms p99 {e['p99_ms']:.2f} "
              f"| model p50 {m['median_ms']:.2f} ms | {r['actions_per_s']:.1f} actions/s | {mem} | "
              f"{r['wall_s']:.1f} s", flush=True)
        build_info[name] = cfg.to_dict()
        del policy, model, tokenizer
        gc.collect()

    target = dict(TARGET)
    two = next((r for r in results if r["config"] == TARGET["config"]), None)
    why_not = [msg for cond, msg in [
        (not cuda, "device is not cuda: the target is for an H100, and CPU timings of any preset say nothing "
                   "about it"),
        (preset != "openvla-7b", f"preset is {preset}, not the full openvla-7b architecture"),
        (dtype_name != "bfloat16", f"dtype is {dtype_name}, not bfloat16"),
        (two is None, f"{TARGET['config']} was not measured")] if cond]
    if why_not:
        target.update(evaluated=False, reason="; ".join(why_not))
    else:
        dev = device_name(device)
        target.update(evaluated=True, device=dev, on_h100="H100" in dev,
                      median_ms=two["end_to_end"]["median_ms"], actions_per_s=two["actions_per_s"],
                      model_only_median_ms=two["model_only"]["median_ms"], peak_memory_gb=two["peak_memory_gb"],
                      time_pass=two["end_to_end"]["median_ms"] <= TARGET["max_ms"]
                      and two["actions_per_s"] >= TARGET["min_actions_per_s"],
                      memory_pass=two["peak_memory_gb"] <= TARGET["max_peak_gb"])
        target["pass"] = target["time_pass"] and target["memory_pass"]
        if not target["on_h100"]:
            target["note"] = f"measured on {dev}; the target is stated for an H100"

    report = {
        "benchmark": "inference",
        "date": _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cuda": torch.version.cuda if cuda else None,
        "git_commit": git_commit(),
        "preset": preset,
        "dtype": dtype_name,
        "compile": args.compile_mode if args.compile else None,
        "attention": {"implementation": "sdpa (Llama, DINOv2, SigLIP)", "cuda_sdpa_backends_enabled": sdpa_backends(),
                      "note": "the Llama body gets an additive float mask (bidirectional_mask), so on CUDA SDPA "
                              "cannot pick its flash kernel there (memory-efficient or cuDNN instead); the ViTs get "
                              "no mask. Use --profile to see the kernels that ran"},
        "warmup": warmup,
        "repeat": repeat,
        "threads": torch.get_num_threads() if not cuda else None,
        "seed": args.seed,
        "memory_unit": "GB = 1e9 bytes",
        "instruction": INSTRUCTION,
        "frames": f"{FRAME_SIZE}x{FRAME_SIZE}x3 uint8, uniform random, fresh per call (generated outside the timing)",
        "tokenizer": tok_desc,
        "dataset_stats": {"key": UNNORM_KEY, **stats.to_dict(),
                          "note": "synthetic LIBERO-like: LIBERO-Spatial action q01/q99, plausible proprio ranges"},
        "timed_call": "end_to_end: wall clock (synchronised) around OFTPolicy.predict_action_chunk(obs): processor "
                      "(centre crop + resample + normalisation -> pixel_values, tokenisation, proprio "
                      "normalisation), copy to device/dtype, OFTModel.predict_normalized, float64 un-normalisation",
        "model_only_call": "OFTModel.predict_normalized on the already-processed batch on the device (vision backbone, "
                           "projector, Llama body, action head); a separate loop of the same length",
        "configs": build_info,
        "results": results,
        "target": target,
        "published": PUBLISHED,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    mem_head = "peak alloc GB" if cuda else "peak RSS GB"
    print(f"\n| config | seq len | e2e p50 ms | e2e p99 ms | model p50 ms | model p99 ms | actions/s | "
          f"{mem_head} | vs A100 (actions/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vp = r.get("vs_published_a100")
        vp_txt = f"{vp['actions_per_s_ratio']:.2f}x" if vp else "-"
        e, m = r["end_to_end"], r["model_only"]
        print(f"| {r['config']} | {r['sequence_length']} | {e['median_ms']:.2f} | {e['p99_ms']:.2f} | "
              f"{m['median_ms']:.2f} | {m['p99_ms']:.2f} | {r['actions_per_s']:.1f} | {r['peak_memory_gb']:.3f} | "
              f"{vp_txt} |")
    if target["evaluated"]:
        print(f"target ({TARGET['description']}): {'PASS' if target['pass'] else 'FAIL'} "
              f"(time {'ok' if target['time_pass'] else 'over'}, memory {'ok' if target['memory_pass'] else 'over'})")
    else:
        print(f"target not evaluated: {target['reason']}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
