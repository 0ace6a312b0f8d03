"""Training pipeline: chunking at episode ends, normalisation, aligned crops, determinism, resume."""

import colorsys

import numpy as np
import pytest
import torch

from spatial_forcing.data.augment import AugmentConfig, crop_intrinsics, crop_resize, saturation_hue
from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig, build_index, make_loader
from spatial_forcing.normalize import normalize
from spatial_forcing.data.sampler import ResumableSampler
from spatial_forcing.data.stats import cached_statistics, compute_statistics


class MemorySource:
    """A tiny in-memory EpisodeSource: marked pixels and matching depth for geometry checks."""

    cameras = ["agentview", "wrist"]
    standardize = "test"
    action_mask = np.array([True] * 6 + [False])

    def __init__(self, lengths=(3, 10, 12), size=32, seed=0, root=None):
        rng = np.random.default_rng(seed)
        self.lengths = list(lengths)
        self.root = root
        self.size = size
        self.actions = [rng.normal(size=(n, 7)).astype(np.float32) for n in lengths]
        self.states = [rng.normal(size=(n, 8)).astype(np.float32) for n in lengths]

    @property
    def num_episodes(self):
        return len(self.lengths)

    def episode_length(self, e):
        return self.lengths[e]

    def episode_arrays(self, e):
        return {"action": self.actions[e], "observation.state": self.states[e]}

    def task(self, e):
        return f"task {e}"

    def frame(self, e, t, keys=None):
        s = self.size
        out = {}
        for cam in self.cameras:
            img = np.zeros((s, s, 3), np.uint8)
            img[10:13, 20:23] = 255  # a marked 3x3 block
            depth = np.full((s, s), 2.0, np.float32)
            depth[10:13, 20:23] = 0.5
            out["observation.images." + cam] = img
            out["observation.depth." + cam] = depth
            out["observation.intrinsics." + cam] = np.array([[30.0, 0, 15.5], [0, 30.0, 15.5], [0, 0, 1]], np.float32)
        return {k: v for k, v in out.items() if keys is None or k in keys}


def test_index_at_episode_ends():
    assert build_index([3, 10], 8, "drop_last").tolist() == [[1, 0], [1, 1], [1, 2]]
    rep = build_index([3, 10], 8, "repeat_last")
    assert len(rep) == 13 and rep[:3].tolist() == [[0, 0], [0, 1], [0, 2]]
    with pytest.raises(ValueError, match="shorter than chunk_len"):
        build_index([3, 4], 8, "drop_last")


def test_chunks_normalisation_and_padding():
    src = MemorySource()
    stats = compute_statistics(src)
    ds = ChunkedDataset(src, stats, PipelineConfig(chunk_len=8, chunk_mode="repeat_last", augment=False, image_size=32))
    i = next(k for k, (e, t) in enumerate(ds.index.tolist()) if (e, t) == (1, 6))
    s = ds[i]
    expected = normalize(src.actions[1], stats.action, "bounds_q99")
    assert torch.allclose(s["action"][:4], torch.from_numpy(np.asarray(expected[6:10], np.float32)))
    assert torch.equal(s["action"][4:], torch.from_numpy(np.asarray(expected[9], np.float32)).expand(4, 7))
    assert s["action_is_pad"].tolist() == [False] * 4 + [True] * 4
    assert torch.equal(s["action"][:, 6], torch.from_numpy(src.actions[1][[6, 7, 8, 9, 9, 9, 9, 9], 6]))  # gripper unnormalised
    assert s["task"] == "task 1" and s["observation.images.wrist"].shape == (3, 32, 32)


def test_statistics_equal_numpy_and_are_cached(tmp_path):
    src = MemorySource(root=tmp_path)
    stats = cached_statistics(src)
    all_actions = np.concatenate(src.actions).astype(np.float64)
    assert np.allclose(stats.action.q01, np.quantile(all_actions, 0.01, axis=0))
    assert np.allclose(stats.action.q99, np.quantile(all_actions, 0.99, axis=0))
    assert np.allclose(stats.action.std, all_actions.std(0)) and stats.num_transitions == 25
    assert stats.action.mask.tolist() == [True] * 6 + [False]
    assert (tmp_path / "sf_statistics.json").is_file()
    assert cached_statistics(src).action.q99.tolist() == stats.action.q99.tolist()  # read back from the cache
    src.actions[0][:] = 100.0  # same lengths, other values: the cache does not apply (issue 20)
    assert np.allclose(cached_statistics(src).action.q99[:6], 100.0)
    longer = MemorySource(lengths=(3, 10, 13), root=tmp_path)  # another dataset: recomputed
    assert cached_statistics(longer).num_transitions == 26


def test_crop_keeps_image_depth_and_intrinsics_aligned():
    src = MemorySource(lengths=(10,))
    cfg = PipelineConfig(chunk_len=1, augment=True, image_size=32, depth=True,
                         augment_config=AugmentConfig(brightness=0.0, contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=0.0))
    ds = ChunkedDataset(src, compute_statistics(src), cfg)
    for i in range(5):
        s = ds[i]
        img, depth = s["observation.images.agentview"][0], s["observation.depth.agentview"]
        box = s["crop_box.agentview"].tolist()
        assert box != [0.0, 0.0, 1.0, 1.0] and abs((box[2] - box[0]) - 0.9 ** 0.5) < 1e-6
        assert img.dtype == torch.uint8  # as the published pipeline, after augmentation
        bright = (img > 127).nonzero().float().mean(0)
        near = (depth < 1.0).nonzero().float().mean(0)
        assert torch.allclose(bright, near, atol=0.75), (bright, near)
        # The marked block's centre (11, 21) in the original maps through the new intrinsics too.
        k0 = torch.tensor([[30.0, 0, 15.5], [0, 30.0, 15.5], [0, 0, 1]])
        ray = torch.linalg.solve(k0, torch.tensor([21.0, 11.0, 1.0]))
        uv = s["observation.intrinsics.agentview"] @ ray
        assert torch.allclose(uv[:2].flip(0), near, atol=0.75)


def test_crop_resize_and_intrinsics_formula():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    full = crop_resize(x, (0.0, 0.0, 1.0, 1.0), (4, 4))
    assert torch.allclose(full, x)
    half = crop_resize(x, (0.0, 0.0, 1 / 3, 1 / 3), (2, 2))  # pixels 0..1 of each axis
    assert torch.allclose(half[0, 0], torch.tensor([[0.0, 1.0], [4.0, 5.0]]), atol=1e-5)
    k = torch.tensor([[10.0, 0, 1.5], [0, 10.0, 1.5], [0, 0, 1]])
    k2 = crop_intrinsics(k, (0.0, 0.0, 1 / 3, 1 / 3), (4, 4), (2, 2))
    assert torch.allclose(k2, torch.tensor([[10.0, 0, 1.5], [0, 10.0, 1.5], [0, 0, 1]]), atol=1e-5)  # scale 1 here


@pytest.mark.parametrize("factor,delta", [(0.0, 0.0), (0.8, 0.05), (1.0, -0.05), (1.2, 0.3), (3.0, -0.7)])
def test_saturation_hue_equals_the_hsv_definition(factor, delta):
    """Oracle: Python's colorsys, pixel by pixel: S -> min(S f, 1), H -> (H + d) mod 1."""
    x = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0] = 0.4  # grey (S = 0)
    x[:, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # pure red, hue 0
    x[:, 0, 2] = torch.tensor([0.2, 0.9, 0.9])  # cyan-ish, hue sector boundary region
    expected = torch.empty_like(x)
    for i in range(6):
        for j in range(6):
            h, s_, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
            expected[:, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + delta) % 1.0, min(s_ * factor, 1.0), v))
    assert torch.allclose(saturation_hue(x, factor, delta), expected, atol=1e-5)
    assert torch.allclose(saturation_hue(x, 1.0, 0.0), x, atol=1e-6)  # identity


def test_determinism_and_workers():
    src = MemorySource()
    ds = ChunkedDataset(src, compute_statistics(src), PipelineConfig(chunk_len=2, image_size=32, seed=3))
    a, b = ds[4], ds[4]
    assert torch.equal(a["observation.images.agentview"], b["observation.images.agentview"])
    assert not torch.equal(ds[4]["crop_box.agentview"], ds[5]["crop_box.agentview"])
    assert not torch.equal(a["crop_box.agentview"], a["crop_box.wrist"])  # views independent
    ds.set_epoch(1)
    assert not torch.equal(ds[4]["crop_box.agentview"], a["crop_box.agentview"])
    ds.set_epoch(0)
    loaders = [make_loader(ds, ResumableSampler(len(ds), seed=1), batch_size=4, num_workers=w) for w in (0, 2)]
    batches = [next(iter(loader)) for loader in loaders]
    assert torch.equal(batches[0]["observation.images.wrist"], batches[1]["observation.images.wrist"])


def test_sampler_resume_and_ddp_shards():
    s = ResumableSampler(10, seed=5)
    it = iter(s)
    first = [next(it) for _ in range(23)]  # crosses two epoch boundaries
    resumed = ResumableSampler(10, seed=5)
    resumed.load_state_dict(s.state_dict(consumed=13))
    it2 = iter(resumed)
    assert [next(it2) for _ in range(10)] == first[13:23]
    assert sorted(first[:10]) == list(range(10)) and first[:10] != first[10:20]
    shards = [ResumableSampler(10, seed=5, rank=r, world_size=3).order(0).tolist() for r in range(3)]
    assert all(len(x) == 3 for x in shards) and not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(10, seed=6).load_state_dict(s.state_dict(consumed=1))
