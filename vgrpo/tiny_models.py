"""The tiny, genuine SD3 pipeline of the embedded default, built from config with random weights (its
pretraining recipe is `vgrpo/pretrain_tiny.py`; the trained weights ship in `core/assets/tiny_sd3/`).

Architecture (every part a stock diffusers / transformers class, so any diffusers tool loads it):

    prompt ──CLIPTokenizer (word-level BPE for the GenEval-Shapes grammar, 16 tokens)
           ├─ CLIPTextModelWithProjection #1  hidden 64, proj 32  ─┐ penultimate states concatenated on
           └─ CLIPTextModelWithProjection #2  hidden 64, proj 32  ─┘ features (128 = joint_attention_dim);
                                                                     pooled = [proj1, proj2] (64)
    image 64×64×3 ──AutoencoderKL (factor 4)──► latent 4×16×16 ──SD3Transformer2DModel (patch 2 → 64
    tokens, width 96, 4 joint blocks)──► velocity;  FlowMatchEulerDiscreteScheduler (shift 3); no T5.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vgrpo.core.policy import AutoencoderKL, StableDiffusion3Pipeline

CLIPTokenizer = Any  # transformers.CLIPTokenizer (lazily imported, opaque to mypy)

# The whole vocabulary of GenEval-Shapes prompts (docs/geneval-shapes.md "Vocabulary" and the six templates),
# frozen here because the tokenizer is part of the shipped model.
SHAPE_WORDS = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GRAMMAR_WORDS: tuple[str, ...] = (
    *("a", "an", "photo", "of", "and", "two", "three", "four", "left", "right", "above", "below"),
    *SHAPE_WORDS,
    *("crosses" if s == "cross" else s + "s" for s in SHAPE_WORDS),
    *COLOR_WORDS,
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TEXT_MAX_LENGTH = 16  # longest prompt: "a photo of an orange triangle and a purple diamond" = 10 words + 2

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
SCHEDULER_SHIFT = 3.0  # SD3's; the scheduler config carries it to every sampler (rollout.shift = None)


# ------------------------------------------------------------------------------------------ tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (what ByteLevel pre-tokenisation emits)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe(word: Sequence[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Classic BPE: repeatedly merge the lowest-ranked adjacent pair present."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP byte-level BPE vocabulary in which every grammar word is ONE token (``word</w>``): all 256
    byte symbols (bare and end-of-word, so any text still tokenises), the two specials, then for each word
    the merges that build it, appended only where the merges so far do not already produce it (a later
    merge never changes an earlier word: BPE always applies the lowest-ranked pair present)."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in GRAMMAR_WORDS:
        chars = [*word[:-1], word[-1] + "</w>"]
        parts = _bpe(chars, ranks)
        while len(parts) > 1:  # merge left to right until the word is one token
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = _bpe(chars, ranks)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def build_tokenizer() -> CLIPTokenizer:
    """The offline CLIP tokenizer for the prompt grammar; pad = eos (as SD3's CLIP-L tokenizer)."""
    from transformers import CLIPTokenizer as Tokenizer

    vocab, merges = tokenizer_vocab_and_merges()
    # tokenizers' BPE takes merges as (left, right) tuples (its hint says list[str])
    tok = Tokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_MAX_LENGTH)  # type: ignore[arg-type]
    for word in GRAMMAR_WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer: grammar word {word!r} is {len(ids)} tokens, expected 1")
    return tok


# ------------------------------------------------------------------------------------------ components


def build_text_encoder(tokenizer: CLIPTokenizer, hidden: int = 64, proj: int = 32, layers: int = 3):
    """A small ``CLIPTextModelWithProjection`` whose bos/eos/pad ids are the tokenizer's (the pooled
    output reads the eos position, docs/stack-notes.md)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=proj,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=TEXT_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def build_vae() -> AutoencoderKL:
    """64×64×3 <-> 4×16×16 (three blocks: factor 4), no mid-block attention, no quant convs (as SD3)."""
    from diffusers import AutoencoderKL as VAE

    return VAE(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )


def build_transformer(heads: int = 3, layers: int = 4, patch: int = 2):
    """SD3's MMDiT at toy size: latent 16×16 (``sample_size`` = 16 so the pipeline's default is 64 px),
    patch 2 -> 64 image tokens, width 32·heads, ``layers`` joint blocks; the joint text width is the sum
    of the CLIP hidden sizes and the pooled width the sum of their projections."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4,
        patch_size=patch,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=layers,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=128,
        caption_projection_dim=32 * heads,
        pooled_projection_dim=64,
        pos_embed_max_size=IMAGE_SIZE // 4 // patch,
    )


def adaln_zero_init(transformer: torch.nn.Module) -> None:
    """DiT's adaLN-Zero initialisation (Peebles & Xie, 2023, §3.2): every modulation linear (shift, scale,
    gate) and the output projection start at zero, so each block starts as the identity; the DiT paper
    finds it converges markedly faster than diffusers' default initialisation of the same layers."""
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and (name.endswith(".linear") or name == "proj_out"):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


def build_pipeline(
    seed: int = 0,
    adaln_zero: bool = True,
    shift: float = SCHEDULER_SHIFT,
    heads: int = 3,
    layers: int = 4,
    patch: int = 2,
) -> StableDiffusion3Pipeline:
    """A randomly initialised tiny SD3 pipeline (T5 omitted)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import StableDiffusion3Pipeline as Pipeline

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    transformer = build_transformer(heads, layers, patch)
    if adaln_zero:
        adaln_zero_init(transformer)
    pipe: StableDiffusion3Pipeline = Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(tokenizer),
        tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: StableDiffusion3Pipeline, out_dir: str | Path) -> None:
    """``save_pretrained`` as safetensors, T5 slots null (load with ``text_encoder_3=None, tokenizer_3=None``)."""
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
