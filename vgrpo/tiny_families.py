"""Tiny, randomly initialised pipelines of every model family the trainer supports (SD3, FLUX.1, Qwen-Image,
Wan2.1), built from config with no download, so that the family-specific code paths (packing, guidance
embedding, dynamic shifting, chat-template prompts, video latents) run end to end on a laptop CPU.

Each folder is a plain ``save_pretrained`` pipeline (float32 safetensors) that
``diffusers.DiffusionPipeline.from_pretrained(DIR)`` loads offline as the family's own class, plus a
``vgrpo.json`` naming the native size the trainer should use:

    family      class                       native size          latent            transformer tokens
    sd3         StableDiffusion3Pipeline    64×64                4×16×16           64 (patch 2)
    flux        FluxPipeline (dev|schnell)  64×64                4×16×16           64 (2×2 packing)
    qwen_image  QwenImagePipeline           64×64                4×16×16           64 (2×2 packing)
    wan         WanPipeline (Wan2.1 T2V)    5 frames × 32×32     4×2×4×4           8 (patch 1×2×2)

The VAEs compress 4× (images) or 8× spatially and 4× in time (Wan, as the real one), so each
pipeline's own default size (FLUX/Qwen 128 latent rows = 512 px, Wan 480×832) still generates in seconds.
Tokenizers are built in code: the word-level CLIP tokenizer of the tiny SD3 (vgrpo/tiny_models.py), a
Unigram T5 tokenizer for the T5/UMT5 slots, and a byte-level BPE Qwen2 tokenizer whose chat-template prefix
is exactly the number of tokens QwenImagePipeline drops. torch, diffusers and transformers are imported
inside the functions, so that a wrong family name is answered at once.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

FAMILIES = ("sd3", "flux", "qwen_image", "wan")
FLUX_VARIANTS = ("dev", "schnell")
# native (height, width, frames) the trainer samples at; frames 1 = an image
NATIVE_SIZE = {"sd3": (64, 64, 1), "flux": (64, 64, 1), "qwen_image": (64, 64, 1), "wan": (32, 32, 5)}
SEED = 0

TEXT_WIDTH = 32  # hidden size of every tiny text encoder (CLIP, T5, UMT5); Qwen2.5-VL's is QWEN_TEXT_WIDTH
QWEN_TEXT_WIDTH = 16
T5_MAX_LENGTH = 512  # FLUX's T5 tokenizer; both pipelines pass their own max_sequence_length anyway
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


# ------------------------------------------------------------------------------------------ tokenizers


def build_t5_tokenizer() -> Any:
    """A SentencePiece-style Unigram ``T5Tokenizer`` (the class FLUX and Wan load): ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, then one piece per grammar word (``▁circle``), then single printable characters, so a
    grammar prompt is one token per word and any other ASCII text still tokenises (character by
    character, since the whole-word pieces score higher). No sentinel ``<extra_id_*>`` tokens."""
    from transformers import T5Tokenizer

    from vgrpo.tiny_models import GRAMMAR_WORDS

    vocab_scores = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab_scores += [("▁" + word, -1.0) for word in GRAMMAR_WORDS]
    vocab_scores += [(ch, -5.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab_scores, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_qwen_tokenizer(prompt_template: str) -> Any:
    """A Qwen2 byte-level BPE ``Qwen2Tokenizer`` with Qwen's specials and its pre-tokeniser, in which every
    pre-token of ``prompt_template`` (QwenImagePipeline's chat template, ``{}`` = the prompt) and every
    grammar word, bare and with its leading space, is ONE token, as in the real Qwen2 vocabulary; so the
    template's prefix is as many tokens as the pipeline drops (``prompt_template_encode_start_idx``).
    The merges for each pre-token are appended in order, as in ``tiny_models.tokenizer_vocab_and_merges``."""
    from transformers import Qwen2Tokenizer

    from vgrpo.tiny_models import GRAMMAR_WORDS, _bpe, _bytes_to_unicode

    pre_tokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer  # Qwen's regex split + ByteLevel
    specials_or_prompt = "|".join(map(re.escape, (*QWEN_SPECIAL_TOKENS, "{}")))
    texts = [
        *re.split(specials_or_prompt, prompt_template),
        *GRAMMAR_WORDS,
        *(" " + w for w in GRAMMAR_WORDS),
    ]
    pre_tokens = [piece for text in texts for piece, _ in pre_tokenizer.pre_tokenize_str(text)]

    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for piece in dict.fromkeys(pre_tokens):  # unique, in first-seen order
        parts = _bpe(piece, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = _bpe(piece, ranks)
    for special in QWEN_SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    # Qwen2.5-VL's: eos <|im_end|>, pad <|endoftext|>, no bos
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # tokenizers' BPE takes (left, right) tuples
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=131072,
    )


def template_prefix_tokens(tokenizer: Any, prompt_template: str) -> int:
    """How many tokens the chat template puts before the prompt (what QwenImagePipeline must drop)."""
    return len(tokenizer(prompt_template.split("{}")[0]).input_ids)


# ------------------------------------------------------------------------------------------ text encoders


def build_clip_text_encoder(tokenizer: Any) -> Any:
    """FLUX's CLIP-L slot: a ``CLIPTextModel`` whose pooled output (at the eos position) is the pooled
    projection input of the transformer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_t5_encoder(tokenizer: Any, width: int = TEXT_WIDTH, umt5: bool = False) -> Any:
    """SD3's and FLUX's T5-v1.1 (``T5EncoderModel``) or Wan's UMT5 (``UMT5EncoderModel``): one layer of
    ``width``, gated GELU feed-forward as the real ones."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 2,
        d_ff=2 * width,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return UMT5EncoderModel(UMT5Config(**fields)) if umt5 else T5EncoderModel(T5Config(**fields))


def build_qwen_text_encoder(tokenizer: Any) -> Any:
    """Qwen-Image's ``Qwen2_5_VLForConditionalGeneration`` at toy size: a 2-layer text model of width 16
    (head dim 8, multimodal RoPE sections 1+1+2 = head_dim / 2) and the one-block vision tower the config
    requires (never run: prompts have no image), with the vision token ids pointing at our specials."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=QWEN_TEXT_WIDTH,
            intermediate_size=2 * QWEN_TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=QWEN_TEXT_WIDTH,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


# ------------------------------------------------------------------------------------------ pipelines


def build_sd3() -> Any:
    """The tiny SD3 architecture of ``vgrpo/tiny_models.py`` (random weights, diffusers' default init) plus
    the T5 slot it omits, so the folder is a complete SD3 that ``DiffusionPipeline.from_pretrained`` loads
    with no ``text_encoder_3=None`` argument; T5's width is the transformer's joint width, as SD3's CLIP
    states are zero-padded to it and concatenated with the T5 tokens."""
    from vgrpo.tiny_models import build_pipeline

    pipe = build_pipeline(seed=SEED, adaln_zero=False)
    tokenizer_3 = build_t5_tokenizer()
    width = int(pipe.transformer.config.joint_attention_dim)
    pipe.register_modules(text_encoder_3=build_t5_encoder(tokenizer_3, width), tokenizer_3=tokenizer_3)
    return pipe


def build_flux(variant: str) -> Any:
    """FLUX.1 at toy size: VAE factor 4 with 4 latent channels, so the transformer sees 2×2-packed
    16-channel tokens; ``dev`` embeds the guidance scale and shifts its schedule with the token count,
    ``schnell`` does neither (both schedulers as the real repos')."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    from vgrpo.model_configs import FLUX1_DEV_SCHEDULER, FLUX1_VAE
    from vgrpo.tiny_models import build_tokenizer

    dev = variant == "dev"
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2×2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6),  # (time, row, column) RoPE split of the head dim, as FLUX's (16, 56, 56)
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=FLUX1_VAE["shift_factor"],
        scaling_factor=FLUX1_VAE["scaling_factor"],
    )
    # FLUX.1-dev's scheduler; schnell's is the same without the resolution-dependent shift
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        **dict(FLUX1_DEV_SCHEDULER, shift=3.0 if dev else 1.0, use_dynamic_shifting=dev),
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=build_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=build_t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_qwen_image() -> Any:
    """Qwen-Image at toy size: a 2-stage Qwen VAE (factor 4, 4 latent channels), the MMDiT on 2×2-packed
    tokens with the text width of the tiny Qwen2.5-VL, and Qwen-Image's dynamic-shift Euler schedule. The
    tokenizer is built from the pipeline's own chat template, then checked against its drop index."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    z_dim = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=QWEN_TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],  # the real pattern; causal, so an image stays one frame
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image's scheduler_config.json
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe: Any = QwenImagePipeline(  # the encoder slots are filled below, from the pipeline's template
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    tokenizer = build_qwen_tokenizer(pipe.prompt_template_encode)
    dropped = template_prefix_tokens(tokenizer, pipe.prompt_template_encode)
    if dropped != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(
            f"qwen_image tokenizer: the chat template's prefix is {dropped} tokens but QwenImagePipeline "
            f"drops {pipe.prompt_template_encode_start_idx}; has diffusers changed its template?"
        )
    pipe.register_modules(tokenizer=tokenizer, text_encoder=build_qwen_text_encoder(tokenizer))
    return pipe


def build_wan() -> Any:
    """Wan2.1 text-to-video at toy size: the Wan VAE with the real compression (8× space, 4× time: 5
    frames -> 2 latent frames), the 3D transformer with patch 1×2×2, a UMT5 encoder, and the UniPC
    flow-matching scheduler of Wan2.1-T2V-1.3B with flow_shift 1 (the real 3.0 is for 480p; shift grows
    with the token count, and the native 32×32 has 4 tokens a frame)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    z_dim = 4
    tokenizer = build_t5_tokenizer()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits it 4 (time) + 4 (rows) + 4 (columns)
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build_t5_encoder(tokenizer, umt5=True),
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
    )


def save_quietly(pipe: Any, out: Path) -> None:
    """``save_pretrained`` as safetensors without transformers' per-text-encoder "Writing model shards"
    progress bar (one sub-megabyte shard each); its global switch is restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(str(out), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def build_tiny(family: str, out: Path, variant: str | None = None) -> dict[str, Any]:
    """Build the tiny pipeline of ``family`` with seeded random weights, save it to ``out`` with its
    ``vgrpo.json`` and return ``{"family", "path", "mb", "class"}``. ``variant`` is FLUX's (dev by default)."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    if variant is not None and family != "flux":
        raise ValueError(
            f"variant {variant!r}: only the flux family has variants ({', '.join(FLUX_VARIANTS)}); "
            f"drop it for {family}"
        )
    if family == "flux":
        variant = variant or "dev"
        if variant not in FLUX_VARIANTS:
            raise ValueError(f"flux variant {variant!r}: choose one of {', '.join(FLUX_VARIANTS)}")

    import torch

    torch.manual_seed(SEED)
    if family == "sd3":
        pipe = build_sd3()
    elif family == "flux":
        pipe = build_flux(variant or "dev")
    elif family == "qwen_image":
        pipe = build_qwen_image()
    else:
        pipe = build_wan()

    out = Path(out)
    save_quietly(pipe, out)
    height, width, frames = NATIVE_SIZE[family]
    native = {"family": family, "variant": variant, "height": height, "width": width, "frames": frames}
    (out / "vgrpo.json").write_text(json.dumps(native, indent=1) + "\n")
    size_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"family": family, "path": str(out), "mb": size_bytes / 2**20, "class": type(pipe).__name__}
