"""HPSv2.1 (Wu et al., 2023, Human Preference Score v2): an open_clip ViT-H-14 fine-tuned on human
preferences; the score is the cosine of the L2-normalised image and text embeddings (no logit scale),
~0.2-0.35 for real generations. Computed as upstream's scorer (tgxs002/HPSv2 ``img_score.py``; the same
in NVlabs/DiffusionNFT ``flow_grpo/hpsv2_scorer.py``): the image resized so that its longer side is
224 (bicubic) and padded to a square with zeros, normalised with OpenAI CLIP's mean and std; the prompt
tokenised to 77 tokens.

The model runs as transformers' ``CLIPModel``, not open_clip: ``open-clip-torch`` pulls ``torchvision``,
whose newest release requires a newer torch than the one a GPU image may carry, and the ``hpsv2`` package
pins ``protobuf<4`` and ``pytest==7.2.0`` (docs/rewards.md, "Why not the upstream packages"). The
checkpoint is upstream's own file (``HPS_v2.1_compressed.pt``, a dict whose ``state_dict`` holds open_clip's
keys), read with ``torch.load(weights_only=True)`` (tensors only, no code) — or a ``.safetensors`` of the
same keys — and its keys are renamed to CLIPModel's by ``open_clip_to_hf`` below (the attention's packed
``in_proj`` split into q, k, v; the projections transposed). The architecture and tokenizer come from
``clip_path``: the ViT-H-14 that HPSv2 starts from, in transformers' layout
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); only its config and tokenizer are read, no weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem, batches
from vgrpo.reward_servers.hf_weights import clip_pixels, load_tensor_file, padded_tokens

DEFAULT_CLIP = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CHECKPOINT_URL = "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt"
MAX_TEXT_TOKENS = 77
# open_clip buffers that are not weights (rebuilt from the config): ignored when present
_NOT_WEIGHTS = ("attn_mask",)


def _block(prefix: str, out: str, state: dict[str, Any], hf: dict[str, Any]) -> None:
    """One open_clip residual block (``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``) →
    a CLIPEncoderLayer."""
    q, k, v = state.pop(prefix + "attn.in_proj_weight").chunk(3, dim=0)
    qb, kb, vb = state.pop(prefix + "attn.in_proj_bias").chunk(3, dim=0)
    for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
        hf[f"{out}self_attn.{name}.weight"], hf[f"{out}self_attn.{name}.bias"] = w, b
    renames = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for src, dst in renames.items():
        for p in ("weight", "bias"):
            hf[f"{out}{dst}.{p}"] = state.pop(f"{prefix}{src}.{p}")


def open_clip_to_hf(state: dict[str, Any]) -> dict[str, Any]:
    """open_clip's CLIP state dict (``visual.*``, ``transformer.*``, ``token_embedding``, …) as
    transformers' CLIPModel keys. Raises KeyError naming a missing key and ValueError listing keys it
    does not know (a checkpoint of another architecture)."""
    state = {
        k.removeprefix("module."): v for k, v in state.items() if k.rsplit(".", 1)[-1] not in _NOT_WEIGHTS
    }
    hf: dict[str, Any] = {}
    t, v = "text_model.", "vision_model."
    hf[t + "embeddings.token_embedding.weight"] = state.pop("token_embedding.weight")
    hf[t + "embeddings.position_embedding.weight"] = state.pop("positional_embedding")
    for i in sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}):
        _block(f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}.", state, hf)
    for p in ("weight", "bias"):
        hf[f"{t}final_layer_norm.{p}"] = state.pop(f"ln_final.{p}")
        hf[f"{v}pre_layrnorm.{p}"] = state.pop(f"visual.ln_pre.{p}")
        hf[f"{v}post_layernorm.{p}"] = state.pop(f"visual.ln_post.{p}")
    hf["text_projection.weight"] = state.pop("text_projection").t().contiguous()
    hf["visual_projection.weight"] = state.pop("visual.proj").t().contiguous()
    hf["logit_scale"] = state.pop("logit_scale")
    hf[v + "embeddings.class_embedding"] = state.pop("visual.class_embedding")
    hf[v + "embeddings.position_embedding.weight"] = state.pop("visual.positional_embedding")
    hf[v + "embeddings.patch_embedding.weight"] = state.pop("visual.conv1.weight")
    for i in sorted({int(k.split(".")[3]) for k in state if k.startswith("visual.transformer.resblocks.")}):
        _block(f"visual.transformer.resblocks.{i}.", f"{v}encoder.layers.{i}.", state, hf)
    if state:
        raise ValueError(f"keys that are not open_clip CLIP's: {sorted(state)[:8]}")
    return hf


def load_checkpoint(path: str, key: str) -> dict[str, Any]:
    """The open_clip state dict in ``path``: upstream's ``.pt`` (``{"state_dict": …}`` or the bare dict)
    or a ``.safetensors`` file (hf_weights.load_tensor_file: tensors only)."""
    obj = load_tensor_file(path, key, CHECKPOINT_URL)
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise ValueError(f"{key}={path!r}: want a dict of tensors (or {{'state_dict': …}})")
    return state


def pad_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Upstream's ``ResizeMaxSize``: the longer side to ``size`` (bicubic), zero-padded to a centred
    square; float32 in [0, 1], H x W x 3."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    pil = Image.fromarray(image[..., :3])
    if (nh, nw) != (h, w):
        pil = pil.resize((nw, nh), Image.Resampling.BICUBIC)
    out = np.zeros((size, size, 3), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.asarray(pil, np.float32) / 255.0
    return out


class HPSv2Reward(Reward):
    """HPSv2.1. Options (``reward.servers.hpsv2.options``): checkpoint (``HPS_v2.1_compressed.pt``;
    required), clip_path (the ViT-H-14's config and tokenizer), device, batch_size (32)."""

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: str = "",
        clip_path: str = DEFAULT_CLIP,
        device: str | None = None,
        batch_size: int = 32,
    ) -> None:
        import torch
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        from vgrpo.reward_servers.hf_weights import load_pretrained, resolve_weights

        key = "reward.servers.hpsv2.options."
        state = load_checkpoint(checkpoint, key + "checkpoint")
        folder = resolve_weights(clip_path, key + "clip_path", DEFAULT_CLIP)
        config = load_pretrained(CLIPConfig.from_pretrained, folder, key + "clip_path", DEFAULT_CLIP)
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, folder, key + "clip_path", DEFAULT_CLIP
        )
        model: Any = CLIPModel(config)
        try:
            missing, unexpected = model.load_state_dict(open_clip_to_hf(state), strict=False)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"{key}checkpoint={checkpoint!r}: not an HPSv2 (open_clip CLIP) checkpoint ({e})"
            ) from None
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"{key}checkpoint={checkpoint!r}: does not fit {key}clip_path={clip_path!r} "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]}); want the ViT-H-14 HPSv2 was trained from"
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.size = int(config.vision_config.image_size)
        self.batch_size = max(1, int(batch_size))

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        import torch

        self.check_batch(images, prompts, metadata)
        out: list[ScoredItem] = []
        for ims, txt in batches(images, prompts, self.batch_size):
            pixels = clip_pixels(ims, self.size, pad_resize)
            tok = padded_tokens(self.tokenizer, txt, MAX_TEXT_TOKENS, self.device)
            with torch.no_grad():
                m = self.model
                img = m.visual_projection(m.vision_model(pixel_values=pixels.to(self.device)).pooler_output)
                text = m.text_projection(m.text_model(input_ids=tok["input_ids"]).pooler_output)
                img = img / torch.linalg.vector_norm(img, dim=-1, keepdim=True)
                text = text / torch.linalg.vector_norm(text, dim=-1, keepdim=True)
                cos = (img.float() * text.float()).sum(-1)
            out.extend(ScoredItem(float(c)) for c in cos.cpu())
        return out
