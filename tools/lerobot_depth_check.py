"""Check LeRobot's depth video both ways against LeRobot itself (issue 21). LeRobot is no dependency of the
project (it needs Python >= 3.12, numpy 2, torch < 2.12), so this runs it in a throwaway environment:

    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lrvenv
    /tmp/lrvenv/bin/pip install "lerobot[dataset]==0.6.1"
    .venv/bin/python tools/lerobot_depth_check.py --lerobot-python /tmp/lrvenv/bin/python

1. Our writer records an RGB-D dataset (two cameras, float metres, `canonical_features` defaults);
   LeRobot's `LeRobotDataset(depth_output_unit="m")` opens it and its depth must equal our reader's.
2. LeRobot records an RGB-D dataset the way its robots do (`observation.images.front_depth`, uint16
   millimetres, its default depth encoder); our reader must return what LeRobot returns.

Last run (LeRobot 0.6.1, PyAV 15.1 in its environment, PyAV 18.1 in ours, torch 2.11 / 2.13): both equal
bit for bit; the round trips within half a quantisation step. LeRobot decodes with its PyAV backend when
torchcodec finds no FFmpeg libraries (it prints a long warning; harmless).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LEROBOT_SIDE = r'''
import sys, numpy as np
from pathlib import Path
from lerobot.datasets.lerobot_dataset import LeRobotDataset
ours, theirs = Path(sys.argv[1]), Path(sys.argv[2])
ds = LeRobotDataset("local/ours", root=ours, depth_output_unit="m")
assert ds.meta.depth_keys == ["observation.images.agentview_depth", "observation.images.wrist_depth"], ds.meta.depth_keys
for cam in ("agentview", "wrist"):
    np.save(ours / f"lerobot_{cam}.npy", np.stack([ds[i][f"observation.images.{cam}_depth"].numpy()[0] for i in range(len(ds))]))
H, W = 48, 64
features = {"observation.images.front": {"dtype": "video", "shape": (H, W, 3), "names": ["height", "width", "channels"]},
            "observation.images.front_depth": {"dtype": "video", "shape": (H, W, 1), "names": ["height", "width", "channels"],
                                               "info": {"is_depth_map": True}},
            "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
            "action": {"dtype": "float32", "shape": (6,), "names": None}}
out = LeRobotDataset.create(repo_id="local/theirs", fps=10, features=features, root=theirs, use_videos=True)
yy, xx = np.mgrid[0:H, 0:W]
source = []
for e, n in enumerate((5, 7)):
    for t in range(n):
        mm = (600 + 35 * yy + 4 * xx + 30 * t + 200 * e).astype(np.uint16)
        mm[10:26, 20 + t:40 + t] = 450 + 10 * t
        mm[0, 0] = 0
        out.add_frame({"observation.images.front": np.stack([xx * 4, yy * 5, np.full_like(xx, 60)], -1).astype(np.uint8),
                       "observation.images.front_depth": mm[..., None], "observation.state": np.zeros(6, np.float32),
                       "action": np.zeros(6, np.float32), "task": f"task {e}"})
        source.append(mm)
    out.save_episode()
out.finalize()
back = LeRobotDataset("local/theirs", root=theirs, depth_output_unit="m")
np.save(theirs / "lerobot_read.npy", np.stack([back[i]["observation.images.front_depth"].numpy()[0] for i in range(len(back))]))
np.save(theirs / "source_mm.npy", np.stack(source))
'''


def main() -> int:
    from spatial_forcing.data.lerobot import LeRobotEpisodeSource, LeRobotWriter, canonical_features
    from spatial_forcing.data.lerobot.depth import DepthQuantizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lerobot-python", required=True, help="a Python with lerobot[dataset]==0.6.1 installed")
    args = p.parse_args()
    q, ok = DepthQuantizer(), True
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "ours", Path(tmp) / "theirs"
        rng, yy, xx = np.random.default_rng(0), *np.mgrid[0:48, 0:64]
        src = {c: [] for c in ("agentview", "wrist")}
        feats = canonical_features({c: (48, 64) for c in src}, 8, 7, depth=True)
        with LeRobotWriter(ours, 10, feats, robot_type="panda", camera_keys=list(src)) as w:
            for e, n in enumerate((5, 7)):
                for t in range(n):
                    frame = {"observation.state": rng.standard_normal(8).astype(np.float32),
                             "action": rng.standard_normal(7).astype(np.float32)}
                    for i, c in enumerate(src):
                        frame[f"observation.images.{c}"] = np.stack([xx * 4, yy * 5, np.full_like(xx, 9 * t)], -1).astype(np.uint8)
                        frame[f"observation.depth.{c}"] = (0.3 + 0.02 * xx + 0.01 * yy + 0.05 * t + i).astype(np.float32)
                        src[c].append(frame[f"observation.depth.{c}"])
                    w.add_frame(frame)
                w.save_episode(task=f"task {e}")
        subprocess.run([args.lerobot_python, "-c", LEROBOT_SIDE, str(ours), str(theirs)], check=True)
        reader = LeRobotEpisodeSource(ours)
        for c in src:
            mine = np.stack([reader.frame(e, t, [f"observation.depth.{c}"])[f"observation.depth.{c}"]
                             for e in range(reader.num_episodes) for t in range(reader.episode_length(e))])
            lerobot = np.load(ours / f"lerobot_{c}.npy")
            same, err = np.array_equal(mine, lerobot), np.abs(lerobot - np.stack(src[c]))
            within = bool((err <= q.max_error(np.stack(src[c]))).all())
            print(f"ours -> LeRobot, {c}: equal to our reader {same}; max error {1e3 * err.max():.3f} mm, within bound {within}")
            ok &= same and within
        reader = LeRobotEpisodeSource(theirs)
        mine = np.stack([reader.frame(e, t, ["observation.depth.front"])["observation.depth.front"]
                         for e in range(reader.num_episodes) for t in range(reader.episode_length(e))])
        lerobot, source = np.load(theirs / "lerobot_read.npy"), np.load(theirs / "source_mm.npy") / 1000.0
        inside = source >= 0.01
        same, err = np.array_equal(mine, lerobot), np.abs(mine - source)[inside]
        within = bool((err <= q.max_error(source[inside])).all())
        print(f"LeRobot -> ours, front: equal to LeRobot's read {same}; max error {1e3 * err.max():.3f} mm, within "
              f"bound {within}; cameras {reader.cameras}, depth keys {[k for k in reader.features if 'depth' in k]}")
        ok &= same and within
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
