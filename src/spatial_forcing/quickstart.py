"""`sf quickstart`: Spatial Forcing end to end on one machine, no download, no account, no GPU.

1. demonstrations: scripted LIBERO experts record a small dataset with metric depth (cached: a
   second run reuses it);
2. training: the compact student twice from the same seed, with Spatial Forcing (geometry
   teacher) and without;
3. evaluation: both policies in the real simulator with the OFT protocol (`eval/`);
4. depth probe: a linear probe from each student's visual tokens to patch depth (`analysis/`);
5. report: `report.md` with plots (action loss, align loss, probe R^2, success rate) and one
   rollout video per policy, plus `quickstart.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUNS = (("sf", True), ("baseline", False))


@dataclass
class QuickstartConfig:
    suite: str = "libero_object"
    tasks: str = "0"  # tasks to demonstrate, train and evaluate on
    episodes_per_task: int = 16  # demonstrations per task (from init state eval_trials on)
    image_size: int = 128  # recorded frames, and the evaluation's render size
    policy: str = "cnn"  # the student preset (policies registry)
    steps: int = 600  # training steps per run
    batch_size: int = 32
    lr: float = 1e-3
    eval_trials: int = 10  # evaluation episodes per task and policy (init states 0..eval_trials-1)
    eval_max_steps: int = 0  # 0: the protocol's limit for the suite (LIBERO-Object 280)
    replan_steps: int = 0  # 0: execute each chunk whole (the OFT protocol)
    antialias: bool = False  # MuJoCo's multisampled renders (LIBERO's default) for the demonstrations and evaluation;
    #                          off renders ~1.7x faster on 2 CPU cores: both see the same images either way
    probe_samples: int = 256  # frames per probe split
    val_episodes: int = 2  # held out of training, used to score the probe
    workers: int = 2  # simulator processes (collection, evaluation)
    seed: int = 7
    out: str = "outputs/quickstart"

    def __post_init__(self) -> None:
        for name in ("episodes_per_task", "steps", "batch_size", "eval_trials", "probe_samples", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"quickstart {name}: expected >= 1, found {getattr(self, name)}")
        for name in ("eval_max_steps", "replan_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"quickstart {name}: expected >= 0, found {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"quickstart lr: expected a positive number, found {self.lr}")
        if self.eval_trials > 50:
            raise ValueError(f"quickstart eval_trials {self.eval_trials}: LIBERO tasks have 50 init states")


class Stages:
    """Prints one line per stage with its time; collects the timings."""

    def __init__(self, total: int, echo: Any = print) -> None:
        self.total, self.echo, self.times, self.i = total, echo, {}, 0

    def run(self, name: str, what: str, fn: Any) -> Any:
        self.i += 1
        self.echo(f"\n[{self.i}/{self.total}] {what}")
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = round(time.perf_counter() - t0, 1)
        self.echo(f"      {name}: {self.times[name]:.0f} s")
        return result


def demonstrations(cfg: QuickstartConfig, progress: bool) -> tuple[str, bool]:
    """The dataset folder, collected unless a complete one with the same settings exists."""
    from spatial_forcing.envs.collect import collect_libero

    folder = Path(cfg.out) / "data" / (f"{cfg.suite}_t{cfg.tasks.replace(',', '-')}_e{cfg.episodes_per_task}"
                                       f"_from{cfg.eval_trials}_{cfg.image_size}px{'' if cfg.antialias else '_noaa'}")
    if (folder / "meta" / "info.json").is_file():
        return str(folder), True
    collect_libero(cfg.suite, cfg.tasks, cfg.episodes_per_task, folder, image_size=cfg.image_size, depth=True,
                   seed=cfg.seed, progress=progress, jobs=cfg.workers, first_init_state=cfg.eval_trials,
                   antialias=cfg.antialias)
    return str(folder), False


def train_config(cfg: QuickstartConfig, dataset: str, name: str, sf: bool) -> Any:
    from spatial_forcing.policies.registry import training_fields
    from spatial_forcing.train.config import TrainConfig

    return TrainConfig.preset("quickstart", **training_fields(cfg.policy), policy=cfg.policy, dataset=dataset,
                              output_dir=str(Path(cfg.out) / "runs" / name), sf=sf, max_steps=cfg.steps,
                              batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, val_episodes=cfg.val_episodes,
                              val_every=max(1, cfg.steps // 2), save_every=cfg.steps,
                              warmup_steps=min(50, cfg.steps // 10), log_every=max(1, cfg.steps // 100))


def train(cfg: Any, progress: bool, frames: Any = None) -> dict[str, Any]:
    """Train (a finished run with the same configuration is reused; a run this quickstart left unfinished, or
    one made with other settings, is replaced). Returns the checkpoint and the decoded frames (shared)."""
    from spatial_forcing.train.checkpoint import latest_checkpoint
    from spatial_forcing.train.config import TrainConfig
    from spatial_forcing.train.loop import Trainer

    last = latest_checkpoint(cfg.output_dir)
    if last is not None and TrainConfig.load(last / "train_config.json").to_dict() == cfg.to_dict() \
            and (last / "policy").is_dir() and int(last.name.split("-")[1]) == cfg.max_steps:
        return {"checkpoint": str(last), "reused": True, "frames": frames}
    trainer = Trainer(cfg, progress=progress, overwrite=True, frames=frames)  # the quickstart's own run folder
    summary = trainer.fit()
    return {"checkpoint": summary["checkpoint"], "reused": False, "seconds": round(summary["seconds"], 1),
            "samples_per_s": round(summary["last"].get("samples_per_s", 0.0), 1),
            "validation": summary["validation"], "frames": getattr(trainer, "frames", None)}


def history(output_dir: str) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> {step: metrics} (the later line wins)."""
    out: dict[int, dict[str, float]] = {}
    path = Path(output_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        entry = json.loads(line)
        out.setdefault(int(entry["step"]), {}).update(entry)
    return out


def evaluate(cfg: QuickstartConfig, checkpoint: str, name: str, progress: bool, workers: int | None = None
             ) -> dict[str, Any]:
    from spatial_forcing.eval.policies import PolicyRef
    from spatial_forcing.eval.runner import evaluate_libero

    out = Path(cfg.out) / "eval" / name
    shutil.rmtree(out, ignore_errors=True)  # the quickstart's own folder; a fresh policy: nothing to resume
    return evaluate_libero(PolicyRef.parse(str(Path(checkpoint) / "policy"), device="cpu"), cfg.suite, tasks=cfg.tasks,
                           trials_per_task=cfg.eval_trials, seed=cfg.seed, workers=workers or cfg.workers, output=out,
                           videos="first:1", max_steps=cfg.eval_max_steps or None,
                           replan_steps=cfg.replan_steps or None, env_image_size=cfg.image_size,
                           antialias=cfg.antialias, progress=progress)


def evaluate_both(cfg: QuickstartConfig, trained: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Both policies at once, one simulator process each (with 2+ workers): every process runs its task's
    episodes in order in one env, so none replays another's resets (LIBERO's layout history)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from spatial_forcing.study import _worker_init

    if cfg.workers < 2:
        return {name: evaluate(cfg, trained[name]["checkpoint"], name, progress) for name, _ in RUNS}
    threads = max(1, (os.cpu_count() or 2) // 2)
    total = cfg.eval_trials * len(cfg.tasks.split(",")) * len(RUNS)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval sf + baseline", unit="ep", dynamic_ncols=True)
    with ProcessPoolExecutor(len(RUNS), mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = {name: pool.submit(evaluate, cfg, trained[name]["checkpoint"], name, False, 1) for name, _ in RUNS}
        while not all(f.done() for f in futures.values()):
            time.sleep(1.0)
            if bar is not None:
                done = sum(_lines(Path(cfg.out) / "eval" / name / "episodes.jsonl") for name, _ in RUNS)
                bar.update(done - bar.n)
        results = {name: f.result() for name, f in futures.items()}
    if bar is not None:
        bar.update(total - bar.n)
        bar.close()
    return results


def _lines(path: Path) -> int:
    try:
        return sum(1 for _ in open(path))
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------- report
def _plots(folder: Path, curves: dict[str, dict[int, dict[str, float]]], probe: dict[str, Any],
           success: dict[str, dict[str, Any]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spatial_forcing.analysis.probe import plot_probe

    files = {}
    for key, title in (("action_loss", "action loss (L1, normalised)"), ("align_loss", "align loss (1 - cos)")):
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        for name, steps in curves.items():
            xs = [s for s in sorted(steps) if key in steps[s]]
            if xs:
                ax.plot(xs, [steps[s][key] for s in xs], label=name)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        files[key] = f"{key}.png"
        fig.savefig(folder / files[key])
        plt.close(fig)
    plot_probe(probe, str(folder / "probe.png"))
    files["probe"] = "probe.png"
    fig, ax = plt.subplots(figsize=(4, 3.2), dpi=120)
    names = list(success)
    rates = [100 * (success[n]["summary"]["success_rate"] or 0.0) for n in names]
    lows = [100 * success[n]["summary"]["ci95"][0] for n in names]
    highs = [100 * success[n]["summary"]["ci95"][1] for n in names]
    ax.bar(names, rates, yerr=[[r - lo for r, lo in zip(rates, lows)], [hi - r for r, hi in zip(rates, highs)]],
           capsize=6, color=["tab:blue", "tab:orange"][:len(names)])
    ax.set_ylim(0, 100)
    ax.set_ylabel("success rate (%), 95 % CI")
    ax.set_title("LIBERO evaluation")
    fig.tight_layout()
    files["success"] = "success.png"
    fig.savefig(folder / files["success"])
    plt.close(fig)
    return files


def write_report(cfg: QuickstartConfig, summary: dict[str, Any], curves: dict[str, Any], probe: dict[str, Any],
                 success: dict[str, dict[str, Any]]) -> Path:
    folder = Path(cfg.out)
    plots = _plots(folder, curves, probe, success)
    videos = {}
    for name, res in success.items():
        shots = [v for task in res["tasks"] for v in task["videos"]]
        if shots:
            target = folder / f"rollout_{name}.mp4"
            shutil.copyfile(Path(res["output"]) / shots[0], target)
            videos[name] = target.name
    lines = ["# Spatial Forcing quickstart", "",
             f"Suite `{cfg.suite}`, tasks {cfg.tasks}: {summary['data']['episodes']} scripted demonstrations with metric "
             f"depth (from init state {cfg.eval_trials} on); the student `{cfg.policy}` trained {cfg.steps} steps "
             f"(batch {cfg.batch_size}, seed {cfg.seed}) twice, with Spatial Forcing ({summary['teacher']} teacher, layer "
             f"{summary['aligned_layer']}) and without; both evaluated on init states 0-{cfg.eval_trials - 1}, which "
             "no demonstration shows.", "", f"**{summary['finding']}**", "",
             "| | with SF | without SF |", "|---|---|---|"]
    r = summary["runs"]
    for label, key, fmt in (("final action loss", "final_action_loss", "{:.4f}"),
                            ("held-out L1 (current action)", "val_l1_current", "{:.4f}"),
                            ("depth probe R² (best layer)", "probe_r2_best", "{:.3f}"),
                            ("depth probe R² (aligned layer)", "probe_r2_aligned", "{:.3f}"),
                            ("success rate", "success_rate", "{:.0%}")):
        cells = [fmt.format(r[n][key]) if r[n].get(key) is not None else "n/a" for n in ("sf", "baseline")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Depth probe: {summary['probe_note']}", "",
              f"![action loss]({plots['action_loss']}) ![align loss]({plots['align_loss']})", "",
              f"![depth probe]({plots['probe']}) ![success]({plots['success']})", ""]
    for name, video in videos.items():
        lines.append(f"- rollout, {name}: [{video}]({video})")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items())
    lines += ["", f"Timings: {timings}.", "",
              "Details: `eval/<run>/results.md` (evaluation protocol and per-episode results), `probe.json`, "
              "`runs/<run>/metrics.jsonl` and `runs/<run>/tensorboard` (training)."]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# -------------------------------------------------------------------------------------------- run
def run_quickstart(cfg: QuickstartConfig, progress: bool = True, echo: Any = print) -> dict[str, Any]:
    from spatial_forcing.analysis.probe import run_probe
    from spatial_forcing.data.lerobot import LeRobotEpisodeSource
    from spatial_forcing.policies.registry import load_policy

    t0 = time.perf_counter()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    stages = Stages(5, echo)
    dataset, cached = stages.run("collect", f"demonstrations: {cfg.episodes_per_task} per task of {cfg.suite} "
                                 f"task(s) {cfg.tasks} (scripted experts)", lambda: demonstrations(cfg, progress))
    if cached:
        echo(f"      using the cached dataset {dataset}")
    episodes = LeRobotEpisodeSource(dataset).num_episodes
    if episodes <= cfg.val_episodes:
        raise ValueError(f"quickstart: {episodes} episodes leave none for training after {cfg.val_episodes} held out")
    configs = {name: train_config(cfg, dataset, name, sf) for name, sf in RUNS}
    def train_both() -> dict[str, Any]:
        out, frames = {}, None
        for name, c in configs.items():  # the second run reuses the first one's decoded frames
            out[name] = train(c, progress, frames)
            frames = out[name].pop("frames")
        return out

    trained = stages.run("train", f"training the compact student twice, {cfg.steps} steps each (with SF, then without)",
                         train_both)
    success = stages.run("eval", f"evaluating both policies in LIBERO ({cfg.eval_trials} episode(s) per task each)",
                         lambda: evaluate_both(cfg, trained, progress))
    layer = configs["sf"].align.student_layer
    policies = {name: load_policy(Path(trained[name]["checkpoint"]) / "policy") for name, _ in RUNS}
    probe = stages.run("probe", "depth probe of both students' visual tokens, every layer",
                       lambda: run_probe(policies, dataset, val_episodes=cfg.val_episodes,
                                         max_samples=cfg.probe_samples, progress=progress))
    (Path(cfg.out) / "probe.json").write_text(json.dumps(probe, indent=2) + "\n")
    curves = {name: history(configs[name].output_dir) for name, _ in RUNS}
    runs = {}
    for name, _ in RUNS:
        scores = probe["policies"][name]
        last = curves[name][max(curves[name])] if curves[name] else {}
        runs[name] = {"checkpoint": trained[name]["checkpoint"], "reused": trained[name]["reused"],
                      "final_action_loss": last.get("action_loss"), "final_align_loss": last.get("align_loss"),
                      "val_l1_current": last.get("val_l1_current"),
                      "probe_r2": {str(k): v["r2"] for k, v in scores.items()},
                      "probe_r2_best": max(v["r2"] for v in scores.values()),
                      "probe_r2_aligned": scores[layer]["r2"],
                      "success_rate": success[name]["summary"]["success_rate"],
                      "success_ci95": success[name]["summary"]["ci95"], "eval": success[name]["output"]}
    difference = paired_success_difference(success)
    summary = {"config": asdict(cfg), "data": {"folder": dataset, "episodes": episodes, "cached": cached},
               "aligned_layer": layer, "teacher": configs["sf"].teacher, "runs": runs, "difference": difference,
               "finding": finding(runs, difference, cfg), "probe_note": PROBE_NOTE, "seconds": stages.times}
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    report = stages.run("report", "writing the report", lambda: write_report(cfg, summary, curves, probe, success))
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    summary["report"] = str(report)
    (Path(cfg.out) / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


PROBE_NOTE = ("The depth probe's target is per-patch depth, and the geometry teacher's aligned target is per-patch 3-D "
              "geometry: a probe that finds depth at the aligned layer only confirms that the SF loss was minimised. "
              "It is not independent evidence; task success is. (With the VGGT teacher, on a GPU, the probe is "
              "independent.)")


def paired_success_difference(success: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """SF - baseline over the same episodes (same init states), with a paired bootstrap interval."""
    from spatial_forcing.analysis.effects import paired_difference

    outcomes = {}
    for name, res in success.items():
        path = Path(res["output"]) / "episodes.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        outcomes[name] = {(r["task"], r["episode"]): bool(r["success"]) for r in records}
    keys = sorted(set(outcomes["sf"]) & set(outcomes["baseline"]))
    if not keys:
        return None
    return paired_difference([[outcomes["sf"][k] for k in keys]], [[outcomes["baseline"][k] for k in keys]])


def finding(runs: dict[str, Any], difference: dict[str, Any] | None, cfg: QuickstartConfig) -> str:
    """The result in one or two plain sentences: success first, with intervals; an absent effect said plainly."""
    sf, base = runs["sf"], runs["baseline"]
    pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
    text = (f"Success on {cfg.eval_trials} unseen episode(s) per task: SF {pct(sf['success_rate'])} "
            f"[{pct(sf['success_ci95'][0])}, {pct(sf['success_ci95'][1])}], baseline {pct(base['success_rate'])} "
            f"[{pct(base['success_ci95'][0])}, {pct(base['success_ci95'][1])}] (95 % Wilson).")
    if difference is not None:
        lo, hi = difference["ci95"]
        text += f" Difference {100 * difference['difference']:+.0f} points, paired bootstrap 95 % CI [{100 * lo:+.0f}, {100 * hi:+.0f}]"
        text += (": SF is better at this scale." if lo > 0 else ": SF is worse at this scale." if hi < 0 else
                 ": not significant at this sample size (one seed); `sf study` measures it over seeds and data.")
    return text


def format_summary(s: dict[str, Any]) -> str:
    r = s["runs"]
    rows = [f"{'':<28} {'with SF':>10} {'without SF':>11}"]
    for label, key, fmt in (("final action loss", "final_action_loss", "{:.4f}"),
                            (f"probe R2, layer {s['aligned_layer']}", "probe_r2_aligned", "{:.3f}"),
                            ("probe R2, best layer", "probe_r2_best", "{:.3f}"),
                            ("success rate", "success_rate", "{:.0%}")):
        a, b = (fmt.format(r[n][key]) if r[n].get(key) is not None else "n/a" for n in ("sf", "baseline"))
        rows.append(f"{label:<28} {a:>10} {b:>11}")
    rows += [s["finding"], f"total {s['seconds']['total'] / 60:.1f} min; report: {s['report']}"]
    return "\n".join(rows)
