"""Latent normalisation: training latents are (z - shift) * scale; sampling inverts it before the VAE decodes.

Its own small module because every stage needs it (the loader, the validation set, the training step, sampling
and export), and none of them should import the loader for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x's VAE; a manifest or data.scaling_factor says otherwise


@dataclass(slots=True)
class LatentNormalizer:
    """Training latents are (z - shift) * scale; sampling inverts it before the VAE decodes."""

    scale: float = SD_SCALING_FACTOR
    shift: list[float] = field(default_factory=lambda: [0.0])

    @classmethod
    def resolve(
        cls,
        scaling_factor: float | None,
        shift_factor: Any,
        manifest: dict[str, Any],
        default_scale: float = SD_SCALING_FACTOR,
    ) -> LatentNormalizer:
        """data.scaling_factor / data.shift_factor where set, else the manifest's VAE entry, else `default_scale`
        (the model's VAE config: 0.13025 for SDXL's VAE, 0.18215 for SD 1/2's)."""
        vae = manifest.get("vae") or {}
        scale = scaling_factor if scaling_factor is not None else vae.get("scaling_factor", default_scale)
        shift = shift_factor if shift_factor is not None else (vae.get("shift_factor") or 0.0)
        return cls(float(scale), [float(s) for s in (shift if isinstance(shift, list | tuple) else [shift])])

    def _shift(self, like: torch.Tensor | np.ndarray) -> Any:
        shift = np.asarray(self.shift, dtype=np.float32).reshape(-1, 1, 1)
        return torch.from_numpy(shift).to(like.device, like.dtype) if isinstance(like, torch.Tensor) else shift

    def normalize(self, z: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        return (z - self._shift(z)) * self.scale

    def normalize_(self, z: torch.Tensor) -> torch.Tensor:
        """normalize() in place, for the loader's own fresh batch tensors."""
        return z.sub_(self._shift(z)).mul_(self.scale)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self._shift(x)

    def as_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "shift": list(self.shift)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentNormalizer:
        return cls(float(data["scale"]), [float(s) for s in data["shift"]])
