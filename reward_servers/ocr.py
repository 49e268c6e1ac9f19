"""The OCR reward of Flow-GRPO (identical in DiffusionNFT; docs/algorithms.md §7.3) on PaddleOCR's models in
ONNX through `rapidocr-onnxruntime` (bundled in the wheel: nothing downloads; the CUDA execution provider
when onnxruntime has it).

    target = the text between the first pair of double quotes of the prompt  (prompt.split('"')[1])
    rec    = the recognised strings with confidence > 0, concatenated in reading order
    both normalised: spaces removed, lower-cased
    dist   = 0 if target is a substring of rec else Levenshtein(rec, target);  dist = min(dist, len(target))
    reward = 1 − dist / len(target)  ∈ [0, 1]      (an OCR failure: dist = len(target), reward 0)

As PaddleOCR's `ocr()` (Flow-GRPO's call) runs: no angle classifier, the detector's input limited to a
long side of 960 px, and lines whose recognition confidence is below `text_score` (PaddleOCR's
drop_score, 0.5) dropped before the concatenation. rapidocr ships the PP-OCRv4 (multilingual, Latin
included) recognition model where Flow-GRPO's `lang="en"` loads the English one.
A prompt without quoted text is an item error naming the prompt; `validate_prompts` checks a whole
prompt file up front (the training driver calls it when it loads OCR prompts).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem


class OcrPromptError(ValueError):
    """A prompt the OCR reward cannot use: no text between double quotes (or only spaces there)."""


def extract_target(prompt: str) -> str:
    """The text between the first pair of double quotes (Flow-GRPO: `prompt.split('"')[1]`); raises
    OcrPromptError naming the prompt when there is none or it is blank."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise OcrPromptError(
            f"OCR prompt {prompt!r} has no text in double quotes; the OCR reward reads its target from "
            'the first pair of double quotes, e.g. a sign that says "OPEN"'
        )
    if not normalize(parts[1]):
        raise OcrPromptError(f"OCR prompt {prompt!r}: the quoted text is empty (nothing to read)")
    return parts[1]


def validate_prompts(prompts: list[str]) -> None:
    """Raises OcrPromptError naming the first prompt (and its 0-based index) without usable quoted
    text, so that a bad OCR prompt file fails when it is loaded, not mid-training."""
    for i, prompt in enumerate(prompts):
        try:
            extract_target(prompt)
        except OcrPromptError as e:
            raise OcrPromptError(f"prompt {i}: {e}") from None


def normalize(text: str) -> str:
    """Flow-GRPO's normalisation: spaces removed, lower-cased."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    try:
        from rapidfuzz.distance import Levenshtein

        return int(Levenshtein.distance(a, b))
    except ImportError:  # the pure-Python dynamic programme
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]


def ocr_reward(recognized: str, target: str) -> float:
    """1 − min(dist, len)/len with dist = 0 when the normalised target is a substring of the normalised
    recognition, else their Levenshtein distance (docs/algorithms.md §7.3)."""
    rec, tgt = normalize(recognized), normalize(target)
    if not tgt:
        raise OcrPromptError(f"empty OCR target {target!r}")
    dist = 0 if tgt in rec else levenshtein(rec, tgt)
    dist = min(dist, len(tgt))
    return 1.0 - dist / len(tgt)


class OcrReward(Reward):
    """PaddleOCR (PP-OCRv4 detection + recognition, ONNX) through rapidocr-onnxruntime.

    Options (`reward.servers.ocr.options`): use_cuda (default: when onnxruntime offers the
    CUDAExecutionProvider), text_score (0.5, PaddleOCR's drop_score), num_threads (onnxruntime's
    intra-op threads; -1: its default)."""

    name = "ocr"

    def __init__(self, use_cuda: bool | None = None, text_score: float = 0.5, num_threads: int = -1) -> None:
        try:
            import onnxruntime
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError(
                f"the OCR reward needs rapidocr-onnxruntime ({e}); fix: pip install rapidocr-onnxruntime"
            ) from e
        if use_cuda is None:
            use_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        self.use_cuda = bool(use_cuda)
        self.text_score = float(text_score)
        self.engine = RapidOCR(
            text_score=self.text_score,
            use_cls=False,  # Flow-GRPO: PaddleOCR(use_angle_cls=False)
            # PaddleOCR's detector defaults (rapidocr's own, min side >= 736, upsamples a 512 px image)
            det_limit_side_len=960,
            det_limit_type="max",
            det_use_cuda=self.use_cuda,
            cls_use_cuda=self.use_cuda,
            rec_use_cuda=self.use_cuda,
            intra_op_num_threads=num_threads,
        )

    def recognize(self, image: np.ndarray) -> tuple[str, list[dict[str, Any]]]:
        """The recognised text (lines with confidence > 0, concatenated in PaddleOCR's reading order:
        top to bottom, left to right) and the lines themselves."""
        result, _ = self.engine(np.ascontiguousarray(image[..., ::-1]), use_cls=False)  # RGB -> BGR (cv2)
        lines = [
            {"text": str(text), "confidence": float(conf), "box": np.asarray(box, dtype=float).tolist()}
            for box, text, conf in (result or [])
        ]
        return "".join(ln["text"] for ln in lines if ln["confidence"] > 0), lines

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            try:
                target = extract_target(prompt)
            except OcrPromptError as e:
                out.append(ScoredItem(None, error=str(e)))
                continue
            try:
                text, lines = self.recognize(image)
            except Exception as e:  # Flow-GRPO: an OCR failure scores as the maximal distance
                out.append(ScoredItem(0.0, details={"target": target, "recognized": "", "ocr_error": str(e)}))
                continue
            value = ocr_reward(text, target)
            out.append(
                ScoredItem(
                    value,
                    details={"target": target, "recognized": text, "exact": value == 1.0, "lines": lines},
                )
            )
        return out
