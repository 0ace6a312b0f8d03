"""`sf serve` (docs/spec/SERVING.md): codecs, a real server on loopback answering real clients over the
openpi websocket protocol and the OpenVLA HTTP protocol, fuzzing, concurrency, authentication, the broker.

The policy is a real `mini` OFTPolicy with random weights, saved with `save_pretrained` and loaded by the
server with `load_policy`; every answer is compared with a direct `predict_action_chunk` call.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import websockets
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sconnect

from spatial_forcing.normalize import DatasetStats
from spatial_forcing.policies.oft.config import OFTConfig
from spatial_forcing.policies.oft.model import OFTModel
from spatial_forcing.policies.oft.policy import OFTPolicy
from spatial_forcing.policies.oft.processor import OFTProcessor, load_tokenizer
from spatial_forcing.serve import codec
from spatial_forcing.serve.client import ActionChunkBroker, HttpClientPolicy, ServerError, WebsocketClientPolicy
from spatial_forcing.serve.engine import InferenceEngine, PolicyError
from spatial_forcing.serve.libero import libero_request, resize_with_pad
from spatial_forcing.serve.obsmap import (PRESETS, InputSpec, ObservationMap, RequestError, observation_map,
                                          to_policy_observation)
from spatial_forcing.serve.server import PolicyServer, ServeConfig, ServerThread, load_policy

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_MESSAGE = 2 << 20  # 2 MiB: comfortably above one 224 px LIBERO request, small enough to send over the limit
ATOL = 1e-5  # batched forward passes differ from batch-1 ones by float rounding (~1e-6 in robot units)


# ====================================================================== fixtures
def _stats() -> DatasetStats:
    return DatasetStats.from_dict({
        "action": {"mean": [0.0] * 7, "std": [1.0] * 7, "min": [-1.0] * 7, "max": [1.0] * 7,
                   "q01": [-0.75, -0.66, -0.94, -0.11, -0.21, -0.18, 0.0], "q99": [0.94, 0.88, 0.93, 0.1, 0.18, 0.15, 1.0],
                   "mask": [True] * 6 + [False]},
        "proprio": {"mean": [0.0] * 8, "std": [1.0] * 8, "min": [-1.0] * 8, "max": [1.0] * 8,
                    "q01": [-0.5] * 8, "q99": [0.5] * 8},
        "num_transitions": 100, "num_trajectories": 2})


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = OFTConfig.preset("mini")
    policy = OFTPolicy(OFTModel(cfg).eval(), OFTProcessor(cfg, load_tokenizer("bytes")), {"toy_no_noops": _stats()},
                       "toy_no_noops")
    return policy.save_pretrained(tmp_path_factory.mktemp("serve") / "mini")


@pytest.fixture(scope="module")
def reference(policy_dir):
    """An independent copy of the served policy, for direct calls."""
    return OFTPolicy.from_pretrained(policy_dir).eval()


@pytest.fixture(scope="module")
def server(policy_dir):
    config = ServeConfig(host="127.0.0.1", port=0, http_port=0, max_batch=16, max_message_bytes=MAX_MESSAGE,
                         request_timeout_s=60.0)
    with ServerThread(load_policy(policy_dir), config, name="mini") as running:
        yield running
    assert not running.alive


def scene(seed: int, size: int = 112) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (size, size, 3), dtype=np.uint8), rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            rng.uniform(-0.4, 0.4, 8), f"put the bowl number {seed} on the plate")


def libero_obs(seed: int, size: int = 112) -> dict:
    image, wrist, state, prompt = scene(seed, size)
    return {"observation/image": image, "observation/wrist_image": wrist, "observation/state": state, "prompt": prompt}


def openvla_obs(seed: int) -> dict:
    image, wrist, state, prompt = scene(seed)
    return {"full_image": image, "wrist_image": wrist, "state": state, "instruction": prompt}


def expected(reference, seed: int, size: int = 112) -> np.ndarray:
    image, wrist, state, prompt = scene(seed, size)
    return reference.predict_action_chunk({"images": [image, wrist], "state": state, "instruction": prompt})


def ws_url(server) -> str:
    return f"ws://127.0.0.1:{server.server.ws_port}"


def http_url(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


def http_post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ws_error_reply(url: str, frame: bytes | str) -> tuple[str | None, int | None]:
    """Send one frame after the metadata; return (text of the error frame, close code)."""
    with sconnect(url, compression=None, max_size=None) as ws:
        ws.recv(timeout=10)
        text = None
        try:
            ws.send(frame)
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str), "a malformed request got a binary answer"
            text = reply
            ws.recv(timeout=10)
        except ConnectionClosed:
            pass
        return text, ws.close_code


# ====================================================================== codecs (SERVING.md 1.7, 2.1)
ALLOWED = ["|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8", ">f4", ">i8", "<U7", "|S5"]
REFUSED = ["<c8", "<c16", "|O", "|V8", "<M8[ns]", "<m8[s]"]


def sample_array(dtype: str, shape=(2, 3)) -> np.ndarray:
    dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    if dt.kind == "U":
        return np.array([["ab", "cdé", ""], ["x" * 7, "y", "z"]], dtype=dt)
    if dt.kind == "S":
        return np.array([[b"ab", b"\x00\xff", b""], [b"x" * 5, b"y", b"z"]], dtype=dt)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, shape, dtype=dt.newbyteorder("="), endpoint=True).astype(dt)
    return (rng.standard_normal(shape) * 1e3).astype(dt)


def test_msgpack_matches_the_spec_test_vectors():
    assert codec.packb(np.array([1, 2], np.uint8)).hex() == (
        "84c40b5f5f6e6461727261795f5fc3c40464617461c4020102c4056474797065a37c7531c40573686170659102")
    assert codec.packb(np.float32(1.5)).hex() == (
        "83c40d5f5f6e7067656e657269635f5fc3c40464617461cb3ff8000000000000c4056474797065a33c6634")
    assert codec.packb({"prompt": "hi"}).hex() == "81a670726f6d7074a26869"
    decoded = codec.unpackb(bytes.fromhex("84c40b5f5f6e6461727261795f5fc3c40464617461c4020102c4056474797065a37c7531"
                                          "c40573686170659102"))
    assert decoded.dtype == np.uint8 and decoded.tolist() == [1, 2] and not decoded.flags.writeable
    assert type(codec.unpackb(codec.packb(np.float32(1.5)))) is np.float32


@pytest.mark.parametrize("dtype", ALLOWED)
def test_codecs_round_trip_every_allowed_dtype(dtype):
    for array in (sample_array(dtype), sample_array(dtype)[:, ::2], sample_array(dtype)[:0], sample_array(dtype)[0, 0:1]
                  .reshape(())):
        packed = codec.unpackb(codec.packb({"x": array}))["x"]
        assert isinstance(packed, np.ndarray) and packed.dtype == array.dtype and not packed.flags.writeable
        assert packed.shape == array.shape and np.array_equal(packed, array)
        decoded = np.asarray(codec.json_loads(codec.json_dumps({"x": array}))["x"])  # 0-d -> a scalar, as json_numpy
        if array.ndim or array.dtype.kind not in "US":  # a 0-d str decodes to np.str_, sized to its text
            assert decoded.dtype == (array.dtype if array.ndim else array.dtype.newbyteorder("="))
        assert decoded.shape == array.shape and np.array_equal(decoded, array)
    scalar = sample_array(dtype)[0, 0]
    if not isinstance(scalar, (str, bytes, float)):  # str/bytes/float64 subclasses travel as msgpack natives
        back = codec.unpackb(codec.packb(scalar))
        assert type(back) is type(scalar) and back == scalar
    nested = {"a": [sample_array(dtype), {"b": (1, 2.5, "s", b"raw", None, True)}]}
    back = codec.unpackb(codec.packb(nested))
    assert np.array_equal(back["a"][0], nested["a"][0]) and back["a"][1] == {"b": [1, 2.5, "s", b"raw", None, True]}


@pytest.mark.parametrize("dtype", REFUSED)
def test_codecs_refuse_other_dtypes_both_ways(dtype):
    array = np.zeros(2, dtype=dtype) if dtype != "|O" else np.array([1, "a"], dtype=object)
    with pytest.raises(ValueError, match="not allowed"):
        codec.packb({"x": array})
    with pytest.raises(ValueError, match="not allowed"):
        codec.json_dumps({"x": array})
    crafted = msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 16, b"dtype": dtype, b"shape": [1]},
                            use_bin_type=True)
    with pytest.raises(codec.CodecError, match="not allowed"):
        codec.unpackb(crafted)
    with pytest.raises(codec.CodecError, match="not allowed"):
        codec.json_loads(json.dumps({"__numpy__": "AAAAAAAAAAA=", "dtype": dtype, "shape": [1]}))
    with pytest.raises(ValueError, match="not allowed"):
        codec.packb(np.zeros((), dtype=array.dtype)[()] if dtype != "|O" else np.zeros(2, [("a", "<f4")]))


def test_codecs_refuse_malformed_input():
    def ndarray_map(**kw):
        fields = {b"__ndarray__": True, b"data": b"\1\2\3\4", b"dtype": "<f4", b"shape": [1]}
        return msgpack.packb({**fields, **{k.encode(): v for k, v in kw.items()}}, use_bin_type=True)

    bad = {
        "size": ndarray_map(shape=[2]), "huge shape": ndarray_map(shape=[1 << 40, 1 << 40]),
        "negative": ndarray_map(shape=[-1]), "bool size": ndarray_map(shape=[True]),
        "shape type": ndarray_map(shape="1"), "data type": ndarray_map(data="text"),
        "dtype text": ndarray_map(dtype="zz"), "dtype type": ndarray_map(dtype=4),
        "structured": ndarray_map(dtype="f4,f4"), "no size": ndarray_map(dtype="<U0", data=b""),
        "generic": msgpack.packb({b"__npgeneric__": True, b"data": "x", b"dtype": "<f4"}, use_bin_type=True),
        "overflow": msgpack.packb({b"__npgeneric__": True, b"data": 300, b"dtype": "|i1"}, use_bin_type=True),
        "int key": msgpack.packb({1: 2}), "ext": msgpack.packb(msgpack.ExtType(5, b"x")),
        "trailing": codec.packb({"a": 1}) + b"\x00", "truncated": codec.packb({"a": np.zeros(4)})[:-3],
        "empty": b"", "nesting": b"\x91" * 100_000, "bad utf-8": b"\xa2\xff\xfe",
    }
    for name, frame in bad.items():
        with pytest.raises(codec.CodecError):
            codec.unpackb(frame)
            pytest.fail(name)
    for text in ["{", "[1, 2", '{"__numpy__": "!!", "dtype": "<f4", "shape": [1]}',
                 '{"__numpy__": "AAAA", "dtype": "<f4", "shape": [2]}',
                 '{"__numpy__": "AAAAAAAAAAAAAAAAAAAAAAAAAAAA", "dtype": "<f4", "shape": [1]}',
                 '{"__numpy__": "AAAAAA==", "dtype": [["a", "<f4"]], "shape": [1]}',
                 '{"__numpy__": 5, "dtype": "<f4", "shape": [1]}', "[" * 100_000, b"\xff\xfe"]:
        with pytest.raises(codec.CodecError):
            codec.json_loads(text)


# ====================================================================== observation maps
def test_observation_maps():
    spec = InputSpec(num_images=2, state_dim=8, action_horizon=8, action_dim=7)
    image, wrist, state, prompt = scene(3)
    obs, unused = to_policy_observation({**libero_obs(3), "extra": 1}, PRESETS["libero"], spec)
    assert np.array_equal(obs["images"][0], image) and np.array_equal(obs["images"][1], wrist)
    assert obs["state"].dtype == np.float64 and obs["instruction"] == prompt and unused == ["extra"]
    # openvla: full_image, then every key containing "wrist" in the request's order; uint8 HWC only
    request = {"instruction": prompt, "wrist_b": wrist, "full_image": image, "state": list(state)}
    obs, _ = to_policy_observation(request, PRESETS["openvla"], spec)
    assert np.array_equal(obs["images"][1], wrist) and np.allclose(obs["state"], state)
    with pytest.raises(RequestError, match="policy takes 2"):
        to_policy_observation({**request, "wrist_c": wrist}, PRESETS["openvla"], spec)
    with pytest.raises(RequestError, match="float64 is not accepted"):
        to_policy_observation({**request, "full_image": image / 255.0}, PRESETS["openvla"], spec)
    # aloha: nested maps, CHW uint8 -> HWC, float in [0, 1] -> float CHW (what the OFT processor takes)
    request = {"images": {"cam_high": image.transpose(2, 0, 1), "cam_left_wrist": wrist / 255.0},
               "state": state, "prompt": prompt.encode()}
    obs, _ = to_policy_observation(request, PRESETS["aloha"], spec)
    assert np.array_equal(obs["images"][0], image) and obs["images"][1].shape == (3, 112, 112)
    assert obs["images"][1].dtype == np.float32 and obs["instruction"] == prompt
    custom = observation_map('{"images": ["cam/a", "cam/b"], "state": "q", "prompt": "task"}')
    obs, _ = to_policy_observation({"cam": {"a": image, "b": wrist}, "q": state, "task": "t"}, custom, spec)
    assert obs["instruction"] == "t"
    with pytest.raises(ValueError, match="names 1 image keys"):
        ObservationMap(("a",), "s", "p").check(spec)
    with pytest.raises(ValueError, match="not a preset"):
        observation_map("no-such-preset")
    assert resize_with_pad(np.full((256, 128, 3), 255, np.uint8), 224, 224)[:, :56].max() == 0  # black side bars
    assert libero_request(*scene(1, 256)[:3], "x")["observation/image"].shape == (224, 224, 3)


# ====================================================================== a real server, real clients
def test_openpi_protocol_answers_like_a_direct_call(server, reference):
    with urllib.request.urlopen(ws_url(server).replace("ws", "http") + "/healthz", timeout=10) as r:
        assert r.status == 200 and r.read() == b"OK\n"
    with urllib.request.urlopen(http_url(server) + "/healthz", timeout=10) as r:
        assert r.status == 200 and r.read() == b"OK\n"
    with WebsocketClientPolicy("127.0.0.1", server.server.ws_port) as client:
        meta = client.get_server_metadata()
        assert meta["action_horizon"] == 8 and meta["action_dim"] == 7 and meta["num_images"] == 2
        first = client.infer(libero_obs(1))
        second = client.infer(libero_obs(2))
    assert first["actions"].dtype == np.float64 and first["actions"].shape == (8, 7)
    assert np.array_equal(first["actions"], expected(reference, 1))  # batch of one: bit-identical
    assert np.array_equal(second["actions"], expected(reference, 2))
    assert first["policy_timing"]["infer_ms"] > 0 and set(first["server_timing"]) == {"infer_ms"}
    assert set(second["server_timing"]) == {"infer_ms", "prev_total_ms"}
    # handshake misuse: observations sent before reading the metadata frame are still served in order
    with sconnect(ws_url(server), compression=None, max_size=None) as ws:
        ws.send(codec.packb(libero_obs(1)))
        ws.send(codec.packb(libero_obs(2)))
        assert codec.unpackb(ws.recv(timeout=30))["action_horizon"] == 8
        assert np.array_equal(codec.unpackb(ws.recv(timeout=30))["actions"], expected(reference, 1))
        assert np.array_equal(codec.unpackb(ws.recv(timeout=30))["actions"], expected(reference, 2))


def _strings(obj) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (str(k), *_strings(v))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_metadata_names_the_policy_and_its_contract_never_a_path(policy_dir, reference, tmp_path):
    """Issue 21: clients see the policy's name, content id, family and its observation and action contract;
    no path of the server's reaches them (the policy was given as a local folder)."""
    config = ServeConfig(host="127.0.0.1", port=0, http_port=0)
    meta = PolicyServer(reference, config, name=str(policy_dir)).metadata
    frame = codec.packb(meta)
    for fragment in (str(policy_dir), str(policy_dir.parent), str(Path.home()), "/tmp"):
        assert fragment.encode() not in frame, fragment
    assert not [s for s in _strings(meta) if "/" in s and not s.startswith("observation/")], _strings(meta)
    assert re.fullmatch(r"oft-[0-9a-f]{12}", meta["policy"]) and meta["policy"] == f"oft-{meta['policy_id']}"
    assert meta["family"] == "oft"
    assert meta["observation"] == {
        "num_images": 2, "image_keys": ["observation/image", "observation/wrist_image"], "image_size": 112,
        "images": "uint8 [H, W, 3] (or [3, H, W]); float [0, 1] where float_images", "float_images": True,
        "center_crop": meta["center_crop"], "image_ops": "oft", "state_key": "observation/state", "state_dim": 8,
        "prompt_key": "prompt", "max_prompt_chars": 2000}
    assert meta["action"] == {"horizon": 8, "dim": 7, "dtype": "float64", "convention": "oft",
                              "normalization": "bounds_q99", "unnorm_key": "toy_no_noops", "replan_steps": 0}
    # the flat keys `sf eval --policy-server` reads are still there
    assert (meta["action_horizon"], meta["action_dim"], meta["num_images"], meta["image_size"]) == (8, 7, 2, 112)
    # the id is the content's: a copy elsewhere has it; a chosen public name replaces the default
    import shutil

    copy = shutil.copytree(policy_dir, tmp_path / "elsewhere" / "copy")
    assert PolicyServer(reference, config, name=str(copy)).metadata["policy_id"] == meta["policy_id"]
    named = PolicyServer(reference, config, name=str(copy), public_name="lab/sf-libero").metadata
    assert named["policy"] == "lab/sf-libero" and str(copy).encode() not in codec.packb(named)
    hub = PolicyServer(reference, config, name="haofuly/spatial-forcing-7b").metadata
    assert hub["policy"] == "haofuly/spatial-forcing-7b" and "policy_id" not in hub


def test_no_server_path_reaches_a_client_over_the_wire(policy_dir, reference, tmp_path):
    """Issue 21, as clients receive it: a server started on a local checkpoint folder sends a metadata frame,
    answers and error replies (websocket and HTTP) that hold none of its paths (the folder, the temporary
    directory, the home directory) in any string at any depth; and docs/serving.md documents every field of
    the frame and of its `observation` and `action` groups."""
    import tempfile

    config = ServeConfig(host="127.0.0.1", port=0, http_port=0)
    texts: list[str] = []
    with ServerThread(load_policy(policy_dir), config, name=str(policy_dir)) as running:
        with sconnect(ws_url(running), compression=None, max_size=None) as ws:
            raw = ws.recv(timeout=30)
            ws.send(codec.packb(libero_obs(5)))
            answer = codec.unpackb(ws.recv(timeout=60))
        assert np.allclose(answer["actions"], expected(reference, 5), atol=ATOL, rtol=0)
        texts += _strings({k: v for k, v in answer.items() if k != "actions"})
        for frame in (codec.packb({"observation/image": "nope"}), "not msgpack"):
            text, code = ws_error_reply(ws_url(running), frame)
            assert code == 1011 and text
            texts.append(text)
        with urllib.request.urlopen(http_url(running) + "/healthz", timeout=30) as response:
            texts.append(response.read().decode())
        for path, body in (("/act", json.dumps({"full_image": 1}).encode()), ("/act", b"{"), ("/metadata", b"{}")):
            status, reply = http_post(http_url(running) + path, body)
            assert 400 <= status < 500
            texts.append(reply.decode())
        status, reply = http_post(http_url(running) + "/act", codec.json_dumps(openvla_obs(5)).encode())
        assert status == 200
    meta = codec.unpackb(raw)
    assert isinstance(raw, bytes) and meta["policy"].startswith("oft-")
    texts += _strings(meta)
    local = {str(policy_dir), str(policy_dir.parent), str(tmp_path.parent), tempfile.gettempdir(), str(Path.home())}
    for fragment in local:
        assert fragment.encode() not in raw, fragment
        assert not [t for t in texts if fragment in t], (fragment, [t for t in texts if fragment in t][:3])
    assert not [t for t in _strings(meta) if t.startswith(("/", "~", ".")) or "\\" in t]
    documented = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    fields = [*meta, *(f"observation.{k}" for k in meta["observation"]), *(f"action.{k}" for k in meta["action"])]
    undocumented = [f for f in fields if f"`{f.rsplit('.', 1)[-1]}`" not in documented]
    assert not undocumented, f"docs/serving.md does not document {undocumented}"


def test_openvla_http_plain_and_double_encoded(server, reference):
    want = expected(reference, 4)
    assert np.array_equal(HttpClientPolicy(http_url(server)).infer(openvla_obs(4)), want)
    assert np.array_equal(HttpClientPolicy(http_url(server), double_encode=True).infer(openvla_obs(4)), want)
    # the raw bodies, as a json_numpy-patched client sends them and reads them
    status, body = http_post(http_url(server) + "/act", codec.json_dumps(openvla_obs(4)).encode())
    chunk = json.loads(body)
    assert status == 200 and len(chunk) == 8
    assert all(set(a) == {"__numpy__", "dtype", "shape"} and a["dtype"] == "<f8" and a["shape"] == [7] for a in chunk)
    status, body = http_post(http_url(server) + "/act",
                             json.dumps({"encoded": codec.json_dumps(openvla_obs(4))}).encode())
    text = json.loads(body)
    assert status == 200 and isinstance(text, str) and np.array_equal(np.stack(codec.json_loads(text)), want)


def test_error_replies_are_protocol_appropriate(server, reference):
    url = ws_url(server)
    good = libero_obs(5)
    cases = {
        "missing required keys ['observation/state']": {k: v for k, v in good.items() if k != "observation/state"},
        "observation/image: float images must lie in [0, 1], found [0, 510]": {
            **good, "observation/image": good["observation/image"] * 2.0},
        "observation/wrist_image: image dtype int32 is not accepted": {
            **good, "observation/wrist_image": good["observation/wrist_image"].astype(np.int32)},
        "observation/state: expected shape (8,), found (9,)": {**good, "observation/state": np.zeros(9)},
        "observation/state: state has non-finite values at [2]": {**good, "observation/state":
                                                                 np.array([0, 0, np.nan, 0, 0, 0, 0, 0.0])},
        "prompt: expected a string, found int": {**good, "prompt": 7},
        "expected the observation as a map": [1, 2, 3],
        "prompt: 2001 characters, the limit is 2000": {**good, "prompt": "x" * 2001},
    }
    for needle, request in cases.items():
        text, code = ws_error_reply(url, codec.packb(request))
        assert text is not None and needle in text and code == 1011, (needle, text, code)
    text, code = ws_error_reply(url, "hello")
    assert "text frames are not part of the protocol" in text and code == 1011
    text, code = ws_error_reply(url, b"\x00" * (MAX_MESSAGE + 1))
    assert text is None and code == 1009  # message too big
    with WebsocketClientPolicy("127.0.0.1", server.server.ws_port) as client:  # openpi-client's behaviour
        with pytest.raises(ServerError, match="Error in inference server:\nbad request: missing"):
            client.infer({"prompt": "x"})
        assert np.array_equal(client.infer(good)["actions"], expected(reference, 5))  # reconnects by itself

    act = http_url(server) + "/act"
    body_cases = {
        (400, "invalid JSON"): b"{not json",
        (400, "invalid base64"): b'{"full_image": {"__numpy__": "!!!", "dtype": "|u1", "shape": [1]}}',
        (400, "data bytes, but shape"): b'{"full_image": {"__numpy__": "AAAA", "dtype": "|u1", "shape": [4]}}',
        (400, "nothing else"): json.dumps({"encoded": codec.json_dumps(openvla_obs(1)), "x": 1}).encode(),
        (400, "missing required keys"): json.dumps({"instruction": "x"}).encode(),
        (400, "expected the observation as a map"): b"[1, 2]",
        (413, "larger than"): b" " * (MAX_MESSAGE + 10),
    }
    for (status, needle), body in body_cases.items():
        got, reply = http_post(act, body)
        assert got == status and needle in json.loads(reply)["error"], (needle, got, reply[:200])
    got, reply = http_post(http_url(server) + "/nothing-here", b"{}")
    assert got == 404 and json.loads(reply)["status"] == 404
    assert server.alive


# ====================================================================== fuzz (SERVING.md 4)
def malformed_frames(rng: np.random.Generator, count: int) -> list[tuple[str, bytes | str]]:
    """`count` malformed websocket frames of every kind, as (kind, frame)."""
    good = libero_obs(9)
    packed_good = codec.packb(good)

    def arr_map(data: bytes, dtype, shape) -> dict:
        return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}

    def wrong_types():
        key = rng.choice(list(good))
        value = [None, 1, 2.5, b"\xff\xfe", [1, 2], {"a": 1}, True][rng.integers(7)]  # wrong for every key
        return codec.packb({**good, key: value})

    def wrong_shapes():
        key = ["observation/image", "observation/wrist_image", "observation/state"][rng.integers(3)]
        shape = [(112, 112), (112, 112, 4), (0, 112, 3), (2, 2, 2, 3), (9,), (8, 1), (), (1, 8)][rng.integers(8)]
        return codec.packb({**good, key: np.zeros(shape, np.uint8 if "image" in key else np.float64)})

    def wrong_dtypes():
        choice = rng.integers(4)
        if choice == 0:
            return codec.packb({**good, "observation/image": good["observation/image"].astype(np.int32)})
        if choice == 1:
            return codec.packb({**good, "observation/state": np.array(["a"] * 8)})
        if choice == 2:
            return codec.packb({**good, "observation/image": good["observation/image"] / 100.0})  # float > 1
        dtype = ["<c8", "|O", "|V4", "<M8[s]", "zz", "f4,f4"][rng.integers(6)]
        return msgpack.packb({"observation/state": arr_map(b"\0" * 64, dtype, [8])}, use_bin_type=True)

    def non_finite():
        state = good["observation/state"].copy()
        state[rng.integers(8)] = [np.nan, np.inf, -np.inf][rng.integers(3)]
        if rng.integers(2):
            return codec.packb({**good, "observation/state": state})
        image = (good["observation/image"] / 255.0).astype(np.float32)
        image[rng.integers(112), rng.integers(112), 0] = np.nan
        return codec.packb({**good, "observation/image": image})

    def missing_keys():
        drop = list(good)[rng.integers(4)]
        return codec.packb({k: v for k, v in good.items() if k != drop and rng.random() < 0.7})

    def bad_arrays():
        shape = [[1 << 40], [-1], [7], [2, 3.5], "8", [True]][rng.integers(6)]
        return msgpack.packb({**{k: v for k, v in good.items() if k != "observation/state"} | {"prompt": "x"},
                              "observation/state": arr_map(b"\0" * 64, "<f8", shape)}, use_bin_type=True,
                             default=codec._pack_numpy)

    def structure():
        options = [lambda: packed_good[: rng.integers(1, len(packed_good))],
                   lambda: packed_good + bytes(rng.integers(0, 256, rng.integers(1, 8), dtype=np.uint8)),
                   lambda: msgpack.packb([good["prompt"]]), lambda: msgpack.packb(int(rng.integers(1 << 30))),
                   lambda: msgpack.packb({1: 2}), lambda: msgpack.packb(msgpack.ExtType(1, b"x")),
                   lambda: b"\x91" * int(rng.integers(2000, 5000)), lambda: b"", lambda: msgpack.packb(None)]
        return options[rng.integers(len(options))]()

    def random_bytes():
        return bytes(rng.integers(0, 256, rng.integers(1, 300), dtype=np.uint8))

    def text():
        return "".join(chr(c) for c in rng.integers(32, 0x2FF, rng.integers(0, 60)))

    makers = [("types", wrong_types), ("shapes", wrong_shapes), ("dtypes", wrong_dtypes), ("nan/inf", non_finite),
              ("missing", missing_keys), ("arrays", bad_arrays), ("structure", structure), ("random", random_bytes),
              ("text", text)]
    frames = [makers[i % len(makers)] for i in range(count)]
    return [(name, make()) for name, make in frames]


def malformed_bodies(rng: np.random.Generator, count: int) -> list[bytes]:
    good = openvla_obs(9)
    text = codec.json_dumps(good)
    options = [lambda: bytes(rng.integers(0, 256, rng.integers(1, 200), dtype=np.uint8)),
               lambda: text[: rng.integers(1, len(text))].encode(),
               lambda: b'"just a string"', lambda: b"[1, 2, 3]", lambda: b"null",
               lambda: json.dumps({"encoded": text, "extra": 1}).encode(),
               lambda: json.dumps({"encoded": 5}).encode(), lambda: json.dumps({"encoded": "{broken"}).encode(),
               lambda: json.dumps({**json.loads(text), "state": [float("nan")] * 8}).encode(),
               lambda: json.dumps({**json.loads(text), "full_image": {"__numpy__": "AA==", "dtype": "|u1",
                                                                       "shape": [112, 112, 3]}}).encode(),
               lambda: json.dumps({**json.loads(text), "wrist_2": json.loads(text)["wrist_image"]}).encode(),
               lambda: json.dumps({k: v for k, v in json.loads(text).items() if k != "instruction"}).encode()]
    return [options[i % len(options)]() for i in range(count)]


async def _fuzz(server, frames, bodies, good_stop: threading.Event) -> dict:
    import aiohttp

    url, act = ws_url(server), http_url(server) + "/act"
    gate = asyncio.Semaphore(8)
    outcomes: dict[str, int] = {}

    def note(kind: str) -> None:
        outcomes[kind] = outcomes.get(kind, 0) + 1

    async def one_frame(kind: str, frame) -> None:
        async with gate:
            async with aconnect(url, compression=None, max_size=None) as ws:
                await ws.recv()
                await ws.send(frame)
                try:
                    reply = await asyncio.wait_for(ws.recv(), 30)
                    assert isinstance(reply, str), f"{kind}: a malformed frame got a binary answer"
                    await asyncio.wait_for(ws.recv(), 10)
                except ConnectionClosed:
                    pass
                assert ws.close_code in (1011, 1009), f"{kind}: closed with {ws.close_code}"
                note(f"ws {ws.close_code}")

    async def oversized() -> None:
        async with gate:
            async with aconnect(url, compression=None, max_size=None) as ws:
                await ws.recv()
                try:
                    await ws.send(b"\x80" * (MAX_MESSAGE + 1))
                    await asyncio.wait_for(ws.recv(), 30)
                except ConnectionClosed:
                    pass
                assert ws.close_code == 1009
                note("ws oversized 1009")

    async def abrupt(i: int) -> None:
        async with gate:
            port = server.server.ws_port
            kind = i % 5
            if kind == 0:  # TCP open and close
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            elif kind == 1:  # half a handshake
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            elif kind == 2:  # a frame header promising more than is sent
                ws = await aconnect(url, compression=None)
                ws.transport.write(struct.pack("!BBH", 0x82, 0xFE, 60000) + b"\0" * 4 + b"\1" * 100)
                ws.transport.abort()
                note("abrupt")
                return
            elif kind == 3:  # connect and vanish without reading anything
                ws = await aconnect(url, compression=None)
                ws.transport.abort()
                note("abrupt")
                return
            else:  # disconnect while the model runs on our request
                ws = await aconnect(url, compression=None, max_size=None)
                await ws.recv()
                await ws.send(codec.packb(libero_obs(9)))
                await asyncio.sleep(0.01)
                ws.transport.abort()
                note("abrupt")
                return
            writer.transport.abort()
            note("abrupt")

    async with aiohttp.ClientSession() as session:
        async def one_body(body: bytes) -> None:
            async with gate:
                async with session.post(act, data=body, headers={"Content-Type": "application/json"}) as r:
                    payload = await r.json(content_type=None)
                    assert 400 <= r.status < 500 and payload["status"] == r.status and payload["error"], payload
                    note(f"http {r.status}")

        async def big_body() -> None:
            async with gate:
                async with session.post(act, data=b"[" + b"1," * MAX_MESSAGE + b"1]") as r:
                    assert r.status == 413
                    note("http 413")

        tasks = [one_frame(k, f) for k, f in frames] + [oversized() for _ in range(4)]
        tasks += [abrupt(i) for i in range(60)] + [one_body(b) for b in bodies] + [big_body() for _ in range(2)]
        order = np.random.default_rng(1).permutation(len(tasks))
        await asyncio.gather(*[tasks[i] for i in order])
    good_stop.set()
    return outcomes


def test_fuzz_never_hurts_the_server_or_other_clients(server, reference, caplog):
    rng = np.random.default_rng(0)
    frames = malformed_frames(rng, 1100)
    bodies = malformed_bodies(rng, 150)
    want, stop = expected(reference, 9), threading.Event()
    good_answers, wrong = [0, 0], []

    def well_behaved_ws() -> None:
        with WebsocketClientPolicy("127.0.0.1", server.server.ws_port) as client:
            while not stop.is_set():
                got = client.infer(libero_obs(9))["actions"]
                good_answers[0] += 1
                if not np.allclose(got, want, atol=ATOL, rtol=0):
                    wrong.append(got)

    def well_behaved_http() -> None:
        client = HttpClientPolicy(http_url(server))
        while not stop.is_set():
            got = client.infer(openvla_obs(9))
            good_answers[1] += 1
            if not np.allclose(got, want, atol=ATOL, rtol=0):
                wrong.append(got)

    caplog.set_level("INFO")
    threads = [threading.Thread(target=f, daemon=True) for f in (well_behaved_ws, well_behaved_http)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    outcomes = asyncio.run(_fuzz(server, frames, bodies, stop))
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - t0
    ws_errors = sum(v for k, v in outcomes.items() if k.startswith("ws"))
    assert ws_errors >= 1000 + 4 and outcomes["abrupt"] == 60 and outcomes["http 413"] == 2, outcomes
    assert sum(v for k, v in outcomes.items() if k.startswith("http 4")) == 152
    assert not wrong and min(good_answers) >= 2, (good_answers, elapsed)
    assert server.alive and not any(t.is_alive() for t in threads)
    problems = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not problems, [r.getMessage() for r in problems[:5]]
    with urllib.request.urlopen(http_url(server) + "/healthz", timeout=10) as r:
        assert r.read() == b"OK\n"


# ====================================================================== concurrency
def test_sixteen_concurrent_clients_get_their_own_answers(server, reference):
    seeds = list(range(100, 116))
    want = {s: expected(reference, s) for s in seeds}
    barrier, results, errors = threading.Barrier(len(seeds)), {}, []

    def client(seed: int) -> None:
        try:
            with WebsocketClientPolicy("127.0.0.1", server.server.ws_port) as c:
                barrier.wait(30)
                results[seed] = [c.infer(libero_obs(seed))["actions"] for _ in range(2)]
        except Exception as exc:  # reported below
            errors.append(exc)

    before = server.server.engine.passes
    server.server.engine.largest_batch = 0
    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    while server.server.engine.passes == before:  # wait until the model is busy
        time.sleep(0.005)
    t0 = time.perf_counter()
    with urllib.request.urlopen(ws_url(server).replace("ws", "http") + "/healthz", timeout=10) as r:
        assert r.read() == b"OK\n"  # health answers while inference runs (not queued behind it)
    healthz_s = time.perf_counter() - t0
    for t in threads:
        t.join(120)
    assert not errors and len(results) == len(seeds)
    for seed in seeds:
        for got in results[seed]:
            assert np.allclose(got, want[seed], atol=ATOL, rtol=0), seed
    assert len({round(float(results[s][0][0, 0]), 6) for s in seeds}) > 8  # the answers really differ per client
    assert server.server.engine.largest_batch > 1  # requests from different clients shared forward passes
    assert server.server.engine.passes - before < 2 * len(seeds)
    assert healthz_s < 0.5, healthz_s


def test_engine_isolates_a_failing_request():
    class Picky:
        """Not a mock of a project component: a policy that fails on one instruction and emits NaN on another."""

        def predict_action_chunk(self, obs):
            if obs["instruction"] == "boom":
                raise RuntimeError("kaboom")
            return np.full((2, 3), np.nan if obs["instruction"] == "nan" else float(len(obs["instruction"])))

    engine = InferenceEngine(Picky(), max_batch=4, batch_wait_s=0.05, expected_shape=(2, 3)).start()

    async def run():
        return await asyncio.gather(*[engine.submit({"instruction": t}) for t in ("ab", "boom", "nan", "abcd")],
                                    return_exceptions=True)

    ok2, boom, nan, ok4 = asyncio.run(run())
    engine.stop()
    assert np.all(ok2.actions == 2) and np.all(ok4.actions == 4)
    assert isinstance(boom, PolicyError) and "kaboom" in str(boom)
    assert isinstance(nan, PolicyError) and "non-finite" in str(nan)
    assert engine.served == 2 and engine.failed == 2


# ====================================================================== authentication
def test_shared_secret_is_enforced(policy_dir, reference):
    config = ServeConfig(host="127.0.0.1", port=0, http_port=0, secret="s3cret", max_message_bytes=MAX_MESSAGE)
    with ServerThread(load_policy(policy_dir), config) as running:
        port = running.server.ws_port
        for headers in (None, {"Authorization": "Api-Key wrong"}, {"Authorization": "s3cret"}):
            with pytest.raises(InvalidStatus) as info:
                sconnect(f"ws://127.0.0.1:{port}", additional_headers=headers, open_timeout=10)
            assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            WebsocketClientPolicy("127.0.0.1", port, api_key="wrong")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:  # health needs no secret
            assert r.status == 200
        with WebsocketClientPolicy("127.0.0.1", port, api_key="s3cret") as client:
            assert np.array_equal(client.infer(libero_obs(6))["actions"], expected(reference, 6))
        url = f"http://127.0.0.1:{running.server.http_port}"
        with pytest.raises(ServerError, match="HTTP 401"):
            HttpClientPolicy(url, api_key="wrong").infer(openvla_obs(6))
        assert np.array_equal(HttpClientPolicy(url, api_key="s3cret").infer(openvla_obs(6)), expected(reference, 6))
        assert running.server.rejected == 5


def test_timeouts_and_connection_cap(policy_dir):
    config = ServeConfig(host="127.0.0.1", port=0, http_port=0, request_timeout_s=1e-3, max_connections=2)
    with ServerThread(load_policy(policy_dir), config) as running:
        url = f"ws://127.0.0.1:{running.server.ws_port}"
        text, code = ws_error_reply(url, codec.packb(libero_obs(1)))
        assert "inference did not finish within 0.001 s" in text and code == 1011
        status, body = http_post(f"http://127.0.0.1:{running.server.http_port}/act",
                                 codec.json_dumps(openvla_obs(1)).encode())
        assert status == 504 and "did not finish" in json.loads(body)["error"]
        first, second = sconnect(url).__enter__(), sconnect(url).__enter__()  # held open by hand
        with pytest.raises(InvalidStatus) as info:
            sconnect(url, open_timeout=10)
        assert info.value.response.status_code == 503
        first.close()
        deadline = time.monotonic() + 10
        while running.server.ws_sessions >= 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with sconnect(url) as third:
            assert codec.unpackb(third.recv(timeout=10))["action_horizon"] == 8
        second.close()
        assert running.alive


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Send `trickle` one byte every 0.1 s until the server closes the connection; seconds it took."""
    t0 = time.monotonic()
    sock.settimeout(0.1)
    for i in range(int(seconds / 0.1)):
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - t0
        try:
            if trickle:
                sock.send(trickle[i % len(trickle):i % len(trickle) + 1])
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0
    raise AssertionError(f"the server kept the connection open for {seconds} s")


def test_slow_header_clients_are_dropped_on_both_ports(policy_dir, reference):
    """A client that trickles its request head (or sends nothing) is disconnected after header_timeout_s,
    on the HTTP port as on the websocket port; a normal client on a fresh connection is still answered."""
    config = ServeConfig(host="127.0.0.1", port=0, http_port=0, header_timeout_s=0.5)
    with ServerThread(load_policy(policy_dir), config) as running:
        http, ws = running.server.http_port, running.server.ws_port
        with socket.create_connection(("127.0.0.1", http)) as slow:
            slow.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\n")
            took = _closed_within(slow, 5.0, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
            assert 0.4 < took < 2.0, took
        with socket.create_connection(("127.0.0.1", http)) as silent:
            assert 0.4 < _closed_within(silent, 5.0) < 2.0
        with socket.create_connection(("127.0.0.1", ws)) as silent:  # the websocket handshake deadline
            assert _closed_within(silent, 5.0) < 2.0
        status, body = http_post(f"http://127.0.0.1:{http}/act", codec.json_dumps(openvla_obs(3)).encode())
        assert status == 200 and np.array_equal(np.stack(codec.json_loads(body)), expected(reference, 3))
        client = HttpClientPolicy(f"http://127.0.0.1:{http}")  # keep-alive: idle past the deadline, then reused
        assert np.array_equal(client.infer(openvla_obs(4)), expected(reference, 4))
        time.sleep(0.8)
        assert np.array_equal(client.infer(openvla_obs(5)), expected(reference, 5))
        client.close()
        assert running.alive


# ====================================================================== client side
def test_broker_replans_every_k_steps(server, reference):
    class Counting:
        def __init__(self, inner):
            self.inner, self.sent = inner, []

        def infer(self, obs):
            self.sent.append(obs["prompt"])
            return self.inner.infer(obs)

        def reset(self):
            self.inner.reset()

    with WebsocketClientPolicy("127.0.0.1", server.server.ws_port) as client:
        counting = Counting(client)
        broker = ActionChunkBroker(counting, action_horizon=3)
        steps = [broker.infer(libero_obs(seed)) for seed in range(7)]
        assert counting.sent == [libero_obs(s)["prompt"] for s in (0, 3, 6)]  # a query at steps 0, 3, 6 only
        for step, out in enumerate(steps):
            chunk = expected(reference, 3 * (step // 3))
            assert out["actions"].shape == (7,) and np.array_equal(out["actions"], chunk[step % 3])
            assert "infer_ms" in out["policy_timing"]  # non-array leaves pass through
        broker.reset()
        broker.infer(libero_obs(1))
        assert counting.sent[-1] == libero_obs(1)["prompt"]  # reset drops the cached chunk
        too_long = ActionChunkBroker(client, action_horizon=9)
        for _ in range(8):
            too_long.infer(libero_obs(2))
        with pytest.raises(IndexError, match="longer than the returned chunk"):
            too_long.infer(libero_obs(2))


def test_client_imports_no_torch():
    code = ("import sys; import spatial_forcing.serve.client, spatial_forcing.serve.libero, spatial_forcing.serve.codec; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'aiohttp')); "
            "assert not bad, bad; print('clean')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


# ====================================================================== the command
def test_sf_serve_command_starts_answers_and_stops_on_ctrl_c(policy_dir, reference):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "spatial_forcing.cli", "serve", "--policy", str(policy_dir), "--host", "127.0.0.1",
           "--port", "0", "--http-port", "0", "--no-warmup"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 90
        while not any("press Ctrl-C" in line for line in seen):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        text = "".join(seen)
        ws_port = int(re.search(r"ws://127\.0\.0\.1:(\d+)", text).group(1))
        http_port = int(re.search(r"http://127\.0\.0\.1:(\d+)/act", text).group(1))
        assert "actions [8, 7]" in text and "auth off" in text
        with WebsocketClientPolicy("127.0.0.1", ws_port) as client:
            got = client.infer(libero_obs(7))["actions"]
        assert np.allclose(got, expected(reference, 7), atol=1e-6, rtol=0)
        assert np.allclose(HttpClientPolicy(f"http://127.0.0.1:{http_port}").infer(openvla_obs(7)), got, atol=1e-6)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    rest = "".join(seen) + "".join(lines.queue)
    assert "stopped: 2 requests answered" in rest, rest
    with socket.socket() as s:  # nothing listens there any more (TIME_WAIT remains, hence SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", ws_port))


def test_sf_serve_refuses_bad_options(policy_dir, capsys):
    from spatial_forcing.cli import main

    assert main(["serve", "--policy", str(policy_dir), "--obs-map", "nope"]) == 2
    assert "not a preset" in capsys.readouterr().err
    assert main(["serve", "--policy", str(policy_dir / "missing")]) == 2
    assert websockets.__version__  # the websocket library the protocol runs on
