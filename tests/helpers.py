"""Shared test helpers: synthetic latent shards and running the training CLI."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from cli_runner import free_port, run_module  # noqa: F401 (free_port: the tests' one helper for it)

from sdtrain.prep.shard_writer import LatentSample, npy_bytes, write_shards

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["grinning face", "red apple", "blue car", "green tree", "yellow sun", "black cat", "white cloud"]


def synthetic_samples(n: int, channels: int = 4, size: int = 8, seed: int = 0, start: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        mean = rng.normal(size=(channels, size, size)).astype(np.float32) * 5
        logvar = np.full((channels, size, size), -6.0, dtype=np.float32)
        yield LatentSample(f"{i:06d}", np.concatenate([mean, logvar]), f"{CAPTIONS[i % len(CAPTIONS)]} {i}")


def make_dataset(out_dir: Path, n: int = 64, per_shard: int = 16, **kw) -> Path:
    write_shards(synthetic_samples(n, **kw), str(out_dir), samples_per_shard=per_shard)
    return out_dir / "manifest.json"


def run_train(run_dir: Path, *overrides: str, timeout: int = 600, env: dict | None = None, fresh: bool = False):
    """`sdtrain-train experiment=tiny hydra.run.dir=RUN_DIR OVERRIDES` as its own process (cli_runner), or one per
    rank with `trainer.devices=N` (torchrun's environment; fresh=True: one fresh process and Lightning's launcher)."""
    args = ["experiment=tiny", f"hydra.run.dir={run_dir}", *overrides]
    ranks = _devices(overrides)  # ignored when fresh: Lightning's launcher starts them
    return run_module("sdtrain.train", *args, cwd=REPO, env=env, timeout=timeout, fresh=fresh, ranks=ranks)


def _devices(overrides) -> int:
    """N of a `trainer.devices=N` override (1 without one): the ranks run_train starts, as torchrun would."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("trainer.devices=")]
    return int(given[-1]) if given and given[-1].isdigit() else 1


def run_train_vae(run_dir: Path, *overrides: str, timeout: int = 900, env: dict | None = None):
    """`sdtrain-train-vae experiment=vae_demo` (the demo's 32 px VAE) with progress lines instead of a bar, at a
    constant rate: the tests' budgets (and the resume tests' max_steps) differ from the demo's cosine schedule."""
    args = ["experiment=vae_demo", "optim.schedule=constant", f"hydra.run.dir={run_dir}", *overrides]
    return run_module("sdtrain.train_vae", *args, cwd=REPO, env=env, timeout=timeout, ranks=_devices(overrides))


# Runs sdtrain-train once per case in ONE fresh process (the imports, ~8 s, paid once), each with its own
# stderr file at the file-descriptor level: what a user would see on the terminal for that command line.
_CASES_DRIVER = r"""
import json, os, sys
from hydra.core.global_hydra import GlobalHydra
import importlib
cases, out = json.loads(sys.argv[1]), sys.argv[2]
main = importlib.import_module(sys.argv[3]).main
results = {}
for name, argv in cases.items():
    err = os.path.join(out, name + ".stderr")
    sys.stderr.flush()
    saved, fd = os.dup(2), os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.argv = ["sdtrain-train", *argv]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # a crash is a result too: the test reports it
        import traceback; traceback.print_exc(); code = 99
    finally:
        sys.stderr.flush(); os.dup2(saved, 2); os.close(fd); os.close(saved)
        GlobalHydra.instance().clear()
    results[name] = {"returncode": code, "stderr": open(err, encoding="utf-8", errors="replace").read()}
json.dump(results, open(os.path.join(out, "results.json"), "w"))
"""


def run_train_cases(
    work: Path, cases: dict[str, list[str]], timeout: int = 600, job: str = "sdtrain.launch.train", base=None
) -> dict[str, dict]:
    """{case: {"returncode", "stderr"}} for `sdtrain-train experiment=tiny ARGS` per case, all in one process
    (each case gets hydra.run.dir=WORK/NAME); `job`/`base`: another entry module and its base overrides
    (sdtrain.launch.train_vae, ["experiment=vae_demo"])."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    base = ["experiment=tiny"] if base is None else base
    argvs = {n: [*base, f"hydra.run.dir={work / n}", *args] for n, args in cases.items()}
    cmd = [sys.executable, "-c", _CASES_DRIVER, json.dumps(argvs), str(work), job]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "results.json").read_text())


def plain_diffusers_classes(folder: str, cwd: Path) -> list[str]:
    """Load `folder` with plain diffusers in a fresh process with no sdtrain import; its text encoder and
    tokenizer classes (the folder is complete when this works)."""
    code = (
        "import sys; from diffusers import StableDiffusionPipeline as P; "
        "p = P.from_pretrained(sys.argv[1], local_files_only=True); "
        "assert 'sdtrain' not in sys.modules; print(type(p.text_encoder).__name__, type(p.tokenizer).__name__)"
    )
    plain = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    return plain.stdout.split()


def write_raw_tar(path: Path, samples) -> Path:
    """An img2dataset-style tar: KEY.png|jpg + KEY.txt + KEY.json per (key, image bytes, caption bytes, meta)."""
    import io
    import json
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, image, caption, meta, ext in samples:
            for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", caption), (f"{key}.json", meta)):
                if data is None:
                    continue
                data = json.dumps(data).encode() if isinstance(data, dict) else data
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def emoji_subset(count: int):
    """`count` twemoji pairs spread over the whole set (every k-th)."""
    from sdtrain.demo.emoji_images import emoji_pairs

    every = emoji_pairs()
    return every[:: max(1, len(every) // count)][:count]


def emoji_raw_tars(out_dir: Path, count: int = 96, per_tar: int = 32, size: int = 40) -> list[Path]:
    """Real twemoji images + names as img2dataset tars (PNG, `size` px, LAION-like json)."""
    import io

    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = emoji_subset(count)
    tars = []
    for t in range(0, len(pairs), per_tar):
        samples = []
        for i, pair in enumerate(pairs[t : t + per_tar], start=t):
            buf = io.BytesIO()
            with Image.open(pair.path) as im:
                im.convert("RGBA").resize((size, size)).save(buf, "PNG")
            meta = {
                "url": f"https://example.org/{pair.key}.png",
                "width": size,
                "height": size,
                "aesthetic": 4.0 + (i % 5),
                "punsafe": 0.01 * (i % 3),
                "pwatermark": 0.1,
            }
            samples.append((f"{i:09d}", buf.getvalue(), pair.caption.encode(), meta, "png"))
        tars.append(write_raw_tar(out_dir / f"{t // per_tar:05d}.tar", samples))
    return tars


def assert_same_parts(a, b, parts=("unet", "vae", "text_encoder")) -> None:
    """Two diffusers pipelines hold the very same tensors in `parts`."""
    import torch

    for part in parts:
        left, right = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert left.keys() == right.keys(), part
        assert all(torch.equal(left[k], right[k]) for k in left), part


def only_folder(path: Path) -> Path:
    (folder,) = [p for p in path.iterdir() if p.is_dir()]
    return folder


def _add_member(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def mixed_shape_dataset(root: Path, shards: int = 5, per_shard: int = 23, bad_every: int = 11) -> Path:
    """Shards of two latent shapes (8x8 and 8x4 moments, aspect buckets) with every `bad_every`-th sample lacking
    its caption (0: none)."""
    entries = []
    for s in range(shards):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                shape = (8, 8, 8) if n % 3 else (8, 8, 4)
                _add_member(tar, f"k{n:05d}.moments.npy", npy_bytes(np.full(shape, n % 251, np.float16)))
                if not bad_every or n % bad_every != 5:
                    _add_member(tar, f"k{n:05d}.txt", f"sample {n}".encode())
        entries.append({"url": f"{s:06d}.tar", "num_samples": per_shard})
    (root / "manifest.json").write_text(json.dumps({"format": "sdtrain-latents", "shards": entries}))
    return root / "manifest.json"


@functools.cache
def _tokenizer():
    from sdtrain.models.text_encoder import build_tokenizer

    return build_tokenizer()


def latent_stream(
    spec, *, rank=0, world=1, seed=7, start_batch=0, resume_positions=None, transition=None, mixture=None, **cfg
):
    """A LatentStream over `spec` (shards, or an already resolved ShardSet) as a rank of `world` would build it
    (tiny test defaults: batch 4, 2 workers, shuffle buffer 8); `cfg` overrides LatentDataConfig fields."""
    from sdtrain.data.loader import LatentDataConfig, LatentStream
    from sdtrain.data.normalizer import LatentNormalizer
    from sdtrain.data.shards import ShardSet, resolve_shards

    options = {"batch_size": 4, "num_workers": 2, "shuffle_buffer": 8, **cfg}
    shard_set = spec if isinstance(spec, ShardSet) else resolve_shards(str(spec))
    return LatentStream(
        shard_set,
        LatentDataConfig(shards=str(spec), **options),
        _tokenizer(),
        latent_channels=4,
        normalizer=LatentNormalizer(),
        rank=rank,
        world_size=world,
        seed=seed,
        start_batch=start_batch,
        resume_positions=resume_positions,
        transition=transition,
        mixture=mixture,
    )


def take_batches(stream, n: int) -> list:
    """The first n batches of a stream through its real DataLoader (workers and all)."""
    from itertools import islice

    from sdtrain.data.loader import build_dataloader

    return list(islice(iter(build_dataloader(stream)), n))
