"""Drop input samples by their metadata (img2dataset/LAION json) and caption, with a count per filter.

A field the filter needs but the sample lacks passes (LAION subsets often miss `pwatermark`); set
`require_fields` to drop such samples instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True, slots=True)
class FilterConfig:
    min_size: int = 0
    """Shorter image side, in pixels of the original image."""
    max_aspect_ratio: float | None = None
    """max(w, h) / min(w, h)."""
    min_aesthetic: float | None = None
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_similarity: float | None = None
    min_caption_chars: int = 0
    max_caption_chars: int | None = None
    require_fields: bool = False

    def __post_init__(self) -> None:
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")


def rejection(cfg: FilterConfig, meta: dict[str, Any], caption: str, size: tuple[int, int]) -> str | None:
    """The name of the first filter that drops this sample, or None to keep it. `size` is the decoded (w, h)."""
    width, height = size
    if min(width, height) < cfg.min_size:
        return "min_size"
    if cfg.max_aspect_ratio is not None and max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        return "aspect_ratio"
    bounds = (
        ("aesthetic", cfg.min_aesthetic, lambda v, b: v < b, "min_aesthetic"),
        ("punsafe", cfg.max_punsafe, lambda v, b: v > b, "max_punsafe"),
        ("pwatermark", cfg.max_pwatermark, lambda v, b: v > b, "max_pwatermark"),
        ("similarity", cfg.min_similarity, lambda v, b: v < b, "min_similarity"),
    )
    for key, bound, fails, name in bounds:
        if bound is None:
            continue
        value = meta.get(key)
        if value is None:
            if cfg.require_fields:
                return f"{name}_missing"
            continue
        if not isinstance(value, int | float) or fails(float(value), bound):
            return name
    if len(caption) < cfg.min_caption_chars:
        return "min_caption_chars"
    if cfg.max_caption_chars is not None and len(caption) > cfg.max_caption_chars:
        return "max_caption_chars"
    return None
