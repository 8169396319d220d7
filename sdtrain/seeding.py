"""Every seed in sdtrain comes from here: what is random is a pure function of where it happens in training.

- `seeded_generator(*words)`: a torch generator seeded by a tuple of ints (hashed, so nearby tuples give
  unrelated streams): per-batch posterior draws and caption dropout (seed, epoch, slot, batch), the validation
  set's posterior draws (seed, index);
- `step_generator`: the noise and timesteps of one micro-batch (seed, rank, step, micro-batch), so a resumed run
  draws exactly what the uninterrupted one would have, with no generator state to carry;
- `image_generator(seed)`: an image's starting noise in sampling (a plain manual_seed, so a seed means the same
  picture in sdtrain-sample, training grids and the exported diffusers pipeline);
- `python_rng` / `numpy_rng`: the loader's shuffle buffer and the per-epoch shard order (stable across processes);
- `get_rng_state` / `set_rng_state`: the global torch/CUDA/numpy/python states, saved in checkpoints (for
  anything else random, e.g. dropout) as plain tensors/lists, loadable with weights_only=True.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def derived_seed(*words: int) -> int:
    """A 63-bit seed from a tuple of ints, through numpy's SeedSequence hash."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generator(*words: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a tuple of ints (hashed, so nearby tuples give unrelated streams)."""
    return torch.Generator(device=device).manual_seed(derived_seed(*words))


def step_generator(seed: int, rank: int, step: int, micro_batch: int, device: torch.device) -> torch.Generator:
    """The generator for the noise and timesteps of one micro-batch: a pure function of where it is in training."""
    return seeded_generator(seed, rank, step, micro_batch, device=device)


def image_generator(seed: int) -> torch.Generator:
    """The CPU generator of one sampled image's starting noise (the same on every device and in every batch)."""
    return torch.Generator().manual_seed(int(seed))


def validation_generator(seed: int, index: int) -> torch.Generator:
    """The fixed noise of held-out sample `index` for the fixed-timestep validation loss."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def python_rng(*words: object) -> random.Random:
    """A `random.Random` seeded by a string of `words` (str seeds hash the same in every process)."""
    return random.Random("/".join(str(w) for w in words))


def crop_rng(seed: int, key: str) -> random.Random:
    """sdtrain-encode's random crop of sample `key` (this string form: re-runs and resumed encodes crop alike)."""
    return random.Random(f"{seed}:{key}")


def numpy_rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(list(words))


def get_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def seed_everything(seed: int) -> None:
    """The global torch/numpy/python seeds at the start of a run (Lightning's, which also seeds its workers)."""
    from lightning.fabric.utilities.seed import seed_everything as lightning_seed

    lightning_seed(seed, workers=True, verbose=False)
