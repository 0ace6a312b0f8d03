"""The `sf` command end to end on real files: teacher-features, init-vggt, demo, bad input."""

import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from spatial_forcing.cli import main
from spatial_forcing.teachers.io import load_grid


def write_png(path, size=(64, 48), colour=(200, 30, 30), alpha=False):
    mode = "RGBA" if alpha else "RGB"
    arr = np.zeros((size[1], size[0], len(mode)), dtype=np.uint8)
    arr[...] = colour + ((0,) if alpha else ())
    Image.fromarray(arr, mode).save(path)
    return path


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "spatial_forcing.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("teacher-features", "init-vggt", "demo"):
        assert command in out


def test_vggt_teacher_features_from_a_tiny_upstream_checkpoint(tmp_path, capsys):
    assert main(["init-vggt", "--preset", "tiny", "--out", str(tmp_path / "model.pt")]) == 0
    a = write_png(tmp_path / "a.png", (224, 224))
    b = write_png(tmp_path / "b.png", (224, 224), (10, 200, 10))
    out = tmp_path / "feats.safetensors"
    code = main(["teacher-features", "--teacher", "vggt", "--weights", str(tmp_path / "model.pt"),
                 "--images", str(a), str(b), "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    assert "(1, 2, 37, 37, 64)" in text and "2738/2738 patches valid" in text
    grid = load_grid(out)
    assert grid.feats.shape == (1, 2, 37, 37, 64) and grid.valid.all()
    # The saved features are those of the loaded model on the same pixels.
    from spatial_forcing.teachers.vggt import VGGTTeacher
    from spatial_forcing.teachers.io import load_images
    again = VGGTTeacher.from_pretrained(tmp_path / "model.pt").features(load_images([a, b]))
    assert torch.equal(again.feats, grid.feats)


def test_pad_mode_on_a_wide_image_marks_padding_invalid(tmp_path, capsys):
    main(["init-vggt", "--out", str(tmp_path / "ckpt")])  # folder: model.safetensors + config.json
    img = write_png(tmp_path / "wide.png", (640, 480))
    assert main(["teacher-features", "--weights", str(tmp_path / "ckpt"), "--images", str(img),
                 "--resize-mode", "pad", "--out", str(tmp_path / "f.safetensors")]) == 0
    grid = load_grid(tmp_path / "f.safetensors")
    # 480x640 -> 392x518, padded by 63 rows on top: token rows 5..31 are fully real.
    assert grid.valid[0, 0].all(dim=1).nonzero().flatten().tolist() == list(range(5, 32))


def test_geometry_teacher_features_from_depth_files(tmp_path):
    img = write_png(tmp_path / "a.png", (56, 42))
    np.save(tmp_path / "d.npy", np.full((42, 56), 2.0, dtype=np.float32))
    (tmp_path / "k.json").write_text(json.dumps([[50.0, 0, 28.0], [0, 50.0, 21.0], [0, 0, 1]]))
    assert main(["teacher-features", "--teacher", "geometry", "--images", str(img), "--depth", str(tmp_path / "d.npy"),
                 "--intrinsics", str(tmp_path / "k.json"), "--out", str(tmp_path / "g.safetensors")]) == 0
    grid = load_grid(tmp_path / "g.safetensors")
    assert grid.feats.shape == (1, 1, 3, 4, 51) and grid.valid.all()


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    a = write_png(tmp_path / "a.png", (64, 48))
    b = write_png(tmp_path / "b.png", (32, 32))
    torch.save([1, 2], tmp_path / "notsd.pt")
    assert main(["teacher-features", "--weights", str(tmp_path / "notsd.pt"), "--images", str(a)]) == 2
    assert "expected a state dict" in capsys.readouterr().err
    main(["init-vggt", "--out", str(tmp_path / "m.pt")])
    assert main(["teacher-features", "--weights", str(tmp_path / "m.pt"), "--images", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "all views must share one size" in err and "a.png is 64x48" in err
    assert main(["teacher-features", "--weights", str(tmp_path / "m.pt"), "--images", str(tmp_path / "nope.png")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["teacher-features", "--images", str(a)]) == 2
    assert "needs weights" in capsys.readouterr().err
    assert main(["teacher-features", "--teacher", "geometry", "--images", str(a)]) == 2
    assert "--depth" in capsys.readouterr().err


def test_rgba_is_composited_on_white(tmp_path):
    from spatial_forcing.teachers.io import load_images
    x = load_images([write_png(tmp_path / "t.png", (8, 8), (0, 0, 0), alpha=True)])
    assert x.shape == (1, 1, 3, 8, 8) and torch.all(x == 1.0)


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--steps", "30", "--scenes", "48", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["steps"] == 30
    assert summary["align_loss_last_10"] < summary["align_loss_first_10"]
    assert -1.0 < summary["depth_probe_r2_before"] < 1.0 and -1.0 < summary["depth_probe_r2_after"] < 1.0
    assert "depth probe R^2" in capsys.readouterr().out


def test_convert_oft_upstream_folder(tmp_path, capsys):
    from oft_upstream import write_upstream_checkpoint

    from spatial_forcing.policies.oft.policy import OFTPolicy

    write_upstream_checkpoint(tmp_path / "up")
    assert main(["convert", "oft", "--src", str(tmp_path / "up"), "--dst", str(tmp_path / "ours"),
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "dropped 44 unused" in out and "libero_spatial_no_noops" in out
    report = json.loads((tmp_path / "ours" / "conversion_report.json").read_text())
    assert "language_model.lm_head.weight" in report["dropped"]
    assert report["mapped"]["vision_backbone.featurizer.blocks.0.attn.qkv.weight"] == [
        "vision_backbone.featurizer.encoder.layer.0.attention.q_proj.weight",
        "vision_backbone.featurizer.encoder.layer.0.attention.k_proj.weight",
        "vision_backbone.featurizer.encoder.layer.0.attention.v_proj.weight"]
    converted, original = OFTPolicy.from_pretrained(tmp_path / "ours"), OFTPolicy.from_pretrained(tmp_path / "up")
    obs = {"images": [np.full((64, 64, 3), 90, np.uint8), np.full((64, 64, 3), 30, np.uint8)],
           "state": np.zeros(8), "instruction": "open the drawer"}
    assert np.array_equal(converted.predict_action_chunk(obs), original.predict_action_chunk(obs))
    # Converting our own format again is refused; a missing folder names itself.
    assert main(["convert", "oft", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "again")]) == 2
    assert "already in this project's format" in capsys.readouterr().err
    assert main(["convert", "oft", "--src", str(tmp_path / "absent"), "--dst", str(tmp_path / "x")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
