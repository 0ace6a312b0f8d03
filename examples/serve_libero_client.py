"""Evaluate a served policy in LIBERO over the openpi websocket protocol (docs/spec/SERVING.md 1.9).

Start a server (any openpi-protocol server works; with `sf serve` the default observation map is
`libero`), then run this client in an environment that has LIBERO (`pip install -e ".[libero]"`):

    sf serve --policy runs/oft-sf-libero-spatial/step-30000/policy --port 8000
    python examples/serve_libero_client.py --suite libero_spatial --episodes 50

Per episode, as openpi's LIBERO example: reset to init state `i`, 10 settle steps, then every
`--replan-steps` steps send `{observation/image, observation/wrist_image, observation/state, prompt}`
(224 px, resized with pad, images already rotated like the training data) and execute the returned
chunk one action at a time through the `ActionChunkBroker`. `--action-convention oft` (default) maps the
OFT gripper (1 open / 0 close) to the env's -1 / +1; use `raw` for servers returning env actions (openpi).
The official OFT protocol (JPEG round trip, Lanczos resize) is `sf eval libero`; this loop is the
openpi-style client a robot-side program would run. Prints a success rate per task and in total, and
writes them as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spatial_forcing.data.schema import IMAGE, STATE
from spatial_forcing.envs.libero import OFT_MAX_STEPS, LiberoEnv, list_tasks
from spatial_forcing.serve.client import ActionChunkBroker, ServerError, WebsocketClientPolicy
from spatial_forcing.serve.libero import LIBERO_RESIZE, libero_request


def run_episode(env: LiberoEnv, broker: ActionChunkBroker, init_state: int, max_steps: int, resize: int | None,
                convention: str) -> bool:
    """One episode; True on success. A server error ends the episode as a failure (as openpi's client)."""
    env.reset(init_state)
    obs = env.settle()
    broker.reset()
    for _ in range(max_steps):
        request = libero_request(obs[IMAGE + "agentview"], obs[IMAGE + "wrist"], obs[STATE], env.instruction, resize)
        action = broker.infer(request)["actions"]
        obs, _, done, _ = env.step(action, convention=convention)
        if done:
            return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", help="the server's shared secret, if it has one")
    ap.add_argument("--suite", default="libero_spatial", choices=sorted(OFT_MAX_STEPS))
    ap.add_argument("--tasks", default="all", help="all, or comma-separated task indices")
    ap.add_argument("--episodes", type=int, default=50, help="episodes per task (init states 0, 1, ...)")
    ap.add_argument("--replan-steps", type=int, default=5, help="actions executed per query (openpi LIBERO: 5)")
    ap.add_argument("--resize", type=int, default=LIBERO_RESIZE, help="client-side resize with pad (0 = none)")
    ap.add_argument("--render-size", type=int, default=256, help="LIBERO camera resolution")
    ap.add_argument("--max-steps", type=int, help="policy steps per episode (default: the suite's OFT limit)")
    ap.add_argument("--action-convention", default="oft", choices=["oft", "raw"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, help="write the per-task success rates as JSON")
    args = ap.parse_args()

    tasks = list_tasks(args.suite)
    indices = range(len(tasks)) if args.tasks == "all" else [int(i) for i in args.tasks.split(",")]
    max_steps = args.max_steps or OFT_MAX_STEPS[args.suite]
    policy = WebsocketClientPolicy(args.host, args.port, api_key=args.api_key)
    print(f"server metadata: {policy.get_server_metadata()}")
    broker = ActionChunkBroker(policy, action_horizon=args.replan_steps)
    results, t0 = {}, time.perf_counter()
    for index in indices:
        with LiberoEnv(args.suite, index, image_size=args.render_size, depth=False, seed=args.seed) as env:
            successes = 0
            for episode in range(args.episodes):
                try:
                    ok = run_episode(env, broker, episode % env.num_init_states, max_steps, args.resize or None,
                                     args.action_convention)
                except ServerError as exc:
                    print(f"  episode {episode}: {exc}")
                    ok = False
                successes += ok
            results[env.task_info.name] = successes / max(1, args.episodes)
            print(f"task {index:2d} {env.task_info.name}: {successes}/{args.episodes}")
    policy.close()
    total = sum(results.values()) / max(1, len(results))
    print(f"{args.suite}: success rate {100 * total:.1f} % over {len(results)} tasks "
          f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps({"suite": args.suite, "success_rate": total, "tasks": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
