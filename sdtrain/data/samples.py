"""Decode one raw shard sample (bytes per extension) into a training latent and a caption.

Every way a sample can be bad maps to a short reason code; the loader skips the sample and counts the code.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

# Extensions that may hold latents, and what they hold. `npy` is the MLPerf SD v2 reference's name for moments.
LATENT_EXTENSIONS = {"moments.npy": "moments", "latent.npy": "latent", "npy": "moments"}
# Inpainting members (sdtrain-encode --inpainting-masks, prep/inpaint_masks.py): K masks at latent size, uint8
# (K, h, w), 1 = repaint; and the VAE moments of each masked image (K, 2C, h, w), unscaled.
MASKS_MEMBER = "inpaint_masks.npy"
MOMENTS_MEMBER = "inpaint_moments.npy"
# Masked loss (diffusion.masked_loss): a per-pixel loss weight in [0, 1], 1 = learn, at latent or pixel size.
LOSS_MASK_MEMBER = "mask.npy"  # what sdtrain-encode writes: float16 (h, w)
LOSS_MASK_MEMBERS = (LOSS_MASK_MEMBER, "mask.png")
# Pre-encoded text (data.text_embeddings): hidden states (L, D); SDXL adds the pooled embedding (P,).
TEXT_MEMBER = "text.npy"
POOLED_MEMBER = "pooled.npy"
# Same clamp as diffusers' DiagonalGaussianDistribution, so a posterior sample matches the VAE's own.
LOGVAR_RANGE = (-30.0, 20.0)


class SampleError(Exception):
    """A sample that cannot be used; `reason` is a short code counted by the loader."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LatentField:
    """Which tar extension holds the latents and whether it is moments (mean ++ logvar) or one sample."""

    extension: str
    kind: str  # "moments" | "latent"

    @classmethod
    def detect(cls, sample: dict[str, Any], requested: str = "auto") -> LatentField:
        if requested != "auto":
            if requested not in LATENT_EXTENSIONS:
                raise SampleError("bad_config", f"data.latent_key must be auto or one of {sorted(LATENT_EXTENSIONS)}")
            return cls(requested, LATENT_EXTENSIONS[requested])
        for extension, kind in LATENT_EXTENSIONS.items():
            if extension in sample:
                return cls(extension, kind)
        present = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError("missing_latent", f"no moments.npy/latent.npy/npy in sample (has {present})")


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, data offset) of a .npy v1 header, or None to take np.load's general path. A dataset has a
    handful of distinct headers, so parsing each once saves np.load's per-call literal_eval (~40% of a load)."""
    try:
        info = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]))
    except (ValueError, SyntaxError):
        return None
    shape, fortran, dtype = info
    if fortran or dtype.hasobject:
        return None
    return dtype, shape, len(header)


def load_array(data: bytes) -> np.ndarray:
    """A float array from .npy bytes: leading singleton axes squeezed (MLPerf stores (1, 8, 64, 64))."""
    parsed = None
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        parsed = _npy_header(data[:end])
    try:
        if parsed is not None:
            dtype, shape, offset = parsed
            array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        else:
            array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - np.load/frombuffer raise many types for garbage input
        raise SampleError("bad_npy", f"cannot parse .npy: {exc}") from None
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise SampleError("bad_shape", f"latents must be (C, h, w), got shape {array.shape}")
    if array.dtype not in (np.float16, np.float32, np.float64):
        raise SampleError("bad_dtype", f"latents must be float16/float32, got {array.dtype}")
    return array


def latent_channels(array: np.ndarray, kind: str) -> int:
    return array.shape[0] // 2 if kind == "moments" else array.shape[0]


def posterior_sample(array: np.ndarray, kind: str, generator: torch.Generator) -> torch.Tensor:
    """z ~ N(mean, exp(logvar)) for moments (channel axis -3), the latent itself otherwise: float32, unscaled.
    One sample (2C, h, w) or a whole batch (B, 2C, h, w) at once (torch's sampler is ~3x numpy's); in place on
    fresh buffers (the loader's hottest lines)."""
    stored = torch.from_numpy(np.ascontiguousarray(array))
    if kind == "latent":
        return stored.float()
    channels = stored.shape[-3]  # even: checked_latent refuses odd moments
    mean, logvar = stored[..., : channels // 2, :, :], stored[..., channels // 2 :, :, :]
    noise = torch.randn(mean.shape, generator=generator)
    std = logvar.float().clamp_(*LOGVAR_RANGE).mul_(0.5).exp_()
    return noise.mul_(std).add_(mean)


def decode_caption(sample: dict[str, Any]) -> str:
    if "txt" not in sample:
        raise SampleError("missing_caption", "sample has no 'txt' caption")
    try:
        return sample["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise SampleError("bad_caption", "caption is not valid UTF-8") from None


def checked_latent(sample: dict[str, Any], field: LatentField, expect_channels: int | None) -> np.ndarray:
    """The sample's moments or latent as stored, checked for shape, channel count (unless None) and finiteness."""
    if field.extension not in sample:
        raise SampleError("missing_latent", f"sample has no {field.extension!r}")
    array = load_array(sample[field.extension])
    if field.kind == "moments" and array.shape[0] % 2:
        raise SampleError("bad_shape", f"moments need an even channel count (mean ++ logvar), got {array.shape[0]}")
    channels = latent_channels(array, field.kind)
    if expect_channels is not None and channels != expect_channels:
        raise SampleError("wrong_channels", f"{channels} latent channels, model expects {expect_channels}")
    if not np.isfinite(array).all():
        raise SampleError("non_finite", "latents contain NaN or Inf")
    return array


def decode_latent(
    sample: dict[str, Any], field: LatentField, expect_channels: int, generator: torch.Generator
) -> torch.Tensor:
    """The unscaled posterior sample of a raw sample, checked for shape and finiteness."""
    return posterior_sample(checked_latent(sample, field, expect_channels), field.kind, generator)


def decode_text(sample: dict[str, Any]) -> np.ndarray:
    """Pre-encoded text hidden states (L, D) from `text.npy` (data.text_embeddings)."""
    return _float_member(sample, TEXT_MEMBER, "text", 2, "(L, D)")


def decode_pooled(sample: dict[str, Any]) -> np.ndarray:
    """SDXL's pre-encoded pooled text embedding (P,) from `pooled.npy` (data.text_embeddings)."""
    return _float_member(sample, POOLED_MEMBER, "pooled", 1, "(P,)")


def _float_member(sample: dict[str, Any], member: str, reason: str, ndim: int, shape: str) -> np.ndarray:
    if member not in sample:
        raise SampleError(f"missing_{reason}", f"sample has no {member} (data.text_embeddings=true)")
    bad = f"bad_{reason}_npy"
    try:
        array = np.load(io.BytesIO(sample[member]), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - np.load raises many types for garbage input
        raise SampleError(bad, f"cannot parse {member}: {exc}") from None
    if array.ndim != ndim or array.dtype not in (np.float16, np.float32) or not np.isfinite(array).all():
        raise SampleError(bad, f"{member} must be finite float {shape}, got {array.dtype} {array.shape}")
    return array


def checked_inpainting(sample: dict[str, Any], moments_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """An inpainting sample's K masks (K, h, w) and masked-image moments (K, 2C, h, w), checked against the
    sample's own moments shape (2C, h, w) (members written by sdtrain-encode --inpainting-masks)."""
    if MASKS_MEMBER not in sample or MOMENTS_MEMBER not in sample:
        raise SampleError("missing_inpaint", f"sample has no {MASKS_MEMBER}/{MOMENTS_MEMBER}")
    try:
        masks = np.load(io.BytesIO(sample[MASKS_MEMBER]), allow_pickle=False)
        moments = np.load(io.BytesIO(sample[MOMENTS_MEMBER]), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - np.load raises many types for garbage input
        raise SampleError("bad_inpaint", f"cannot parse inpainting members: {exc}") from None
    k = masks.shape[0] if masks.ndim == 3 else 0
    if k == 0 or moments.shape != (k, *moments_shape) or masks.shape[1:] != tuple(moments_shape[1:]):
        raise SampleError(
            "bad_inpaint",
            f"inpainting masks {masks.shape} / moments {moments.shape} do not fit moments {moments_shape}",
        )
    if moments.dtype not in (np.float16, np.float32) or not np.isfinite(moments).all():
        raise SampleError("bad_inpaint", "inpainting moments must be finite float16/float32")
    return masks, moments


def average_down(mask: np.ndarray, factor: int) -> np.ndarray:
    """(h*f, w*f) -> (h, w): each output pixel the mean of its f x f block (the share of it the mask keeps)."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    return mask[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))


def decode_loss_mask(sample: dict[str, Any], latent_size: tuple[int, int]) -> np.ndarray | None:
    """The sample's loss weights (h, w) float32 in [0, 1] from mask.npy (float in [0, 1], uint8 0-255 or bool) or
    mask.png (grey level / 255), at the latent size or an integer multiple of it (averaged down: a pixel mask
    weighs each latent by the share of its pixels kept); None if the sample has none."""
    member = next((m for m in LOSS_MASK_MEMBERS if m in sample), None)
    if member is None:
        return None
    try:
        if member == "mask.png":
            with Image.open(io.BytesIO(sample[member])) as image:
                mask = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        else:
            mask = np.load(io.BytesIO(sample[member]), allow_pickle=False)
            mask = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - PIL and np.load raise many types for garbage input
        raise SampleError("bad_loss_mask", f"cannot read {member}: {exc}") from None
    h, w = latent_size
    factor = mask.shape[0] // h if mask.ndim == 2 and h else 0
    if factor < 1 or mask.shape != (h * factor, w * factor):
        raise SampleError("bad_loss_mask", f"{member} is {mask.shape}, the latents are {h}x{w} (or a multiple)")
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise SampleError("bad_loss_mask", f"{member} values must be in [0, 1]")
    return average_down(mask, factor) if factor > 1 else mask


def decode_size_conditioning(sample: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(original height, original width, crop top, crop left) in pixels from the sample's json (what
    sdtrain-encode writes for every sample: docs/latent-shards.md), for SDXL's micro-conditioning; None when the
    json or its size fields are absent (the run then uses original = target size, crop (0, 0))."""
    if "json" not in sample:
        return None
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError("bad_json", f"sample json does not parse: {exc}") from None
    keys = ("original_height", "original_width", "crop_top", "crop_left")
    if not isinstance(meta, dict) or not all(k in meta for k in keys):
        return None
    values = [meta[k] for k in keys]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) or 0 in values[:2]:
        raise SampleError("bad_json", f"sample json size fields must be integers >= 0, got {values}")
    return values[0], values[1], values[2], values[3]
