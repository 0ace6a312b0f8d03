"""OpenVLA-OFT inputs: camera images -> `pixel_values`, instruction -> token ids, state -> proprio.

Images (OPENVLA_OFT.md §9, LIBERO.md §3.2). Each view is either a uint8 `(H, W, 3)` array/tensor (or a
PIL image) or a float `(3, H, W)` array/tensor in [0, 1]. Per view, in order:

1. optional centre crop (inference, `config.center_crop`): the upstream evaluation's TF
   `crop_and_resize`, bilinear, box `[o, o, o+s, o+s]` with `s = sqrt(0.9)` and `o = (1 - s) / 2` in
   float32, output `S x S` sampled directly from the input (output row `i` reads input row
   `o (H-1) + i s (H-1) / (S-1)`); clipped to [0, 1]; uint8 inputs are read as `u8 * float32(1/255)` and
   written back as `trunc(v * 255.5)` (TF `convert_image_dtype(saturate=True)`), float inputs stay float.
   Bit-exact with TensorFlow 2.21 for uint8 and float inputs (goldens in the tests).
2. resize to `S = config.image_size` when the side differs: uint8 through PIL bicubic (what upstream's
   torchvision resize of a PIL image does, bit-exact; torch's uint8 antialias bicubic differs by up to 2
   levels on ~0.5 % of pixels), float through `F.interpolate(bicubic, antialias=True)` clamped to [0, 1]
   (no uint8 rounding).
3. `to_tensor` (`u8 / 255` in float32), then normalise twice -> 6 channels: channels 0-2 with the DINOv2
   statistics (bf16-rounded ImageNet values, as stored in the released `preprocessor_config.json`),
   channels 3-5 with the SigLIP statistics (0.5, 0.5); `(x - mean) / std` in float32.

Views are concatenated along channels: view `i` occupies channels `[6i, 6i + 6)`.

Text (§3.1-3.2): `format_prompt`; ids `[BOS] + tokens(prompt)`, then `prompt_space_id` if absent, then
`chunk_len * action_dim` placeholders (id 1, upstream's `torch.ones`; their embeddings are zeroed by the
model, so the id never matters) and EOS. Batches are right-padded with `pad_token_id`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import CROP_AREA, as_view_tensor, center_crop, crop_box, resize_view  # noqa: F401 (re-exported)
from .config import OFTConfig
from ...normalize import DatasetStats, STATS_FILE, load_dataset_statistics, normalize, select_stats, unnormalize

Vec3 = tuple[float, float, float]
ImageNorm = tuple[tuple[Vec3, Vec3], tuple[Vec3, Vec3]]  # ((dino mean, dino std), (siglip mean, siglip std))

# ImageNet statistics rounded to bf16, as stored in the released preprocessor_config.json (§9).
DINO_MEAN: Vec3 = (0.484375, 0.455078125, 0.40625)
DINO_STD: Vec3 = (0.228515625, 0.2236328125, 0.224609375)
SIGLIP_MEAN: Vec3 = (0.5, 0.5, 0.5)
SIGLIP_STD: Vec3 = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_NORM: ImageNorm = ((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD))

PLACEHOLDER_ID = 1  # upstream `_prepare_input_for_action_prediction` uses torch.ones for the action slots
PROMPT_TEMPLATE = "In: What action should the robot take to {}?\nOut:"
PROCESSOR_FILE = "processor_config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
LLAMA_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


# ============================================================================ images
def load_image_normalization(preprocessor_config_path: str | Path) -> ImageNorm:
    """The two `(mean, std)` pairs of an upstream `preprocessor_config.json` (a file or its folder).

    Reads `tvf_normalize_params` (a list of `{"mean", "std"}` dicts, which upstream lets override the
    rest) when present, else `means` / `stds`. Two entries are required: DINOv2 first, then SigLIP.
    """
    path = Path(preprocessor_config_path).expanduser()
    if path.is_dir():
        path = path / PREPROCESSOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the checkpoint's {PREPROCESSOR_FILE})")
    d = json.loads(path.read_text())
    if "tvf_normalize_params" in d:
        entries = d["tvf_normalize_params"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "mean" in e and "std" in e
                                                    for e in entries):
            raise ValueError(f"{path}: tvf_normalize_params must be a list of {{'mean', 'std'}} dicts, "
                             f"found {str(entries)[:120]}")
        pairs = [(e["mean"], e["std"]) for e in entries]
        source = "tvf_normalize_params"
    elif "means" in d and "stds" in d:
        pairs = list(zip(d["means"], d["stds"]))
        source = "means/stds"
    else:
        raise ValueError(f"{path}: neither 'tvf_normalize_params' nor 'means'/'stds' found; keys: {sorted(d)}")
    if len(pairs) != 2:
        raise ValueError(f"{path}: {source} has {len(pairs)} entries, expected 2 (DINOv2, SigLIP) for the "
                         "fused vision backbone")
    return check_image_norm(tuple(pairs), where=f"{path}: {source}")


def check_image_norm(image_norm: Any, where: str = "image_norm") -> ImageNorm:
    """Validate and canonicalise `((mean, std), (mean, std))`, three positive stds each."""
    try:
        pairs = [(tuple(float(v) for v in m), tuple(float(v) for v in s)) for m, s in image_norm]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: expected ((mean3, std3), (mean3, std3)), found {image_norm!r}") from exc
    if len(pairs) != 2 or any(len(m) != 3 or len(s) != 3 for m, s in pairs):
        raise ValueError(f"{where}: expected two (mean, std) pairs of 3 values each, found {pairs!r}")
    if any(v <= 0 for _, s in pairs for v in s):
        raise ValueError(f"{where}: standard deviations must be positive, found {[s for _, s in pairs]}")
    return tuple(pairs)  # type: ignore[return-value]


def normalize_views(images01: torch.Tensor, image_norm: ImageNorm = DEFAULT_IMAGE_NORM) -> torch.Tensor:
    """`[..., V, 3, H, W]` in [0, 1] -> `[..., 6V, H, W]`: per view DINOv2- then SigLIP-normalised RGB."""
    if images01.ndim < 4 or images01.shape[-3] != 3:
        raise ValueError(f"normalize_views: expected [..., V, 3, H, W], found shape {tuple(images01.shape)}")
    x = images01.float()
    outs = []
    for mean, std in image_norm:
        m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
        s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
        outs.append((x - m) / s)
    fused = torch.cat(outs, dim=-3)  # [..., V, 6, H, W]
    return fused.flatten(-4, -3)


def preprocess_view(image: Any, size: int, crop: bool = False, image_norm: ImageNorm = DEFAULT_IMAGE_NORM,
                    what: str = "image") -> torch.Tensor:
    """One camera image -> `(6, size, size)` float32 (crop, resize, /255, double normalisation)."""
    v = as_view_tensor(image, what)
    if crop:
        v = center_crop(v, size)
    v = resize_view(v, size)
    v01 = v.float().div(255) if v.dtype == torch.uint8 else v
    return normalize_views(v01[None], image_norm)


# ============================================================================ text
def format_prompt(instruction: str) -> str:
    """`"In: What action should the robot take to {instruction.lower()}?\\nOut:"` (§3.1)."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction: expected a string, found {type(instruction).__name__}")
    return PROMPT_TEMPLATE.format(instruction.lower())


class PromptTokenizer(Protocol):
    """What `OFTProcessor` needs from a tokenizer."""

    kind: str
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...  # BOS first, no EOS
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, folder: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 byte tokenizer of the `mini` preset: 0 = pad, 1 = BOS, 2 = EOS, byte `b` -> `b + 3`.

    It uses 259 ids (`config.vocab_size` 260 leaves one spare). No file is needed.
    """

    kind = "bytes"
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """`[BOS] + [b + 3 for b in text.encode("utf-8")]` (no EOS)."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: expected a string, found {type(text).__name__}")
        return [self.bos_token_id] + [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of `encode`; special ids (0, 1, 2) are skipped, invalid UTF-8 is replaced."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), found {bad[:8]}")
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        """Nothing to write: the byte tokenizer is fully described by `processor_config.json`."""


class LlamaPromptTokenizer:
    """A transformers Llama tokenizer that encodes exactly as transformers 4.40.1 did for OpenVLA.

    `encode(text) == [bos] + ids(text)` with no EOS, where `ids` uses the normaliser, pre-tokeniser and
    decoder of the checkpoint's own `tokenizer.json` (Llama-2: prepend "▁", spaces -> "▁", BPE with byte
    fallback), which reproduces SentencePiece. transformers 5.x rebuilds Llama tokenizers with a Metaspace
    pre-tokeniser that drops the dummy "▁" before text that starts with a space; restoring the file's
    components keeps every input exact, not only prompts (which start with "In:").
    """

    kind = "llama"

    def __init__(self, hf_tokenizer: Any) -> None:
        if hf_tokenizer.bos_token_id is None or hf_tokenizer.eos_token_id is None:
            raise ValueError("the Llama tokenizer has no BOS/EOS token (expected '<s>' = 1 and '</s>' = 2)")
        self.hf = hf_tokenizer
        self.bos_token_id = int(hf_tokenizer.bos_token_id)
        self.eos_token_id = int(hf_tokenizer.eos_token_id)
        self.pad_token_id = None if hf_tokenizer.pad_token_id is None else int(hf_tokenizer.pad_token_id)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: expected a string, found {type(text).__name__}")
        return [self.bos_token_id] + list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))


def load_llama_tokenizer(folder: str | Path) -> LlamaPromptTokenizer:
    """Load the Llama tokenizer of a checkpoint folder offline (`local_files_only=True`).

    Uses `tokenizer.json` with transformers' `LlamaTokenizer` (plus `tokenizer_config.json`,
    `special_tokens_map.json`, `added_tokens.json` when present). A folder with only `tokenizer.model`
    is converted through the `sentencepiece` runtime into the Llama-2 `tokenizer.json` layout first
    (transformers' own conversion would need `protobuf`); that route needs `sentencepiece` installed.
    """
    from transformers import LlamaTokenizer

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected a tokenizer folder with one of "
                                f"{list(LLAMA_TOKENIZER_FILES)})")
    if (folder / "tokenizer.json").is_file():
        hf = LlamaTokenizer.from_pretrained(str(folder), local_files_only=True)
        _restore_file_pipeline(hf, folder / "tokenizer.json")
        return LlamaPromptTokenizer(hf)
    if (folder / "tokenizer.model").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            _sentencepiece_to_tokenizer_json(folder / "tokenizer.model", Path(tmp) / "tokenizer.json")
            for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
                if (folder / name).is_file():
                    shutil.copy(folder / name, Path(tmp) / name)
            hf = LlamaTokenizer.from_pretrained(tmp, local_files_only=True)
            _restore_file_pipeline(hf, Path(tmp) / "tokenizer.json")
        return LlamaPromptTokenizer(hf)
    raise FileNotFoundError(f"{folder}: no Llama tokenizer files; expected {LLAMA_TOKENIZER_FILES[0]} or "
                            f"{LLAMA_TOKENIZER_FILES[1]} (with tokenizer_config.json) as shipped with "
                            "openvla/openvla-7b")


def _restore_file_pipeline(hf: Any, tokenizer_json: Path) -> None:
    """Put the file's own normaliser / pre-tokeniser / decoder back on the backend transformers rebuilt."""
    from tokenizers import Tokenizer

    d = json.loads(tokenizer_json.read_text())
    model = dict(d.get("model") or {})
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_json}: expected a BPE model (Llama-2 SentencePiece), found {model.get('type')!r}")
    model["vocab"], model["merges"] = {}, []
    light = Tokenizer.from_str(json.dumps({**d, "model": model, "added_tokens": [], "post_processor": None}))
    backend = hf.backend_tokenizer
    backend.normalizer = light.normalizer
    backend.pre_tokenizer = light.pre_tokenizer
    if light.decoder is not None:
        backend.decoder = light.decoder


def _sentencepiece_to_tokenizer_json(model_file: Path, out: Path) -> None:
    """Write the Llama-2 `tokenizer.json` layout of a SentencePiece BPE model (transformers 4.x converter).

    vocab = the pieces in id order; merges = every split of a piece into two pieces, ranked by the id of
    the merged piece (SentencePiece scores BPE pieces by rank); byte fallback; `fuse_unk`.
    """
    try:
        import sentencepiece as spm
    except ImportError as exc:
        raise ImportError(f"{model_file.parent}: only tokenizer.model is present; converting it needs the "
                          "`sentencepiece` package (or provide tokenizer.json)") from exc
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((rank, left, right) for left, right in local)
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])))
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = [sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    if sp.bos_id() >= 0:
        bos = sp.id_to_piece(sp.bos_id())
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, sp.bos_id())])
    tok.save(str(out))


def load_tokenizer(kind: str, folder: str | Path | None = None) -> PromptTokenizer:
    """`ByteTokenizer()` for `"bytes"`; `load_llama_tokenizer(folder)` for `"llama"`."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "llama":
        if folder is None:
            raise ValueError("the llama tokenizer needs a folder with tokenizer.json or tokenizer.model")
        return load_llama_tokenizer(folder)
    raise ValueError(f"tokenizer kind must be 'llama' or 'bytes', got {kind!r}")


# ============================================================================ processor
class OFTProcessor:
    """Turns observations into OFT model inputs, and normalised actions back into robot units.

    `config` fixes the image size, number of views, token ids, chunk layout and normalisation type;
    `tokenizer` must match `config.tokenizer` and `config.bos_token_id`. `image_norm` defaults to the
    bf16-rounded DINOv2 + SigLIP statistics; `center_crop` defaults to `config.center_crop` and is applied
    by `__call__` (inference); `stats` are the dataset statistics used for proprio and actions.
    """

    def __init__(self, config: OFTConfig, tokenizer: PromptTokenizer, image_norm: ImageNorm | None = None, *,
                 center_crop: bool | None = None, stats: DatasetStats | None = None) -> None:
        if getattr(tokenizer, "kind", None) != config.tokenizer:
            raise ValueError(f"config.tokenizer is {config.tokenizer!r} but the tokenizer is "
                             f"{getattr(tokenizer, 'kind', type(tokenizer).__name__)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name) != getattr(config, name):
                raise ValueError(f"tokenizer {name} is {getattr(tokenizer, name)}, but config.{name} is "
                                 f"{getattr(config, name)}")
        self.config = config
        self.tokenizer = tokenizer
        self.image_norm = check_image_norm(DEFAULT_IMAGE_NORM if image_norm is None else image_norm)
        self.center_crop = config.center_crop if center_crop is None else bool(center_crop)
        self.stats = stats

    # ---------------------------------------------------------------- images
    def pixel_values(self, images: Sequence[Any], center_crop: bool = False) -> torch.Tensor:
        """Views in camera order -> `[6V, S, S]` float32 (see the module doc for accepted inputs).

        `center_crop` defaults to False here: training pixels arrive already randomly cropped by the data
        pipeline. `__call__` (inference) passes `self.center_crop`.
        """
        if isinstance(images, (np.ndarray, torch.Tensor, Image.Image)) or not isinstance(images, Sequence):
            raise TypeError(f"images: expected a list with one image per view ({self.config.num_images}), "
                            f"found {type(images).__name__}")
        if len(images) != self.config.num_images:
            raise ValueError(f"images: got {len(images)} views, config.num_images expects {self.config.num_images}")
        size = self.config.image_size
        return torch.cat([preprocess_view(im, size, center_crop, self.image_norm, what=f"images[{i}]")
                          for i, im in enumerate(images)], dim=0)

    def pixel_values_batch(self, images01: torch.Tensor) -> torch.Tensor:
        """Training fast path, any device: `[B, V, 3, S, S]` float in [0, 1] -> `[B, 6V, S, S]` (no resize)."""
        c = self.config
        expected = (c.num_images, 3, c.image_size, c.image_size)
        if images01.ndim != 5 or tuple(images01.shape[1:]) != expected or not images01.is_floating_point():
            raise ValueError(f"images01: expected float [B, {', '.join(map(str, expected))}], found "
                             f"{images01.dtype} {tuple(images01.shape)}")
        return normalize_views(images01, self.image_norm)

    # ---------------------------------------------------------------- text
    def prompt_ids(self, instruction: str) -> list[int]:
        """`[BOS] + tokens(format_prompt(instruction))`, then `prompt_space_id` unless already last."""
        ids = self.tokenizer.encode(format_prompt(instruction))
        if ids[-1] != self.config.prompt_space_id:
            ids.append(self.config.prompt_space_id)
        return ids

    def text_inputs(self, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded inference ids for a batch of instructions.

        Per sample: `prompt_ids + [PLACEHOLDER_ID] * chunk_len * action_dim + [eos]`.
        Returns `input_ids` [B, L] long, `attention_mask` [B, L] bool (True on real tokens) and
        `prompt_lens` [B] long = P, the ids after BOS up to and including the space id.
        """
        if isinstance(instructions, str) or not isinstance(instructions, Sequence) or not instructions:
            raise TypeError("instructions: expected a non-empty list of strings")
        c = self.config
        rows, prompt_lens = [], []
        for text in instructions:
            ids = self.prompt_ids(text)
            prompt_lens.append(len(ids) - 1)
            rows.append(ids + [PLACEHOLDER_ID] * c.num_action_tokens + [c.eos_token_id])
        too_big = max(max(r) for r in rows)
        if too_big >= c.vocab_size:
            raise ValueError(f"token id {too_big} is outside config.vocab_size {c.vocab_size}: "
                             "the tokenizer does not match the config")
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), c.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for b, r in enumerate(rows):
            input_ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, :len(r)] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "prompt_lens": torch.tensor(prompt_lens, dtype=torch.long)}

    # ---------------------------------------------------------------- state and actions
    def _stats(self, stats: DatasetStats | None) -> DatasetStats:
        stats = self.stats if stats is None else stats
        if stats is None:
            raise ValueError("no dataset statistics: pass stats=DatasetStats (see load_dataset_statistics "
                             "and select_stats) to the processor or the call")
        return stats

    def normalize_state(self, state: Any, stats: DatasetStats | None = None) -> torch.Tensor:
        """Raw proprio `[..., A_p]` -> normalised float32 tensor (float64 maths, §6), by upstream's evaluation
        rule: clipped to [-1, 1] after the mask, so masked-out dims are clipped too (`normalize`)."""
        st = self._stats(stats)
        if st.proprio is None:
            raise ValueError("the dataset statistics have no 'proprio' entry, but config.use_proprio is set")
        x = state if isinstance(state, (np.ndarray, torch.Tensor)) else np.asarray(state, dtype=np.float64)
        if x.shape[-1:] != (self.config.proprio_dim,):
            raise ValueError(f"state has {x.shape[-1] if x.ndim else 0} values, config.proprio_dim expects "
                             f"{self.config.proprio_dim}")
        out = normalize(x, st.proprio, self.config.norm_type, what="state", clip_masked=True)
        return torch.as_tensor(out).to(torch.float32)

    def unnormalize_actions(self, actions: Any, stats: DatasetStats | None = None) -> np.ndarray:
        """Model output `[..., A]` (normalised) -> robot units, float64 numpy, masked dims untouched."""
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().float().cpu().numpy()
        return unnormalize(np.asarray(actions, dtype=np.float64), self._stats(stats).action,
                           self.config.norm_type, what="actions")

    # ---------------------------------------------------------------- one call
    def __call__(self, observation: dict | Sequence[dict], stats: DatasetStats | None = None
                 ) -> dict[str, torch.Tensor]:
        """`{"images": [view0, ...], "state": array, "instruction": str}` (or a list of them) -> batch.

        Returns `pixel_values` [B, 6V, S, S], `input_ids`, `attention_mask`, `prompt_lens`, and
        `proprio` [B, A_p] float32 when `config.use_proprio`. Images are centre-cropped when
        `self.center_crop` (the upstream evaluation setting).
        """
        obs_list = [observation] if isinstance(observation, dict) else list(observation)
        for i, obs in enumerate(obs_list):
            if not isinstance(obs, dict):
                raise TypeError(f"observation[{i}]: expected a dict, found {type(obs).__name__}")
            needed = ["images", "instruction"] + (["state"] if self.config.use_proprio else [])
            missing = [k for k in needed if k not in obs]
            if missing:
                raise KeyError(f"observation[{i}] is missing {missing}; it has {sorted(obs)}")
        out = {"pixel_values": torch.stack([self.pixel_values(o["images"], center_crop=self.center_crop)
                                            for o in obs_list])}
        out.update(self.text_inputs([o["instruction"] for o in obs_list]))
        if self.config.use_proprio:
            out["proprio"] = torch.stack([self.normalize_state(o["state"], stats) for o in obs_list])
        return out

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict:
        return {"processor_type": "oft", "tokenizer": self.tokenizer.kind, "image_size": self.config.image_size,
                "num_images": self.config.num_images, "center_crop": self.center_crop,
                "image_normalization": [{"mean": list(m), "std": list(s)} for m, s in self.image_norm]}

    def save(self, folder: str | Path) -> Path:
        """Write `processor_config.json` (+ the tokenizer files for Llama). Statistics are not written."""
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.tokenizer.save(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, config: OFTConfig, unnorm_key: str | None = None) -> "OFTProcessor":
        """Rebuild a processor saved by `save`. If the folder has `dataset_statistics.json`, the entry
        `unnorm_key` (or the only one) becomes `stats`; with several entries and no key, stats stay unset."""
        folder = Path(folder).expanduser()
        path = folder / PROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (save the processor with OFTProcessor.save)")
        d = json.loads(path.read_text())
        if d.get("processor_type") != "oft":
            raise ValueError(f"{path}: not an OFTProcessor file (processor_type {d.get('processor_type')!r}); "
                             "for an upstream OpenVLA folder use OFTProcessor.from_upstream")
        for key, expected in (("tokenizer", config.tokenizer), ("image_size", config.image_size),
                              ("num_images", config.num_images)):
            if d.get(key) != expected:
                raise ValueError(f"{path}: {key} is {d.get(key)!r}, but the config expects {expected!r}")
        norm = check_image_norm([(e["mean"], e["std"]) for e in d["image_normalization"]], where=str(path))
        return cls(config, load_tokenizer(d["tokenizer"], folder), norm, center_crop=d["center_crop"],
                   stats=_stats_in_folder(folder, unnorm_key))

    @classmethod
    def from_upstream(cls, folder: str | Path, config: OFTConfig, unnorm_key: str | None = None) -> "OFTProcessor":
        """Build from an upstream OpenVLA(-OFT) folder: `preprocessor_config.json` image statistics (else the
        defaults), the Llama tokenizer files, and `dataset_statistics.json` as in `load`."""
        folder = Path(folder).expanduser()
        pre = folder / PREPROCESSOR_FILE
        norm = load_image_normalization(pre) if pre.is_file() else None
        return cls(config, load_tokenizer(config.tokenizer, folder), norm, stats=_stats_in_folder(folder, unnorm_key))


def _stats_in_folder(folder: Path, unnorm_key: str | None) -> DatasetStats | None:
    if not (folder / STATS_FILE).is_file():
        if unnorm_key is not None:
            raise FileNotFoundError(f"{folder / STATS_FILE}: no such file, but unnorm_key {unnorm_key!r} was given")
        return None
    all_stats = load_dataset_statistics(folder / STATS_FILE)
    if unnorm_key is None and len(all_stats) > 1:
        return None
    return select_stats(all_stats, unnorm_key)[1]
