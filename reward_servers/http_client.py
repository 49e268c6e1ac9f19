"""The HTTP wire format of `vgrpo serve-rewards` and a small client for it, with no Ray (or anything
beyond numpy and Pillow) to import, so that another trainer or a shared reward tier can call the reward
servers from any Python process.

    POST /score  {"items": [{"image_b64": <PNG, base64>, "prompt": "...", "metadata": {...}?}, ...],
                  "details": false}
    200          {"results": [{"rewards": {name: value}, "score": weighted_sum}
                              | {"error": "why this item has no score"}, ...]}   (same order)
    400          {"error": "what is wrong with the body"}

The image conversion rules (`to_uint8_rgb`) live here too, because both ends use them: the server
decodes whatever PNG arrives into the uint8 H x W x 3 array every reward takes, and a client that holds
float or 16-bit arrays sends them the same way.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


class ImageFormatError(ValueError):
    """An array or a PNG that cannot be read as an image (wrong rank, unsupported channels, bad bytes)."""


# Decoded images are capped (a 130 KB PNG can declare 10000 x 10000 pixels and take 7 GB to decode): the
# size is read from the header and a larger image refused before any pixel is decoded.
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageTooLargeError(ImageFormatError):
    """An image whose header declares more pixels than the cap (``max_pixels``)."""


def open_checked(source: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``Image.open`` (which reads only the header) and the pixel cap, before anything is decoded.
    Pillow's own decompression-bomb guard sits above the cap (its warning at 89 M pixels, its error at
    179 M): its error becomes this cap's, its warning is superseded by the check below."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{e}; over the cap of {max_pixels} pixels: fix: resize it, or raise reward.max_image_pixels"
        ) from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageTooLargeError(
            f"an image of {w} x {h} = {w * h} pixels is over the cap of {max_pixels} "
            f"({int(max_pixels**0.5)}²); fix: resize it, or raise reward.max_image_pixels"
        )
    return im


def to_uint8_rgb(image: Any) -> np.ndarray:
    """Any image a caller may hold -> the uint8 H x W x 3 array every `Reward.score` takes.

    Accepted: numpy arrays or torch tensors (detached and moved to the CPU), H x W (grey), H x W x C or
    C x H x W with C in {1, 3, 4} (alpha is dropped). Values: uint8 as is; floats are taken as [0, 1]
    (diffusers' `output_type="np"`), clipped and rounded; uint16 is scaled by 255/65535; other integers
    and booleans are clipped to [0, 255] (booleans as 0/255). Deciding the float range from the data
    would make the same image score differently by its content, so [0, 1] is the one rule."""
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageFormatError(f"an image must be H x W or H x W x C, got shape {tuple(arr.shape)}")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # C x H x W (torch layout)
    if arr.shape[-1] not in (1, 3, 4):
        raise ImageFormatError(
            f"an image must have 1, 3 or 4 channels (grey, RGB, RGBA), got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageFormatError(f"an image of shape {tuple(arr.shape)} has no pixels")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageFormatError("a float image holds NaN or infinite pixels")
        out = np.rint(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype == np.uint16:
        out = np.rint(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise ImageFormatError(f"cannot read an image of dtype {arr.dtype}")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:
        out = out[..., :3]
    return np.ascontiguousarray(out)


def encode_png(image: Any) -> bytes:
    """An image (any form `to_uint8_rgb` takes) as PNG bytes: lossless, so the server scores exactly
    the pixels the client holds."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8_rgb(image)).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """PNG (or any format Pillow reads) bytes -> uint8 H x W x 3, at most ``max_pixels`` pixels (refused
    from the header, before decoding). 16-bit and float modes go through `to_uint8_rgb` so that they are
    scaled, not clipped as Pillow's own `convert("RGB")` would."""
    try:
        with open_checked(io.BytesIO(data), max_pixels) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return to_uint8_rgb(np.asarray(im).astype(np.uint16))
            if im.mode == "I":
                return to_uint8_rgb(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
            if im.mode == "F":
                return to_uint8_rgb(np.asarray(im, dtype=np.float32) / 255.0)
            return np.asarray(im.convert("RGB"))
    except ImageFormatError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageFormatError(
            f"not an image Pillow can read (PNG expected; {len(data)} bytes starting {data[:8]!r})"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise ImageFormatError(f"not a readable image ({e})") from e


class RewardHTTPError(RuntimeError):
    """The server refused or failed a request: `status` is the HTTP status, the message its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class RewardHTTPClient:
    """Scores images with a running `vgrpo serve-rewards`.

    >>> client = RewardHTTPClient("http://127.0.0.1:8000")
    >>> client.score([image_hw3], ["a photo of a red circle"])
    [{'rewards': {'shapes': 1.0}, 'score': 1.0}]

    Large lists are sent in chunks of `chunk_size` items (one HTTP request each, in order), so that one
    request body stays small; each result is either {"rewards", "score"} or {"error"} for that item."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 300.0, chunk_size: int = 64):
        url = url.rstrip("/")
        self.url = url if url.endswith("/score") else url + "/score"
        self.timeout_s = timeout_s
        self.chunk_size = max(1, chunk_size)

    def score(
        self,
        images: Sequence[Any] | np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        details: bool = False,
    ) -> list[dict[str, Any]]:
        """One result per image, in order. Raises RewardHTTPError when the server answers an error
        status, ValueError when the counts differ."""
        if len(images) != len(prompts) or (metadata is not None and len(metadata) != len(prompts)):
            raise ValueError(
                f"{len(images)} images, {len(prompts)} prompts, "
                f"{'no' if metadata is None else len(metadata)} metadata rows: pass one per image"
            )
        results: list[dict[str, Any]] = []
        for start in range(0, len(prompts), self.chunk_size):
            stop = start + self.chunk_size
            items: list[dict[str, Any]] = []
            for i in range(start, min(stop, len(prompts))):
                item: dict[str, Any] = {
                    "image_b64": base64.b64encode(encode_png(images[i])).decode("ascii"),
                    "prompt": prompts[i],
                }
                if metadata is not None:
                    item["metadata"] = metadata[i]
                items.append(item)
            results.extend(self._post({"items": items, "details": details})["results"])
        return results

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw).get("error", raw.decode(errors="replace"))
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")[:500]
            raise RewardHTTPError(e.code, str(message)) from None
