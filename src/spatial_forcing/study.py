"""`sf study`: Spatial Forcing's efficiency claims at a scale that runs here (SPATIAL_FORCING.md §11).

For every (data fraction, seed, arm) with arm in {sf, baseline}: train the student on that fraction of
the demonstrations of each task, save `evals` checkpoints along training, evaluate every checkpoint in
LIBERO on the same `episodes` init states per task, and record everything in the study folder. Then:
success against steps and against data (mean over seeds with 95 % intervals), the paired SF - baseline
difference with a bootstrap interval, the steps SF needs to reach the baseline's final success, and the
smallest data fraction at which SF reaches the baseline's success with all the data
(`analysis/effects.py`). Plots (PNG), `study.json`, `study.md`.

Folder (`out`):
    study_config.json       the settings; a rerun with others is refused (nothing is touched)
    data/                   demonstrations (`sf collect libero`, cached), unless --dataset is given
    runs/<unit>/            one training per (fraction, seed, arm), its checkpoints kept
    eval/<unit>/step-N/     one evaluation per checkpoint (episodes.jsonl, results.json)
    study.json, study.md, success_vs_steps.png, success_vs_data.png

Everything is resumable: a killed study continues where it stopped (trainings from their last
checkpoint, evaluations from their last episode). Work runs in `workers` spawned processes, each a
unit at a time (a training, or the evaluation of one checkpoint), with cores / workers threads;
with `device` cuda the trainings use the GPU and the simulator work spreads over the CPU cores.
Demonstrations start at init state `episodes`, so the evaluated scenes are not in the data.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ARMS = ("sf", "baseline")
CONFIG_FILE = "study_config.json"


@dataclass
class StudyConfig:
    suite: str = "libero_object"
    tasks: str = "0"  # task indices (comma-separated) or "all"
    demos: int = 40  # demonstrations per task (collected, or the dataset's)
    dataset: str = ""  # an existing dataset of these tasks (default: collected into <out>/data)
    fractions: list[float] = field(default_factory=lambda: [0.25, 1.0])  # of each task's demonstrations
    seeds: int = 3
    steps: int = 1500  # training steps of every run
    evals: int = 5  # checkpoints evaluated per run, evenly spaced, the last at `steps`
    episodes: int = 10  # evaluation episodes per task and checkpoint (init states 0..episodes-1)
    eval_max_steps: int = 0  # 0: the protocol's limit for the suite (LIBERO-Object 280)
    policy: str = "cnn"
    batch_size: int = 32
    lr: float = 1e-3
    teacher: str = "geometry"
    align_layer: int = 2
    align_coeff: float = 0.5
    image_size: int = 128  # recorded frames (and the evaluation's render size)
    replan_steps: int = 0  # 0: execute the whole chunk (the OFT protocol)
    antialias: bool = False  # multisampled renders (LIBERO's default) for demonstrations and evaluation; off: ~1.7x faster
    seed: int = 7  # run i uses seed + i
    workers: int = 2
    device: str = "cpu"
    out: str = "outputs/study"

    def __post_init__(self) -> None:
        self.fractions = [float(f) for f in self.fractions]
        problems = []
        for name in ("demos", "seeds", "steps", "evals", "episodes", "batch_size", "workers", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}: expected an integer >= 1, found {value!r}")
        bad = [f for f in self.fractions if not (math.isfinite(f) and 0 < f <= 1)]
        if not self.fractions or bad or len(set(self.fractions)) != len(self.fractions):
            problems.append(f"fractions: expected distinct values in (0, 1], found {self.fractions}")
        if self.evals > self.steps:
            problems.append(f"evals {self.evals}: more evaluation points than training steps ({self.steps})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr: expected a positive number, found {self.lr!r}")
        if not (math.isfinite(self.align_coeff) and self.align_coeff > 0):
            problems.append(f"align_coeff: expected a positive number, found {self.align_coeff!r}")
        for name in ("replan_steps", "eval_max_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: expected >= 0, found {getattr(self, name)}")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device: expected cpu or cuda, found {self.device!r}")
        if self.episodes > 50:
            problems.append(f"episodes {self.episodes}: LIBERO tasks have 50 init states")
        if problems:
            raise ValueError("study: " + "; ".join(problems))

    def identity(self) -> dict[str, Any]:
        """What a study folder is bound to (the work it holds depends on all of it but where it runs)."""
        return {k: v for k, v in asdict(self).items() if k not in ("workers", "out")}

    def checkpoints(self) -> list[int]:
        return sorted({round(self.steps * (i + 1) / self.evals) for i in range(self.evals)})


@dataclass(frozen=True)
class Unit:
    fraction: float
    seed: int  # index 0..seeds-1
    arm: str

    @property
    def name(self) -> str:
        return f"f{self.fraction:g}_s{self.seed}_{self.arm}"


def units(cfg: StudyConfig) -> list[Unit]:
    """Seed-major, so that a stopped study already holds complete pairs."""
    return [Unit(f, s, arm) for s in range(cfg.seeds) for f in cfg.fractions for arm in ARMS]


# ----------------------------------------------------------------------------------------- folders
def bind_folder(cfg: StudyConfig, overwrite: bool = False) -> Path:
    """Create the study folder or check that it holds this study; refuses another study's folder."""
    out = Path(cfg.out)
    path = out / CONFIG_FILE
    if path.is_file() and not overwrite:
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); pass --overwrite to start the study afresh") from None
        diff = sorted(k for k in set(saved) | set(cfg.identity()) if saved.get(k) != cfg.identity().get(k))
        if diff:
            shown = ", ".join(f"{k}: {saved.get(k)!r} there, {cfg.identity().get(k)!r} now" for k in diff)
            raise ValueError(f"{out} holds a study with other settings ({shown}); use another --out, or "
                             "--overwrite to discard it")
        return out
    if out.exists() and any(out.iterdir()) and not overwrite and not path.is_file():
        raise ValueError(f"{out} is not empty and holds no study ({CONFIG_FILE}); use another --out or --overwrite")
    if overwrite and out.exists():
        import shutil

        for child in ("runs", "eval", CONFIG_FILE, "study.json", "study.md"):
            target = out / child
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.identity(), indent=2) + "\n")
    return out


def dataset_folder(cfg: StudyConfig) -> Path:
    if cfg.dataset:
        return Path(cfg.dataset)
    return Path(cfg.out) / "data" / (f"{cfg.suite}_t{cfg.tasks.replace(',', '-')}_e{cfg.demos}_from{cfg.episodes}"
                                     f"_{cfg.image_size}px{'' if cfg.antialias else '_noaa'}")


def demonstrations(cfg: StudyConfig, progress: bool) -> Path:
    """The dataset folder; collected (from init state `episodes` on) unless complete already."""
    from spatial_forcing.envs.collect import collect_libero

    folder = dataset_folder(cfg)
    if (folder / "meta" / "info.json").is_file():
        return folder
    if cfg.dataset:
        raise FileNotFoundError(f"--dataset {folder}: no LeRobot dataset there (meta/info.json)")
    collect_libero(cfg.suite, cfg.tasks, cfg.demos, folder, image_size=cfg.image_size, depth=True, seed=cfg.seed,
                   progress=progress, jobs=cfg.workers, first_init_state=cfg.episodes, antialias=cfg.antialias)
    return folder


def fraction_episodes(source: Any, fraction: float, per_task: int) -> list[int]:
    """The first `round(fraction * per_task)` (at least 1) episodes of every task, in dataset order."""
    by_task: dict[str, list[int]] = {}
    for e in range(source.num_episodes):
        by_task.setdefault(source.task(e), []).append(e)
    keep = max(1, round(fraction * per_task))
    return sorted(e for eps in by_task.values() for e in eps[:keep])


# ------------------------------------------------------------------------------------------- units
def train_config(cfg: StudyConfig, dataset: Path, unit: Unit, episodes: list[int]) -> Any:
    from spatial_forcing.policies.registry import training_fields
    from spatial_forcing.train.config import TrainConfig

    align = {"student_layer": cfg.align_layer, "teacher_layer": -1, "use_pos_embed": cfg.teacher == "vggt",
             "pos_embed_ratio": 0.1, "coeff": cfg.align_coeff, "projector_norm": True}
    every = cfg.checkpoints()
    return TrainConfig(policy=cfg.policy, dataset=str(dataset), episodes=",".join(map(str, episodes)),
                       sf=unit.arm == "sf", teacher=cfg.teacher, align=align, batch_size=cfg.batch_size, lr=cfg.lr,
                       schedule="cosine", warmup_steps=min(100, cfg.steps // 10), max_steps=cfg.steps,
                       val_episodes=0, val_every=0, save_every=every[0] if len(every) == 1 else every[1] - every[0],
                       keep_last=len(every) + 1, log_every=max(1, cfg.steps // 50), logger="none",
                       output_dir=str(Path(cfg.out) / "runs" / unit.name), seed=cfg.seed + unit.seed,
                       data_mode="memory", num_workers=0, device=cfg.device, **training_fields(cfg.policy))


_FRAMES: dict[tuple, Any] = {}  # per worker process: the decoded dataset, shared by its trainings


def run_training(cfg: StudyConfig, dataset: str, unit: Unit, episodes: list[int]) -> dict[str, Any]:
    """Train one unit to `steps` (resuming its last checkpoint); returns its checkpoint steps."""
    from spatial_forcing.train.checkpoint import list_checkpoints
    from spatial_forcing.train.loop import Trainer

    tc = train_config(cfg, Path(dataset), unit, episodes)
    done = {step for step, _ in list_checkpoints(tc.output_dir)}
    t0 = time.perf_counter()
    if cfg.steps not in done:
        key = (dataset, tuple(tc.cameras))
        trainer = Trainer(tc, resume="latest" if done else None, progress=False, frames=_FRAMES.get(key))
        if trainer.in_memory:
            _FRAMES.clear()
            _FRAMES[key] = trainer.frames
        trainer.fit()
    return {"unit": unit, "checkpoints": sorted(s for s, _ in list_checkpoints(tc.output_dir)),
            "seconds": time.perf_counter() - t0}


def run_evaluation(cfg: StudyConfig, unit: Unit, step: int) -> dict[str, Any]:
    """Evaluate one checkpoint in this process (resumes its episodes)."""
    from spatial_forcing.eval.policies import PolicyRef
    from spatial_forcing.eval.runner import evaluate_libero

    ckpt = Path(cfg.out) / "runs" / unit.name / "checkpoints" / f"step-{step:07d}" / "policy"
    t0 = time.perf_counter()
    res = evaluate_libero(PolicyRef.parse(str(ckpt), device="cpu"), cfg.suite, tasks=cfg.tasks,
                          trials_per_task=cfg.episodes, seed=7, workers=1, videos="none",
                          output=Path(cfg.out) / "eval" / unit.name / f"step-{step:07d}",
                          replan_steps=cfg.replan_steps or None, max_steps=cfg.eval_max_steps or None,
                          env_image_size=cfg.image_size, antialias=cfg.antialias, progress=False)
    return {"unit": unit, "step": step, "success_rate": res["summary"]["success_rate"],
            "seconds": time.perf_counter() - t0}


def _worker_init(threads: int) -> None:
    os.environ["LP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("MUJOCO_GL", "egl")
    import torch

    torch.set_num_threads(threads)


class _Inline:
    """workers == 1: run each call at once in this process."""

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - surfaced by future.result()
            future.set_exception(exc)
        return future

    def shutdown(self, **_: Any) -> None:
        pass


# ------------------------------------------------------------------------------------------ results
def episode_outcomes(cfg: StudyConfig, unit: Unit, step: int) -> list[bool] | None:
    """The unit's outcomes at `step`, in (task, episode) order; None until its evaluation is complete."""
    path = Path(cfg.out) / "eval" / unit.name / f"step-{step:07d}" / "episodes.jsonl"
    if not path.is_file():
        return None
    records = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        records[(r["task"], r["episode"])] = bool(r["success"])
    from spatial_forcing.envs.collect import parse_tasks

    keys = [(t.index, e) for t in parse_tasks(cfg.suite, cfg.tasks) for e in range(cfg.episodes)]
    if any(k not in records for k in keys):
        return None
    return [records[k] for k in keys]


def analyse(cfg: StudyConfig) -> dict[str, Any]:
    """Every statistic of the study from the evaluation records (complete seeds only)."""
    import numpy as np

    from spatial_forcing.analysis.effects import (data_efficiency, paired_difference, rate_summary,
                                                  training_efficiency)

    steps = cfg.checkpoints()
    table: dict[str, Any] = {}
    for f in cfg.fractions:
        per_step = []
        for step in steps:
            outcomes = {arm: [episode_outcomes(cfg, Unit(f, s, arm), step) for s in range(cfg.seeds)] for arm in ARMS}
            seeds = [s for s in range(cfg.seeds) if all(outcomes[arm][s] is not None for arm in ARMS)]
            if not seeds:
                per_step.append({"step": step, "seeds": 0})
                continue
            arrays = {arm: np.array([outcomes[arm][s] for s in seeds]) for arm in ARMS}
            row = {"step": step, "seeds": len(seeds), **{arm: rate_summary(arrays[arm]) for arm in ARMS},
                   "difference": paired_difference(arrays["sf"], arrays["baseline"])}
            per_step.append(row)
        complete = [r for r in per_step if r["seeds"] == cfg.seeds]
        entry: dict[str, Any] = {"curve": per_step}
        if len(complete) == len(steps):
            entry["training_efficiency"] = training_efficiency(
                steps, [r["sf"]["mean"] for r in complete], [r["baseline"]["mean"] for r in complete])
        table[f"{f:g}"] = entry
    finals = {f: table[f"{f:g}"]["curve"][-1] for f in cfg.fractions}
    result: dict[str, Any] = {"config": asdict(cfg), "checkpoints": steps, "fractions": table}
    if all(r["seeds"] == cfg.seeds for r in finals.values()):
        result["data_efficiency"] = data_efficiency(cfg.fractions, [finals[f]["sf"]["mean"] for f in cfg.fractions],
                                                    [finals[f]["baseline"]["mean"] for f in cfg.fractions])
        pooled = {arm: np.concatenate([np.array([episode_outcomes(cfg, Unit(f, s, arm), steps[-1])
                                                 for s in range(cfg.seeds)]) for f in cfg.fractions], axis=1)
                  for arm in ARMS}
        result["overall_final_difference"] = paired_difference(pooled["sf"], pooled["baseline"])
    return result


def finding(result: dict[str, Any]) -> str:
    """One plain sentence on what the study shows (an absent effect is said to be absent)."""
    diff = result.get("overall_final_difference")
    if diff is None:
        return "The study is incomplete: the statistics cover the finished seeds only."
    lo, hi = diff["ci95"]
    d = diff["difference"]
    if lo > 0:
        return (f"At the final checkpoint SF's success is {100 * d:+.1f} points over the baseline "
                f"(95 % CI {100 * lo:+.1f} to {100 * hi:+.1f}): an effect at this scale.")
    if hi < 0:
        return (f"At the final checkpoint SF's success is {100 * d:+.1f} points against the baseline "
                f"(95 % CI {100 * lo:+.1f} to {100 * hi:+.1f}): SF is worse at this scale.")
    return (f"At the final checkpoint SF's success differs from the baseline's by {100 * d:+.1f} points, "
            f"95 % CI {100 * lo:+.1f} to {100 * hi:+.1f}: no effect is detectable at this scale.")


def plots(cfg: StudyConfig, result: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.out)
    colours = {"sf": "tab:blue", "baseline": "tab:orange"}
    n = len(cfg.fractions)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), dpi=120, squeeze=False)
    for ax, f in zip(axes[0], cfg.fractions):
        rows = [r for r in result["fractions"][f"{f:g}"]["curve"] if r["seeds"]]
        for arm in ARMS:
            xs = [r["step"] for r in rows]
            ax.plot(xs, [100 * r[arm]["mean"] for r in rows], marker="o", color=colours[arm], label=arm)
            ax.fill_between(xs, [100 * r[arm]["ci95"][0] for r in rows], [100 * r[arm]["ci95"][1] for r in rows],
                            color=colours[arm], alpha=0.15)
        ax.set_title(f"{100 * f:g} % of the demonstrations")
        ax.set_xlabel("training step")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("success (%), 95 % CI")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "success_vs_steps.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=120)
    for arm in ARMS:
        pts = [(f, result["fractions"][f"{f:g}"]["curve"][-1]) for f in sorted(cfg.fractions)]
        pts = [(f, r) for f, r in pts if r["seeds"]]
        ax.plot([100 * f for f, _ in pts], [100 * r[arm]["mean"] for _, r in pts], marker="o", color=colours[arm],
                label=arm)
        ax.fill_between([100 * f for f, _ in pts], [100 * r[arm]["ci95"][0] for _, r in pts],
                        [100 * r[arm]["ci95"][1] for _, r in pts], color=colours[arm], alpha=0.15)
    ax.set_xlabel("demonstrations used (%)")
    ax.set_ylabel("final success (%), 95 % CI")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "success_vs_data.png")
    plt.close(fig)
    return {"steps": "success_vs_steps.png", "data": "success_vs_data.png"}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def write_report(cfg: StudyConfig, result: dict[str, Any], images: dict[str, str]) -> Path:
    lines = ["# Spatial Forcing study", "",
             f"Suite `{cfg.suite}`, tasks {cfg.tasks}; student `{cfg.policy}`, teacher `{cfg.teacher}` (layer "
             f"{cfg.align_layer}, coefficient {cfg.align_coeff}); {cfg.demos} demonstrations per task (from init "
             f"state {cfg.episodes} on), fractions {', '.join(f'{100 * f:g} %' for f in cfg.fractions)}; "
             f"{cfg.seeds} seeds; {cfg.steps} steps at batch {cfg.batch_size}; {cfg.episodes} evaluation episodes per "
             f"task (init states 0-{cfg.episodes - 1}, unseen in training) at steps {result['checkpoints']}.", "",
             f"**{finding(result)}**", ""]
    lines += ["| data | step | SF | baseline | SF - baseline (95 % CI) |", "|---|---|---|---|---|"]
    for f in cfg.fractions:
        for r in result["fractions"][f"{f:g}"]["curve"]:
            if not r["seeds"]:
                continue
            d = r["difference"]
            cell = lambda a: f"{_pct(r[a]['mean'])} [{_pct(r[a]['ci95'][0])}, {_pct(r[a]['ci95'][1])}]"  # noqa: E731
            lines.append(f"| {100 * f:g} % | {r['step']} | {cell('sf')} | {cell('baseline')} | "
                         f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] |")
    lines += ["", "Intervals: per arm, the 95 % Wilson interval of the pooled episodes of every seed; the difference, "
              "a paired bootstrap (seeds, then episodes within seeds, 10,000 draws).", ""]
    for f in cfg.fractions:
        eff = result["fractions"][f"{f:g}"].get("training_efficiency")
        if eff:
            text = (f"SF reaches the baseline's final {_pct(eff['baseline_final'])} at step {eff['sf_steps']} "
                    f"({eff['ratio']:.1f}x fewer steps)" if eff["ratio"] else eff["note"])
            lines.append(f"- Training efficiency, {100 * f:g} % of the data: {text}.")
    de = result.get("data_efficiency")
    if de:
        text = (f"SF reaches the baseline's {_pct(de['baseline_at_most_data'])} (with {100 * de['most_data']:g} % of the "
                f"data) with {100 * de['sf_fraction']:g} % ({de['ratio']:.1f}x less data)" if de["ratio"] else de["note"])
        lines.append(f"- Data efficiency: {text}.")
    diff = result.get("overall_final_difference")
    measured = any(line.startswith(("- Training efficiency", "- Data efficiency")) for line in lines)
    if measured and (diff is None or diff["ci95"][0] <= 0 <= diff["ci95"][1]):
        lines.append("- These efficiency figures compare mean curves whose differences lie inside the intervals "
                     "above: at this scale they are not evidence of an effect.")
    lines += ["", f"![success vs steps]({images['steps']}) ![success vs data]({images['data']})", "",
              "The teacher's targets are per-patch 3-D geometry from the simulator's depth (the geometry teacher); "
              "success in the simulator is the measure here, not a depth probe."]
    path = Path(cfg.out) / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------- run
def plan(cfg: StudyConfig) -> dict[str, int]:
    from spatial_forcing.envs.collect import parse_tasks

    n_units = len(units(cfg))
    tasks = len(parse_tasks(cfg.suite, cfg.tasks))
    return {"trainings": n_units, "evaluations": n_units * len(cfg.checkpoints()),
            "episodes": n_units * len(cfg.checkpoints()) * cfg.episodes * tasks, "tasks": tasks}


def run_study(cfg: StudyConfig, progress: bool = True, overwrite: bool = False, echo: Any = print) -> dict[str, Any]:
    from spatial_forcing.train.loop import open_source

    from spatial_forcing.envs.collect import parse_tasks

    from spatial_forcing.policies.registry import preset_family, presets

    parse_tasks(cfg.suite, cfg.tasks)  # unknown suites and tasks fail here, before anything is written
    if preset_family(cfg.policy) is None:
        raise ValueError(f"--policy {cfg.policy!r}: expected a student preset, one of {sorted(presets())}")
    if cfg.dataset and not (Path(cfg.dataset) / "meta" / "info.json").is_file():
        raise FileNotFoundError(f"--dataset {cfg.dataset}: no LeRobot dataset there (meta/info.json)")
    if cfg.episodes + cfg.demos > 50 and not cfg.dataset:
        echo(f"note: {cfg.demos} demonstrations from init state {cfg.episodes} wrap past the 50 init states: "
             "some evaluated scenes are also demonstrated")
    out = bind_folder(cfg, overwrite)
    t0 = time.perf_counter()
    p = plan(cfg)
    echo(f"study -> {out}: {p['trainings']} trainings x {len(cfg.checkpoints())} checkpoints = {p['evaluations']} "
         f"evaluations ({p['episodes']} episodes), {cfg.workers} worker process(es)")
    dataset = demonstrations(cfg, progress)
    source = open_source(str(dataset))
    per_task = cfg.demos
    selections = {f: fraction_episodes(source, f, per_task) for f in cfg.fractions}
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    executor: Any = _Inline() if cfg.workers == 1 else ProcessPoolExecutor(
        cfg.workers, mp_context=__import__("multiprocessing").get_context("spawn"), initializer=_worker_init,
        initargs=(threads,))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=p["trainings"] + p["evaluations"], desc="study", unit="job", dynamic_ncols=True)
    pending: dict[Future, str] = {}
    timings: dict[str, list[float]] = {"train": [], "eval": []}
    try:
        for unit in units(cfg):
            pending[executor.submit(run_training, cfg, str(dataset), unit, selections[unit.fraction])] = "train"
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                kind = pending.pop(fut)
                result = fut.result()
                timings[kind].append(result["seconds"])
                if kind == "train":
                    for step in cfg.checkpoints():
                        pending[executor.submit(run_evaluation, cfg, result["unit"], step)] = "eval"
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(last=f"{kind} {result['unit'].name}")
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    result = analyse(cfg)
    result["finding"] = finding(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["timings"] = {k: {"count": len(v), "mean_s": round(sum(v) / len(v), 1) if v else None}
                         for k, v in timings.items()}
    result["dataset"] = str(dataset)
    images = plots(cfg, result)
    result["report"] = str(write_report(cfg, result, images))
    (out / "study.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_summary(result: dict[str, Any]) -> str:
    lines = [result["finding"]]
    de = result.get("data_efficiency")
    if de:
        for f, cell in de["success_at_equal_data"].items():
            lines.append(f"  {100 * float(f):>5g} % data: SF {_pct(cell['sf'])}  baseline {_pct(cell['baseline'])}")
    lines.append(f"report: {result['report']} ({result['seconds'] / 60:.1f} min)")
    return "\n".join(lines)


def config_from_args(args: Any) -> StudyConfig:
    return StudyConfig(**{f.name: getattr(args, f.name) for f in fields(StudyConfig)})
