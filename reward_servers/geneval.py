"""The GenEval reward (Ghosh et al., 2023; docs/algorithms.md §7.1): GenEval's detector and colour classifier
on transformers classes, and GenEval's rules, both the official binary correctness (evaluation) and the
partial-credit score Flow-GRPO trains on (`value`).

    image ──Mask2Former (COCO instance)──▶ detections (class, score, box from mask, mask)
          ──select: score > 0.3 (> 0.9 for `counting`), ≤ 16 per class by confidence, no NMS──▶ objects
    metadata {tag, include, exclude} ──rules (pure functions below)──▶ correct (binary), reward (partial)
                   colour clauses ask CLIP ViT-L/14 zero-shot over GenEval's 10 colours, on the box crop
                   of the image composited onto grey #999 through the instance mask

The rules are plain functions over `Detection`s (`select_detections`, `relative_position`,
`evaluate_official`, `evaluate_partial`), written line by line after GenEval's `evaluation/evaluate_images.py`
and Flow-GRPO's reward server `reward_server/gen_eval.py`, and tested on synthetic detections; the models
only produce the detections and the colours.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem
from vgrpo.reward_servers.shapes.spec import POSITION_MARGIN, relations

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
# GenEval's evaluation/object_names.txt: the 80 COCO classes in the detector's order, with GenEval's names
# (computer mouse, tv remote, computer keyboard), which its prompt metadata uses
CLASSNAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop",
    "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
FAMILIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

THRESHOLD = 0.3  # GenEval: detection score threshold
COUNTING_THRESHOLD = 0.9  # ... for prompts tagged `counting`
MAX_OBJECTS = 16  # detections kept per class, by confidence
NMS_THRESHOLD = 1.0  # overlap threshold 1.0: no NMS
POSITION_THRESHOLD = POSITION_MARGIN  # margin: 0.1 x the summed box sizes, per axis

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass
class Detection:
    """One detected instance: GenEval class name, confidence, box (x1, y1, x2, y2) in pixels, its
    instance mask (bool H x W, optional) and a colour when already known (synthetic tests)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, repr=False)
    color: str | None = None


# ------------------------------------------------------------------------------------- the rules (pure)

ColorFn = Callable[[list[Detection], str], list[str]]


def colors_from_detections(detections: list[Detection], classname: str) -> list[str]:
    """A ColorFn that reads `Detection.color` (for detections whose colour is already known)."""
    return [d.color or "" for d in detections]


def select_detections(
    detections: Sequence[Detection],
    tag: str,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
) -> dict[str, list[Detection]]:
    """GenEval's `evaluate_image` selection: per class, detections with score > threshold (> the counting
    threshold when the prompt's tag is `counting`), sorted by confidence, the first `max_objects`; no NMS
    (GenEval's overlap threshold is 1.0). Classes with no detection are absent."""
    cut = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    out: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        kept = [d for d in sorted(dets, key=lambda d: -d.score) if d.score > cut][:max_objects]
        if kept:
            out[label] = kept
    return out


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_THRESHOLD
) -> set[str]:
    """Position of A relative to B (GenEval's `relative_position`): box centres c, sizes d, off = c_a − c_b,
    rev = max(|off| − margin·(d_a + d_b), 0)·sign(off) per axis; no relation when |rev| < 1e-3 on both
    axes; else (dx, dy) = rev / ‖off‖ and left of dx < −0.5, right of dx > 0.5, above dy < −0.5,
    below dy > 0.5 (image y grows downward)."""
    xa0, ya0, xa1, ya1 = (float(v) for v in list(box_a)[:4])
    xb0, yb0, xb1, yb1 = (float(v) for v in list(box_b)[:4])
    return relations(
        ((xa0 + xa1) / 2, (ya0 + ya1) / 2),
        (abs(xa1 - xa0), abs(ya1 - ya0)),
        ((xb0 + xb1) / 2, (yb0 + yb1) / 2),
        (abs(xb1 - xb0), abs(yb1 - yb0)),
        margin,
    )


def _color_counts(colors: list[str]) -> str:
    return ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)


def evaluate_official(
    objects: Mapping[str, list[Detection]],
    metadata: Mapping[str, Any],
    colors_of: ColorFn = colors_from_detections,
    margin: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """GenEval's binary correctness (`evaluate`): include clauses AND, exclude clauses OR. Each include
    needs ≥ count detections; colour is checked on the top-`count` ones; position needs every one of
    them to relate correctly to every object of the referenced (earlier, matched) clause. Each exclude
    fails when ≥ count are detected (counting prompts exclude count + 1: the count must be exact).
    Returns (correct, reason)."""
    correct = True
    reason: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        classname, count = req["class"], req["count"]
        matched = True
        found = list(objects.get(classname, []))[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = colors_of(found, classname)
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={count}, found "
                        f"{colors.count(req['color'])} {req['color']}; and {_color_counts(colors)}"
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                target = matched_groups[target_group]
                if target is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target_obj in target:
                            true_rels = relative_position(obj.box, target_obj.box, margin)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    f"{' and '.join(sorted(true_rels))} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, "\n".join(reason)


def evaluate_partial(
    objects: Mapping[str, list[Detection]],
    metadata: Mapping[str, Any],
    colors_of: ColorFn = colors_from_detections,
    margin: float = POSITION_THRESHOLD,
) -> tuple[bool, float, str]:
    """Flow-GRPO's training score (`evaluate_reward`), quirks kept: the mean of a list built per include
    clause: the count term 1 − |count − n_found|/count over all selected detections (negative when
    n_found > 2·count); a wrong count with a colour or position clause appends 0; the colour term
    1 − |count − n_colour_ok|/count; position appends 0 when the target clause failed, 0 on the first
    failing pair, and 1.0 after the loop even when a pair failed. Exclude clauses are ignored. Returns
    (strict_correct: exact counts and colours, reward, reason); reward 0 when there is no include."""
    correct = True
    reason: list[str] = []
    rewards: list[float] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        classname, count = req["class"], req["count"]
        matched = True
        found = list(objects.get(classname, []))
        rewards.append(1 - abs(count - len(found)) / count)
        if len(found) != count:
            correct = matched = False
            reason.append(f"expected {classname}=={count}, found {len(found)}")
            if "color" in req or "position" in req:
                rewards.append(0.0)
        else:
            if "color" in req:
                colors = colors_of(found, classname)
                n_ok = colors.count(req["color"])
                rewards.append(1 - abs(count - n_ok) / count)
                if n_ok != count:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={count}, found {n_ok} {req['color']}; "
                        f"and {_color_counts(colors)}"
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                target = matched_groups[target_group]
                if target is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                    rewards.append(0.0)
                else:
                    for obj in found:
                        for target_obj in target:
                            true_rels = relative_position(obj.box, target_obj.box, margin)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    f"{' and '.join(sorted(true_rels))} target"
                                )
                                rewards.append(0.0)
                                break
                        if not matched:
                            break
                    rewards.append(1.0)  # upstream quirk: appended after the loop, even on failure
        matched_groups.append(found if matched else None)
    reward = sum(rewards) / len(rewards) if rewards else 0.0
    return correct, float(reward), "\n".join(reason)


@dataclass
class GenEvalVerdict:
    """Both readings of one image: `correct` (GenEval's official binary metric, for evaluation),
    `strict_correct` and `reward` (Flow-GRPO's training score) with the reasons of each."""

    correct: bool
    strict_correct: bool
    reward: float
    reason: str
    strict_reason: str


def judge(
    objects: Mapping[str, list[Detection]],
    metadata: Mapping[str, Any],
    colors_of: ColorFn = colors_from_detections,
    margin: float = POSITION_THRESHOLD,
) -> GenEvalVerdict:
    """`evaluate_official` and `evaluate_partial` on the same selected detections."""
    correct, reason = evaluate_official(objects, metadata, colors_of, margin)
    strict, reward, strict_reason = evaluate_partial(objects, metadata, colors_of, margin)
    return GenEvalVerdict(correct, strict, reward, reason, strict_reason)


def metadata_problem(metadata: Any) -> str | None:
    """Why a metadata row cannot be judged (naming the missing or malformed fields), or None."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return "metadata is a string but not JSON"
    if not isinstance(metadata, Mapping) or not metadata:
        return (
            "no GenEval metadata; each prompt needs its row's fields 'tag' and 'include' "
            "(and optionally 'exclude'), as in GenEval's evaluation_metadata.jsonl"
        )
    missing = [k for k in ("tag", "include") if k not in metadata]
    if missing:
        return f"GenEval metadata lacks the field(s) {', '.join(repr(k) for k in missing)}"
    for key in ("include", "exclude"):
        clauses = metadata.get(key, [])
        if not isinstance(clauses, list):
            return f"GenEval metadata field {key!r} must be a list of clauses"
        for j, req in enumerate(clauses):
            if not isinstance(req, Mapping) or not isinstance(req.get("class"), str):
                return f"GenEval metadata {key}[{j}] lacks a string 'class'"
            count = req.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                return f"GenEval metadata {key}[{j}] needs an integer 'count' >= 1, got {count!r}"
            if key == "include" and "position" in req:
                pos = req["position"]
                if not (isinstance(pos, list | tuple) and len(pos) == 2 and isinstance(pos[1], int)):
                    return f"GenEval metadata include[{j}].position must be [relation, clause index]"
                if not 0 <= pos[1] < j:
                    return f"GenEval metadata include[{j}].position refers to clause {pos[1]}, not an earlier one"
            if key == "include" and "color" in req and req["color"] not in COLORS:
                return (
                    f"GenEval metadata include[{j}].color {req['color']!r} is not one of {', '.join(COLORS)}"
                )
    return None


# -------------------------------------------------------------------------------------------- the models


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class GenEvalReward(Reward):
    """GenEval on transformers: Mask2Former (`detector_path`, a COCO instance checkpoint) for detections
    and CLIP ViT-L/14 (`clip_path`) for colours. `value` is the partial-credit training reward; `details`
    carry the official binary `correct` (also as `score`, 1.0/0.0), `strict_correct`, the reasons and
    the selected detections per class ([x1, y1, x2, y2, score]).

    Each image needs its GenEval metadata row (`tag`, `include`, optional `exclude`) in `metadata`;
    one without is an item error naming the missing fields.

    Options (`reward.servers.geneval.options`): detector_path, clip_path, device (default cuda when
    present), threshold 0.3, counting_threshold 0.9, max_objects 16, position_threshold 0.1,
    image_size 1024 (the detector input's long side, as mmdet's LSJ test pipeline; None: the
    checkpoint's processor size), max_per_image 100 (mmdet's test_cfg), class_names (the detector's
    labels in order; default GenEval's 80 COCO names for an 80-class detector, else its id2label),
    bgcolor "#999", batch_size 8 (detector images per forward pass)."""

    name = "geneval"

    def __init__(
        self,
        detector_path: str = DEFAULT_DETECTOR,
        clip_path: str = DEFAULT_CLIP,
        device: str | None = None,
        threshold: float = THRESHOLD,
        counting_threshold: float = COUNTING_THRESHOLD,
        max_objects: int = MAX_OBJECTS,
        position_threshold: float = POSITION_THRESHOLD,
        image_size: int | None = 1024,
        max_per_image: int = 100,
        class_names: list[str] | None = None,
        bgcolor: str = "#999",
        batch_size: int = 8,
    ) -> None:
        import torch
        from transformers import (
            AutoImageProcessor,
            AutoProcessor,
            CLIPModel,
            Mask2FormerForUniversalSegmentation,
        )

        from vgrpo.reward_servers.hf_weights import load_pretrained, resolve_weights

        key = "reward.servers.geneval.options."
        det_path = resolve_weights(detector_path, key + "detector_path", DEFAULT_DETECTOR)
        clip_dir = resolve_weights(clip_path, key + "clip_path", DEFAULT_CLIP)
        self.device = _device(device)
        self.detector = load_pretrained(
            Mask2FormerForUniversalSegmentation.from_pretrained,
            det_path,
            key + "detector_path",
            DEFAULT_DETECTOR,
        ).to(self.device)
        self.detector.eval()
        self.det_processor = load_pretrained(
            AutoImageProcessor.from_pretrained, det_path, key + "detector_path", DEFAULT_DETECTOR
        )
        self.clip = load_pretrained(CLIPModel.from_pretrained, clip_dir, key + "clip_path", DEFAULT_CLIP)
        self.clip = self.clip.to(self.device)
        self.clip.eval()
        self.clip_processor = load_pretrained(
            AutoProcessor.from_pretrained, clip_dir, key + "clip_path", DEFAULT_CLIP
        )
        num_labels = int(self.detector.config.num_labels)
        if class_names is not None:
            if len(class_names) != num_labels:
                raise ValueError(
                    f"{key}class_names has {len(class_names)} names for a detector with {num_labels} classes"
                )
            self.class_names = list(class_names)
        elif num_labels == len(CLASSNAMES):
            self.class_names = list(CLASSNAMES)
        else:
            self.class_names = [self.detector.config.id2label[i] for i in range(num_labels)]
        self.threshold = threshold
        self.counting_threshold = counting_threshold
        self.max_objects = max_objects
        self.position_threshold = position_threshold
        self.image_size = image_size
        self.max_per_image = max_per_image
        self.bgcolor = bgcolor
        self.batch_size = max(1, batch_size)
        self._color_classifiers: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------- detection

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Mask2Former instance detections per image, post-processed as mmdet's MaskFormerFusionHead:
        softmax over classes (no-object dropped), top `max_per_image` (query, class) pairs, masks upsampled
        to the padded input, cropped to the resized image, upsampled to the original size, binarised at 0;
        score = class probability x mean mask probability inside the mask; box = the mask's extent."""
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._detect_batch(images[start : start + self.batch_size]))
        return out

    def _detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        import torch
        import torch.nn.functional as F

        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if self.image_size:
            kwargs["size"] = {"shortest_edge": self.image_size, "longest_edge": self.image_size}
        inputs = self.det_processor(images=list(images), **kwargs)
        pixel_values = inputs["pixel_values"].to(self.device)
        pixel_mask = inputs.get("pixel_mask")
        with torch.no_grad():
            outputs = self.detector(pixel_values=pixel_values)
        results = []
        padded_hw = pixel_values.shape[-2:]
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            if pixel_mask is not None:
                valid = pixel_mask[i].bool()
                rh, rw = int(valid.any(1).sum()), int(valid.any(0).sum())
            else:
                rh, rw = int(padded_hw[0]), int(padded_hw[1])
            cls_logits = outputs.class_queries_logits[i].float()  # (Q, C+1)
            num_queries, num_classes = cls_logits.shape[0], cls_logits.shape[1] - 1
            scores_qc = F.softmax(cls_logits, dim=-1)[:, :-1]
            k = min(self.max_per_image, num_queries * num_classes)
            top_scores, top_idx = scores_qc.flatten().topk(k, sorted=False)
            labels = (top_idx % num_classes).tolist()
            queries = top_idx // num_classes
            masks_qhw = outputs.masks_queries_logits[i][queries].float()[None]  # (1, k, h/4, w/4)
            masks_qhw = F.interpolate(masks_qhw, size=padded_hw, mode="bilinear", align_corners=False)
            masks_qhw = masks_qhw[:, :, :rh, :rw]
            masks_qhw = F.interpolate(masks_qhw, size=(h, w), mode="bilinear", align_corners=False)[0]
            binary = masks_qhw > 0
            mask_scores = (masks_qhw.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            det_scores = (top_scores * mask_scores).tolist()
            binary_np = binary.cpu().numpy()
            dets = []
            for j in range(k):
                m = binary_np[j]
                xs, ys = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
                box = (
                    (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))
                    if len(xs) and len(ys)
                    else (0.0, 0.0, 0.0, 0.0)  # mmdet's mask2bbox for an empty mask
                )
                dets.append(Detection(self.class_names[labels[j]], float(det_scores[j]), box, m))
            results.append(dets)
        return results

    # ------------------------------------------------------------------------------------------- colour

    def _clip_text(self, texts: list[str]) -> Any:
        import torch

        tok = self.clip_processor.tokenizer(
            texts, padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            pooled = self.clip.text_model(
                input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask")
            ).pooler_output
            return self.clip.text_projection(pooled).float()

    def _color_classifier(self, classname: str) -> Any:
        """clip_benchmark's `zero_shot_classifier`: per colour, the mean of the normalised embeddings of
        GenEval's three templates, normalised again; columns in COLORS order."""
        import torch

        if classname not in self._color_classifiers:
            weights = []
            for c in COLORS:
                emb = self._clip_text([t.format(c=c, obj=classname) for t in COLOR_TEMPLATES])
                emb = emb / emb.norm(dim=-1, keepdim=True)
                mean = emb.mean(dim=0)
                weights.append(mean / mean.norm())
            self._color_classifiers[classname] = torch.stack(weights, dim=1)
        return self._color_classifiers[classname]

    def crop(self, image: np.ndarray, det: Detection) -> Any:
        """GenEval's ImageCrops: the image composited onto `bgcolor` through the instance mask, cropped
        to the box (a PIL image; None when the box is empty)."""
        from PIL import Image

        pil = Image.fromarray(image).convert("RGB")
        if det.mask is not None:
            blank = Image.new("RGB", pil.size, color=self.bgcolor)
            pil = Image.composite(pil, blank, Image.fromarray(det.mask.astype(np.uint8) * 255, "L"))
        x1, y1, x2, y2 = det.box
        cropped = pil.crop((x1, y1, x2, y2))
        return cropped if cropped.width > 0 and cropped.height > 0 else None

    def classify_colors(self, image: np.ndarray, detections: list[Detection], classname: str) -> list[str]:
        """CLIP zero-shot colour of each detection (`run_classification`: argmax of 100·img·W), "" for an
        empty box."""
        import torch

        crops = [self.crop(image, d) for d in detections]
        keep = [i for i, c in enumerate(crops) if c is not None]
        colors = [""] * len(detections)
        if not keep:
            return colors
        pixels = self.clip_processor.image_processor(images=[crops[i] for i in keep], return_tensors="pt")[
            "pixel_values"
        ].to(self.device)
        with torch.no_grad():
            pooled = self.clip.vision_model(pixel_values=pixels).pooler_output
            feats = self.clip.visual_projection(pooled).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = 100.0 * feats @ self._color_classifier(classname)
        for i, idx in zip(keep, logits.argmax(dim=1).tolist(), strict=True):
            colors[i] = COLORS[idx]
        return colors

    def _colors_fn(self, image: np.ndarray) -> ColorFn:
        cache: dict[int, str] = {}  # the official and the partial rules ask about the same detections

        def colors_of(dets: list[Detection], classname: str) -> list[str]:
            todo = [d for d in dets if id(d) not in cache]
            for d, c in zip(todo, self.classify_colors(image, todo, classname), strict=True):
                cache[id(d)] = c
                d.color = c
            return [cache[id(d)] for d in dets]

        return colors_of

    # -------------------------------------------------------------------------------------------- score

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        out: list[ScoredItem | None] = [None] * len(images)
        rows: dict[int, Mapping[str, Any]] = {}
        for i, prompt in enumerate(prompts):
            meta: Any = metadata[i] if metadata is not None else None
            problem = metadata_problem(meta)
            if problem:
                out[i] = ScoredItem(None, error=f"geneval: prompt {prompt!r}: {problem}")
                continue
            rows[i] = json.loads(meta) if isinstance(meta, str) else meta
        todo = sorted(rows)
        detections = self.detect([images[i] for i in todo])
        for i, dets in zip(todo, detections, strict=True):
            meta = rows[i]
            objects = select_detections(
                dets, str(meta["tag"]), self.threshold, self.counting_threshold, self.max_objects
            )
            verdict = judge(objects, meta, self._colors_fn(images[i]), self.position_threshold)
            details = {
                "tag": meta["tag"],
                "correct": verdict.correct,
                "score": 1.0 if verdict.correct else 0.0,
                "strict_correct": verdict.strict_correct,
                "reason": verdict.reason,
                "strict_reason": verdict.strict_reason,
                "detections": {
                    label: [[*map(float, d.box), float(d.score)] for d in ds] for label, ds in objects.items()
                },
            }
            out[i] = ScoredItem(verdict.reward, details=details)
        return [item if item is not None else ScoredItem(None, error="not scored") for item in out]
