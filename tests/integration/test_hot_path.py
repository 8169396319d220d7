"""The training step makes no host sync between logging steps: no `.item()`, `bool(tensor)`, `float(tensor)`,
`.tolist()`, `.cpu()`... on any tensor, and no Python number handed to `self.log` (Lightning copies those to the
device). Counted by patching those calls while the real callbacks of a run (throughput, progress lines, EMA,
checkpointing) are attached; on CPU every call is counted, so this is stricter than a GPU needs."""

import collections

import lightning as L
import pytest
import torch
from test_step_reference import _batches, tiny_module
from torch.utils.data import DataLoader

from sdtrain.diffusion.objective import DiffusionConfig
from sdtrain.training.callbacks.build import CallbacksConfig, build_callbacks
from sdtrain.training.callbacks.checkpointing import CheckpointConfig
from sdtrain.training.callbacks.progress import ProgressConfig
from sdtrain.training.callbacks.samples import SampleScheduleConfig
from sdtrain.training.optim import OptimConfig

pytestmark = pytest.mark.slow
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu")
LOG_EVERY = 4


def _with_context(batches):
    """The pre-encoded-text form of the batches (data.text_embeddings=true): states + which captions dropped."""
    g = torch.Generator().manual_seed(2)
    return [
        {
            "latents": b["latents"],
            "context": torch.randn(4, 77, 32, generator=g),
            "dropped": torch.tensor([0, 1, 0, 0]).bool(),
            "keys": b["keys"],
        }
        for b in batches
    ]


@pytest.mark.parametrize("text", ["tokens", "pre-encoded"])
def test_no_host_sync_between_logging_steps(tmp_path, monkeypatch, text):
    batches = _batches(9) if text == "tokens" else _with_context(_batches(9))
    module = tiny_module(DiffusionConfig(min_snr_gamma=5.0), OptimConfig(lr=1e-3, warmup_steps=2))
    cfg = CallbacksConfig(
        checkpoint=CheckpointConfig(every_n_steps=LOG_EVERY),
        samples=SampleScheduleConfig(every_n_steps=0, at_end=False),
        progress=ProgressConfig(enabled="lines", every_n_steps=LOG_EVERY, every_seconds=0),
    )
    callbacks = build_callbacks(cfg, str(tmp_path), val_shards=None, latent_key="latents", progress_bar=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=9,
        log_every_n_steps=LOG_EVERY,
        callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    reads: dict[int, list[str]] = collections.defaultdict(list)

    def counting(name, original):
        def call(self, *args, **kwargs):
            if trainer.training:
                reads[trainer.global_step].append(name)
            return original(self, *args, **kwargs)

        return call

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    numbers_logged = collections.Counter()
    log = L.LightningModule.log

    def counting_log(self, name, value, *args, **kwargs):
        if not isinstance(value, torch.Tensor):
            numbers_logged[self.trainer.global_step] += 1
        return log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", counting_log)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert module.nonfinite.on_device  # fused AdamW on CPU: the on-device NaN policy is the one measured
    # global_step k is read during step k+1 (before its update) and after step k (its end hooks)
    quiet = [s for s in range(1, 9) if s % LOG_EVERY not in (0, LOG_EVERY - 1)]
    assert quiet == [1, 2, 5, 6]
    for step in quiet:
        assert reads.get(step, []) == [], f"host reads around step {step}: {reads[step]}"
        assert numbers_logged[step] == 0, f"Python numbers logged around step {step}"
    assert reads[LOG_EVERY] and numbers_logged[LOG_EVERY - 1]  # the counting works: the logging step reads
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/images_per_s", "perf/data_wait_fraction"):
        assert key in logged, key
