"""JPEG compressibility and incompressibility, DDPO's classic tasks (Black et al., 2023; the same code in
yifan123/flow_grpo `rewards.py`): each image saved as a quality-95 JPEG with Pillow, its size in kB.

    jpeg_incompressibility:  value = size_kB / scale        (upstream returns size_kB; scale default 1)
    jpeg_compressibility:    value = -size_kB / scale       (upstream divides by 500: scale default 500)

No weights and no prompt: the embedded task beside GenEval-Shapes for checking that a loop optimises
anything at all (compressibility is learned in tens of steps: smooth, flat images). `details` carries the
raw size in kB."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vgrpo.reward_servers.base import Reward, ScoredItem

QUALITY = 95  # DDPO / Flow-GRPO


def jpeg_kb(image: np.ndarray, quality: int = QUALITY) -> float:
    """The size in kB (1000 bytes, as upstream) of ``image`` (uint8 H x W x 3) saved as a JPEG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


class _JpegReward(Reward):
    sign = 1.0

    def __init__(self, scale: float, quality: int = QUALITY) -> None:
        key = f"reward.servers.{self.name}.options."
        if not scale > 0:
            raise ValueError(f"{key}scale={scale!r}: want a positive number")
        if not 1 <= quality <= 100:
            raise ValueError(f"{key}quality={quality!r}: want 1..100 (95 as DDPO)")
        self.scale, self.quality = float(scale), int(quality)

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        out = []
        for image in images:
            kb = jpeg_kb(np.ascontiguousarray(image, dtype=np.uint8), self.quality)
            out.append(ScoredItem(self.sign * kb / self.scale, details={"kb": kb}))
        return out


class JpegCompressibility(_JpegReward):
    """Smaller JPEGs score higher: value = -kB / scale (500, as Flow-GRPO)."""

    name = "jpeg_compressibility"
    sign = -1.0

    def __init__(self, scale: float = 500.0, quality: int = QUALITY) -> None:
        super().__init__(scale, quality)


class JpegIncompressibility(_JpegReward):
    """Larger JPEGs score higher: value = kB / scale (1, as DDPO)."""

    name = "jpeg_incompressibility"

    def __init__(self, scale: float = 1.0, quality: int = QUALITY) -> None:
        super().__init__(scale, quality)
