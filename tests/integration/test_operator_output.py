"""What an operator sees in a job log (no terminal): a short start header, progress lines with the fields a
multi-day job needs, none of the third-party noise every run printed, metrics for tracking; shard patterns as
users type them; the profiler."""

import csv

import pytest
from helpers import run_train

pytestmark = pytest.mark.slow
FIELDS = ("step ", "loss ", "lr ", "img/s", "data wait ", "peak mem ", "elapsed ", "ETA ")
NOISE = ("LeafSpec", "in eval mode", "litlogger", "Total FLOPs", "Epoch 0/-2", "not writable", "Loading weights")


def test_a_job_log_has_a_header_progress_lines_and_no_noise(tmp_path, dataset):
    run = tmp_path / "run"
    result = run_train(
        run,
        f"data.shards={dataset}",
        "data.num_workers=1",
        "trainer.max_steps=12",
        "callbacks.progress.every_n_steps=4",
        "callbacks.progress.every_seconds=0",
        "callbacks.samples.every_n_steps=0",
        fresh=True,  # a fresh interpreter: the noise of the imports is part of what the log shows
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr  # captured: not a terminal, as under SLURM
    lines = [line for line in log.splitlines() if "[sdtrain.progress]" in line]
    assert len(lines) == 3 and [line.split(" - ", 1)[1].split(" (")[0] for line in lines] == [
        "step 4/12",
        "step 8/12",
        "step 12/12",
    ], lines
    assert all(field in line for line in lines for field in FIELDS), lines[0]
    header = [line.split(" - ", 1)[1] for line in log.splitlines() if "[sdtrain.start]" in line]
    assert [h.split(":")[0] for h in header] == ["model", "data", "run", "resume", "folder"], header
    assert "4 shards, 64 samples, latents (4, 8, 8)" in header[1]
    assert not [n for n in NOISE if n in log], [line for line in log.splitlines() if any(n in line for n in NOISE)]
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/grad_norm", "train/lr", "perf/images_per_s", "perf/step_time_s"} <= logged
    assert "seed: 0" in (run / "logs" / "version_0" / "hparams.yaml").read_text()  # the config, for comparing runs


def test_brace_shard_patterns_tensorboard_and_the_profiler(tmp_path, dataset):
    """`data.shards=/d/{000000..000003}.tar` unquoted (the webdataset/MLPerf way) passes Hydra's grammar."""
    run = tmp_path / "run"
    result = run_train(
        run,
        f"data.shards={dataset.parent}/{{000000..000003}}.tar",
        "logger=tensorboard",
        "trainer.profiler=simple",
        "debug=fast",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "4 shards, 64 samples" in log and "FIT Profiler Report" in log
    version = run / "logs" / "version_0"
    assert list(version.glob("events.out.tfevents.*")) and "batch_size" in (version / "hparams.yaml").read_text()


def test_run_report_has_the_curves_and_every_grid(trained_run, tmp_path):
    from sdtrain.evaluate.report import main as report_main

    out = tmp_path / "report.html"
    assert report_main([str(trained_run), "--out", str(out)]) == 0
    page = out.read_text()
    grids = sorted((trained_run / "samples").glob("step_*.png"))
    assert grids and all(f"samples/{g.name}" in page for g in grids)  # linked relative to the page
    assert "training loss" in page and "validation loss" in page and "throughput" in page
    from PIL import Image

    assert Image.open(tmp_path / "report_metrics.png").size[0] > 1000  # the panels side by side
    assert report_main([str(tmp_path / "nowhere")]) == 2
