"""The inference worker: one thread owns the policy; requests wait in a queue (SERVING.md 4.10, 4.12).

    engine = InferenceEngine(policy, max_batch=8)
    engine.start()
    result = await engine.submit(observation)      # Result(actions [K, A] float64, infer_ms, batch)
    engine.stop()

Inference never runs on the event loop, so pings, `/healthz` and decoding keep going while the model
works. With `max_batch > 1` the worker takes every request already waiting (up to `max_batch`, after
waiting at most `batch_wait_s` for more) and runs them as one forward pass; at low load a request runs
alone and pays nothing. A batch that fails is re-run one request at a time, so one bad request only
fails itself. A request whose caller gave up (timeout, disconnect) before its turn is skipped. Actions
that are not finite are an error, never an answer (4.4).

Batching uses `policy.predict_action_chunks(observations)` when the policy has it, else the OFT pieces
(`processor(list)`, `model.predict_normalized`, `processor.unnormalize_actions`); other policies run
one request at a time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger("spatial_forcing.serve")


class PolicyError(RuntimeError):
    """The policy failed on a request (or produced unusable actions); logged with its traceback."""


@dataclass
class Result:
    actions: np.ndarray  # [K, A] float64, robot units
    infer_ms: float  # forward time of the pass this request ran in
    batch: int  # requests in that pass


@dataclass
class _Job:
    observation: dict
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def predict_batch(policy: Any, observations: list[dict]) -> list[np.ndarray]:
    """Action chunks for several observations in one forward pass where the policy allows it."""
    if len(observations) == 1:
        return [policy.predict_action_chunk(observations[0])]
    if hasattr(policy, "predict_action_chunks"):
        return list(policy.predict_action_chunks(observations))
    processor, model = getattr(policy, "processor", None), getattr(policy, "model", None)
    if processor is None or not hasattr(model, "predict_normalized") or not hasattr(policy, "dataset_stats"):
        return [policy.predict_action_chunk(o) for o in observations]
    stats = policy.dataset_stats()
    batch = processor(observations, stats=stats)
    param = next(model.parameters())
    batch = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
    with torch.no_grad():
        actions = model.predict_normalized(batch)
    return [processor.unnormalize_actions(a, stats) for a in actions]


class InferenceEngine:
    def __init__(self, policy: Any, max_batch: int = 1, batch_wait_s: float = 0.0,
                 expected_shape: tuple[int, int] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, found {max_batch}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, found {batch_wait_s}")
        self.policy = policy
        self.max_batch = int(max_batch)
        self.batch_wait_s = float(batch_wait_s)
        self.expected_shape = expected_shape
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.served = 0
        self.failed = 0
        self.passes = 0
        self.largest_batch = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "InferenceEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sf-serve-inference", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def warmup(self, observation: dict) -> float:
        """Run one observation synchronously (before serving), returning its time in ms."""
        t0 = time.perf_counter()
        self._predict([observation])
        return (time.perf_counter() - t0) * 1e3

    # ------------------------------------------------------------------ requests
    async def submit(self, observation: dict) -> Result:
        """Queue one observation and wait for its actions. Cancelling the wait drops the request if it has
        not started; a request that already runs finishes and its result is discarded."""
        if not self.alive:
            raise PolicyError("the inference worker is not running")
        loop = asyncio.get_running_loop()
        job = _Job(observation, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    # ------------------------------------------------------------------ worker
    def _take_batch(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, stop = [first], False
        deadline = time.perf_counter() + self.batch_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._take_batch(first) if self.max_batch > 1 else ([first], False)
            jobs = [j for j in jobs if not j.future.done()]  # the caller gave up while it waited
            if jobs:
                self._serve(jobs)
            if stop:
                return

    def _serve(self, jobs: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            outputs: list[Any] = self._predict([j.observation for j in jobs])
        except Exception as exc:
            if len(jobs) > 1:  # find the request that failed: run each alone
                for job in jobs:
                    self._serve([job])
                return
            log.exception("the policy failed on a request")
            error = PolicyError(f"the policy failed on this request: {type(exc).__name__}: {str(exc)[:300]}")
            error.__cause__ = exc
            outputs = [error]
        ms = (time.perf_counter() - t0) * 1e3
        self.passes += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        for job, out in zip(jobs, outputs):
            if not isinstance(out, Exception):
                out = self._check(out)
            self.failed += isinstance(out, Exception)
            self.served += not isinstance(out, Exception)
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, out if isinstance(out, Exception)
                                              else Result(out, ms, len(jobs)))
            except RuntimeError:  # the caller's event loop is gone (server stopped)
                pass

    def _predict(self, observations: list[dict]) -> list[np.ndarray]:
        return predict_batch(self.policy, observations)

    def _check(self, actions: Any) -> np.ndarray | Exception:
        actions = np.asarray(actions, dtype=np.float64)
        if self.expected_shape is not None and actions.shape != self.expected_shape:
            return PolicyError(f"the policy returned actions of shape {actions.shape}, expected {self.expected_shape}")
        if not np.isfinite(actions).all():
            log.error("the policy produced non-finite actions; the request gets an error")
            return PolicyError("the policy produced non-finite actions")
        return actions


def _settle(future: asyncio.Future, value: Any) -> None:
    if future.done():  # cancelled: timeout or disconnect
        return
    if isinstance(value, Exception):
        future.set_exception(value)
    else:
        future.set_result(value)
