"""Tiny reward models built from config, for tests and benchmarks that must not download anything: a
CLIP (usable as GenEval's colour classifier and as a PickScore model + processor) and an 80-class
Mask2Former. Saved with `save_pretrained`, they load through the same `from_pretrained` path as the real
checkpoints. Their scores mean nothing; their shapes, dtypes and code paths are the real ones."""

from __future__ import annotations

from pathlib import Path

from vgrpo.core.policy import builtin_tiny_path

TOKENIZER = builtin_tiny_path() / "tokenizer"
PERSON = 0  # COCO class 0, GenEval's "person"


def build_tiny_clip(out: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A CLIPModel (width 16, one layer per tower) and a CLIPProcessor (the tiny SD3 tokenizer, images
    resized and centre-cropped to `image_size`) saved to `out`."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    vision = dict(
        image_size=image_size, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tok
    ).save_pretrained(out)
    return out


def build_tiny_mask2former(
    out: str | Path, image_size: int = 64, force_class: int | None = PERSON, seed: int = 0
) -> Path:
    """An 80-class Mask2FormerForUniversalSegmentation (Swin backbone of width 8, 6 queries) and its image
    processor (long side `image_size`) saved to `out`. With `force_class`, the class head predicts that
    class for every query (so a test knows which class it finds); the masks come from random weights.
    `use_auxiliary_loss=True`: False crashes the forward in transformers 5.24 (docs/stack-notes.md)."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    out = Path(out)
    torch.manual_seed(seed)
    swin = SwinConfig(  # type: ignore[call-arg]
        image_size=image_size, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
        window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(  # type: ignore[call-arg]
        backbone_config=swin, hidden_dim=32, num_queries=6, encoder_layers=1, decoder_layers=2,
        feature_size=32, mask_feature_size=32, encoder_feedforward_dim=32, dim_feedforward=32,
        num_attention_heads=2, num_labels=80, use_auxiliary_loss=True,
    )  # fmt: skip
    model = Mask2FormerForUniversalSegmentation(config)
    if force_class is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[force_class] = 12.0
    model.save_pretrained(out)
    size = {"shortest_edge": image_size, "longest_edge": image_size}
    Mask2FormerImageProcessor(size=size).save_pretrained(out)
    return out
