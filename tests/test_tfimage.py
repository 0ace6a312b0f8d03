"""The published TensorFlow image pipeline, bit for bit, against TensorFlow's own outputs.

`tests/fixtures/tf_images.npz` was made by `tools/tf_image_oracle.py` with tensorflow-cpu in a throwaway
environment, on real LIBERO frames rendered by our env at 256 px: TF's JPEG bytes (`encode_jpeg`), decoded
pixels (`decode_image`), Lanczos3 resizes to 224 / 112 (uint8, plus a SHA-256 of the float32 result), the
per-axis Lanczos3 weights, and TF's decode of JPEGs from other encoder settings. Every comparison here is
exact equality; TensorFlow is not needed.
"""

from __future__ import annotations

import hashlib
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spatial_forcing.data import tfimage
from spatial_forcing.data.dataset import ChunkedDataset, PipelineConfig, resize_uint8
from spatial_forcing.data.rlds import RLDSEpisodeSource, decode_image
from spatial_forcing.data.schema import IMAGE
from spatial_forcing.data.stats import compute_statistics
from spatial_forcing.eval import protocol as P

sys.path.insert(0, str(Path(__file__).parent))

FIXTURE = Path(__file__).parent / "fixtures" / "tf_images.npz"


@pytest.fixture(scope="module")
def tf():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def unpack(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    return [raw[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def test_fixture_is_what_the_tool_documents(tf):
    meta = json.loads(str(tf["meta"]))
    assert meta["tool"] == "tools/tf_image_oracle.py" and meta["tensorflow"]
    tool = runpy.run_path(str(Path(__file__).parents[1] / meta["tool"]))  # imports no TensorFlow at load
    assert [list(s) for s in tool["SCENES"]] == meta["scenes"] and list(tool["SIZES"]) == meta["sizes"]
    assert [list(p) for p in tool["WEIGHT_PAIRS"]] == meta["weight_pairs"]
    assert tf["frames"].shape == (6, 256, 256, 3) and tf["frames"].dtype == np.uint8
    assert [str(n).rsplit("/", 1)[1] for n in tf["names"]] == ["agentview", "wrist"] * 3
    assert FIXTURE.stat().st_size < 2_000_000


# ------------------------------------------------------------------------------------------------ JPEG
def test_encode_gives_tensorflows_bytes(tf):
    jpegs = unpack(tf["tf_jpeg"], tf["tf_jpeg_offsets"])
    for frame, want in zip(tf["frames"], jpegs):
        assert tfimage.encode_jpeg(frame) == want
        assert P.jpeg_encode(frame) == want
    # Pillow's own default JFIF header (density 1:1, no unit) is the only difference without dpi=300.
    buf = io.BytesIO()
    Image.fromarray(tf["frames"][0]).save(buf, format="JPEG", quality=95, subsampling="4:2:0")
    plain = buf.getvalue()
    assert len(plain) == len(jpegs[0])
    assert [i for i in range(len(plain)) if plain[i] != jpegs[0][i]] == [13, 14, 15, 16, 17]


def test_decode_gives_tensorflows_pixels(tf):
    jpegs = unpack(tf["tf_jpeg"], tf["tf_jpeg_offsets"])
    for data, want in zip(jpegs, tf["tf_decoded"]):
        np.testing.assert_array_equal(tfimage.decode_jpeg(data), want)
        np.testing.assert_array_equal(decode_image(data), want)  # the RLDS reader
    # TF decodes with the fast integer IDCT; Pillow's accurate IDCT misses most values (the fixture bites).
    pil = np.asarray(Image.open(io.BytesIO(jpegs[0])).convert("RGB")).astype(int)
    diff = np.abs(pil - tf["tf_decoded"][0])
    assert (diff > 0).mean() > 0.3 and diff.max() >= 5


def test_decode_of_other_encoders_jpegs_gives_tensorflows_pixels(tf):
    """Training-side decode (`tf.io.decode_image` in the OFT RLDS pipeline) on 4:4:4, 4:2:2 and progressive
    JPEGs of an odd-sized crop (partial MCUs at the edges)."""
    options = [json.loads(str(o)) for o in tf["extra_jpeg_options"]]
    assert {o["subsampling"] for o in options} == {"4:4:4", "4:2:2", "4:2:0"}
    for data, want in zip(unpack(tf["extra_jpeg"], tf["extra_jpeg_offsets"]), tf["extra_tf_decoded"]):
        assert want.shape == (100, 132, 3)
        np.testing.assert_array_equal(decode_image(data), want)


def test_round_trip_is_tensorflows(tf):
    for frame, want in zip(tf["frames"], tf["tf_decoded"]):
        np.testing.assert_array_equal(P.jpeg_roundtrip(frame), want)


# -------------------------------------------------------------------------------------------- Lanczos3
@pytest.mark.parametrize("pair", [(256, 224), (256, 112), (128, 224), (200, 77)])
def test_lanczos3_weights_are_tensorflows_bit_for_bit(tf, pair):
    n_in, n_out = pair
    want = tf[f"tf_weights_{n_in}_{n_out}"]
    start, w = tfimage.lanczos3_weights(n_in, n_out)
    dense = np.zeros((n_out, n_in), np.float32)
    for k in range(w.shape[1]):
        cols = start + k
        ok = cols < n_in
        dense[np.arange(n_out)[ok], cols[ok]] += w[ok, k]
    assert np.array_equal(dense, want), f"{int((dense != want).sum())} weights differ"


@pytest.mark.parametrize("size", [224, 112])
def test_resize_is_tensorflows_bit_for_bit(tf, size):
    for dec, want_u8, want_sha in zip(tf["tf_decoded"], tf[f"tf_resized_{size}"], tf[f"tf_resized_{size}_f32_sha256"]):
        out = tfimage.resize_lanczos3(dec, size)
        assert out.dtype == np.float32 and out.shape == (size, size, 3)
        assert hashlib.sha256(out.tobytes()).hexdigest() == str(want_sha)  # every float32, before rounding
        for ours in (tfimage.resize_uint8(dec, size), resize_uint8(dec, size), P.lanczos3_resize(dec, size)):
            np.testing.assert_array_equal(ours, want_u8)


def test_same_size_resize_is_the_identity_after_rounding(tf):
    assert bool(tf["tf_same_size_is_identity"])  # checked by the tool on every decoded frame and 224 resize
    img = tf["tf_resized_224"][0]
    out = tfimage.resize_uint8(img, 224)
    np.testing.assert_array_equal(out, img)
    assert out is not img and out.flags.writeable


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("size", [224, 112])
def test_evaluation_images_are_tensorflows(tf, size):
    """`prepare_image` (what `sf eval libero` feeds the policy) = OFT's `resize_image_for_policy`."""
    for frame, want in zip(tf["frames"], tf[f"tf_resized_{size}"]):
        np.testing.assert_array_equal(P.prepare_image(frame, size), want)


def test_rlds_training_images_are_tensorflows(tf, tmp_path):
    """RLDS frames stored as TF's JPEGs -> our reader and pipeline (no augmentation) = `decode_image` +
    dlimp `resize_image` of the published data pipeline."""
    import test_rlds as R

    jpegs = unpack(tf["tf_jpeg"], tf["tf_jpeg_offsets"])
    T = 8
    episodes = []
    for e in range(4):
        scene = e % 3
        rng = np.random.default_rng(e)
        episodes.append({"T": T, "state": rng.normal(size=(T, 8)).astype(np.float32),
                         "action": rng.uniform(-1, 1, size=(T, 7)).astype(np.float32),
                         "images": [jpegs[2 * scene]] * T, "wrist": [jpegs[2 * scene + 1]] * T,
                         "task": f"task {scene}", "joint_state": np.zeros((T, 7), np.float32)})
    src = RLDSEpisodeSource(R.write_dataset(tmp_path, episodes))
    ds = ChunkedDataset(src, compute_statistics(src), PipelineConfig(chunk_len=T, image_size=224, augment=False))
    assert len(ds) == 4
    for i in range(4):
        scene = i % 3
        frame = src.frame(i, 3)
        sample = ds[i]
        for v, cam in enumerate(("agentview", "wrist")):
            np.testing.assert_array_equal(frame[IMAGE + cam], tf["tf_decoded"][2 * scene + v])
            np.testing.assert_array_equal(sample[IMAGE + cam].permute(1, 2, 0).numpy(),
                                          tf["tf_resized_224"][2 * scene + v])


@pytest.fixture(scope="module")
def upstream_policy(tmp_path_factory):
    import oft_upstream as U

    from spatial_forcing.policies.oft.policy import OFTPolicy

    ckpt = U.write_upstream_checkpoint(tmp_path_factory.mktemp("oft_upstream") / "libero_spatial",
                                       llm=(64, 1, 4, 128, U.VOCAB), shards=1, with_lora_stub=False)
    return OFTPolicy.from_pretrained(ckpt["folder"], platform="libero")


def test_actions_from_our_evaluation_images_equal_the_tensorflow_paths(tf, upstream_policy):
    """Same frames through `prepare_image` and through TensorFlow: identical pixel_values, actions differ by
    exactly 0.0 on a synthetic upstream-layout OFT checkpoint; Pillow's JPEG decode moves them."""
    policy = upstream_policy
    proc = policy.processor
    for scene in range(3):
        ours = [P.prepare_image(f, 224) for f in tf["frames"][2 * scene:2 * scene + 2]]
        theirs = list(tf["tf_resized_224"][2 * scene:2 * scene + 2])
        assert torch.equal(proc.pixel_values(ours, center_crop=proc.center_crop),
                           proc.pixel_values(theirs, center_crop=proc.center_crop))
    state = np.array([-0.2, 0.1, 1.05, 3.0, -0.1, 0.05, 0.03, -0.03])

    def act(images):
        return policy.predict_action_chunk({"images": images, "state": state,
                                            "instruction": "put the bowl on the plate"})

    frames = tf["frames"][:2]  # libero_spatial task 0: agentview, wrist
    a_ours, a_tf = act([P.prepare_image(f, 224) for f in frames]), act(list(tf["tf_resized_224"][:2]))
    assert a_ours.shape == (8, 7) and np.abs(a_ours - a_tf).max() == 0.0
    # The accurate-IDCT decode (Pillow's, what this harness used before) feeds other pixels: the actions move.
    pil = [P.lanczos3_resize(np.asarray(Image.open(io.BytesIO(P.jpeg_encode(f))).convert("RGB")), 224)
           for f in frames]
    assert np.abs(act(pil) - a_tf).max() > 0
