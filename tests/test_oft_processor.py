"""policies/oft/processor.py: pixel values, centre crop, prompt ids, tokenizers, proprio, files."""

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spatial_forcing.policies.oft.config import OFTConfig
from spatial_forcing.normalize import DatasetStats
from spatial_forcing.policies.oft.processor import (DEFAULT_IMAGE_NORM, PLACEHOLDER_ID, ByteTokenizer, OFTProcessor,
                                                    as_view_tensor, center_crop, crop_box, format_prompt,
                                                    load_image_normalization, load_llama_tokenizer)

PROMPT = "In: What action should the robot take to pick up the black bowl?\nOut:"


@pytest.fixture
def mini():
    return OFTConfig.preset("mini")  # 112 px, 2 views, bytes tokenizer, chunk 8 x 7


@pytest.fixture
def proc(mini):
    return OFTProcessor(mini, ByteTokenizer())


def _stats(proprio_dim=8):
    arr = lambda v, n: [float(v)] * n  # noqa: E731
    return DatasetStats.from_dict({
        "action": {"mean": arr(0, 7), "std": arr(1, 7), "max": arr(1, 7), "min": arr(-1, 7), "q01": arr(-0.5, 7),
                   "q99": arr(0.5, 7), "mask": [True] * 6 + [False]},
        "proprio": {"mean": arr(0, proprio_dim), "std": arr(1, proprio_dim), "max": arr(2, proprio_dim),
                    "min": arr(-2, proprio_dim), "q01": arr(-1, proprio_dim), "q99": arr(1, proprio_dim)},
        "num_transitions": 10, "num_trajectories": 1})


# ---------------------------------------------------------------- pixel values
@pytest.mark.parametrize("v", [0, 37, 128, 255])
def test_constant_image_channels(proc, v):
    u8 = np.full((112, 112, 3), v, np.uint8)
    f01 = torch.full((3, 112, 112), v / 255.0)
    for img in (u8, torch.from_numpy(u8), f01, Image.fromarray(u8)):
        pv = proc.pixel_values([img, img])
        assert pv.shape == (12, 112, 112) and pv.dtype == torch.float32
        x = torch.tensor(v, dtype=torch.float32) / 255
        assert torch.all(pv[0] == (x - 0.484375) / 0.228515625)
        assert torch.all(pv[1] == (x - 0.455078125) / 0.2236328125)
        assert torch.all(pv[2] == (x - 0.40625) / 0.224609375)
        assert torch.all(pv[3:6] == (x - 0.5) / 0.5)
    assert pv[0, 5, 7].item() == pytest.approx((v / 255 - 0.484375) / 0.228515625, abs=1e-6)
    assert pv[3, 5, 7].item() == pytest.approx((v / 255 - 0.5) / 0.5, abs=1e-6)


def test_views_occupy_their_channel_blocks(proc):
    a = np.full((112, 112, 3), 10, np.uint8)
    b = np.zeros((112, 112, 3), np.uint8)
    b[..., 0], b[..., 1], b[..., 2] = 200, 100, 50
    pv = proc.pixel_values([a, b])
    only_a = proc.pixel_values([a, a])
    only_b = proc.pixel_values([b, b])
    assert torch.equal(pv[0:6], only_a[0:6]) and torch.equal(pv[6:12], only_b[6:12])
    assert pv[6, 0, 0].item() == pytest.approx((200 / 255 - 0.484375) / 0.228515625, abs=1e-6)
    assert pv[7, 0, 0].item() == pytest.approx((100 / 255 - 0.455078125) / 0.2236328125, abs=1e-6)
    assert pv[9, 0, 0].item() == pytest.approx((200 / 255 - 0.5) / 0.5, abs=1e-6)
    assert pv[11, 0, 0].item() == pytest.approx((50 / 255 - 0.5) / 0.5, abs=1e-6)


def test_resize_non_square_uint8_matches_pil_bicubic(proc):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    pv = proc.pixel_values([img, img])
    assert pv.shape == (12, 112, 112)
    pil = np.array(Image.fromarray(img).resize((112, 112), Image.Resampling.BICUBIC))
    expected = (torch.from_numpy(pil).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(pv[3:6], expected)  # bit-exact with upstream's PIL resize
    f = proc.pixel_values([torch.rand(3, 300, 200), torch.rand(3, 64, 64)])
    assert f.shape == (12, 112, 112) and f[3:6].min() >= -1 and f[3:6].max() <= 1


def test_center_crop_removes_border_and_keeps_centre():
    img = np.full((224, 224, 3), 100, np.uint8)
    img[:5], img[-5:], img[:, :5], img[:, -5:] = 255, 255, 255, 255  # crop starts at 223 * 0.02566 = 5.72
    out = center_crop(as_view_tensor(img), 224)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert torch.all(out == 100)  # the frame is gone, the inside is unchanged (trunc(100/255 * 255.5) = 100)
    inner = np.full((224, 224, 3), 100, np.uint8)
    inner[100:124, 100:124] = 0  # a centred dark square grows by 1/sqrt(0.9)
    dark = (center_crop(as_view_tensor(inner), 224)[0] < 50).sum(dim=1).max().item()
    assert dark in (25, 26)  # 24 / 0.9487 = 25.3


# TensorFlow 2.21 goldens of upstream `center_crop_image` (crop_and_resize to 12 x 12 instead of 224 x 224)
# on the 20 x 24 image below, generated once in a separate environment.
TF_CROP_U8 = (
    "CyhFJkNgQV57W3iVdpOwka7LrMnmx+SE4YEbfxk2FjRRMU5rKUZjR2SBZYKfg6C9ob7Kv8zZzdoX2xg1GTZTN1RxVXKPc5Ctbouoj6zK"
    "sc7r0oVIjExKUU9OVFNwV3SReJWymbfUu9ih3DVSnI6rlls3ZT9cRmOAa4ilj6yVtJ6GcY6rlbM3dj5bRmOAaoekZ4Sbj6G+rMnm1GwY"
    "eyNALktoVXOKfZCtmrfUwt+Q6hEuHDlWb4x5mmaDdJGun7x6yjhVRmOAcY6DnGiFdpOwob6NgTpXSGWCp8R6cURhVXJhg3RrYH2ajqvI"
    "vIRImFl2amJTdWSBdZKvpMGWZx88NFFuZYKal67Gvtt3cxc0K0hlXXqXj6e+u9KD5w4rI0BdhqTBu52OiVAqa0JfWXaUjqvIw62WkWUy"
    "LElmYX6blrPQy75fLktoZoOgnrvY1oksKytIRmOAfpu4ttOTlCwoJkNgXnuYlrPQVxg1N1Rxco+srcrW2HAiJEFeX3yZmrfV1n0PES5L"
    "TGmGh6TC8HYqLktobYqnq8nm6oEkKEViZ4ShpsPg5IseIj9cYX6boL3a")
TF_CROP_F32 = {(0, 0, 0): 0.04459653049707413, (5, 7, 1): 0.4072086811065674, (11, 11, 2): 0.8538351655006409,
               (3, 9, 0): 0.4650745987892151}


def test_center_crop_bit_exact_with_tensorflow():
    y, x, c = np.meshgrid(np.arange(20), np.arange(24), np.arange(3), indexing="ij")
    im = ((7 * y * y + 13 * x + 29 * c + x * y) % 256).astype(np.uint8)
    golden = np.frombuffer(base64.b64decode(TF_CROP_U8), np.uint8).reshape(12, 12, 3)
    got = center_crop(as_view_tensor(im), 12).permute(1, 2, 0).numpy()
    assert np.array_equal(got, golden)
    f = center_crop(torch.from_numpy(im).permute(2, 0, 1).float() * torch.tensor(1 / 255), 12)
    for (i, j, ch), value in TF_CROP_F32.items():
        assert f[ch, i, j].item() == value


def test_center_crop_sample_positions_tf_golden():
    low, high, side = crop_box()
    assert side == 0.9486832618713379  # float32 sqrt(0.9), correctly rounded as in TF
    assert low == pytest.approx(0.0256584, abs=1e-7) and high == pytest.approx(0.9743416, abs=1e-7)
    ramp = torch.arange(224, dtype=torch.float32)[:, None].expand(224, 224) / 255  # value = row / 255
    out = center_crop(torch.stack([ramp] * 3), 224)[0, :, 0] * 255
    rows = 5.7218 + torch.arange(224) * 0.94868  # LIBERO.md: first sample row 5.7218, step 0.94868
    assert torch.allclose(out, rows, atol=2e-3)


def test_call_applies_center_crop_per_config(mini):
    img = np.full((112, 112, 3), 100, np.uint8)
    img[:2] = 255  # rows 0-1; the crop's first sample row is 111 * 0.02566 = 2.85
    obs = {"images": [img, img], "instruction": "go", "state": np.zeros(8)}
    cropped = OFTProcessor(mini, ByteTokenizer(), stats=_stats())(obs)["pixel_values"]
    plain = OFTProcessor(mini, ByteTokenizer(), center_crop=False, stats=_stats())(obs)["pixel_values"]
    x = torch.tensor(100.0) / 255
    assert torch.all(cropped[0, 3] == (x - 0.5) / 0.5)  # the top rows are cropped away
    assert torch.all(plain[0, 3, 0] == 1.0) and not torch.equal(cropped, plain)


def test_image_errors(proc):
    good = np.zeros((112, 112, 3), np.uint8)
    with pytest.raises(ValueError, match="got 1 views, config.num_images expects 2"):
        proc.pixel_values([good])
    with pytest.raises(ValueError, match=r"images\[1\]: expected dtype uint8 .* found torch.int32"):
        proc.pixel_values([good, np.zeros((112, 112, 3), np.int32)])
    with pytest.raises(ValueError, match=r"uint8 image must have shape \(H, W, 3\), found \(3, 112, 112\).*permute"):
        proc.pixel_values([good, np.zeros((3, 112, 112), np.uint8)])
    with pytest.raises(ValueError, match=r"float image must have shape \(3, H, W\), found \(112, 112, 3\)"):
        proc.pixel_values([good, np.zeros((112, 112, 3), np.float32)])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], found range \[0, 255\]"):
        proc.pixel_values([good, torch.linspace(0, 255, 3 * 112 * 112).view(3, 112, 112)])
    with pytest.raises(TypeError, match="one image per view"):
        proc.pixel_values(good)


def test_batch_fast_path_equals_per_sample(proc):
    x = torch.rand(3, 2, 3, 112, 112)
    fast = proc.pixel_values_batch(x)
    assert fast.shape == (3, 12, 112, 112)
    for b in range(3):
        assert torch.equal(fast[b], proc.pixel_values([x[b, 0], x[b, 1]]))
    with pytest.raises(ValueError, match=r"expected float \[B, 2, 3, 112, 112\]"):
        proc.pixel_values_batch(torch.rand(3, 1, 3, 112, 112))


def test_image_normalization_from_upstream_file(tmp_path):
    d = {"use_fused_vision_backbone": True, "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
         "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
         "tvf_normalize_params": [{"mean": [0.484375, 0.455078125, 0.40625],
                                   "std": [0.228515625, 0.2236328125, 0.224609375], "inplace": False},
                                  {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "inplace": False}]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    assert load_image_normalization(tmp_path) == DEFAULT_IMAGE_NORM  # tvf_* wins over means/stds
    del d["tvf_normalize_params"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    norm = load_image_normalization(tmp_path / "preprocessor_config.json")
    assert norm == (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3))
    pv = OFTProcessor(OFTConfig.preset("mini"), ByteTokenizer(), norm).pixel_values(
        [np.full((112, 112, 3), 51, np.uint8)] * 2)
    assert pv[0, 0, 0].item() == pytest.approx((0.2 - 0.485) / 0.229, abs=1e-6)
    d["means"] = d["means"][:1]
    d["stds"] = d["stds"][:1]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="has 1 entries, expected 2"):
        load_image_normalization(tmp_path)


# ---------------------------------------------------------------- text
def test_format_prompt_exact():
    assert format_prompt("Pick up the Black Bowl") == PROMPT
    assert format_prompt("") == "In: What action should the robot take to ?\nOut:"


@pytest.mark.parametrize("text", ["pick up the bowl", "ünïcödé 日本 🤖", "", "a\nb\tc  d"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == 1 and all(3 <= i < 259 for i in ids[1:]) and len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([0, 0] + ids + [2, 0]) == text  # specials skipped
    assert tok.encode("A") == [1, 65 + 3]


def test_text_inputs_batch_padding_and_prompt_lens(proc, mini):
    texts = ["go", "Pick up the bowl", "put the cream cheese in the bowl"]
    out = proc.text_inputs(texts)
    ids, mask, plens = out["input_ids"], out["attention_mask"], out["prompt_lens"]
    assert ids.dtype == torch.long and mask.dtype == torch.bool and plens.dtype == torch.long
    n_act = mini.chunk_len * mini.action_dim
    assert n_act == 56
    for b, t in enumerate(texts):
        prompt = format_prompt(t).encode("utf-8")
        expected = [1] + [c + 3 for c in prompt] + [mini.prompt_space_id] + [PLACEHOLDER_ID] * 56 + [2]
        assert plens[b].item() == len(prompt) + 1  # P counts the ids after BOS, incl. the space
        n = len(expected)
        assert ids[b, :n].tolist() == expected
        assert torch.all(ids[b, n:] == mini.pad_token_id)
        assert mask[b, :n].all() and not mask[b, n:].any()
    assert ids.shape == (3, 1 + plens.max().item() + 56 + 1)
    assert plens.tolist() == [len(format_prompt(t)) + 1 for t in texts]


class _EndsWithSpace(ByteTokenizer):
    """A tokenizer whose prompt encoding already ends with the space id."""

    def encode(self, text):
        return super().encode(text + " ")


def test_space_id_appended_only_when_absent(mini):
    plain = OFTProcessor(mini, ByteTokenizer()).prompt_ids("go")
    spaced = OFTProcessor(mini, _EndsWithSpace()).prompt_ids("go")
    assert plain[-1] == spaced[-1] == mini.prompt_space_id == 3 + ord(" ")
    assert plain[-2] == 3 + ord(":") and spaced[-2] == 3 + ord(":")
    assert plain == spaced  # appended once, never twice


def test_tokenizer_config_mismatch(mini):
    with pytest.raises(ValueError, match="config.tokenizer is 'llama'"):
        OFTProcessor(OFTConfig.preset("openvla-7b"), ByteTokenizer())
    with pytest.raises(ValueError, match="bos_token_id is 1, but config.bos_token_id is 5"):
        OFTProcessor(OFTConfig.preset("mini", bos_token_id=5), ByteTokenizer())


# ---------------------------------------------------------------- proprio and the one call
def test_call_single_observation(proc):
    img = np.full((112, 112, 3), 128, np.uint8)
    state = np.array([0.5, -1.0, 3.0, 0.0, 1.0, -5.0, 0.25, 0.0])
    out = proc({"images": [img, img], "state": state, "instruction": "Go"}, stats=_stats())
    assert out["pixel_values"].shape == (1, 12, 112, 112)
    assert out["input_ids"].shape[0] == 1 and out["attention_mask"].all()
    assert out["prompt_lens"].tolist() == [len(format_prompt("go")) + 1]
    p = out["proprio"]
    assert p.shape == (1, 8) and p.dtype == torch.float32
    expected = np.clip(2 * (state + 1) / (2 + 1e-8) - 1, -1, 1)  # q01 -1, q99 1
    assert torch.allclose(p[0], torch.tensor(expected, dtype=torch.float32))
    assert p[0, 2].item() == 1.0 and p[0, 5].item() == -1.0


def test_call_errors(proc):
    img = np.zeros((112, 112, 3), np.uint8)
    with pytest.raises(ValueError, match="state has 9 values, config.proprio_dim expects 8"):
        proc({"images": [img, img], "state": np.zeros(9), "instruction": "go"}, stats=_stats())
    with pytest.raises(ValueError, match="no dataset statistics"):
        proc({"images": [img, img], "state": np.zeros(8), "instruction": "go"})
    with pytest.raises(ValueError, match="state has 8 values .*statistics expect 9"):
        proc({"images": [img, img], "state": np.zeros(8), "instruction": "go"}, stats=_stats(9))
    with pytest.raises(KeyError, match=r"missing \['state'\]"):
        proc({"images": [img, img], "instruction": "go"}, stats=_stats())


def test_unnormalize_actions(proc):
    a = torch.tensor([[[1.0, -1.0, 0.0, 0.5, 2.0, -2.0, 0.75]]], dtype=torch.bfloat16)
    out = proc.unnormalize_actions(a, stats=_stats())
    assert out.dtype == np.float64 and out.shape == (1, 1, 7)
    assert out[0, 0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.25, 1.0, -1.0, 0.75], abs=1e-7)


def test_save_load_bytes(tmp_path, mini):
    norm = (((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), ((0.5,) * 3, (0.5,) * 3))
    p = OFTProcessor(mini, ByteTokenizer(), norm, center_crop=False)
    p.save(tmp_path)
    d = json.loads((tmp_path / "processor_config.json").read_text())
    assert d["tokenizer"] == "bytes" and d["center_crop"] is False
    q = OFTProcessor.load(tmp_path, mini)
    assert q.image_norm == norm and q.center_crop is False and isinstance(q.tokenizer, ByteTokenizer)
    with pytest.raises(ValueError, match="image_size is 112, but the config expects 224"):
        OFTProcessor.load(tmp_path, OFTConfig.preset("mini", image_size=224))


# ---------------------------------------------------------------- Llama tokenizer, offline
SENTENCES = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
             "put both the alphabet soup and the tomato sauce in the basket",
             "open the middle drawer of the cabinet", "turn on the stove and put the moka pot on it",
             "pick up the book and place it in the back compartment of the caddy",
             "push the plate to the front of the stove", "put the cream cheese in the bowl",
             "In: What action should the robot take to do it?\nOut:"]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    """A tiny Llama-2-like SentencePiece BPE model (byte fallback, dummy prefix), tokenizer.model only."""
    spm = pytest.importorskip("sentencepiece", reason="training a test tokenizer needs sentencepiece")
    folder = tmp_path_factory.mktemp("llama_tok")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 30), model_prefix=str(folder / "tokenizer"), vocab_size=420,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    (folder / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    pad = sp.get_piece_size()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<PAD>",
        "model_max_length": 2048, "padding_side": "right",
        "added_tokens_decoder": {str(pad): {"content": "<PAD>", "special": True, "normalized": False,
                                            "lstrip": False, "rstrip": False, "single_word": False}}}))
    return folder, sp


LLAMA_TEXTS = [PROMPT, format_prompt("Put the Zebra 123 in the xylophone, ünïcödé 日本"),
               format_prompt("a  b\tc"), " leading space", "x\n\ny  ", ""]


def test_llama_tokenizer_matches_sentencepiece(sp_folder, tmp_path):
    folder, sp = sp_folder
    tok = load_llama_tokenizer(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, sp.get_piece_size())
    assert len(sp.encode(PROMPT)) < len(PROMPT) - 10  # merges are in play, not just characters
    for text in LLAMA_TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    # The saved folder holds tokenizer.json (the Llama-2 layout) and loads to the same ids.
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    normalizer = json.loads((tmp_path / "tokenizer.json").read_text())["normalizer"]
    assert [n["type"] for n in normalizer["normalizers"]] == ["Prepend", "Replace"]
    again = load_llama_tokenizer(tmp_path)
    for text in LLAMA_TEXTS:
        assert again.encode(text) == [1] + sp.encode(text), text


def test_llama_processor_ids(sp_folder, tmp_path):
    folder, sp = sp_folder
    space = sp.piece_to_id("▁")
    assert sp.id_to_piece(space) == "▁"
    cfg = OFTConfig.preset("mini", tokenizer="llama", vocab_size=512, pad_token_id=sp.get_piece_size(),
                           prompt_space_id=space)
    proc = OFTProcessor(cfg, load_llama_tokenizer(folder))
    out = proc.text_inputs(["Pick up the black bowl", "go"])
    first = [1] + sp.encode(PROMPT) + [space] + [1] * 56 + [2]
    assert out["input_ids"][0].tolist() == first
    assert out["prompt_lens"][0].item() == len(sp.encode(PROMPT)) + 1
    second = [1] + sp.encode(format_prompt("go")) + [space] + [1] * 56 + [2]
    assert out["input_ids"][1, :len(second)].tolist() == second
    assert torch.all(out["input_ids"][1, len(second):] == cfg.pad_token_id)
    proc.save(tmp_path)
    reloaded = OFTProcessor.load(tmp_path, cfg)
    assert torch.equal(reloaded.text_inputs(["go"])["input_ids"][0], out["input_ids"][1, :len(second)])


def test_llama_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json or tokenizer.model"):
        load_llama_tokenizer(tmp_path)
