"""The `sf` command: argument parsing and wiring only; the work happens in the rooms."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def cmd_teacher_features(args: argparse.Namespace) -> int:
    from .teachers import build_teacher
    from .teachers.io import load_depths, load_images, load_matrices, save_grid

    images = load_images(args.images)
    extras = {}
    options: dict = {}
    if args.teacher == "vggt":
        options = dict(layer=args.layer, resize_mode=args.resize_mode, weights_dtype=args.weights_dtype)
    elif args.teacher == "geometry":
        if not args.depth or not args.intrinsics:
            raise ValueError("the geometry teacher needs --depth (one .npy per image) and --intrinsics (.npy/.json)")
        if len(args.depth) != len(args.images):
            raise ValueError(f"--depth: expected one depth map per image ({len(args.images)}), got {len(args.depth)}")
        v = images.shape[1]
        extras = dict(depth=load_depths(args.depth), intrinsics=load_matrices(args.intrinsics, v, 3, "intrinsics"))
        if args.extrinsics:
            extras["extrinsics"] = load_matrices(args.extrinsics, v, 4, "extrinsics")
        options = dict(patch_size=args.patch_size)
    device = _device(args.device)
    t0 = time.perf_counter()
    teacher = build_teacher(args.teacher, args.weights, **options).to(device)
    t_load = time.perf_counter() - t0
    report = getattr(getattr(teacher, "model", None), "load_report", None)
    t0 = time.perf_counter()
    grid = teacher.features(images.to(device), **{k: v.to(device) for k, v in extras.items()})
    t_run = time.perf_counter() - t0
    out = save_grid(args.out, grid, {"teacher": args.teacher, "images": " ".join(map(str, args.images)),
                                     "weights": str(args.weights), **{k: str(v) for k, v in options.items()}})
    b, v, h, w, d = grid.feats.shape
    print(f"teacher      {args.teacher}" + (f" ({args.weights})" if args.weights else ""))
    if report is not None:
        print(f"weights      {report.summary()}")
    print(f"input        {tuple(images.shape)}  [B, V, 3, H, W] in [0, 1]")
    print(f"features     {tuple(grid.feats.shape)}  [B, V, h, w, D] {str(grid.feats.dtype).replace('torch.', '')}")
    print(f"valid        {tuple(grid.valid.shape)}  {int(grid.valid.sum())}/{grid.valid.numel()} patches valid")
    print(f"time         load {t_load:.2f} s, features {t_run:.2f} s on {device}")
    print(f"saved        {out}")
    return 0


def cmd_init_vggt(args: argparse.Namespace) -> int:
    import torch

    from .teachers.vggt import VGGT, VGGTConfig

    heads = {f"enable_{h}": True for h in args.heads}
    cfg = VGGTConfig.preset(args.preset, **heads)
    torch.manual_seed(args.seed)
    model = VGGT(cfg)
    out = Path(args.out)
    if out.suffix == ".pt":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out)
        if args.preset != "vggt-1b" and any((cfg.enable_depth, cfg.enable_point, cfg.enable_camera)):
            cfg.save(out.parent / "config.json")
    else:
        model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a randomly initialised VGGT ({args.preset}, {n:,} parameters) to {out}")
    return 0


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_convert_oft(args: argparse.Namespace) -> int:
    import torch

    from .policies.oft.policy import OFTPolicy

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    policy = OFTPolicy.from_pretrained(args.src, platform=args.platform, dtype=dtype, **_parse_overrides(args.set))
    report = policy.conversion_report
    if report is None:
        raise ValueError(f"{args.src} is already in this project's format; nothing to convert")
    dst = policy.save_pretrained(args.dst)
    (dst / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    cfg = policy.config
    n = sum(p.numel() for p in policy.model.parameters())
    print(f"source       {args.src}")
    print(f"model        {n / 1e6:.1f}M parameters, {cfg.num_images} images, proprio {cfg.use_proprio}, "
          f"chunk {cfg.chunk_len} x {cfg.action_dim}, head {cfg.action_head}, {args.dtype}")
    print(f"keys         {report.summary()}")
    print(f"statistics   {', '.join(policy.stats) or 'none'}")
    print(f"written      {dst} (config.json, model.safetensors, dataset_statistics.json, processor files, "
          f"conversion_report.json) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_convert_rlds(args: argparse.Namespace) -> int:
    from .data.convert import rlds_to_lerobot

    summary = rlds_to_lerobot(args.src, args.dst, fps=args.fps, video=not args.png, overwrite=args.overwrite,
                              verify_crc=not args.no_verify)
    print(f"source       {summary['source']} ({summary['name']})")
    print(f"written      {summary['destination']}: LeRobotDataset v3.0, {summary['episodes']} episodes, "
          f"{summary['frames']} frames, cameras {', '.join(summary['cameras'])}, "
          f"{'mp4' if summary['video'] else 'png'}, {summary['fps']} fps, in {summary['seconds']:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, seed=args.seed, out=args.out, scenes=args.scenes)
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from .envs.collect import collect_libero, format_summary

    summary = collect_libero(args.suite, args.tasks, args.episodes, args.out, image_size=args.image_size,
                             depth=not args.no_depth, seed=args.seed, video=not args.png, overwrite=args.overwrite,
                             jobs=args.jobs)
    print(format_summary(summary))
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from .teachers import build_teacher
    from .teachers.cache import build_cache, default_location
    from .train.loop import open_source

    source = open_source(args.dataset, args.standardize)
    cameras = args.cameras or list(source.cameras)
    missing = [c for c in cameras if c not in source.cameras]
    if missing:
        raise ValueError(f"dataset {args.dataset} has no camera {missing}; it has {source.cameras}")
    options = dict(layer=args.layer, weights_dtype=args.weights_dtype) if args.teacher == "vggt" else {}
    teacher = build_teacher(args.teacher, args.weights, **options).freeze()
    out = Path(args.output) if args.output else default_location(args.dataset, args.teacher)
    frames = sum(source.episode_length(e) for e in range(source.num_episodes))
    print(f"cache {args.teacher} over {frames} frames x {len(cameras)} views of {args.dataset} "
          f"at {args.image_size} px -> {out}")
    summary = build_cache(source, teacher, out, teacher_name=args.teacher, weights=args.weights, cameras=cameras,
                          image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers,
                          dtype=args.dtype, device=_device(args.device), progress=not args.quiet)
    written, seconds = summary["written"], summary["seconds"]
    if written:
        print(f"wrote {written} frames{' (resumed)' if summary['resumed'] else ''} in {seconds:.1f} s "
              f"({written / max(seconds, 1e-9):.1f} frames/s)")
    else:
        print("the store was already complete")
    print(f"store: {summary['bytes'] / 1e9:.2f} GB at {summary['folder']}\n"
          f"train with: sf train ... --teacher {args.teacher} --teacher-cache {summary['folder']}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .analysis.probe import plot_probe, run_probe
    from .policies.oft.policy import OFTPolicy

    names = args.names or [Path(p).name or str(p) for p in args.policy]
    if len(names) != len(args.policy) or len(set(names)) != len(names):
        raise ValueError(f"--names: expected {len(args.policy)} distinct names (one per --policy), got {names}")
    policies = {name: OFTPolicy.from_pretrained(path) for name, path in zip(names, args.policy)}
    result = run_probe(policies, args.dataset, layers=args.layers, val_episodes=args.val_episodes,
                       max_samples=args.max_samples, lam=args.ridge, batch_size=args.batch_size,
                       cameras=args.cameras, standardize=args.standardize, device=_device(args.device),
                       progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_probe(result, str(out / "probe.png"))
    split = result["split"]
    print(f"depth probe on {args.dataset}: {split['train_samples']} training frames "
          f"({split['train_episodes']} episodes), {split['test_samples']} held-out frames "
          f"({split['test_episodes']} episodes), ridge lambda {args.ridge}")
    for name, scores in result["policies"].items():
        best = max(scores, key=lambda k: scores[k]["r2"])
        cells = "  ".join(f"L{k}: {v['r2']:.3f}" for k, v in sorted(scores.items()))
        print(f"  {name:<20} R2 {cells}   (best layer {best}, RMSE {scores[best]['rmse_m']:.3f} m)")
    print(f"written: {out / 'probe.json'}, {out / 'probe.png'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    result = run(only=args.only, skip=args.skip, device=args.device, summarize_only=args.summarize_only,
                 readme=args.update_readme, out_dir=Path(args.out_dir) if args.out_dir else None)
    print(result["table"], end="")
    failed = [name for name, r in result["ran"].items() if r["status"].startswith("failed")]
    print(f"summary: {Path(args.out_dir) if args.out_dir else 'benchmarks/results'}/SUMMARY.md"
          + ("; README table updated" if args.update_readme else "")
          + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .quickstart import QuickstartConfig, format_summary, run_quickstart

    cfg = QuickstartConfig(**{f.name: getattr(args, f.name) for f in fields(QuickstartConfig)})
    print(f"Spatial Forcing quickstart -> {cfg.out} (about 10-15 minutes on 2 CPU cores with the defaults)")
    summary = run_quickstart(cfg, progress=not args.quiet)
    print("\n" + format_summary(summary))
    if args.record:
        import datetime
        import platform

        doc = {"benchmark": "quickstart", "date": datetime.date.today().isoformat(),
               "device": f"{platform.machine()}, {os.cpu_count()} CPU cores", **summary}
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"recorded: {args.record}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sf", description="Spatial Forcing: align a VLA policy's visual tokens with a frozen 3D teacher.")
    parser.add_argument("--version", action="version", version=f"spatial-forcing {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("teacher-features", help="run a teacher on image files; print shapes and save the features",
                       description="Run a frozen teacher on one image per camera view and save its patch grid "
                                   "(feats [B,V,h,w,D] and valid [B,V,h,w]) to a safetensors file.")
    p.add_argument("--teacher", default="vggt", choices=["vggt", "geometry"])
    p.add_argument("--weights", help="vggt: model.pt of facebook/VGGT-1B, a .safetensors file, or a folder")
    p.add_argument("--images", nargs="+", required=True, help="one image per view; the first is the reference view")
    p.add_argument("--layer", type=int, default=-1, help="vggt block pair to read (-1 = last, the SF recipe)")
    p.add_argument("--resize-mode", default="crop", choices=["crop", "pad"])
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="vggt: float32 = the SF recipe; bfloat16 halves memory (features differ by bf16 rounding)")
    p.add_argument("--depth", nargs="+", help="geometry: metric depth .npy per view")
    p.add_argument("--intrinsics", help="geometry: 3x3 (or Vx3x3) pixel intrinsics, .npy or .json")
    p.add_argument("--extrinsics", help="geometry: 4x4 (or Vx4x4) camera-to-world, .npy or .json")
    p.add_argument("--patch-size", type=int, default=14, help="geometry: patch side in pixels")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="teacher_features.safetensors")
    p.set_defaults(func=cmd_teacher_features)

    p = sub.add_parser("init-vggt", help="write a randomly initialised VGGT checkpoint (upstream key names)",
                       description="Write random VGGT weights: a flat state dict (.pt, upstream model.pt layout) or "
                                   "a folder with model.safetensors + config.json. For trying commands and tests.")
    p.add_argument("--preset", default="tiny", choices=["tiny", "vggt-1b"])
    p.add_argument("--heads", nargs="*", default=[], choices=["camera", "depth", "point"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="file.pt or a folder")
    p.set_defaults(func=cmd_init_vggt)

    p = sub.add_parser("convert", help="convert an upstream checkpoint into this project's format",
                       description="Convert an upstream checkpoint (folder or Hugging Face hub id) into this "
                                   "project's format, reporting every key it mapped or dropped.")
    conv = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    p = conv.add_parser("oft", help="OpenVLA-OFT / Spatial-Forcing LIBERO checkpoints (merged weights + heads)")
    p.add_argument("--src", required=True, help="upstream folder, or a hub id such as moojink/openvla-7b-oft-finetuned-libero-spatial")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--platform", default="libero", choices=["libero", "aloha", "bridge"],
                   help="chunk length, action and proprio dims (the weights do not record them)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override OFTConfig fields, e.g. num_images=1")
    p.set_defaults(func=cmd_convert_oft)

    p = conv.add_parser("rlds", help="LIBERO RLDS TFRecords (openvla/modified_libero_rlds) -> LeRobot v3.0",
                        description="Convert one RLDS dataset folder (e.g. libero_spatial_no_noops/1.0.0) to "
                                    "a LeRobotDataset v3.0, without TensorFlow; raw values are kept.")
    p.add_argument("--src", required=True, help="RLDS dataset folder (with dataset_info.json and the shards)")
    p.add_argument("--dst", required=True, help="output LeRobot dataset folder")
    p.add_argument("--fps", type=int, default=20, help="frame rate recorded in info.json (LIBERO control: 20 Hz)")
    p.add_argument("--png", action="store_true", help="store frames as PNG instead of mp4 video")
    p.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                   help="simulator worker processes (default: one per CPU core, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --dst")
    p.add_argument("--no-verify", action="store_true", help="skip the CRC checks (faster)")
    p.set_defaults(func=cmd_convert_rlds)

    p = sub.add_parser("demo", help="the smallest end-to-end Spatial Forcing run (CPU, about a minute)",
                       description="Train a tiny student's visual tokens toward the geometry teacher on synthetic "
                                   "RGB-D scenes and show the alignment and a linear depth probe improving.")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--scenes", type=int, default=384, help="training scenes (a third as many are held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/demo", help="folder for the summary JSON")
    p.set_defaults(func=cmd_demo)

    from .quickstart import QuickstartConfig

    q = QuickstartConfig()
    p = sub.add_parser("quickstart", help="Spatial Forcing end to end on this machine: demos, 2 trainings, eval, probe, report",
                       description="Collect scripted LIBERO demonstrations (cached), train the compact student with and "
                                   "without Spatial Forcing from the same seed, evaluate both in the simulator, probe "
                                   "their visual tokens for depth, and write a report with plots and rollout videos.")
    p.add_argument("--suite", default=q.suite, choices=["libero_object", "libero_spatial"])
    p.add_argument("--tasks", default=q.tasks, help="task indices, comma-separated")
    p.add_argument("--episodes", dest="episodes_per_task", type=int, default=q.episodes_per_task,
                   help="demonstrations per task")
    p.add_argument("--image-size", type=int, default=q.image_size, help="recorded frame side")
    p.add_argument("--steps", type=int, default=q.steps, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=q.batch_size)
    p.add_argument("--eval-trials", type=int, default=q.eval_trials, help="evaluation episodes per task and policy")
    p.add_argument("--eval-max-steps", type=int, default=q.eval_max_steps,
                   help="0: the protocol's limit (LIBERO-Object 280); smaller values shorten failed episodes")
    p.add_argument("--probe-samples", type=int, default=q.probe_samples, help="frames per probe split")
    p.add_argument("--val-episodes", type=int, default=q.val_episodes, help="episodes held out (validation, probe)")
    p.add_argument("--workers", type=int, default=q.workers, help="simulator processes")
    p.add_argument("--seed", type=int, default=q.seed)
    p.add_argument("--out", default=q.out)
    p.add_argument("--record", help="also write the summary as a benchmark result (e.g. benchmarks/results/quickstart.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("probe", help="linear depth probe of a policy's visual tokens, per layer",
                       description="Fit a ridge probe (closed form) from the visual-token hidden states at each "
                                   "layer to per-patch metric depth on the training episodes of a dataset with "
                                   "depth; report R2 and RMSE on the held-out episodes, with a plot.")
    p.add_argument("--policy", nargs="+", required=True, help="checkpoint folders (e.g. <run>/checkpoints/step-N/policy)")
    p.add_argument("--names", nargs="+", help="a label per policy (default: folder names)")
    p.add_argument("--dataset", required=True, help="a dataset with metric depth (e.g. from sf collect libero)")
    p.add_argument("--layers", nargs="+", type=int, help="layers to probe (default: all of a shallow student)")
    p.add_argument("--val-episodes", type=int, default=2, help="last episodes held out for scoring")
    p.add_argument("--max-samples", type=int, default=512, help="frames per split (evenly spaced)")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge strength, relative to the mean feature variance")
    p.add_argument("--cameras", nargs="+", help="views in the policy's order (default: the dataset's first ones)")
    p.add_argument("--standardize", default="libero")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="outputs/probe", help="folder for probe.json and probe.png")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("bench", help="run the benchmarks and summarise their results in one table",
                       description="Run every benchmark of benchmarks/ (each writes one JSON result) on the CPU, or "
                                   "their GPU modes with --device cuda, then write benchmarks/results/SUMMARY.md and "
                                   "summary.json. Needs a source checkout.")
    p.add_argument("--only", nargs="+", help="benchmarks to run (teacher inference data collect experts train eval serve)")
    p.add_argument("--skip", nargs="+", help="benchmarks to leave out")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--summarize-only", action="store_true", help="only rebuild the summary from existing results")
    p.add_argument("--update-readme", action="store_true", help="also rewrite the README's benchmark table")
    p.add_argument("--out-dir", help="write results here instead of benchmarks/results")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("collect", help="collect scripted-expert demonstrations into a LeRobot v3.0 dataset",
                       description="Run scripted experts (privileged simulator state) and record successful "
                                   "episodes, no-ops filtered, as a LeRobotDataset v3.0.")
    coll = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    p = coll.add_parser("libero", help="LIBERO-Object / LIBERO-Spatial pick-and-place experts")
    p.add_argument("--suite", required=True, help="libero_object or libero_spatial")
    p.add_argument("--tasks", default="all", help="all, indices (0,1,2) or task names, comma-separated")
    p.add_argument("--episodes", type=int, default=50, help="successful episodes per task")
    p.add_argument("--out", required=True, help="output LeRobot dataset folder")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--no-depth", action="store_true", help="do not record metric depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", action="store_true", help="store frames as PNG instead of mp4 video")
    p.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                   help="simulator worker processes (default: one per CPU core, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("cache-teacher", help="run a frozen teacher once over a dataset into a feature store",
                       description="Run the teacher over every (episode, frame) of a dataset, all views together, on "
                                   "un-augmented frames at the policy's resolution, into a memory-mapped store "
                                   "(default <dataset>/teacher_cache/<teacher>). Train with --teacher-cache. "
                                   "Colour jitter does not reach a cached teacher; crops do (the grid is cropped "
                                   "with the pixels' box). Rerunning an interrupted build resumes it.")
    p.add_argument("--teacher", default="vggt", choices=["vggt", "geometry"])
    p.add_argument("--weights", help="vggt: model.pt of facebook/VGGT-1B, a .safetensors file, or a folder")
    p.add_argument("--dataset", required=True, help="a LeRobot v3 folder or an RLDS folder")
    p.add_argument("--cameras", nargs="+", help="views in the policy's order (default: the dataset's cameras)")
    p.add_argument("--image-size", type=int, default=224, help="the policy's input side (OpenVLA-OFT 224, mini 112)")
    p.add_argument("--standardize", default="libero", help="reader transform ('' for none), as in sf train")
    p.add_argument("--layer", type=int, default=-1, help="vggt block pair to read (-1 = last, the SF recipe)")
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored feature precision")
    p.add_argument("--batch-size", type=int, default=16, help="frames per teacher call")
    p.add_argument("--num-workers", type=int, default=2, help="frame-decoding worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--output", help="store folder (default <dataset>/teacher_cache/<teacher>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache_teacher)

    from .serve.cli import add_serve_arguments

    add_serve_arguments(sub)  # sf serve

    from .train.cli import add_train_arguments, cmd_train

    p = sub.add_parser("train", help="train a policy with Spatial Forcing (or without: --no-sf)",
                       description="Train a policy with Spatial Forcing. Start from --preset NAME; every field can "
                                   "be overridden (--lr 1e-4, --align-coeff 0.2, --no-sf, ...).")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    from .eval.cli import add_eval_arguments

    add_eval_arguments(sub)  # sf eval libero
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError, KeyError, ImportError) as exc:
        print(f"sf {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
