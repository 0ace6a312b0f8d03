"""openpi's π0 input path (`transforms.py`, `models/tokenizer.py`, `policies/*_policy.py`,
`models_pytorch/preprocessing_pytorch.py`) as one processor.

    processor = Pi0Processor(config, tokenizer)
    batch = processor(observations, stats)           # robot observations -> model inputs (inference)
    batch = processor.batch(pixels01, image_masks, tasks, state_n, actions_n)   # pipeline -> model inputs
    actions = processor.unnormalize_actions(chunk, stats, state)   # [K, 32] -> [K, action_dim] robot units

- Images: uint8 HxWx3 (or float CHW in [0, 1], converted as openpi's `_parse_image`: `(255 x).astype(uint8)`)
  -> `resize_with_pad` to the model side (PIL bilinear, black letterbox) -> `x / 255 * 2 - 1`. A camera that
  is missing (None) or exactly 0 everywhere is an *absent* camera: zeros and `image_mask` False, as openpi's
  `LiberoInputs` / `AlohaInputs` fill missing cameras; its tokens are masked out of attention.
- Prompt: `strip()`, `_` and newlines -> spaces, `[BOS] + tokens(text) + tokens("\\n")`, at most
  `max_token_len` (48) tokens, padded with 0 and masked (openpi `PaligemmaTokenizer.tokenize`). Batches
  are padded to their longest prompt, not to 48: padded positions are masked and skipped, so the other
  tokens' numbers do not change.
- State / actions: normalised with the dataset statistics (`mean_std`: `(x - mean) / (std + 1e-6)`,
  openpi's π0 rule), zero-padded to 32 (`PadStatesAndActions`); outputs are cut to `action_dim`,
  un-normalised, and the `delta_action_mask` dims get the state added (`AbsoluteActions`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...normalize import DatasetStats, normalize, unnormalize
from ..images import resize_with_pad
from .config import Pi0Config

TOKENIZER_FILE = "tokenizer.model"  # PaliGemma's SentencePiece model (gs://big_vision/paligemma_tokenizer.model)


class BytePromptTokenizer:
    """UTF-8 bytes with PaliGemma's special ids: 0 = pad, 1 = EOS, 2 = BOS, byte `b` -> `b + 3` (259 ids).
    For the small presets: no file is needed."""

    kind = "bytes"
    bos_id, offset, vocab_size = 2, 3, 259

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [b + self.offset for b in text.encode("utf-8")]

    def save(self, folder: Path) -> None:
        pass


class PaligemmaPromptTokenizer:
    """PaliGemma's SentencePiece tokenizer from a `tokenizer.model` file, as openpi loads it."""

    kind = "paligemma"

    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        self.path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.path.read_bytes())
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.path}: not a SentencePiece model ({exc})") from None
        self.vocab_size = int(self.sp.get_piece_size())

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(self.sp.encode(text, add_bos=add_bos))

    def save(self, folder: Path) -> None:
        target = Path(folder) / TOKENIZER_FILE
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)


def find_tokenizer_file(folder: Path | None, explicit: str | Path | None = None) -> Path:
    """`explicit` (a file or a folder holding `tokenizer.model`), else `<folder>/tokenizer.model`."""
    candidates = []
    if explicit:
        p = Path(explicit).expanduser()
        candidates.append(p / TOKENIZER_FILE if p.is_dir() else p)
    elif folder is not None:
        candidates += [Path(folder) / TOKENIZER_FILE, Path(folder) / "assets" / TOKENIZER_FILE]
    for c in candidates:
        if c.is_file():
            return c
    where = ", ".join(str(c) for c in candidates) or "(no folder)"
    raise FileNotFoundError(
        f"π0 needs PaliGemma's SentencePiece tokenizer and found none at {where}: copy "
        f"paligemma_tokenizer.model (gs://big_vision/paligemma_tokenizer.model, or tokenizer.model of "
        f"google/paligemma-3b-pt-224) into the checkpoint folder as {TOKENIZER_FILE}, or pass "
        f"tokenizer=PATH (--policy-override tokenizer_file=PATH)")


def load_tokenizer(config: Pi0Config, folder: Path | None = None, explicit: str | Path | None = None):
    if config.tokenizer == "bytes":
        return BytePromptTokenizer()
    tok = PaligemmaPromptTokenizer(find_tokenizer_file(folder, explicit))
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"{tok.path}: the tokenizer has {tok.vocab_size} pieces but the model's vocabulary has "
                         f"{config.vocab_size}")
    return tok


def clean_prompt(text: str) -> str:
    """openpi `PaligemmaTokenizer.tokenize`: strip, `_` -> space, newline -> space."""
    return str(text).strip().replace("_", " ").replace("\n", " ")


class Pi0Processor:
    def __init__(self, config: Pi0Config, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    # -- prompt ---------------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """openpi's π0 prompt: `[BOS] + tokens(cleaned) + tokens("\\n")`, cut to `max_token_len`."""
        ids = self._cache.get(text)
        if ids is None:
            ids = (self.tokenizer.encode(clean_prompt(text), add_bos=True)
                   + self.tokenizer.encode("\n"))[:self.config.max_token_len]
            if len(self._cache) < 4096:
                self._cache[text] = ids
        return ids

    def text_inputs(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [self.prompt_ids(t) for t in texts]
        length = max(len(e) for e in encoded)
        ids = torch.zeros(len(encoded), length, dtype=torch.long)
        mask = torch.zeros(len(encoded), length, dtype=torch.bool)
        for i, e in enumerate(encoded):
            ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, :len(e)] = True
        return ids, mask

    # -- model inputs ---------------------------------------------------------------------------
    def batch(self, pixels: torch.Tensor, image_masks: torch.Tensor, texts: Sequence[str], state: torch.Tensor,
              actions: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Model inputs from views `[B, V, 3, S, S]` in [-1, 1], camera masks `[B, V]`, prompts and the
        normalised state `[B, state_dim]` (and actions `[B, K, action_dim]`), all on one device."""
        cfg = self.config
        device = pixels.device
        b, v = pixels.shape[:2]
        ids, text_mask = self.text_inputs(texts)
        p = cfg.tokens_per_image
        image_ids = torch.full((b, v * p), cfg.image_token_id, dtype=torch.long)
        out = {"input_ids": torch.cat([image_ids, ids], dim=1).to(device),
               "attention_mask": torch.cat([image_masks.to(device).repeat_interleave(p, dim=1),
                                            text_mask.to(device)], dim=1).long(),
               "pixel_values": pixels, "image_masks": image_masks.to(device).bool(),
               "state": pad_to(state.to(device).float(), cfg.max_state_dim)}
        if actions is not None:
            out["actions"] = pad_to(actions.to(device).float(), cfg.max_action_dim)
        if pad_mask is not None:
            out["pad_mask"] = pad_mask.to(device).bool()
        return out

    def views(self, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One observation's cameras -> pixels `[V, 3, S, S]` in [-1, 1], camera mask `[V]`, letterbox `[V, S, S]`."""
        cfg = self.config
        s = cfg.image_size
        if len(images) != cfg.num_images:
            raise ValueError(f"observation has {len(images)} images; the policy takes {cfg.num_images} "
                             f"(cameras in the training order)")
        pixels, present, letterbox = [], [], []
        for i, image in enumerate(images):
            if image is None:
                pixels.append(np.zeros((s, s, 3), np.uint8))
                present.append(False)
                letterbox.append(np.ones((s, s), bool))
                continue
            a = as_uint8_hwc(image, f"images[{i}]")
            a, m = resize_with_pad(a, s, s)
            pixels.append(a)
            present.append(bool(a.any()))
            letterbox.append(m)
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
        return x, torch.tensor(present), torch.from_numpy(np.stack(letterbox))

    def __call__(self, observations: dict | Sequence[dict], stats: DatasetStats) -> dict[str, torch.Tensor]:
        """Robot observations `{"images": [...], "state": array, "instruction": str}` -> model inputs (CPU)."""
        obs = [observations] if isinstance(observations, dict) else list(observations)
        cfg = self.config
        views = [self.views(o["images"]) for o in obs]
        pixels = torch.stack([v[0] for v in views])
        masks = torch.stack([v[1] for v in views])
        pad = torch.stack([v[2] for v in views])
        state = self.normalize_state(obs, stats)
        return self.batch(pixels, masks, [str(o.get("instruction", "")) for o in obs], state, pad_mask=pad)

    def normalize_state(self, observations: Sequence[dict], stats: DatasetStats) -> torch.Tensor:
        cfg = self.config
        if cfg.state_dim == 0:
            return torch.zeros(len(observations), 0)
        if stats.proprio is None:
            raise ValueError("the dataset statistics have no 'proprio' entry, but π0 reads the state")
        rows = []
        for o in observations:
            s = np.asarray(o.get("state"), dtype=np.float64).reshape(-1)
            if s.shape[0] != cfg.state_dim:
                raise ValueError(f"state has {s.shape[0]} values; the policy expects {cfg.state_dim}")
            rows.append(s)
        x = normalize(np.stack(rows), stats.proprio, cfg.norm_type, what="state")
        return torch.as_tensor(x, dtype=torch.float32)

    def unnormalize_actions(self, actions: torch.Tensor | np.ndarray, stats: DatasetStats,
                            state: Any = None) -> np.ndarray:
        """`[K, >= action_dim]` normalised -> `[K, action_dim]` float64 robot units; the
        `delta_action_mask` dims are relative to the (raw) state and get it added (openpi `AbsoluteActions`)."""
        cfg = self.config
        a = actions.detach().float().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
        out = unnormalize(a[..., :cfg.action_dim].astype(np.float64), stats.action, cfg.norm_type, what="actions")
        if cfg.delta_action_mask:
            if state is None:
                raise ValueError("this π0 predicts some action dims relative to the state (delta_action_mask): "
                                 "the observation needs its state")
            s = np.asarray(state, dtype=np.float64).reshape(-1)
            d = len(cfg.delta_action_mask)
            out[..., :d] += np.where(np.asarray(cfg.delta_action_mask), s[:d], 0.0)
        return out


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension to `size` (openpi `pad_to_dim`)."""
    if x.shape[-1] > size:
        raise ValueError(f"a vector of {x.shape[-1]} values does not fit the model's padded size {size}")
    return torch.nn.functional.pad(x, (0, size - x.shape[-1])) if x.shape[-1] < size else x


def as_uint8_hwc(image: Any, what: str) -> np.ndarray:
    """uint8 HxWx3 as it is; uint8 CHW transposed; float (CHW or HWC) in [0, 1] -> `(255 x).astype(uint8)`
    (openpi `_parse_image`); a PIL image converted to RGB."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{what}: expected an image (H, W, 3) or (3, H, W), found shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(f"{what}: float images must lie in [0, 1] (pass uint8 for 0..255 pixels)")
        a = (255 * a).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 or float pixels, found {a.dtype}")
    return np.ascontiguousarray(a)
