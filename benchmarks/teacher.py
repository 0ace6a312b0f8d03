#!/usr/bin/env python
"""Benchmark of the Spatial Forcing teacher path: `VGGTTeacher.features` for V = 1, 2, 3 views.

What one timed call covers (exactly what the trainer calls): input checks, resize of the
`[B,V,3,H,W]` images in [0,1] to the teacher's 518 px working size, the frozen VGGT aggregator
(all block pairs up to the requested layer, -1 = last) and the fp32 copy of the patch grid.
Weights are randomly initialised (timing does not depend on their values) and kept in fp32;
the teacher itself runs bf16 autocast on CUDA and plain fp32 elsewhere (VGGT.md §6-7).

    PYTHONPATH=src python benchmarks/teacher.py                # CPU, tiny preset
    PYTHONPATH=src python benchmarks/teacher.py --device cuda                             # GPU, vggt-1b

Memory. CUDA: `torch.cuda.max_memory_allocated` over the timed calls of one V after
`reset_peak_memory_stats` (tensors held by PyTorch's allocator: weights + activations; the
CUDA context and allocator cache are not included), in GB = 1e9 bytes. CPU: the process's peak
resident set size (`resource.getrusage(...).ru_maxrss`, whole process: Python, libraries,
weights, activations) over warm-up + timed calls of one V; on Linux the peak is reset per V
through /proc/self/clear_refs, elsewhere it is the process-lifetime peak (said in the JSON).

FLOPs follow VGGT.md §7.1 (2 FLOPs per MAC, attention included, heads excluded), evaluated
with the preset's widths and depths; achieved TFLOP/s = FLOPs per batch / median time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from common import (current_rss_bytes, device_name, git_commit, peak_rss_bytes, percentile,  # noqa: E402
                    reset_peak_rss, sync)

try:
    from spatial_forcing.teachers.vggt.config import VGGTConfig
except ImportError:  # run without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))
    from spatial_forcing.teachers.vggt.config import VGGTConfig
from spatial_forcing.teachers.vggt.teacher import VGGTTeacher, working_size

GB = 1e9  # all memory figures are in GB = 1e9 bytes

# VGGT.md §7.2: upstream README, aggregator only, one H100, FlashAttention 3, resolution not stated.
PUBLISHED = {
    "source": "VGGT.md §7.2 (upstream README: aggregator only, one H100, FlashAttention 3, resolution not stated)",
    "frames": {"1": {"time_s": 0.04, "memory_gb": 1.88}, "2": {"time_s": 0.05, "memory_gb": 2.07}},
}
TARGET = {"description": "2 views at 518 px in <= 50 ms with <= 2.5 GB peak (batch 1, vggt-1b, CUDA)",
          "views": 2, "resolution": 518, "max_ms": 50.0, "max_peak_gb": 2.5}

# VGGT.md §7.1 table (TFLOP per sample) used to check `aggregator_flops`: (tokens/frame, S) -> T.
SPEC_FLOPS_T = {(1374, 1): 3.05, (1374, 2): 6.47, (1374, 3): 10.26, (1374, 8): 34.78,
                (1041, 1): 2.21, (1041, 2): 4.63, (1041, 3): 7.26, (1041, 8): 23.62,
                (782, 1): 1.60, (782, 2): 3.32, (782, 3): 5.16, (782, 8): 16.15,
                (261, 1): 0.49, (261, 2): 1.00, (261, 3): 1.52, (261, 8): 4.32}


# ----------------------------------------------------------------------------------------- FLOPs
def aggregator_flops(frames: int, tokens_per_frame: int, width: int = 1024, depth: int = 24,
                     dino_depth: int = 24, mlp_ratio: float = 4.0, special_tokens: int = 5,
                     patch_size: int = 14) -> float:
    """FLOPs of one sample through the VGGT aggregator (VGGT.md §7.1; 2 FLOPs per MAC).

    Per block with `n` tokens of width `d`: dense `(8 + 4·mlp_ratio)·n·d²` (= 24·n·d² at ratio 4:
    qkv 3d², proj d², MLP 2·ratio·d² MACs) plus attention `4·n·m·d` (QKᵀ and AV over `m` keys).
        DINO   = dino_depth · (24·n·d² + 4·n²·d)          (n = 1 + 4 + h·w as well)
        frame  = depth      · (24·n·d² + 4·n²·d)
        global = depth      · (24·n·d² + 4·n·(S·n)·d)
        total  = S · (DINO + frame + global) + S · patch conv (2·h·w·3·p²·d)
    """
    n, d, s = tokens_per_frame, width, frames
    dense = (8.0 + 4.0 * mlp_ratio) * n * d * d
    dino = dino_depth * (dense + 4.0 * n * n * d)
    frame = depth * (dense + 4.0 * n * n * d)
    glob = depth * (dense + 4.0 * n * (s * n) * d)
    patches = n - special_tokens
    conv = 2.0 * patches * 3 * patch_size ** 2 * d
    return s * (dino + frame + glob + conv)


def check_flops_formula() -> dict:
    """Reproduce every entry of the §7.1 table (rounded to 0.01 T); raise if one differs."""
    worst = 0.0
    for (n, s), tera in SPEC_FLOPS_T.items():
        got = aggregator_flops(s, n) / 1e12
        worst = max(worst, abs(got - tera))
        if abs(got - tera) > 0.0051:
            raise AssertionError(f"FLOP formula gives {got:.3f} T for S={s}, {n} tokens/frame; VGGT.md §7.1 says {tera} T")
    return {"entries_checked": len(SPEC_FLOPS_T), "max_abs_error_tflop": round(worst, 4),
            "s2_518_tflop": round(aggregator_flops(2, 1374) / 1e12, 4)}


def config_flops(cfg: VGGTConfig, frames: int, h: int, w: int) -> float:
    return aggregator_flops(frames, cfg.patch_start_idx + h * w, width=cfg.embed_dim, depth=cfg.depth,
                            dino_depth=cfg.patch_embed_depth, mlp_ratio=cfg.mlp_ratio,
                            special_tokens=cfg.patch_start_idx, patch_size=cfg.patch_size)


# ------------------------------------------------------------------------------------------ misc
# ------------------------------------------------------------------------------------ benchmark
def time_views(teacher: VGGTTeacher, device: torch.device, batch: int, views: int, size: int,
               warmup: int, repeat: int, gen: torch.Generator) -> tuple[list[float], tuple]:
    """Run warm-up then `repeat` timed calls, each on fresh random images; per-call ms."""

    def fresh() -> torch.Tensor:  # uniform in [0, 1), new data every call
        return torch.rand(batch, views, 3, size, size, generator=gen, device=device)

    for _ in range(warmup):
        grid = teacher.features(fresh())
        del grid
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, shape = [], None
    for _ in range(repeat):
        images = fresh()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            grid = teacher.features(images)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            grid = teacher.features(images)
            times.append((time.perf_counter() - t0) * 1e3)
        shape = tuple(grid.feats.shape)
        del grid, images
    return times, shape


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", choices=("tiny", "vggt-1b"), default=None,
                   help="default: tiny on cpu, vggt-1b on cuda")
    p.add_argument("--batch", type=int, default=1, help="samples per call (each with V views)")
    p.add_argument("--input-size", type=int, default=224,
                   help="square input side in pixels (student resolution; the teacher resizes to 518)")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--layer", type=int, default=-1, help="teacher layer (-1 = last, the SF recipe)")
    p.add_argument("--warmup", type=int, default=None, help="default: 5 on cuda; on cpu 3 (tiny) or 1 (vggt-1b)")
    p.add_argument("--repeat", type=int, default=None, help="default: 30 on cuda; on cpu 20 (tiny) or 3 (vggt-1b)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="float32: the SF recipe (fp32 weights, bf16 autocast on CUDA); bfloat16: bf16 weights")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/teacher_<device>_<preset>.json)")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    preset = args.preset or ("vggt-1b" if args.device == "cuda" else "tiny")
    tiny = preset == "tiny"
    warmup = args.warmup if args.warmup is not None else (5 if args.device == "cuda" else 3 if tiny else 1)
    repeat = args.repeat if args.repeat is not None else (30 if args.device == "cuda" else 20 if tiny else 3)
    if args.batch < 1 or args.input_size < 14 or repeat < 1 or warmup < 0 or min(args.views) < 1:
        p.error("--batch, --views, --repeat must be >= 1, --warmup >= 0, --input-size >= 14")
    suffix = "_bf16" if args.weights_dtype == "bfloat16" else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"teacher_{args.device}_{preset}{suffix}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    flops_check = check_flops_formula()
    torch.manual_seed(args.seed)
    cfg = VGGTConfig.preset(preset)
    rss_start = current_rss_bytes()
    t0 = time.perf_counter()
    with torch.device(device):  # initialise in place (the 1B model is 3.6 GB in fp32)
        teacher = VGGTTeacher.from_config(cfg, layer=args.layer, weights_dtype=args.weights_dtype)
    teacher = teacher.to(device)  # features() applies bf16 autocast on CUDA itself for fp32 weights
    sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(t.numel() for t in teacher.parameters())
    weights_gb = sum(t.numel() * t.element_size() for t in teacher.parameters()) / GB
    rss_model = current_rss_bytes()
    th, tw = working_size(args.input_size, args.input_size, cfg.img_size, cfg.patch_size, teacher.resize_mode)
    th = min(th, cfg.img_size)
    gh, gw = th // cfg.patch_size, tw // cfg.patch_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rss_scope = None
    cuda_1b = device.type == "cuda" and preset == "vggt-1b"

    print(f"teacher benchmark: {device_name(device)} | torch {torch.__version__} | preset {preset} "
          f"({n_params / 1e6:.1f} M params, {weights_gb:.2f} GB fp32, built in {build_s:.1f} s) | "
          f"batch {args.batch} | input {args.input_size}px -> teacher {th}x{tw} ({gh}x{gw} patches) | "
          f"warmup {warmup} repeat {repeat}", flush=True)

    results = []
    for v in args.views:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            rss_scope = "per V: warm-up + timed calls" if reset_peak_rss() else "process lifetime (peak could not be reset)"
        t_v = time.perf_counter()
        times, shape = time_views(teacher, device, args.batch, v, args.input_size, warmup, repeat, gen)
        med = percentile(times, 50)
        flops = args.batch * config_flops(cfg, v, gh, gw)
        r = {"views": v, "frames_per_batch": args.batch * v, "feats_shape": list(shape), "repeat": repeat,
             "median_ms": med, "p10_ms": percentile(times, 10), "p90_ms": percentile(times, 90),
             "min_ms": min(times), "max_ms": max(times), "mean_ms": sum(times) / len(times),
             "median_ms_per_frame": med / (args.batch * v), "times_ms": times,
             "tflop_per_batch": flops / 1e12, "tflops": flops / 1e12 / (med / 1e3)}
        if device.type == "cuda":
            r["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / GB
            r["peak_memory_above_weights_gb"] = r["peak_memory_gb"] - weights_gb
            r["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
            r["peak_memory_kind"] = "torch.cuda.max_memory_allocated over the timed calls (weights + activations)"
        else:
            peak = peak_rss_bytes()
            r["peak_memory_gb"] = peak / GB
            if rss_model is not None:
                r["peak_rss_above_model_gb"] = (peak - rss_model) / GB
            r["peak_memory_kind"] = f"process peak RSS (ru_maxrss), {rss_scope}"
        pub = PUBLISHED["frames"].get(str(v))
        if cuda_1b and args.batch == 1 and pub and th == tw == 518:
            r["vs_published"] = {"time_ratio": med / 1e3 / pub["time_s"],
                                 "memory_ratio": r["peak_memory_gb"] / pub["memory_gb"]}
        results.append(r)
        mem_txt = (f"peak alloc {r['peak_memory_gb']:.3f} GB" if device.type == "cuda"
                   else f"peak RSS {r['peak_memory_gb']:.3f} GB")
        print(f"  V={v}: median {med:.2f} ms (p10 {r['p10_ms']:.2f}, p90 {r['p90_ms']:.2f}) | {mem_txt} | "
              f"{r['tflop_per_batch']:.4g} TFLOP -> {r['tflops']:.3g} TFLOP/s | {time.perf_counter() - t_v:.1f} s",
              flush=True)

    target = dict(TARGET)
    two = next((r for r in results if r["views"] == 2), None)
    why_not = [msg for cond, msg in [(device.type != "cuda", "device is not cuda"),
                                     (preset != "vggt-1b", "preset is not vggt-1b"),
                                     (args.batch != 1, "batch is not 1"),
                                     ((th, tw) != (518, 518), f"teacher input is {th}x{tw}, not 518x518"),
                                     (two is None, "V=2 was not measured")] if cond]
    if why_not:
        target.update(evaluated=False, reason="; ".join(why_not))
    else:
        target.update(evaluated=True, median_ms=two["median_ms"], peak_memory_gb=two["peak_memory_gb"],
                      time_pass=two["median_ms"] <= TARGET["max_ms"],
                      memory_pass=two["peak_memory_gb"] <= TARGET["max_peak_gb"])
        target["pass"] = target["time_pass"] and target["memory_pass"]
        target["note"] = ("peak includes the fp32 weights (%.2f GB); published figures suggest bf16 weights"
                          % weights_gb)

    report = {
        "benchmark": "teacher",
        "date": _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_commit": git_commit(),
        "preset": preset,
        "config": cfg.to_dict(),
        "params_m": n_params / 1e6,
        "weights_gb_fp32": weights_gb,
        "precision": ("bf16 weights and activations" if args.weights_dtype == "bfloat16"
                      else "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"),
        "weights_dtype": args.weights_dtype,
        "layer": args.layer,
        "batch": args.batch,
        "input_size": args.input_size,
        "teacher_resolution": th if th == tw else [th, tw],
        "tokens_per_frame": cfg.patch_start_idx + gh * gw,
        "warmup": warmup,
        "repeat": repeat,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "build_s": build_s,
        "rss_before_model_gb": None if rss_start is None else rss_start / GB,
        "rss_after_model_gb": None if rss_model is None else rss_model / GB,
        "memory_unit": "GB = 1e9 bytes",
        "timed_call": "VGGTTeacher.features(images [B,V,3,S,S] uniform in [0,1), fresh per call): checks, "
                      "resize to teacher resolution, aggregator up to `layer`, fp32 patch grid",
        "flops": "VGGT.md §7.1 formula with the preset's widths/depths, per batch, heads excluded",
        "flops_formula_check": flops_check,
        "results": results,
        "target": target,
        "published": PUBLISHED,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    mem_head = "peak alloc GB" if device.type == "cuda" else "peak RSS GB"
    print(f"\n| V | median ms | p10 ms | p90 ms | {mem_head} | TFLOP/batch | TFLOP/s | vs published (time, mem) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        vp = r.get("vs_published")
        vp_txt = f"{vp['time_ratio']:.2f}x, {vp['memory_ratio']:.2f}x" if vp else "-"
        print(f"| {r['views']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['peak_memory_gb']:.3f} | {r['tflop_per_batch']:.4g} | {r['tflops']:.3g} | {vp_txt} |")
    if target["evaluated"]:
        print(f"target ({TARGET['description']}): {'PASS' if target['pass'] else 'FAIL'} "
              f"(time {'ok' if target['time_pass'] else 'over'}, memory {'ok' if target['memory_pass'] else 'over'})")
    else:
        print(f"target not evaluated: {target['reason']}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
