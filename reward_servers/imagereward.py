"""ImageReward (Xu et al., 2023; THUDM/ImageReward v1.0): BLIP's ViT-L/16 image encoder, its BERT-base text
encoder cross-attending to the image, and an MLP 768-1024-128-64-16-1 on the text encoder's first token;
reward = (mlp - 0.16717) / 1.03334 (upstream's normalisation). Computed as upstream's ``ImageReward.score``
(the package ``image-reward`` 1.5, which yifan123/flow_grpo's ``imagereward_scorer.py`` calls): the prompt
tokenised by ``bert-base-uncased`` with BLIP's added ``[DEC]`` and ``[ENC]`` tokens, padded to 35 tokens;
the image resized so that its shorter side is 224 (bicubic), centre-cropped, normalised with OpenAI
CLIP's mean and std.

The model runs as transformers' BLIP classes (``BlipVisionModel``, ``BlipTextModel``, which were ported
from the same BLIP code), not the ``image-reward`` package: it pins ``timm==0.6.13`` and
``fairscale==0.4.13`` and needs ``torchvision`` (docs/rewards.md, "Why not the upstream packages"). The
checkpoint is upstream's own file (``ImageReward.pt``, keys ``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``), read with ``torch.load(weights_only=True)`` or from a
``.safetensors`` of the same keys; its keys are renamed as transformers' BLIP conversion script renames
them (``blocks`` → ``layers``, ``attn.proj`` → ``self_attn.projection``, …) and the architecture is read
from the tensors' shapes (head width 64, as ViT-L and BERT-base).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem, batches
from vgrpo.reward_servers.hf_weights import clip_pixels, load_tensor_file, padded_tokens

DEFAULT_TOKENIZER = "bert-base-uncased"
CHECKPOINT_URL = "https://huggingface.co/THUDM/ImageReward/resolve/main/ImageReward.pt"
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # upstream ImageReward.__init__
MAX_TEXT_TOKENS = 35
HEAD_WIDTH = 64


def vision_key(key: str) -> str:
    """A BLIP ``visual_encoder`` key (after the prefix) as BlipVisionModel's (transformers'
    ``convert_blip_original_pytorch_to_hf.rename_key``)."""
    key = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(
        key, key
    )
    key = key.replace("patch_embed.proj", "embeddings.patch_embedding")
    key = re.sub(r"^blocks\.", "encoder.layers.", key)
    key = key.replace(".attn.proj.", ".self_attn.projection.").replace(".attn.qkv.", ".self_attn.qkv.")
    key = key.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
    return re.sub(r"^norm\.", "post_layernorm.", key)


def split_checkpoint(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(vision, text, mlp) state dicts in transformers' / the MLP's keys. Buffers that are not weights
    (``position_ids``) are dropped; other keys are ignored as upstream's ``load_state_dict(strict=False)``
    ignores them."""
    vision, text, mlp = {}, {}, {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.endswith("position_ids"):
            continue
        if k.startswith("blip.visual_encoder."):
            vision[vision_key(k.removeprefix("blip.visual_encoder."))] = v
        elif k.startswith("blip.text_encoder."):
            text[k.removeprefix("blip.text_encoder.")] = v
        elif k.startswith("mlp.layers."):
            mlp[k.removeprefix("mlp.layers.")] = v
    return vision, text, mlp


def configs_from_shapes(vision: dict[str, Any], text: dict[str, Any]) -> tuple[Any, Any]:
    """BlipVisionConfig and BlipTextConfig of the checkpoint (ViT-L/16 at 224 and BERT-base for the real
    one), read from its tensors' shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    tokens = int(vision["embeddings.position_embedding"].shape[1]) - 1
    depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    vcfg = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // HEAD_WIDTH),
        image_size=round(tokens**0.5) * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
    )
    vocab, hidden = (int(n) for n in text["embeddings.word_embeddings.weight"].shape)
    tcfg = BlipTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(text["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        num_hidden_layers=len({k.split(".")[2] for k in text if k.startswith("encoder.layer.")}),
        num_attention_heads=max(1, hidden // HEAD_WIDTH),
        max_position_embeddings=int(text["embeddings.position_embeddings.weight"].shape[0]),
        encoder_hidden_size=int(text["encoder.layer.0.crossattention.self.key.weight"].shape[1]),
        layer_norm_eps=1e-12,
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    return vcfg, tcfg


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Upstream's ``_transform``: shorter side to ``size`` (bicubic), centre crop, [0, 1] float32."""
    from PIL import Image

    h, w = image.shape[:2]
    if min(h, w) != size:
        nh, nw = (size, max(size, int(size * w / h))) if h <= w else (max(size, int(size * h / w)), size)
        pil = Image.fromarray(image[..., :3]).resize((nw, nh), Image.Resampling.BICUBIC)
        image = np.asarray(pil)
        h, w = nh, nw
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image[top : top + size, left : left + size, :3].astype(np.float32) / 255.0


class ImageRewardReward(Reward):
    """ImageReward v1.0. Options (``reward.servers.imagereward.options``): checkpoint (``ImageReward.pt``;
    required), tokenizer_path (``bert-base-uncased``), device, batch_size (32)."""

    name = "imagereward"

    def __init__(
        self,
        checkpoint: str = "",
        tokenizer_path: str = DEFAULT_TOKENIZER,
        device: str | None = None,
        batch_size: int = 32,
    ) -> None:
        import torch
        from transformers import AutoTokenizer
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        from vgrpo.reward_servers.clip_rewards import aesthetic_mlp
        from vgrpo.reward_servers.hf_weights import load_pretrained, resolve_weights

        key = "reward.servers.imagereward.options."
        vision, text, mlp = split_checkpoint(load_tensor_file(checkpoint, key + "checkpoint", CHECKPOINT_URL))
        bad = f"{key}checkpoint={checkpoint!r}: not an ImageReward checkpoint"
        try:
            vcfg, tcfg = configs_from_shapes(vision, text)
        except (KeyError, IndexError) as e:
            raise ValueError(f"{bad} (no {e})") from None
        folder = resolve_weights(tokenizer_path, key + "tokenizer_path", DEFAULT_TOKENIZER)
        tok = load_pretrained(
            AutoTokenizer.from_pretrained, folder, key + "tokenizer_path", DEFAULT_TOKENIZER
        )
        tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(tok) != tcfg.vocab_size:
            raise ValueError(
                f"{key}tokenizer_path={tokenizer_path!r}: {len(tok)} tokens with BLIP's [DEC] and [ENC], the "
                f"checkpoint's text encoder has {tcfg.vocab_size}; want bert-base-uncased's tokenizer"
            )
        self.tokenizer = tok
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(tcfg, add_pooling_layer=False)
        # the aesthetic predictor's MLP layout (768-1024-128-64-16-1) with the same indices
        self.mlp = aesthetic_mlp(tcfg.hidden_size)
        for name, state in (("vision", vision), ("text", text), ("mlp", mlp)):
            module = getattr(self, name)
            try:
                missing, _ = module.load_state_dict(state, strict=False)
            except RuntimeError as e:
                raise ValueError(f"{bad} ({name}: {str(e)[:200]})") from None
            if missing := [k for k in missing if not k.endswith("position_ids")]:
                raise ValueError(f"{bad} ({name} lacks {missing[:4]})")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        parts: list[Any] = [self.vision, self.text, self.mlp]
        for part in parts:
            part.to(self.device).eval()
        self.size = int(vcfg.image_size)
        self.batch_size = max(1, int(batch_size))

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        import torch

        self.check_batch(images, prompts, metadata)
        out: list[ScoredItem] = []
        for ims, txt in batches(images, prompts, self.batch_size):
            pixels = clip_pixels(ims, self.size, preprocess)
            tok = padded_tokens(self.tokenizer, txt, MAX_TEXT_TOKENS, self.device)
            with torch.no_grad():
                embeds = self.vision(pixel_values=pixels.to(self.device)).last_hidden_state
                hidden = self.text(
                    input_ids=tok["input_ids"],
                    attention_mask=tok["attention_mask"],
                    encoder_hidden_states=embeds,
                    encoder_attention_mask=torch.ones(
                        embeds.shape[:-1], dtype=torch.long, device=self.device
                    ),
                ).last_hidden_state
                raw = self.mlp(hidden[:, 0, :].float()).squeeze(1)
            out.extend(ScoredItem(float((r - MEAN) / STD), details={"mlp": float(r)}) for r in raw.cpu())
        return out
