"""The GenEval-Shapes detector (docs/geneval-shapes.md "Detector"), standing in for GenEval's Mask2Former +
CLIP colour classifier: segments flat shapes from the grey background, names each one's shape by
matching the six spec shapes drawn in its bounding box, and its colour by the nearest palette colour in
CIELAB, judged from the object's interior. Exact on clean spec images, tolerant of blur, noise and JPEG."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from vgrpo.reward_servers.shapes.spec import BACKGROUND, COLORS, MAX_SIDE, REFERENCE_SIZE, SHAPES, inside

BACKGROUND_TOLERANCE = 40.0  # max channel offset of the border median still taken as the background grey
MIN_AREA = 20.0  # px at 64 px: smaller blobs are specks, not objects (the smallest spec shape has 72)
MIN_SIDE_PX = 4.0  # px at 64 px: a blob thinner than this is a streak, not an object
MAX_SIDE_FACTOR = 1.6  # a blob wider than this x the spec's largest side is not one object
MAX_INTERIOR_STD = 40.0  # a flat object's interior varies by noise only; pure noise varies far more
MAX_OFF_LINE = 0.3  # RMS distance of a blob's pixels from its background-to-colour line, in line lengths
MIN_MATCH = 0.45  # soft IoU with the best shape template below which a blob is not a shape


@dataclass(frozen=True)
class Detection:
    """One detected object, in the coordinates of the detector's working frame (`size` x `size`, the
    input resized): `cx, cy` the centre of its bounding box (GenEval's centre, not the mask centroid),
    `bbox = (x0, y0, x1, y1)` in pixels with x1, y1 exclusive, `area` its coverage in px. `match` is the
    soft IoU with the shape template and `color_distance` the CIELAB distance to the palette colour."""

    shape: str
    color: str
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]
    area: float
    match: float = 1.0
    color_distance: float = 0.0

    @property
    def width(self) -> int:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> int:
        return self.bbox[3] - self.bbox[1]


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours given in 0..255, shape (..., 3)."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], np.float64)
_PALETTE_LAB = srgb_to_lab(_PALETTE)
# RGB -> (Y, Cb, Cr) scaled so that chroma counts CHROMA_WEIGHT as much as luma when judging form
CHROMA_WEIGHT = 0.15
_SHAPE_METRIC = np.diag([1.0, CHROMA_WEIGHT**0.5, CHROMA_WEIGHT**0.5]) @ np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)


def to_rgb(image: Any, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Any image (PIL of any mode; uint8 or float array, H x W, H x W x 1/3/4 or 1/3/4 x H x W; floats in
    0..1 or 0..255) as a float size x size x 3 array in 0..255. Transparency is composited over the spec's
    grey background; other sizes are resized (area averaging when shrinking)."""
    if isinstance(image, Image.Image):
        pil = image
    else:
        a = np.asarray(image)
        if a.dtype == bool:
            a = a.astype(np.float64)
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.size == 0:
            raise ValueError(f"expected an H x W (x 1/3/4) image, got an array of shape {a.shape}")
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.dtype.kind == "f" and f.max(initial=0.0) <= 1.0:
            f = f * 255.0
        f = np.clip(f, 0, 255)
        if f.shape[-1] == 1:
            f = np.repeat(f, 3, -1)
        pil = Image.fromarray(np.rint(f).astype(np.uint8), "RGBA" if f.shape[-1] == 4 else "RGB")
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        pil = Image.alpha_composite(flat, rgba)
    pil = pil.convert("RGB")
    if pil.size != (size, size):
        shrink = pil.size[0] > size or pil.size[1] > size
        pil = pil.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(pil, np.float64)


TEMPLATE_PAD = 3  # px of window around a blob's box, room for blur tails and grown boxes
TEMPLATE_BLURS = (0.0, 1.0)  # Gaussian sigmas (px) an object may have been blurred by
TEMPLATE_GROWTHS = (0.0, 1.0, 2.0)  # px per side the true box may exceed the half-coverage box by


@lru_cache(maxsize=4096)
def _templates(w: int, h: int) -> np.ndarray:
    """Candidate appearances of each spec shape for a blob whose half-coverage box is w x h: the shape
    drawn (coverage, 4x4 supersampled) in that box grown by each of TEMPLATE_GROWTHS px per side (blur
    shaves the tips of diamonds, triangles and circles off the half-coverage box) and blurred by each of
    TEMPLATE_BLURS, in a window padded by TEMPLATE_PAD: array (len(SHAPES), n_candidates, h + 2 pad,
    w + 2 pad). A non-square box stretches the shapes, so a sloppily drawn object is judged by its form."""
    ss, pad = 4, TEMPLATE_PAD
    sub = (np.arange(ss) + 0.5) / ss
    x = (np.arange(-pad, w + pad)[:, None] + sub).reshape(-1) - w / 2
    y = (np.arange(-pad, h + pad)[:, None] + sub).reshape(-1) - h / 2
    out = np.empty((len(SHAPES), len(TEMPLATE_GROWTHS) * len(TEMPLATE_BLURS), h + 2 * pad, w + 2 * pad))
    for i, shape in enumerate(SHAPES):
        j = 0
        for g in TEMPLATE_GROWTHS:
            u, v = x / (w + 2 * g), y / (h + 2 * g)
            cov = (
                inside(shape, u[None, :], v[:, None], 1.0)
                .reshape(h + 2 * pad, ss, w + 2 * pad, ss)
                .mean((1, 3))
            )
            for sigma in TEMPLATE_BLURS:
                out[i, j] = ndimage.gaussian_filter(cov, sigma, mode="constant") if sigma else cov
                j += 1
    return out


def _background(img: np.ndarray) -> np.ndarray:
    """The background colour: the median of the border pixels when it is near the spec grey (a generated
    image's grey drifts a little), the spec grey otherwise (e.g. a uniform image of another colour)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    med = np.median(border, axis=0)
    grey = np.asarray(BACKGROUND, np.float64)
    return med if np.abs(med - grey).max() <= BACKGROUND_TOLERANCE else grey


def color_name(rgb: np.ndarray) -> tuple[str, float]:
    """The palette colour nearest to `rgb` in CIELAB, and the distance."""
    d = np.linalg.norm(_PALETTE_LAB - srgb_to_lab(rgb), axis=-1)
    i = int(d.argmin())
    return _NAMES[i], float(d[i])


def detect(image: Any, size: int = REFERENCE_SIZE) -> list[Detection]:
    """Detects the spec's objects in `image` (resized to size x size first). Each pixel is explained as a
    mix of the background and one palette colour (anti-aliased and blurred edges are such mixes); pixels
    more than half object form the masks, 8-connected blobs are the objects. Blobs that are specks,
    larger than any spec object, internally non-uniform (noise) or unlike every shape are dropped.
    Never raises on image content: an empty image gives []."""
    try:
        img = to_rgb(image, size)
    except (ValueError, TypeError, OSError):  # not an image at all: nothing in it
        return []
    k = size / REFERENCE_SIZE
    bg = _background(img)
    diff = img - bg  # H x W x 3
    dirs = _PALETTE - bg  # 10 x 3, each palette colour's mixing line from the background
    norms = (dirs * dirs).sum(-1)
    proj = diff @ dirs.T
    a = np.clip(proj / norms, 0.0, 1.5)  # H x W x 10: the fraction of each colour in the pixel
    resid = (diff * diff).sum(-1, keepdims=True) - 2 * a * proj + a * a * norms  # squared, off each line
    alpha = np.take_along_axis(a, resid.argmin(-1)[..., None], -1)[..., 0]
    labels, _ = ndimage.label(alpha > 0.5, structure=np.ones((3, 3), bool))
    out: list[Detection] = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        det = _describe(img, bg, alpha, labels, i, sl, k)
        if det is not None:
            out.append(det)
    return out


def _describe(
    img: np.ndarray,
    bg: np.ndarray,
    alpha: np.ndarray,
    labels: np.ndarray,
    i: int,
    sl: tuple[slice, slice],
    k: float,
) -> Detection | None:
    """One blob as a Detection, or None when it is not an object (see `detect`)."""
    ys, xs = sl
    x0, y0, x1, y1 = xs.start, ys.start, xs.stop, ys.stop
    w, h = x1 - x0, y1 - y0
    mask = labels[sl] == i
    if (
        mask.sum() < MIN_AREA * k * k
        or min(w, h) < MIN_SIDE_PX * k
        or max(w, h) > MAX_SIDE_FACTOR * MAX_SIDE * k
    ):
        return None
    interior = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))
    if interior.sum() < 3:
        interior = mask & (alpha[sl] >= np.quantile(alpha[sl][mask], 0.7))
    pixels = img[sl][interior]
    mean = pixels.mean(0)
    # a flat object and its blended edges lie on one line from the background to its colour
    offs, line = img[sl][mask] - bg, mean - bg
    along = offs @ line / max(float(line @ line), 1e-6)
    off_line = np.sqrt(((offs - along[:, None] * line) ** 2).sum(-1).mean() / max(float(line @ line), 1e-6))
    if pixels.std(0).mean() > MAX_INTERIOR_STD or off_line > MAX_OFF_LINE:
        return None
    color, dist = color_name(mean)
    pad, (H, W) = TEMPLATE_PAD, labels.shape
    wy0, wx0 = max(y0 - pad, 0), max(x0 - pad, 0)
    win = (slice(wy0, min(y1 + pad, H)), slice(wx0, min(x1 + pad, W)))
    lab = labels[win]
    # coverage along the object's own mixing line, measured mostly in luma: JPEG keeps chroma at half
    # resolution, which smears the form of low-luma-contrast colours (orange on grey)
    line = _SHAPE_METRIC @ line
    soft = np.clip(((img[win] - bg) @ _SHAPE_METRIC.T) @ line / max(float(line @ line), 1e-6), 0.0, 1.0)
    soft = np.where((lab == i) | (lab == 0), soft, 0.0)
    tpl = _templates(w, h)[
        ...,
        wy0 - (y0 - pad) : wy0 - (y0 - pad) + soft.shape[0],
        wx0 - (x0 - pad) : wx0 - (x0 - pad) + soft.shape[1],
    ]
    iou = (np.minimum(tpl, soft).sum((2, 3)) / np.maximum(tpl, soft).sum((2, 3))).max(1)
    best = int(iou.argmax())
    if iou[best] < MIN_MATCH:
        return None
    return Detection(
        SHAPES[best],
        color,
        (x0 + x1) / 2,
        (y0 + y1) / 2,
        (x0, y0, x1, y1),
        float(soft.sum()),
        float(iou[best]),
        dist,
    )
