"""A minimal robot control loop against `sf serve`: no torch, no model on the robot (docs/spec/SERVING.md 1.8).

    sf serve --policy PATH --secret "$SF_SERVE_SECRET"          # on the GPU machine
    SF_SERVE_SECRET=... python examples/serve_robot_loop.py --host gpu-box --hz 10

The robot side needs numpy, msgpack, websockets and pillow. Replace `Robot` with your driver: it must
give two camera frames (uint8 HxWx3, in the order the policy was trained with), the 8-D proprio state and
the task instruction, and execute one action. The broker queries the server every `--replan-steps`
steps and plays the chunk in between; the loop keeps a fixed rate.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from spatial_forcing.serve.client import ActionChunkBroker, WebsocketClientPolicy
from spatial_forcing.serve.libero import libero_request


class Robot:
    """Stand-in hardware: synthetic frames and a state that integrates the commanded deltas."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.state = np.zeros(8)

    def observe(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frames = self.rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
        return frames[0], frames[1], self.state.copy()

    def act(self, action: np.ndarray) -> None:
        self.state[:6] += 0.01 * np.clip(action[:6], -1, 1)
        self.state[6:] = 0.04 * float(action[6] > 0.5) * np.array([1, -1])  # open / close the fingers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--instruction", default="put the bowl on the plate")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--replan-steps", type=int, help="default: the server's whole chunk")
    args = ap.parse_args()

    robot = Robot()
    policy = WebsocketClientPolicy(args.host, args.port, api_key=os.environ.get("SF_SERVE_SECRET"))
    horizon = args.replan_steps or int(policy.get_server_metadata().get("action_horizon", 5))
    broker = ActionChunkBroker(policy, action_horizon=horizon)
    period, late = 1.0 / args.hz, 0
    for step in range(args.steps):
        t0 = time.monotonic()
        image, wrist, state = robot.observe()
        out = broker.infer(libero_request(image, wrist, state, args.instruction))
        robot.act(out["actions"])
        spare = period - (time.monotonic() - t0)
        late += spare < 0
        time.sleep(max(0.0, spare))
        if step % horizon == 0:
            print(f"step {step:3d}: queried the server ({out['server_timing']['infer_ms']:.1f} ms), "
                  f"action {np.round(out['actions'], 3).tolist()}")
    policy.close()
    print(f"{args.steps} steps at {args.hz} Hz, {late} late, replanning every {horizon} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
