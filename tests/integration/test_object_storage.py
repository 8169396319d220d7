"""Shards and manifests in object storage (issue 16): a real S3 API (moto in server mode on 127.0.0.1, started
here), reached through s3fs with the endpoint and credentials from the standard AWS environment only. A stream
over s3:// equals the local one batch for batch and resumes from its positions (sparse reads by range); a
missing bucket or key and refused credentials are one line; sdtrain-train runs on s3:// shards."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import free_port, latent_stream, run_train, take_batches

from sdtrain.data.shards import resolve_shards
from sdtrain.errors import DataError

pytestmark = pytest.mark.slow
BUCKET = "sdtrain-test"


def _moto_server(**env):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "moto server did not start"
            time.sleep(0.1)


def _use(endpoint, key="testing"):
    """Point the AWS environment at `endpoint` (what a user exports); s3fs caches clients per settings."""
    import s3fs

    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=key, AWS_DEFAULT_REGION="us-east-1"
    )
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3(dataset):
    """s3://sdtrain-test/latents: the `dataset` fixture's shards and manifest, uploaded."""
    import boto3

    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    proc, endpoint = _moto_server()
    _use(endpoint)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(Path(dataset).parent.iterdir()):
        client.upload_file(str(path), BUCKET, f"latents/{path.name}")
    yield f"s3://{BUCKET}/latents", endpoint
    proc.terminate()
    proc.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_a_stream_over_s3_equals_the_local_one_and_resumes_from_its_positions(s3, dataset):
    url, endpoint = s3
    _use(endpoint)
    remote, local = resolve_shards(f"{url}/manifest.json"), resolve_shards(str(dataset))
    assert [s.url for s in remote.shards][0].startswith(f"{url}/") and remote.sample_counts == local.sample_counts
    assert resolve_shards(url).sample_counts == local.sample_counts  # a folder URL: its manifest.json
    over_s3 = take_batches(latent_stream(remote, num_workers=2), 8)
    on_disk = take_batches(latent_stream(local, num_workers=2), 8)
    for a, b in zip(over_s3, on_disk, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["latents"], b["latents"]) and not a["skipped"]
    positions = {}
    for batch in over_s3[:5]:
        positions[batch["position"].position.worker] = batch["position"].position.to_dict()
    resumed = take_batches(latent_stream(remote, num_workers=2, start_batch=5, resume_positions=positions), 3)
    for a, b in zip(over_s3[5:], resumed, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["latents"], b["latents"])
    with pytest.raises(DataError, match="remote shards need a manifest.json"):
        resolve_shards(f"{url}/*.tar")


def test_missing_bucket_missing_key_and_refused_credentials_are_one_line(s3):
    url, endpoint = s3
    _use(endpoint)
    cases = [
        (f"s3://{BUCKET}/nothing/manifest.json", "does not exist"),
        ("s3://no-such-bucket-here/manifest.json", "does not exist"),
    ]
    strict, strict_endpoint = _moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0")  # every request checks its keys
    try:
        for manifest, message in cases:
            with pytest.raises(DataError, match=message) as info:
                resolve_shards(manifest)
            assert "\n" not in str(info.value) and manifest in str(info.value)
        _use(strict_endpoint, key="not-a-key")
        with pytest.raises(DataError, match="access denied .*AWS_ACCESS_KEY_ID") as info:
            resolve_shards(f"s3://{BUCKET}/latents/manifest.json")
        assert "\n" not in str(info.value)
    finally:
        strict.terminate()
        strict.wait()
        _use(endpoint)


def test_training_on_s3_shards_keeps_the_credentials_out_of_the_run(s3, tmp_path):
    url, endpoint = s3
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "s3cr3t-v4lue"}
    run = tmp_path / "run"
    result = run_train(
        run,
        f"data.shards={url}/manifest.json",
        "trainer.max_steps=3",
        "callbacks.samples.at_end=false",
        "trainer.enable_progress_bar=false",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = "".join(
        p.read_text(errors="ignore")
        for p in run.rglob("*")
        if p.is_file() and p.suffix in {".yaml", ".csv", ".log", ".txt"}
    )
    assert "s3cr3t-v4lue" not in written + result.stdout + result.stderr


def test_sdtrain_encode_from_an_s3_glob_to_a_bucket(s3, raw_tars, vae_dir, tmp_path):
    """img2dataset tars in a bucket, read by a glob and encoded into another prefix of it (shards uploaded part by
    part, the manifest last): the same shards, byte for byte, as from and to a local folder, and they train."""
    import boto3

    from sdtrain.prep.encode_cli import main as encode_main

    _, endpoint = s3
    _use(endpoint)
    client = boto3.client("s3")
    for path in raw_tars:
        client.upload_file(str(path), BUCKET, f"raw/{path.name}")
    common = ["--vae", vae_dir, "--resolution", "32", "--samples-per-shard", "10", "--workers", "0"]
    assert encode_main([f"s3://{BUCKET}/raw/*.tar", "--out", f"s3://{BUCKET}/encoded", *common]) == 0
    assert encode_main([*map(str, raw_tars), "--out", str(tmp_path / "local"), *common]) == 0
    remote = resolve_shards(f"s3://{BUCKET}/encoded/manifest.json")
    local = sorted((tmp_path / "local").glob("*.tar"))
    assert [s.url.rsplit("/", 1)[1] for s in remote.shards] == [p.name for p in local] and len(local) > 1
    for path in local:
        assert client.get_object(Bucket=BUCKET, Key=f"encoded/{path.name}")["Body"].read() == path.read_bytes()
    batch = take_batches(latent_stream(remote, num_workers=0), 1)[0]
    assert batch["latents"].shape[0] == 4 and not batch["skipped"]
