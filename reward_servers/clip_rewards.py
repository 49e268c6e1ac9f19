"""Rewards on a CLIP model's embeddings (transformers' CLIPModel; weights by local folder or hub id):

- ``clipscore``: CLIPScore (Hessel et al., 2021): ``w · max(cos(image, text), 0)`` with ``w = 2.5``,
  image and text embedded by the same CLIP (default ``openai/clip-vit-large-patch14``; the paper used
  ViT-B/32), the text truncated at 77 tokens. ``details["cos"]`` keeps the cosine.
- ``aesthetic``: the LAION improved aesthetic predictor (Schuhmann, `improved-aesthetic-predictor`,
  ``simple_inference.py``; the same in yifan123/flow_grpo ``aesthetic_scorer.py``): the L2-normalised
  CLIP ViT-L/14 image embedding through the MLP 768-1024-128-64-16-1 of ``sac+logos+ava1-l14-linearMSE``
  (scores ~1-10). The MLP's weights are a file of its state dict (upstream's ``.pth``, read with
  ``torch.load(weights_only=True)``: tensors only, no code; or a ``.safetensors`` of the same keys).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem, batches

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
MAX_TEXT_TOKENS = 77
AESTHETIC_MLP_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"


def _clip(key: str, path: str, device: str | None) -> tuple[Any, Any, str]:
    """(CLIPModel, CLIPProcessor, device) from a folder or hub id, with the missing-weights error."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from vgrpo.reward_servers.hf_weights import load_pretrained, resolve_weights

    folder = resolve_weights(path, key, DEFAULT_CLIP)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = load_pretrained(CLIPProcessor.from_pretrained, folder, key, DEFAULT_CLIP)
    model = load_pretrained(CLIPModel.from_pretrained, folder, key, DEFAULT_CLIP)
    return model.to(device).eval(), processor, device


def _image_features(model: Any, processor: Any, images: list[np.ndarray], device: str) -> Any:
    """CLIP's get_image_features written out (its return type changed between transformers 4 and 5)."""
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).float()


def _text_features(model: Any, processor: Any, prompts: list[str], device: str) -> Any:
    tok = processor(
        text=list(prompts), padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
    ).to(device)
    out = model.text_model(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask"))
    return model.text_projection(out.pooler_output).float()


class ClipScoreReward(Reward):
    """CLIPScore. Options (``reward.servers.clipscore.options``): model_path, w (2.5), device,
    batch_size (32)."""

    name = "clipscore"

    def __init__(
        self, model_path: str = DEFAULT_CLIP, w: float = 2.5, device: str | None = None, batch_size: int = 32
    ) -> None:
        key = "reward.servers.clipscore.options."
        if not w > 0:
            raise ValueError(f"{key}w={w!r}: want a positive number (2.5 as Hessel et al.)")
        self.model, self.processor, self.device = _clip(key + "model_path", model_path, device)
        self.w, self.batch_size = float(w), max(1, int(batch_size))

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        import torch

        self.check_batch(images, prompts, metadata)
        out: list[ScoredItem] = []
        for ims, txt in batches(images, prompts, self.batch_size):
            with torch.no_grad():
                img = _image_features(self.model, self.processor, ims, self.device)
                text = _text_features(self.model, self.processor, txt, self.device)
                cos = torch.nn.functional.cosine_similarity(img, text, dim=-1)
            out.extend(ScoredItem(self.w * max(float(c), 0.0), details={"cos": float(c)}) for c in cos.cpu())
        return out


def aesthetic_mlp(in_features: int = 768) -> Any:
    """The predictor's MLP, with upstream's layer indices (Linear at 0, 2, 4, 6, 7; Dropout between);
    ``in_features`` 768 for CLIP ViT-L/14 (and ImageReward's BERT-base), smaller for tiny test models."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(in_features, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def load_aesthetic_mlp(path: str, key: str, in_features: int = 768) -> Any:
    """The MLP from ``path`` (upstream's ``.pth`` state dict, keys ``layers.<i>.weight`` — read with
    ``weights_only=True`` — or a ``.safetensors`` of the same keys, with or without ``layers.``)."""
    from vgrpo.reward_servers.hf_weights import load_tensor_file

    state = load_tensor_file(path, key, AESTHETIC_MLP_URL)
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    mlp = aesthetic_mlp(in_features)
    try:
        mlp.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{key}={path!r}: not the aesthetic predictor's MLP ({str(e)[:200]})") from None
    return mlp.eval()


class AestheticReward(Reward):
    """The LAION aesthetic predictor. Options (``reward.servers.aesthetic.options``): mlp_path (the
    ``sac+logos+ava1-l14-linearMSE`` weights; required), clip_path (CLIP ViT-L/14), device,
    batch_size (32), scale (1: value = score / scale; details["raw"] keeps the score)."""

    name = "aesthetic"

    def __init__(
        self,
        mlp_path: str = "",
        clip_path: str = DEFAULT_CLIP,
        device: str | None = None,
        batch_size: int = 32,
        scale: float = 1.0,
    ) -> None:
        key = "reward.servers.aesthetic.options."
        if not mlp_path:
            raise FileNotFoundError(
                f"{key}mlp_path is not set; fix: download {AESTHETIC_MLP_URL} and set {key}mlp_path=FILE"
            )
        if not scale > 0:
            raise ValueError(f"{key}scale={scale!r}: want a positive number")
        self.model, self.processor, self.device = _clip(key + "clip_path", clip_path, device)
        dim = int(self.model.config.projection_dim)
        self.mlp = load_aesthetic_mlp(mlp_path, key + "mlp_path", in_features=dim).to(self.device)
        self.batch_size, self.scale = max(1, int(batch_size)), float(scale)

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        import torch

        self.check_batch(images, prompts, metadata)
        out: list[ScoredItem] = []
        for ims, _ in batches(images, prompts, self.batch_size):
            with torch.no_grad():
                emb = _image_features(self.model, self.processor, ims, self.device)
                emb = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
                raw = self.mlp(emb).squeeze(1)
            out.extend(ScoredItem(float(r) / self.scale, details={"raw": float(r)}) for r in raw.cpu())
        return out
