#!/usr/bin/env python
"""Benchmark of `sf serve`: the latency the server adds over a direct call, and requests/s under load.

The policy is the `mini` OFTPolicy (random weights, fp32, LIBERO-like statistics), saved with
`save_pretrained` and loaded with the server's own `load_policy`. The server runs in this process
(`ServerThread`: its event loop in one thread, inference in another); clients are threads too, on loopback.

One request is what openpi's LIBERO client sends: two uint8 224x224x3 frames, an 8-D float64 state and
the prompt (`observation/image`, `observation/wrist_image`, `observation/state`, `prompt`), about 300 kB
of msgpack; over HTTP the same values under OpenVLA's keys in json-numpy (base64, about 400 kB).
Observations cycle through 8 pre-drawn ones.

Latency (one client, `--requests` requests per mode, modes interleaved call by call so that noise from
other processes hits all of them alike):
- direct: `policy.predict_action_chunk(obs)` in this process (processor + forward + un-normalise);
- openpi: `WebsocketClientPolicy.infer`. The added latency of each request is its round trip minus the
  `policy_timing.infer_ms` the server measured around the same `predict_action_chunk` work, i.e. client
  encode + loopback transfer + server decode and validation + queue hand-off + response encode and decode;
- http: `HttpClientPolicy.infer` (plain json-numpy). The HTTP answer carries no timing, so its added
  latency is the median of (round trip - the direct call just before it).

Throughput: 1, 4 and 16 clients, each in a loop for `--seconds`, with `--max-batch 1` (no batching) and
`--max-batch 16` (requests waiting together share one forward pass): completed requests/s and the
per-request latency.

    PYTHONPATH=src python benchmarks/serve.py               # -> benchmarks/results/serve.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from common import device_name, git_commit, percentile, write_result  # noqa: E402
from inference import INSTRUCTION, libero_like_stats  # noqa: E402

from spatial_forcing.policies.oft.config import OFTConfig  # noqa: E402
from spatial_forcing.policies.oft.model import OFTModel  # noqa: E402
from spatial_forcing.policies.oft.policy import OFTPolicy  # noqa: E402
from spatial_forcing.policies.oft.processor import OFTProcessor, load_tokenizer  # noqa: E402
from spatial_forcing.serve.client import HttpClientPolicy, WebsocketClientPolicy  # noqa: E402
from spatial_forcing.serve.codec import json_dumps, packb  # noqa: E402
from spatial_forcing.serve.server import ServeConfig, ServerThread, load_policy  # noqa: E402

TARGET_ADDED_P50_MS = 2.0
FRAME = 224


def observations(n: int = 8) -> list[tuple[dict, dict, dict]]:
    """(policy observation, openpi request, OpenVLA request) triples with the same values."""
    rng = np.random.default_rng(0)
    stats = libero_like_stats().proprio
    out = []
    for _ in range(n):
        image, wrist = (rng.integers(0, 256, (FRAME, FRAME, 3), dtype=np.uint8) for _ in range(2))
        state = rng.uniform(np.asarray(stats.q01), np.asarray(stats.q99))
        out.append(({"images": [image, wrist], "state": state, "instruction": INSTRUCTION},
                    {"observation/image": image, "observation/wrist_image": wrist, "observation/state": state,
                     "prompt": INSTRUCTION},
                    {"full_image": image, "wrist_image": wrist, "state": state, "instruction": INSTRUCTION}))
    return out


def summary(values: list[float]) -> dict:
    return {"p50_ms": round(percentile(values, 50), 3), "p99_ms": round(percentile(values, 99), 3),
            "mean_ms": round(float(np.mean(values)), 3), "n": len(values)}


def latency(policy, server: ServerThread, obs: list, requests: int) -> dict:
    port, http_port = server.server.ws_port, server.server.http_port
    ws = WebsocketClientPolicy("127.0.0.1", port)
    http = HttpClientPolicy(f"http://127.0.0.1:{http_port}")
    direct, ws_rtt, ws_added, http_rtt, http_added = [], [], [], [], []
    for i in range(requests + 5):
        direct_obs, openpi_req, openvla_req = obs[i % len(obs)]
        t0 = time.perf_counter()
        want = policy.predict_action_chunk(direct_obs)
        t1 = time.perf_counter()
        got = ws.infer(openpi_req)
        t2 = time.perf_counter()
        got_http = http.infer(openvla_req)
        t3 = time.perf_counter()
        assert np.array_equal(got["actions"], want) and np.array_equal(got_http, want)
        if i < 5:  # warm-up
            continue
        direct.append((t1 - t0) * 1e3)
        ws_rtt.append((t2 - t1) * 1e3)
        ws_added.append(ws_rtt[-1] - got["policy_timing"]["infer_ms"])
        http_rtt.append((t3 - t2) * 1e3)
        http_added.append(http_rtt[-1] - direct[-1])
    ws.close()
    http.close()
    return {"direct": summary(direct),
            "openpi_websocket": {"round_trip": summary(ws_rtt), "added": summary(ws_added),
                                 "round_trip_minus_direct_p50_ms": round(percentile(ws_rtt, 50) - percentile(direct, 50), 3)},
            "openvla_http": {"round_trip": summary(http_rtt),
                             "added_vs_direct_call_before_it": summary(http_added)}}


def throughput(server: ServerThread, obs: list, clients: int, seconds: float) -> dict:
    port = server.server.ws_port
    stop, start = threading.Event(), threading.Barrier(clients + 1)
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            with WebsocketClientPolicy("127.0.0.1", port) as c:
                start.wait()
                i = k
                while not stop.is_set():
                    t0 = time.perf_counter()
                    c.infer(obs[i % len(obs)][1])
                    lat[k].append((time.perf_counter() - t0) * 1e3)
                    i += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    engine = server.server.engine
    passes0, served0 = engine.passes, engine.served
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    done = [x for per in lat for x in per]
    return {"clients": clients, "max_batch": server.server.config.max_batch, "seconds": round(elapsed, 2),
            "requests": len(done), "requests_per_s": round(len(done) / elapsed, 2),
            "mean_batch": round((engine.served - served0) / max(1, engine.passes - passes0), 2),
            "latency": summary(done)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="timed requests per latency mode")
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = OFTConfig.preset("mini")
    with tempfile.TemporaryDirectory() as tmp:
        OFTPolicy(OFTModel(cfg).eval(), OFTProcessor(cfg, load_tokenizer("bytes")),
                  {"libero_spatial_no_noops": libero_like_stats()}).save_pretrained(tmp)
        policy = load_policy(tmp, device="cpu")
    obs = observations()
    sizes = {"openpi_msgpack_bytes": len(packb(obs[0][1])), "openvla_json_bytes": len(json_dumps(obs[0][2]))}

    config = ServeConfig(host="127.0.0.1", port=0, http_port=0, max_batch=1)
    with ServerThread(policy, config, name="mini", warmup=True) as server:
        lat = latency(policy, server, obs, args.requests)
        runs = [throughput(server, obs, n, args.seconds) for n in args.clients]
    config = ServeConfig(host="127.0.0.1", port=0, http_port=0, max_batch=16)
    with ServerThread(policy, config, name="mini", warmup=True) as server:
        runs += [throughput(server, obs, n, args.seconds) for n in args.clients if n > 1]

    added = lat["openpi_websocket"]["added"]
    doc = {
        "benchmark": "serve", "date": _dt.date.today().isoformat(), "git_commit": git_commit(),
        "device": device_name(torch.device("cpu")), "torch": torch.__version__,
        "policy": "mini OFTPolicy, random weights, fp32, CPU (2 views + 8-D proprio, chunk 8 x 7)",
        "request": {"frames": f"2 x uint8 {FRAME}x{FRAME}x3", **sizes},
        "latency": lat, "throughput": runs,
        "target": {"added_p50_ms_max": TARGET_ADDED_P50_MS, "openpi_added_p50_ms": added["p50_ms"],
                   "openpi_added_p99_ms": added["p99_ms"], "pass": added["p50_ms"] <= TARGET_ADDED_P50_MS},
    }
    write_result(args.out, doc)
    d, w, h = lat["direct"], lat["openpi_websocket"], lat["openvla_http"]
    print(f"direct call          p50 {d['p50_ms']:.2f} ms   p99 {d['p99_ms']:.2f} ms")
    print(f"openpi websocket     round trip p50 {w['round_trip']['p50_ms']:.2f} ms; added p50 {added['p50_ms']:.2f} ms, "
          f"p99 {added['p99_ms']:.2f} ms (target p50 <= {TARGET_ADDED_P50_MS} ms: "
          f"{'pass' if doc['target']['pass'] else 'FAIL'})")
    print(f"OpenVLA HTTP         round trip p50 {h['round_trip']['p50_ms']:.2f} ms; added p50 "
          f"{h['added_vs_direct_call_before_it']['p50_ms']:.2f} ms")
    print("clients  max_batch  requests/s  mean batch  p50 ms  p99 ms")
    for r in runs:
        print(f"{r['clients']:>7}  {r['max_batch']:>9}  {r['requests_per_s']:>10.1f}  {r['mean_batch']:>10.2f}  "
              f"{r['latency']['p50_ms']:>6.1f}  {r['latency']['p99_ms']:>6.1f}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
