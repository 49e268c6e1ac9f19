"""Group-relative advantages (docs/algorithms.md §3)."""

from __future__ import annotations

import torch

from vgrpo.proto.config import AdvantageConfig


def group_advantages(
    rewards_b: torch.Tensor, group_ids_b: torch.Tensor, cfg: AdvantageConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """A = (R - mean_g) / (std + eps), then an optional hard clip and/or soft clip.

    ``norm``: ``group`` divides by the group's own std (DGPO GenEval), ``global_std`` by the std of every
    reward of the iteration (Flow-GRPO, DiffusionNFT), ``none`` leaves A = R - mean_g. Stds are population
    stds (numpy's default, as Flow-GRPO, DGPO and DiffusionNFT compute them) unless ``std`` is ``sample``
    (torch's default, as MixGRPO computes them). Zero-std groups get A = 0 exactly (§3 note a);
    their fraction is reported as ``zero_std_frac``.
    """
    rewards_b = rewards_b.double()
    _, inverse = torch.unique(group_ids_b, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    count_g = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards_b))
    mean_g = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, rewards_b) / count_g
    centred_b = rewards_b - mean_g[inverse]
    sample = cfg.std == "sample"
    sq_g = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, centred_b**2)
    std_g = (sq_g / (count_g - 1 if sample else count_g).clamp(min=1)).sqrt()
    if cfg.norm == "group":
        adv_b = centred_b / (std_g[inverse] + cfg.eps)
    elif cfg.norm == "global_std":
        adv_b = centred_b / (rewards_b.std(unbiased=sample) + cfg.eps)
    else:
        adv_b = centred_b
    zero_b = (std_g < 1e-12)[inverse]
    adv_b = torch.where(zero_b, torch.zeros_like(adv_b), adv_b)
    if cfg.clip is not None:
        adv_b = adv_b.clamp(-cfg.clip, cfg.clip)
    if cfg.soft_clip is not None:
        adv_b = cfg.soft_clip * torch.tanh(adv_b / cfg.soft_clip)  # V-GRPO's soft clip (§4.3)
    stats = {
        "zero_std_frac": float((std_g < 1e-12).double().mean()),
        "adv_abs_mean": float(adv_b.abs().mean()),
    }
    return adv_b.float(), stats


def combine_rewards(
    values: dict[str, torch.Tensor],
    weights: dict[str, float],
    group_ids_b: torch.Tensor,
    mode: str = "weighted_sum",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar reward the advantages are computed from, and per-reward statistics.

    ``weighted_sum``: ``sum_k w_k r_k`` (the embedded default, Flow-GRPO's ``multi_score``).
    ``group_normalized``: ``sum_k w_k (r_k - mean_g r_k) / (std_g r_k + eps)``, each reward standardised
    inside its prompt group before weighting (population std; a group in which a reward is constant
    contributes 0 for it), so that a reward's influence is its weight, not its scale or spread.
    Statistics: ``adv/<name>/zero_std_frac`` (groups in which that reward cannot rank the images) and
    ``adv/<name>/abs_mean`` (mean |standardised reward|)."""
    if mode not in ("weighted_sum", "group_normalized"):
        raise ValueError(f"reward.combine = {mode!r}: want weighted_sum or group_normalized")
    _, inverse = torch.unique(group_ids_b, return_inverse=True)
    g = int(inverse.max()) + 1 if len(inverse) else 0
    total = torch.zeros(len(group_ids_b), dtype=torch.float64)
    stats: dict[str, float] = {}
    for name, r in values.items():
        r = r.double()
        count = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
        mean = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, r) / count
        centred = r - mean[inverse]
        std = (torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, centred**2) / count).sqrt()
        flat = std < 1e-12
        z = torch.where(flat[inverse], torch.zeros_like(r), centred / (std[inverse] + eps))
        stats[f"adv/{name}/zero_std_frac"] = float(flat.double().mean())
        stats[f"adv/{name}/abs_mean"] = float(z.abs().mean())
        total += float(weights.get(name, 1.0)) * (z if mode == "group_normalized" else r)
    return total, stats
