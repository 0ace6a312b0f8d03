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
    episodes_per_task: int = 12  # demonstrations per task
    image_size: int = 128  # recorded frames
    steps: int = 200  # training steps per run
    batch_size: int = 8
    eval_trials: int = 3  # evaluation episodes per task and policy
    eval_max_steps: int = 0  # 0: the protocol's limit for the suite (LIBERO-Object 280)
    probe_samples: int = 256  # frames per probe split
    val_episodes: int = 2  # held out of training, used to score the probe
    workers: int = 2  # simulator processes (collection, evaluation)
    seed: int = 7
    out: str = "outputs/quickstart"

    def __post_init__(self) -> None:
        for name in ("episodes_per_task", "steps", "batch_size", "eval_trials", "probe_samples", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"quickstart {name}: expected >= 1, found {getattr(self, name)}")
        if self.eval_max_steps < 0:
            raise ValueError(f"quickstart eval_max_steps: expected >= 0, found {self.eval_max_steps}")


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

    folder = Path(cfg.out) / "data" / f"{cfg.suite}_t{cfg.tasks.replace(',', '-')}_e{cfg.episodes_per_task}_{cfg.image_size}px"
    if (folder / "meta" / "info.json").is_file():
        return str(folder), True
    collect_libero(cfg.suite, cfg.tasks, cfg.episodes_per_task, folder, image_size=cfg.image_size, depth=True,
                   seed=cfg.seed, progress=progress, jobs=cfg.workers)
    return str(folder), False


def train_config(cfg: QuickstartConfig, dataset: str, name: str, sf: bool) -> Any:
    from spatial_forcing.train.config import TrainConfig

    return TrainConfig.preset("quickstart", dataset=dataset, output_dir=str(Path(cfg.out) / "runs" / name), sf=sf,
                              max_steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                              val_episodes=cfg.val_episodes, val_every=max(1, cfg.steps // 2),
                              save_every=cfg.steps, warmup_steps=min(20, cfg.steps // 10), log_every=1)


def train(cfg: Any, progress: bool) -> dict[str, Any]:
    """Train (a finished run with the same configuration is reused)."""
    from spatial_forcing.train.checkpoint import latest_checkpoint
    from spatial_forcing.train.config import TrainConfig
    from spatial_forcing.train.loop import Trainer

    last = latest_checkpoint(cfg.output_dir)
    if last is not None and TrainConfig.load(last / "train_config.json").to_dict() == cfg.to_dict() \
            and (last / "policy").is_dir() and int(last.name.split("-")[1]) == cfg.max_steps:
        return {"checkpoint": str(last), "reused": True}
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    summary = Trainer(cfg, progress=progress).fit()
    return {"checkpoint": summary["checkpoint"], "reused": False, "seconds": round(summary["seconds"], 1),
            "validation": summary["validation"]}


def history(output_dir: str) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> {step: metrics} (the later line wins)."""
    out: dict[int, dict[str, float]] = {}
    path = Path(output_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        entry = json.loads(line)
        out.setdefault(int(entry["step"]), {}).update(entry)
    return out


def evaluate(cfg: QuickstartConfig, checkpoint: str, name: str, progress: bool) -> dict[str, Any]:
    from spatial_forcing.eval.policies import PolicyRef
    from spatial_forcing.eval.runner import evaluate_libero

    out = Path(cfg.out) / "eval" / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh policy: nothing to resume
    return evaluate_libero(PolicyRef.parse(str(Path(checkpoint) / "policy"), device="cpu"), cfg.suite, tasks=cfg.tasks,
                           trials_per_task=cfg.eval_trials, seed=cfg.seed, workers=cfg.workers, output=out,
                           videos="first:1", max_steps=cfg.eval_max_steps or None, progress=progress)


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
             f"depth; the compact student (`mini`) trained {cfg.steps} steps (batch {cfg.batch_size}, seed {cfg.seed}) "
             "twice, with Spatial Forcing (geometry teacher) and without.", "",
             "| | with SF | without SF |", "|---|---|---|"]
    r = summary["runs"]
    for label, key, fmt in (("final action loss", "final_action_loss", "{:.4f}"),
                            ("held-out L1 (current action)", "val_l1_current", "{:.4f}"),
                            ("depth probe R² (best layer)", "probe_r2_best", "{:.3f}"),
                            ("depth probe R² (aligned layer)", "probe_r2_aligned", "{:.3f}"),
                            ("success rate", "success_rate", "{:.0%}")):
        cells = [fmt.format(r[n][key]) if r[n].get(key) is not None else "n/a" for n in ("sf", "baseline")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += ["", f"The aligned layer is {summary['aligned_layer']}. {summary['finding']}", "",
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
    from spatial_forcing.policies.oft.policy import OFTPolicy

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
    trained = stages.run("train", f"training the compact student twice, {cfg.steps} steps each (with SF, then without)",
                         lambda: {name: train(c, progress) for name, c in configs.items()})
    success = stages.run("eval", f"evaluating both policies in LIBERO ({cfg.eval_trials} episode(s) per task each)",
                         lambda: {name: evaluate(cfg, trained[name]["checkpoint"], name, progress) for name, _ in RUNS})
    layer = configs["sf"].align.student_layer
    policies = {name: OFTPolicy.from_pretrained(Path(trained[name]["checkpoint"]) / "policy") for name, _ in RUNS}
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
    gap = runs["sf"]["probe_r2_aligned"] - runs["baseline"]["probe_r2_aligned"]
    finding = (f"At the aligned layer the SF student's depth probe R² is {gap:+.3f} against the baseline's "
               + ("(SF above the baseline)." if gap > 0 else
                  "(SF is NOT above the baseline in this run: a finding to investigate, e.g. more steps or data)."))
    summary = {"config": asdict(cfg), "data": {"folder": dataset, "episodes": episodes, "cached": cached},
               "aligned_layer": layer, "runs": runs, "finding": finding, "seconds": stages.times}
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    report = stages.run("report", "writing the report", lambda: write_report(cfg, summary, curves, probe, success))
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    summary["report"] = str(report)
    (Path(cfg.out) / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
