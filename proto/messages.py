"""Messages that cross process boundaries. Each is stamped with the policy version it concerns.

Big tensors never go through pydantic: they travel as numpy/torch in Ray's object store and the message
carries a :class:`TensorSpec` (shape and dtype) beside the reference.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class TensorSpec(Message):
    shape: list[int]
    dtype: str


class PromptItem(Message):
    prompt: str
    prompt_id: int = Field(description="stable index in the prompt file (group-shared noise keys on it)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="e.g. GenEval's tag/include")


class PromptBatch(Message):
    """What the driver asks one rollout worker to sample: G images for each prompt."""

    step: int
    policy_version: int = Field(description="the newest version the driver knows of")
    prompts: list[PromptItem]
    group_size: int
    seed: int = Field(description="base seed; image j of prompt i uses a seed derived from it")


class RolloutBatchMeta(Message):
    """Describes a rollout batch whose tensors travel by object reference beside it."""

    step: int
    policy_version: int = Field(description="the single version that sampled every image of the batch")
    worker: int
    prompts: list[PromptItem]
    group_size: int
    seeds: list[int]
    latents: TensorSpec
    images: TensorSpec
    extras: dict[str, TensorSpec] = Field(default_factory=dict, description="e.g. SDE trajectory, log-probs")
    sample_seconds: float = 0.0

    @model_validator(mode="after")
    def _counts(self) -> RolloutBatchMeta:
        n = len(self.prompts) * self.group_size
        if len(self.seeds) != n or self.latents.shape[:1] != [n]:
            raise ValueError(
                f"rollout batch holds {n} images but {len(self.seeds)} seeds / latents {self.latents.shape}"
            )
        return self


class RewardRequest(Message):
    policy_version: int
    reward: str
    prompts: list[str]
    metadata: list[dict[str, Any]] = Field(default_factory=list)
    images: TensorSpec


class RewardResult(Message):
    policy_version: int
    reward: str
    values: list[float]
    details: list[dict[str, Any]] = Field(default_factory=list)
    seconds: float = 0.0


class WeightUpdateManifest(Message):
    """The learner's published weights: names, shapes and dtypes; the payload travels beside it."""

    policy_version: int
    kind: str = Field(description="lora | full")
    tensors: dict[str, TensorSpec]
    num_bytes: int
    transport: str = Field("object_store", description="object_store | nccl")
