"""The objectives, one file each, behind one interface (:class:`Objective`). Adding one: a new file and
one line in ``OBJECTIVES``."""

from __future__ import annotations

from vgrpo.learner.objectives.base import FlowPolicy, Objective, TrainBatch, index_cond, mean_d
from vgrpo.learner.objectives.dgpo import DGPO
from vgrpo.learner.objectives.flow_grpo import FlowGRPO, WindowedFlowGRPO
from vgrpo.learner.objectives.flow_grpo_fast import FlowGRPOFast
from vgrpo.learner.objectives.mixgrpo import MixGRPO
from vgrpo.learner.objectives.nft import DiffusionNFT
from vgrpo.learner.objectives.vgrpo import VGRPO
from vgrpo.proto.config import AlgorithmConfig

OBJECTIVES: dict[str, type[Objective]] = {
    "vgrpo": VGRPO,
    "dgpo": DGPO,
    "flow_grpo": FlowGRPO,
    "nft": DiffusionNFT,
    "flow_grpo_fast": FlowGRPOFast,
    "mixgrpo": MixGRPO,
}


def build_objective(cfg: AlgorithmConfig) -> Objective:
    """The configured objective, given only its own subsection of ``algorithm``."""
    return OBJECTIVES[cfg.name](cfg.params())


__all__ = [
    "DGPO",
    "OBJECTIVES",
    "VGRPO",
    "DiffusionNFT",
    "FlowGRPO",
    "FlowGRPOFast",
    "FlowPolicy",
    "MixGRPO",
    "Objective",
    "TrainBatch",
    "WindowedFlowGRPO",
    "build_objective",
    "index_cond",
    "mean_d",
]
