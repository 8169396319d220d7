"""`sdtrain-report RUN_DIR`: one page a person would rather look at than a CSV.

    sdtrain-report outputs/2026-12-01_10-00-00/             # -> RUN_DIR/report.html + RUN_DIR/report_metrics.png
    sdtrain-report RUN_DIR --eval demo_out/eval              # also the FID-vs-step table of sdtrain-eval

The page shows training loss, validation loss, images/s and MFU against step (every `logs/version_N/metrics.csv`
of the run, so a resumed run is one curve), FID against step when `--eval` names an sdtrain-eval folder, and the
sample grids in step order (linked from RUN_DIR/samples/, so the page stays small).
"""

from __future__ import annotations

import argparse
import csv
import glob
import html
import logging
import os
import sys

from sdtrain.errors import ConfigError, command_line

log = logging.getLogger("sdtrain.report")
PANELS = [  # (metric, title, y label)
    ("train/loss", "training loss", "loss"),
    ("val/loss", "validation loss (fixed timesteps)", "loss"),
    ("perf/images_per_s", "throughput", "images/s"),
    ("perf/mfu", "model FLOPs utilisation", "MFU"),
]


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] over every logs/version_N/metrics.csv (later versions win a step)."""
    files = sorted(glob.glob(os.path.join(run_dir, "logs", "version_*", "metrics.csv")), key=_version)
    if not files:
        raise ConfigError(f"{run_dir} has no logs/version_*/metrics.csv (a run folder with logger=csv)")
    series: dict[str, dict[int, float]] = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                for key, value in row.items():
                    if key != "step" and value not in (None, "") and step not in (None, ""):
                        series.setdefault(key, {})[int(float(step))] = float(value)
    return {key: sorted(values.items()) for key, values in series.items()}


def _version(path: str) -> int:
    return int(os.path.basename(os.path.dirname(path)).split("_")[-1])


def read_fid(eval_dir: str, guided: bool = False) -> list[tuple[int, float]]:
    """[(step, FID)] of the checkpoints sdtrain-eval sampled; `guided`: its rows with autoguidance instead."""
    path = os.path.join(eval_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise ConfigError(f"--eval {eval_dir} has no metrics.csv (an sdtrain-eval --out folder)")
    with open(path, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step") and bool(r.get("guide")) == guided]
    return sorted((int(r["step"]), float(r["fid"])) for r in rows)


def plot(series: dict[str, list[tuple[int, float]]], fid: list[tuple[int, float]], out: str) -> list[str]:
    """The metric panels as one PNG; returns the titles of the panels that had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t, y) for k, t, y in PANELS if series.get(k)]
    if fid:
        panels.append(("fid", "FID vs real images (sdtrain-eval)", "FID"))
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.2), squeeze=False)
    for axis, (key, title, ylabel) in zip(axes[0], panels, strict=False):
        points = fid if key == "fid" else series[key]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return [title for _, title, _ in panels]


def write_report(run_dir: str, eval_dir: str | None = None, out: str | None = None) -> str:
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir} is not a run folder")
    out = out or os.path.join(run_dir, "report.html")
    series = read_metrics(run_dir)
    fid = read_fid(eval_dir) if eval_dir else []
    guided_fid = read_fid(eval_dir, guided=True) if eval_dir else []
    metrics_png = os.path.splitext(out)[0] + "_metrics.png"
    titles = plot(series, fid, metrics_png)
    grids = sorted(glob.glob(os.path.join(run_dir, "samples", "step_*.png")))
    base = os.path.dirname(os.path.abspath(out))
    rel = lambda path: html.escape(os.path.relpath(os.path.abspath(path), base))  # noqa: E731
    last = {k: v[-1] for k, v in series.items() if v}
    summary = [f"{k} = {v:.4g} at step {s}" for k, (s, v) in sorted(last.items()) if k in dict.fromkeys(
        ["train/loss", "val/loss", "perf/images_per_s", "perf/mfu"])]  # fmt: skip
    parts = [
        "<!doctype html><meta charset='utf-8'><title>sdtrain report</title>",
        "<style>body{font-family:sans-serif;margin:2em} img{image-rendering:pixelated;max-width:100%}</style>",
        f"<h1>Run {html.escape(os.path.abspath(run_dir))}</h1>",
        "<p>" + "<br>".join(html.escape(s) for s in summary) + "</p>",
        f"<h2>Metrics</h2><p>{html.escape(', '.join(titles))}</p><img src='{rel(metrics_png)}'>",
    ]
    if fid:
        rows = "".join(f"<tr><td>{s}</td><td>{v:.2f}</td></tr>" for s, v in fid)
        rows += "".join(f"<tr><td>{s}, with autoguidance</td><td>{v:.2f}</td></tr>" for s, v in guided_fid)
        parts.append(f"<h2>FID</h2><table border=1 cellpadding=4><tr><th>step</th><th>FID</th></tr>{rows}</table>")
    parts.append(f"<h2>Sample grids ({len(grids)})</h2>")
    for grid in grids:
        name = os.path.basename(grid)
        parts.append(f"<h3>{html.escape(name[:-4].replace('_', ' '))}</h3><img src='{rel(grid)}'>")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return out


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training run folder (hydra.run.dir)")
    parser.add_argument("--eval", help="an sdtrain-eval --out folder: adds FID vs step")
    parser.add_argument("--out", help="the HTML file (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    out = write_report(args.run_dir, args.eval, args.out)
    log.info("report: %s", out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
