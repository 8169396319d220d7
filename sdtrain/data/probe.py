"""What the launcher checks about a dataset before any process starts: one readable first sample with a caption
and the model's channel count, the latent normalisation, and whether pre-encoded text fits the text encoder.

Problems that would make every sample bad are one-line DataErrors here, naming the shard and sample, instead of
thousands of counted skips later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sdtrain.data.loader import LatentDataConfig
from sdtrain.data.mixing import Mixture, resolve_sources
from sdtrain.data.normalizer import SD_SCALING_FACTOR, LatentNormalizer
from sdtrain.data.samples import (
    LatentField,
    SampleError,
    checked_inpainting,
    checked_latent,
    decode_caption,
    decode_loss_mask,
    posterior_sample,
)
from sdtrain.data.shards import ShardSet, iter_raw_samples, resolve_shards
from sdtrain.errors import DataError
from sdtrain.seeding import seeded_generator

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbedData:
    shard_set: ShardSet
    latent_shape: tuple[int, ...]
    normalizer: LatentNormalizer
    mixture: Mixture | None = None  # data.sources


def probe_dataset(
    shard_set: ShardSet,
    cfg: LatentDataConfig,
    latent_channels: int,
    inpainting: bool = False,
    masked_loss: bool = False,
) -> tuple[int, ...]:
    """Check the first sample before training starts (with `inpainting`, its masks and masked-image moments
    too; with `masked_loss`, its loss mask); returns the latent shape (C, h, w)."""
    url = shard_set.shards[0].url
    problems: list[str] = []
    raw = next(iter(iter_raw_samples(url, problems.append)), None)
    if raw is None:
        raise DataError(problems[0] if problems else f"shard {url} holds no samples")
    where = f"shard {url}, sample {raw['__key__']!r}"
    try:
        field = LatentField.detect(raw, cfg.latent_key)
        decode_caption(raw)
        stored = checked_latent(raw, field, latent_channels)
        latent = posterior_sample(stored, field.kind, seeded_generator(0))
        if inpainting:
            checked_inpainting(raw, stored.shape)
        if masked_loss and decode_loss_mask(raw, stored.shape[-2:]) is None:
            log.warning(
                "diffusion.masked_loss=true, but %s has no mask.npy/mask.png: such samples count everywhere", where
            )
    except SampleError as exc:
        if exc.reason == "wrong_channels":
            # an odd channel count is the inpainting layout (2C + 1: latents + mask + masked-image latents)
            odd = latent_channels % 2 and not inpainting
            hint = " or an inpainting U-Net (set diffusion.inpainting=true)" if odd else ""
            raise DataError(f"{where}: {exc} (model.unet.in_channels); wrong dataset or model size{hint}?") from None
        if exc.reason == "missing_inpaint":
            raise DataError(
                f"{where}: {exc}: diffusion.inpainting=true needs shards from sdtrain-encode --inpainting-masks K"
            ) from None
        raise DataError(f"{where}: {exc}") from None
    return tuple(latent.shape)


def check_text_embeddings(manifest: dict[str, Any], text_config: Any, text_config_2: Any = None) -> None:
    """Pre-encoded text.npy is only usable from the very text encoder(s) this run has (never silently mixed);
    `text_config` (and SDXL's `text_config_2`) are those encoders' TextEncoderConfigs (their identity
    fingerprints the weights by content; manifests from before fingerprints, without `kind`, are compared by
    their old record)."""
    manifest = manifest or {}
    recorded = manifest.get("text_encoder")
    if not recorded:
        raise DataError("data.text_embeddings=true but the manifest names no text encoder (shards without text.npy)")
    recorded_2 = manifest.get("text_encoder_2")
    if bool(recorded_2) != (text_config_2 is not None):
        there, here = ("SDXL's two", "one") if recorded_2 else ("one", "SDXL's two")
        raise DataError(
            f"the shards' text.npy came from {there} text encoder(s), this run has {here}; set "
            "data.text_embeddings=false to encode the captions instead"
        )
    _same_text_encoder(recorded, text_config, "model.text_encoder")
    if text_config_2 is not None:
        _same_text_encoder(recorded_2, text_config_2, "model.text_encoder_2")


def _same_text_encoder(recorded: dict[str, Any], text_config: Any, key: str) -> None:
    expected = text_config.identity() if "kind" in recorded else text_config.legacy_identity()
    differ = sorted(k for k in expected if recorded.get(k) != expected[k])
    if differ:
        k = differ[0]
        raise DataError(
            f"the shards' text.npy came from another text encoder ({k}: {recorded.get(k)!r} there, {expected[k]!r} "
            f"in {key}); set data.text_embeddings=false to encode the captions instead"
        )


def check_vae(manifest: dict[str, Any], encoder_sha256: str | None) -> None:
    """Latents are only meaningful to the VAE whose encoder made them: a manifest that records its encoder
    (sdtrain-encode does) must match the run's VAE. Older manifests record none and are not checked."""
    recorded = (manifest.get("vae") or {}).get("encoder_sha256")
    if recorded and encoder_sha256 and recorded != encoder_sha256:
        name = (manifest.get("vae") or {}).get("name", "unknown")
        raise DataError(
            f"the shards' latents come from another VAE (manifest: {name}, encoder sha256 {recorded[:12]}; this "
            f"run's VAE: {encoder_sha256[:12]}): train with the VAE they were encoded with (model.vae.pretrained=) "
            "or re-encode them with sdtrain-encode --vae"
        )


def probe(
    cfg: LatentDataConfig,
    *,
    latent_channels: int,
    text_config: Any,
    text_config_2: Any = None,
    vae_encoder_sha256: str | None = None,
    inpainting: bool = False,
    masked_loss: bool = False,
    vae_scaling_factor: float = SD_SCALING_FACTOR,
) -> ProbedData:
    """The training set resolved and checked: shards (of each source, with data.sources), latent shape of its
    first sample, VAE, normalisation."""
    mixture = None
    if cfg.sources is not None:
        shard_set, mixture = resolve_sources(cfg.sources)
        firsts = [ShardSet((shard_set.shards[i],)) for i in mixture.first_shard]
    else:
        shard_set = resolve_shards(cfg.shards)
        firsts = [shard_set]
    check_vae(shard_set.manifest, vae_encoder_sha256)
    shapes = [probe_dataset(first, cfg, latent_channels, inpainting, masked_loss) for first in firsts]
    latent_shape = shapes[0]  # of the first source; each source's first sample is checked
    if cfg.text_embeddings:
        check_text_embeddings(shard_set.manifest, text_config, text_config_2)
    normalizer = LatentNormalizer.resolve(cfg.scaling_factor, cfg.shift_factor, shard_set.manifest, vae_scaling_factor)
    return ProbedData(shard_set, latent_shape, normalizer, mixture)
