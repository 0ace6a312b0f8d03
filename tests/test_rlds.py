"""LIBERO RLDS reader (DATA.md Part A): CRCs, TFRecord framing, Example decoding, a tiny on-disk dataset.

The dataset is written with an independent protobuf/TFRecord encoder defined here (not the reader's code).
"""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatial_forcing.data.rlds import (RLDSEpisodeSource, RLDSError, crc32c, crc32c_py, find_shards, iter_records,
                                       mask_crc, parse_example, unmask_crc)
from spatial_forcing.data.schema import ACTION, EpisodeSource, IMAGE, STATE, TASK

# ------------------------------------------------------------------------- independent encoder (test-only)


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 * (c & 1))
        table.append(c)
    return table


_TABLE = _crc_table()


def ref_crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def ref_mask(c: int) -> int:
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", ref_mask(ref_crc32c(head))) + data + struct.pack("<I", ref_mask(ref_crc32c(data)))


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def f_floats(values, packed: bool = True) -> bytes:
    values = [float(v) for v in values]
    if packed:
        inner = ld(1, struct.pack(f"<{len(values)}f", *values))
    else:
        inner = b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in values)
    return ld(2, inner)


def f_ints(values, packed: bool = True) -> bytes:
    if packed:
        inner = ld(1, b"".join(varint(int(v)) for v in values))
    else:
        inner = b"".join(varint(1 << 3 | 0) + varint(int(v)) for v in values)
    return ld(3, inner)


def f_bytes(values) -> bytes:
    return ld(1, b"".join(ld(1, v) for v in values))


def example(features: dict[str, bytes], value_first: bool = False) -> bytes:
    entries = []
    for key, feat in features.items():
        k, v = ld(1, key.encode()), ld(2, feat)
        entries.append(ld(1, v + k if value_first else k + v))
    return ld(1, b"".join(entries))


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tf_decode(data: bytes) -> np.ndarray:
    """What `tf.io.decode_image` gives (fast integer IDCT; pinned against TensorFlow in test_tfimage.py)."""
    from spatial_forcing.data.tfimage import decode_jpeg

    return decode_jpeg(data)


# ---------------------------------------------------------------------------------------- CRC and framing


def test_crc32c_check_value_and_fallback():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c_py(b"123456789") == 0xE3069283
    rng = random.Random(0)
    for n in (0, 1, 7, 8, 100, 4097):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert crc32c(data) == crc32c_py(data) == ref_crc32c(data)


def test_mask_unmask_round_trip():
    rng = random.Random(1)
    for c in [0, 1, 0xFFFFFFFF, 0xE3069283] + [rng.getrandbits(32) for _ in range(200)]:
        assert mask_crc(c) == ref_mask(c)
        assert unmask_crc(mask_crc(c)) == c


def test_record_test_vectors(tmp_path):
    empty = bytes.fromhex("0000000000000000" "29039807" "d8ea82a2")
    hello = bytes.fromhex("0500000000000000" "eab2043e" "68656c6c6f" "bb1f1c19")
    assert record(b"") == empty and record(b"hello") == hello
    path = tmp_path / "x.tfrecord"
    path.write_bytes(empty + hello)
    assert list(iter_records(path)) == [(0, b""), (16, b"hello")]
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    assert list(iter_records(tmp_path / "empty.tfrecord")) == []


def test_iter_records_errors_name_file_and_offset(tmp_path):
    good = record(b"hello") + record(b"world!")
    path = tmp_path / "bad.tfrecord"
    bad = bytearray(good)
    bad[21 + 12 + 2] ^= 0x01  # a data byte of the second record (offset 21)
    path.write_bytes(bytes(bad))
    with pytest.raises(RLDSError, match=r"bad\.tfrecord: data CRC mismatch in the record at byte offset 21"):
        list(iter_records(path))
    assert [d for _, d in iter_records(path, verify=False)] == [b"hello", b"wosld!"]
    bad = bytearray(good)
    bad[21] ^= 0x01  # the length field of the second record
    path.write_bytes(bytes(bad))
    with pytest.raises(RLDSError, match="length CRC mismatch in the record at byte offset 21"):
        list(iter_records(path))
    path.write_bytes(good[:-3])
    with pytest.raises(RLDSError, match="truncated record at byte offset 21"):
        list(iter_records(path))
    path.write_bytes(good + b"\x00" * 5)
    with pytest.raises(RLDSError, match="truncated record header at byte offset 43"):
        list(iter_records(path))


# ------------------------------------------------------------------------------------- Example decoding


def test_example_spec_vectors():
    out = parse_example(bytes.fromhex("0a130a110a0178120c120a0a080000803f00000040"))
    assert list(out) == ["x"] and out["x"].dtype == np.float32 and out["x"].tolist() == [1.0, 2.0]
    # Feature-level vectors wrapped into an Example by hand
    for hexfeat, want in (("1a0d0a0b01ffffffffffffffffff01", [1, -1]), ("0a040a026162", [b"ab"])):
        feat = bytes.fromhex(hexfeat)
        assert (f_ints([1, -1]) if want == [1, -1] else f_bytes([b"ab"])) == feat
        got = parse_example(example({"k": feat}))["k"]
        assert (got.tolist() if isinstance(got, np.ndarray) else got) == want


def test_example_packed_unpacked_mixed_and_negative():
    ints = [0, 1, -1, 127, 128, 300, -2**63, 2**63 - 1, -123456789]
    floats = [0.5, -1.25, 3.0e7, float("inf")]
    mixed_floats = ld(2, ld(1, struct.pack("<2f", 1.0, 2.0)) + varint(13) + struct.pack("<f", 3.0)
                      + ld(1, struct.pack("<f", 4.0)))
    mixed_ints = ld(3, varint(8) + varint(5) + ld(1, varint(6) + varint(-7)) + varint(8) + varint(2**40))
    buf = example({"fp": f_floats(floats), "fu": f_floats(floats, packed=False), "ip": f_ints(ints),
                   "iu": f_ints(ints, packed=False), "fm": mixed_floats, "im": mixed_ints,
                   "flags": f_ints([0, 1, 0, 1, 1])})
    out = parse_example(buf)
    assert out["fp"].tolist() == out["fu"].tolist() == floats
    assert out["ip"].dtype == np.int64 and out["ip"].tolist() == out["iu"].tolist() == ints
    assert out["fm"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert out["im"].tolist() == [5, 6, -7, 2**40]
    assert out["flags"].tolist() == [0, 1, 0, 1, 1]
    assert len(varint(-1)) == 10  # two's complement, not zigzag


def test_example_bytes_lists_empty_and_unknown_fields():
    unknown = (varint(7 << 3 | 0) + varint(99) + varint(8 << 3 | 1) + b"\x00" * 8 + ld(9, b"junk")
               + varint(10 << 3 | 5) + b"\x01\x02\x03\x04" + varint(11 << 3 | 3) + varint(1 << 3 | 0) + varint(5)
               + varint(11 << 3 | 4))
    blist = ld(1, ld(1, b"a") + unknown + ld(1, b"") + ld(1, bytes(range(256)) * 3))
    feats = {"b": blist, "empty": b"", "emptyfloat": ld(2, b""), "one": f_bytes([b"only"]),
             "f": ld(2, ld(1, struct.pack("<f", 1.5)) + unknown), "i": ld(3, unknown + ld(1, varint(-2)))}
    entries = b"".join(ld(1, ld(1, k.encode()) + unknown + ld(2, v + (unknown if k == "b" else b"")))
                       for k, v in feats.items())
    buf = unknown + ld(1, entries + unknown) + unknown
    out = parse_example(buf)
    assert out["b"] == [b"a", b"", bytes(range(256)) * 3]
    assert out["empty"] == [] and out["emptyfloat"].tolist() == [] and out["one"] == [b"only"]
    assert out["f"].tolist() == [1.5] and out["i"].tolist() == [-2]


def test_example_map_order_value_first_and_merged_features():
    feats = {"b": f_bytes([b"x"]), "a": f_floats([1.0])}
    one = parse_example(example(feats))
    two = parse_example(example(dict(reversed(feats.items())), value_first=True))
    assert one.keys() == two.keys() and one["b"] == two["b"] and one["a"].tolist() == two["a"].tolist()
    # a repeated `features` field merges its map entries; a duplicated key keeps the last value
    buf = example({"a": f_floats([1.0])}) + example({"c": f_ints([3]), "a": f_floats([2.0])})
    out = parse_example(buf)
    assert sorted(out) == ["a", "c"] and out["a"].tolist() == [2.0] and out["c"].tolist() == [3]


@pytest.mark.parametrize("cut", [1, 5, 12, 30])
def test_example_truncated_is_an_error(cut):
    buf = example({"x": f_floats([1.0, 2.0, 3.0]), "y": f_bytes([b"abc", b"def"])})
    with pytest.raises(RLDSError, match="malformed tf.train.Example"):
        parse_example(buf[:len(buf) - cut])


# ------------------------------------------------------------------------------------ a tiny dataset

NAME = "liber_o10"
LENGTHS = [5, 9, 6, 8]  # 2 episodes per shard, 2 shards
TASKS = ["put both the alphabet soup and the tomato sauce in the basket", "turn on the stove",
         "put the black bowl in the bottom drawer", "pick up the book and place it in the caddy"]
H = W = 32


def make_image(e: int, t: int, view: int) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 7 + 10 * t, y * 7 + 20 * view, (x + 2 * y) * 2 + 30 * e], -1)
    img[:6, :6] = 255  # a bright top-left corner: a flip would move it
    return np.clip(img, 0, 255).astype(np.uint8)


def make_episode(e: int) -> dict:
    rng = np.random.default_rng(e)
    T = LENGTHS[e]
    state = rng.normal(size=(T, 8)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(T, 7)).astype(np.float32)
    action[:, 6] = np.resize(np.array([-1.0, -1.0, 1.0, 0.3, 1.5, -0.5, 0.0, 1.0], np.float32), T)
    images = [jpeg(make_image(e, t, 0)) for t in range(T)]
    wrist = [jpeg(make_image(e, t, 1)) for t in range(T)]
    return {"T": T, "state": state, "action": action, "images": images, "wrist": wrist, "task": TASKS[e],
            "joint_state": rng.normal(size=(T, 7)).astype(np.float32)}


def encode_episode(ep: dict, e: int) -> bytes:
    T = ep["T"]
    last = [0] * (T - 1) + [1]
    packed = e % 2 == 0  # odd episodes use the unpacked encodings
    feats = {
        "steps/observation/image": f_bytes(ep["images"]),
        "steps/observation/wrist_image": f_bytes(ep["wrist"]),
        "steps/observation/state": f_floats(ep["state"].ravel(), packed),
        "steps/observation/joint_state": f_floats(ep["joint_state"].ravel(), packed),
        "steps/action": f_floats(ep["action"].ravel(), packed),
        "steps/reward": f_floats([float(v) for v in last], packed),
        "steps/discount": f_floats([1.0] * T, packed),
        "steps/is_first": f_ints([1] + [0] * (T - 1), packed),
        "steps/is_last": f_ints(last, packed),
        "steps/is_terminal": f_ints(last, packed),
        "steps/language_instruction": f_bytes([ep["task"].encode()] * T),
        "episode_metadata/file_path": f_bytes([f"/data/libero_10/demo_{e}.hdf5".encode()]),
    }
    keys = list(feats)
    random.Random(e).shuffle(keys)  # map-entry order must not matter
    return example({k: feats[k] for k in keys}, value_first=e == 3)


def write_dataset(root: Path, episodes: list[dict], encoded: list[bytes] | None = None) -> Path:
    d = root / "libero_10_no_noops" / "1.0.0"
    d.mkdir(parents=True)
    encoded = encoded or [encode_episode(ep, e) for e, ep in enumerate(episodes)]
    for s in range(2):
        data = b"".join(record(x) for x in encoded[2 * s:2 * s + 2])
        (d / f"{NAME}-train.tfrecord-{s:05d}-of-00002").write_bytes(data)
    info = {"name": NAME, "version": "1.0.0", "fileFormat": "tfrecord",
            "splits": [{"name": "train", "numBytes": "1", "shardLengths": ["2", "2"],
                        "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}]}
    (d / "dataset_info.json").write_text(json.dumps(info))
    (d / "features.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def episodes() -> list[dict]:
    return [make_episode(e) for e in range(len(LENGTHS))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, episodes) -> Path:
    return write_dataset(tmp_path_factory.mktemp("rlds"), episodes)


@pytest.fixture
def copy(tmp_path, dataset) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(dataset, dst)
    return dst


def shard(d: Path, i: int) -> Path:
    return d / f"{NAME}-train.tfrecord-{i:05d}-of-00002"


def test_find_shards_uses_dataset_info_name(dataset):
    assert dataset.parent.name == "libero_10_no_noops"
    assert [p.name for p in find_shards(dataset)] == [f"{NAME}-train.tfrecord-0000{i}-of-00002" for i in range(2)]


def test_source_episodes_state_action_task(dataset, episodes):
    src = RLDSEpisodeSource(dataset.parent)  # the version subfolder is found
    assert isinstance(src, EpisodeSource)
    assert src.root == dataset and src.name == NAME and src.cameras == ["agentview", "wrist"]
    assert src.num_episodes == 4 and [src.episode_length(e) for e in range(4)] == LENGTHS
    assert src.num_frames == sum(LENGTHS)
    for e, ep in enumerate(episodes):
        arr = src.episode_arrays(e)
        assert arr[STATE].dtype == np.float32 and arr[STATE].shape == (LENGTHS[e], 8)
        assert arr[ACTION].dtype == np.float32 and arr[ACTION].shape == (LENGTHS[e], 7)
        np.testing.assert_array_equal(arr[STATE], ep["state"])  # 8-D state: [:6] + [-2:] is the identity
        np.testing.assert_array_equal(arr[ACTION][:, :6], ep["action"][:, :6])
        raw_g = ep["action"][:, 6].tolist()
        want_g = [{-1.0: 1.0, 1.0: 0.0, 0.3: 0.7, 1.5: 0.0, -0.5: 1.0, 0.0: 1.0}[round(g, 4)] for g in raw_g]
        np.testing.assert_allclose(arr[ACTION][:, 6], want_g, atol=1e-7)
        assert src.task(e) == TASKS[e]
    raw = RLDSEpisodeSource(dataset, standardize=None)
    np.testing.assert_array_equal(raw.episode_arrays(2)[ACTION], episodes[2]["action"])
    with pytest.raises(ValueError, match="standardize"):
        RLDSEpisodeSource(dataset, standardize="bridge")


def test_frames_decode_to_written_pixels(dataset, episodes):
    src = RLDSEpisodeSource(dataset)
    for e, ep in enumerate(episodes):
        for t in range(ep["T"]):
            fr = src.frame(e, t)
            assert set(fr) == {IMAGE + "agentview", IMAGE + "wrist", STATE, ACTION, TASK}
            for key, view in (("agentview", "images"), ("wrist", "wrist")):
                img = fr[IMAGE + key]
                assert img.dtype == np.uint8 and img.shape == (H, W, 3)
                np.testing.assert_array_equal(img, tf_decode(ep[view][t]))
                orig = make_image(e, t, 0 if key == "agentview" else 1).astype(int)
                assert np.abs(img.astype(int) - orig).mean() < 3  # no flip applied by the reader
            np.testing.assert_array_equal(fr[STATE], ep["state"][t])
            assert fr[TASK] == TASKS[e]
    assert set(src.frame(1, 0, keys=[STATE, TASK])) == {STATE, TASK}
    with pytest.raises(KeyError, match="observation.images.front"):
        src.frame(0, 0, keys=[IMAGE + "front"])
    with pytest.raises(IndexError, match="step 5 out of range for episode 0"):
        src.frame(0, 5)
    with pytest.raises(IndexError, match="episode 4 out of range"):
        src.episode_length(4)


def test_random_access_order_independent(dataset):
    seq = RLDSEpisodeSource(dataset)
    want = {(e, t): seq.frame(e, t) for e in range(4) for t in range(LENGTHS[e])}
    order = list(want)
    random.Random(3).shuffle(order)
    rnd = RLDSEpisodeSource(dataset, cache_episodes=1)
    for e, t in order:
        got = rnd.frame(e, t)
        for k, v in want[(e, t)].items():
            assert (np.array_equal(got[k], v) if isinstance(v, np.ndarray) else got[k] == v)
    clone = pickle.loads(pickle.dumps(rnd))  # DataLoader workers
    np.testing.assert_array_equal(clone.frame(3, 7)[IMAGE + "wrist"], want[(3, 7)][IMAGE + "wrist"])


def test_read_episode_raw_features(dataset, episodes):
    src = RLDSEpisodeSource(dataset)
    raw = src.read_episode(1)
    assert raw["episode_metadata/file_path"] == [b"/data/libero_10/demo_1.hdf5"]
    assert raw["steps/observation/image"] == episodes[1]["images"]
    assert raw["steps/is_last"].tolist() == [0] * 8 + [1]
    np.testing.assert_array_equal(raw["steps/observation/joint_state"], episodes[1]["joint_state"].ravel())
    dec = src.read_episode(0, decode_images=True)
    assert dec["steps/observation/wrist_image"].shape == (5, H, W, 3)
    path, off = src.episode_location(1)
    assert path == shard(dataset, 0) and off == len(record(encode_episode(episodes[0], 0)))


# ----------------------------------------------------------------------------------------------- errors


def test_flipped_data_byte_names_file_and_offset(copy, episodes):
    path = shard(copy, 0)
    data = bytearray(path.read_bytes())
    rec1 = len(record(encode_episode(episodes[0], 0)))
    pos = data.index(episodes[1]["images"][4]) + 40  # inside a JPEG of episode 1: headers stay intact
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    src = RLDSEpisodeSource(copy)  # indexing reads headers only
    src.frame(0, 0)
    with pytest.raises(RLDSError, match=rf"{path.name}: data CRC mismatch in the record at byte offset {rec1}"):
        src.frame(1, 0)
    with pytest.raises(RLDSError, match=f"byte offset {rec1}"):
        src.verify()
    with pytest.raises(RLDSError, match=f"byte offset {rec1}"):
        list(iter_records(path))
    RLDSEpisodeSource(copy, verify_crc=False).frame(1, 0)  # opt-out: reads without checking


def test_flipped_length_byte_fails_at_construction(copy, episodes):
    path = shard(copy, 1)
    data = bytearray(path.read_bytes())
    rec1 = len(record(encode_episode(episodes[2], 2)))
    data[rec1 + 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(RLDSError, match=rf"{path.name}: length CRC mismatch in the record at byte offset {rec1}"):
        RLDSEpisodeSource(copy)


def test_truncated_shard(copy, episodes):
    path = shard(copy, 1)
    data = path.read_bytes()
    rec1 = len(record(encode_episode(episodes[2], 2)))
    path.write_bytes(data[:rec1 + 500])
    with pytest.raises(RLDSError, match=rf"{path.name}: truncated record at byte offset {rec1}"):
        RLDSEpisodeSource(copy)
    path.write_bytes(data[:rec1])  # cut at a record boundary: only shardLengths can tell
    with pytest.raises(RLDSError, match=r"holds 1 episodes, but dataset_info.json shardLengths says 2"):
        RLDSEpisodeSource(copy)


def test_foreign_and_missing_shards(copy):
    foreign = copy / "libero_goal-train.tfrecord-00000-of-00016"
    foreign.write_bytes(record(b""))
    with pytest.raises(RLDSError, match=r"libero_goal-train\.tfrecord-00000-of-00016: shard of another dataset"
                                        r".*expected the prefix 'liber_o10-train\.tfrecord-'"):
        RLDSEpisodeSource(copy)
    foreign.unlink()
    shard(copy, 1).unlink()
    with pytest.raises(RLDSError, match=r"expected 2 shards .* 1 missing: liber_o10-train\.tfrecord-00001-of-00002"):
        RLDSEpisodeSource(copy)


def test_not_an_rlds_dataset(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RLDSError, match="no dataset_info.json"):
        RLDSEpisodeSource(empty)
    (empty / "dataset_info.json").write_text(json.dumps({"name": NAME}))
    with pytest.raises(RLDSError, match=r"no shards 'liber_o10-train\.tfrecord-\*'"):
        RLDSEpisodeSource(empty)
    with pytest.raises(FileNotFoundError):
        RLDSEpisodeSource(tmp_path / "nowhere")


def _single_episode_dataset(tmp_path: Path, ep: dict, feats_edit) -> Path:
    enc = {}
    T = ep["T"]
    enc["steps/observation/image"] = f_bytes(ep["images"])
    enc["steps/observation/wrist_image"] = f_bytes(ep["wrist"])
    enc["steps/observation/state"] = f_floats(ep["state"].ravel())
    enc["steps/action"] = f_floats(ep["action"].ravel())
    enc["steps/language_instruction"] = f_bytes([ep["task"].encode()] * T)
    feats_edit(enc)
    buf = example(enc)
    return write_dataset(tmp_path, [], encoded=[buf, buf, buf, buf])


def test_missing_key_and_inconsistent_lengths(tmp_path, episodes):
    ep = episodes[0]
    d = _single_episode_dataset(tmp_path / "a", ep, lambda f: f.pop("steps/observation/wrist_image"))
    with pytest.raises(RLDSError, match=r"tfrecord-00000-of-00002, record at byte offset 0: required key "
                                        r"'steps/observation/wrist_image' missing"):
        RLDSEpisodeSource(d)
    d = _single_episode_dataset(tmp_path / "b", ep,
                                lambda f: f.update({"steps/observation/state": f_floats(ep["state"].ravel()[:-8])}))
    src = RLDSEpisodeSource(d)
    with pytest.raises(RLDSError, match=r"'steps/observation/state' has 32 values, expected 40"):
        src.episode_arrays(0)
    d = _single_episode_dataset(tmp_path / "c", ep,
                                lambda f: f.update({"steps/language_instruction": f_bytes([b"a"] * 4 + [b"b"])}))
    with pytest.raises(RLDSError, match="not constant over the episode"):
        RLDSEpisodeSource(d).task(0)
    d = _single_episode_dataset(tmp_path / "d", ep, lambda f: f.update({"steps/action": f_floats([0.0] * 34)}))
    with pytest.raises(RLDSError, match=r"'steps/action' must be a float_list of 7\*T values"):
        RLDSEpisodeSource(d)


def test_pure_python_crc_fallback(monkeypatch):
    import spatial_forcing.data.rlds as rlds
    monkeypatch.setattr(rlds, "_gcrc", None)
    assert rlds.crc32c(b"123456789") == 0xE3069283
    assert record(b"hello")[8:12] == struct.pack("<I", rlds.mask_crc(rlds.crc32c(struct.pack("<Q", 5))))


def test_parse_example_accepts_memoryview_and_bytearray():
    buf = example({"x": f_floats([1.0, 2.0]), "b": f_bytes([b"ab", b"cd"]), "i": f_ints([300, -5])})
    for view in (memoryview(buf), bytearray(buf)):
        out = parse_example(view)
        assert out["x"].tolist() == [1.0, 2.0] and out["b"] == [b"ab", b"cd"] and out["i"].tolist() == [300, -5]


def test_sf_convert_rlds_to_lerobot_reads_back(dataset, episodes, tmp_path, capsys):
    from spatial_forcing.cli import main
    from spatial_forcing.data.lerobot import LeRobotEpisodeSource

    assert main(["convert", "rlds", "--src", str(dataset), "--dst", str(tmp_path / "lr"), "--png"]) == 0
    assert "LeRobotDataset v3.0, 4 episodes" in capsys.readouterr().out
    lr = LeRobotEpisodeSource(tmp_path / "lr", standardize="libero")
    rl = RLDSEpisodeSource(dataset)
    assert lr.num_episodes == rl.num_episodes and lr.cameras == ["agentview", "wrist"]
    for e in range(rl.num_episodes):
        assert lr.task(e) == rl.task(e)
        a, b = lr.episode_arrays(e), rl.episode_arrays(e)
        assert np.array_equal(a["action"], b["action"]) and np.array_equal(a["observation.state"], b["observation.state"])
        t = rl.episode_length(e) - 1
        assert np.array_equal(lr.frame(e, t)["observation.images.wrist"], rl.frame(e, t)["observation.images.wrist"])
    raw = LeRobotEpisodeSource(tmp_path / "lr")  # stored raw, as LeRobot's LIBERO datasets
    assert np.array_equal(raw.episode_arrays(0)["action"][:, 6], episodes[0]["action"][:, 6])
    assert main(["convert", "rlds", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "x")]) == 2
