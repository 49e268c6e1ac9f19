"""Architecture configs of real models, for building them with random weights (no download): GPU tests,
benchmarks and FLOP estimates use the same numbers."""

from __future__ import annotations

# stabilityai/stable-diffusion-3.5-medium transformer/config.json and vae/config.json
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD35_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)

# black-forest-labs/FLUX.1-dev transformer/config.json (12 B: 19 double-stream + 38 single-stream blocks;
# in_channels 64 = 16 latent channels packed 2x2; guidance-distilled) and vae/config.json (SD3's VAE
# shape with FLUX's latent normalisation)
FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX1_VAE = dict(SD35_VAE, scaling_factor=0.3611, shift_factor=0.1159)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (30 blocks, d 1536 = 12 heads x 128) and
# vae/config.json (AutoencoderKLWan's defaults: the causal video VAE, 8x space / 4x time, 16 channels
# normalised per channel by latents_mean / latents_std)
WAN21_T2V_1_3B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
WAN21_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    latents_std=[
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.9160,
    ],
)

# the schedulers' shifts: FLUX.1-dev's scheduler/scheduler_config.json (resolution-dependent: exp(mu), mu
# linear in the packed token count; core.families.base.dynamic_shift) and Wan2.1's flow_shift at 480p
FLUX1_DEV_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
WAN21_480P_FLOW_SHIFT = 3.0
