"""The PickScore reward (Kirstain et al., 2023; docs/algorithms.md §7.2), as Flow-GRPO and DiffusionNFT load
and scale it: the CLIP-H processor (`processor_path`) and the PickScore CLIP model (`model_path`);
image and text embeddings L2-normalised, score = exp(logit_scale)·cos(image, text) (≈ 100·cos), text
truncated at 77 tokens. The training reward (`value`) is score / 26; the raw score (the reported metric,
SD3.5-M ≈ 21.7) is in `details["raw"]`."""

from __future__ import annotations

from typing import Any

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem, batches

DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
SCALE = 26.0  # Flow-GRPO / DiffusionNFT: reward = PickScore / 26
MAX_TEXT_TOKENS = 77


class PickScoreReward(Reward):
    """PickScore. Options (`reward.servers.pickscore.options`): processor_path, model_path, device
    (default cuda when present), scale (26: value = raw / scale), batch_size (images per forward, 32)."""

    name = "pickscore"

    def __init__(
        self,
        processor_path: str = DEFAULT_PROCESSOR,
        model_path: str = DEFAULT_MODEL,
        device: str | None = None,
        scale: float = SCALE,
        batch_size: int = 32,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoProcessor

        from vgrpo.reward_servers.hf_weights import load_pretrained, resolve_weights

        key = "reward.servers.pickscore.options."
        proc_dir = resolve_weights(processor_path, key + "processor_path", DEFAULT_PROCESSOR)
        model_dir = resolve_weights(model_path, key + "model_path", DEFAULT_MODEL)
        if not scale > 0:
            raise ValueError(f"{key}scale={scale!r}: want a positive number (26 as Flow-GRPO)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = load_pretrained(
            AutoProcessor.from_pretrained, proc_dir, key + "processor_path", DEFAULT_PROCESSOR
        )
        self.model: Any = load_pretrained(
            AutoModel.from_pretrained, model_dir, key + "model_path", DEFAULT_MODEL
        )
        self.model = self.model.to(self.device).eval()
        self.scale = float(scale)
        self.batch_size = max(1, batch_size)

    def raw_scores(self, images: list[np.ndarray], prompts: list[str]) -> list[float]:
        """exp(logit_scale) · cos(image_i, text_i) for each pair (PickScore's `calc_probs` before the
        softmax), in batches of `batch_size`."""
        import torch

        out: list[float] = []
        for ims, txt in batches(images, prompts, self.batch_size):
            pixels = self.processor(images=ims, return_tensors="pt")["pixel_values"].to(self.device)
            tok = self.processor(
                text=txt, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
            ).to(self.device)
            with torch.no_grad():
                # CLIP's get_image_features / get_text_features, written out (their return type changed
                # between transformers 4 and 5)
                img = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
                text = self.model.text_projection(
                    self.model.text_model(
                        input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask")
                    ).pooler_output
                )
                img = img.float() / img.float().norm(dim=-1, keepdim=True)
                text = text.float() / text.float().norm(dim=-1, keepdim=True)
                scores = self.model.logit_scale.exp().float() * (img * text).sum(dim=-1)
            out.extend(float(s) for s in scores.cpu())
        return out

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        if not images:
            return []
        raw = self.raw_scores(images, prompts)
        return [ScoredItem(r / self.scale, details={"raw": r}) for r in raw]
