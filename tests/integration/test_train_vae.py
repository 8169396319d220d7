"""`sdtrain-train-vae`: the first stage as a training job.

- the session's 500-step run (conftest `vae_run`) learns (held-out PSNR up, rFID down, above the mean-image
  baseline), draws reconstruction grids, and writes DIR/vae/ whose latent statistics are what its VAE gives and
  which `sdtrain-encode --vae DIR/vae` copies into the manifest;
- one training step equals a bare PyTorch loop (L1 + KL + perceptual + patch-GAN, one AdamW over both nets);
- a resumed run equals an uninterrupted one bit for bit; decoder-only fine-tuning of a released-layout VAE keeps
  the encoder (and so the latents of existing shards);
- bad settings end with one line.
"""

import csv
import json

import lightning as L
import pytest
import torch
from diffusers import AutoencoderKL
from helpers import run_train_cases, run_train_vae

from sdtrain.launch.config import compose_config
from sdtrain.models.diffusers_parts import encoder_fingerprint
from sdtrain.seeding import step_generator
from sdtrain.training.callbacks.throughput import ThroughputCallback
from sdtrain.training.optim import OptimConfig
from sdtrain.vae.data import read_held_out
from sdtrain.vae.losses import InceptionPerceptual, PatchDiscriminator, VAELossConfig, gan_losses
from sdtrain.vae.metrics import encode_moments, psnr, reconstruct
from sdtrain.vae.module import AutoencoderModule

pytestmark = pytest.mark.slow


def _metric(run, name):
    rows = csv.DictReader((run / "logs" / "version_0" / "metrics.csv").read_text().splitlines())
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}


def test_the_job_learns_and_writes_a_vae_folder_sdtrain_encode_takes(vae_run, emoji_folders, tmp_path):
    psnrs, rfids = _metric(vae_run, "val/psnr"), _metric(vae_run, "val/rfid")
    assert sorted(psnrs) == [250, 500] and sorted(rfids) == [250, 500]
    assert psnrs[500] > psnrs[250] + 0.5, psnrs
    assert rfids[500] < rfids[250], rfids
    assert (vae_run / "reconstructions" / "step_000500.png").exists()
    assert (vae_run / "checkpoints" / "last.ckpt").exists()

    vae = AutoencoderKL.from_pretrained(vae_run / "vae")  # a plain diffusers folder
    held_out, _ = read_held_out(str(emoji_folders[1]), 32, 64)
    baseline = psnr(held_out.mean(0, keepdim=True).expand_as(held_out), held_out)
    assert psnr(reconstruct(vae, held_out), held_out) > baseline + 3.0
    # the statistics are the saved VAE's on the held-out images, and config.json's scale is 1 / their std
    stats = json.loads((vae_run / "vae" / "latent_statistics.json").read_text())
    means = encode_moments(vae, held_out)[:, :4].double()
    assert stats["images"] == 64
    torch.testing.assert_close(
        torch.tensor(stats["mean"], dtype=torch.float64), means.mean(dim=(0, 2, 3)), rtol=0, atol=1e-5
    )
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert stats["scaling_factor"] == pytest.approx(1 / (means - means.mean(dim=(0, 2, 3))[:, None, None]).std().item())

    from sdtrain.prep.encode_cli import main as encode_main

    out = tmp_path / "latents"
    assert (
        encode_main([str(emoji_folders[1]), "--out", str(out), "--vae", str(vae_run / "vae"), "--resolution", "32"])
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vae"]["shift_factor"] == stats["shift_factor"]
    assert manifest["vae"]["scaling_factor"] == pytest.approx(stats["scaling_factor"])


def _tiny_vae():
    return AutoencoderKL.from_config(dict(compose_config(["model=vae_tiny"], config_name="train_vae").model.config))


def test_a_training_step_equals_a_bare_pytorch_loop():
    torch.manual_seed(0)
    loss_cfg = VAELossConfig(
        perceptual_weight=0.5, gan_weight=0.3, disc_start=1, disc_lr_ratio=2.0, disc_channels=8, latent_noise=0.4
    )
    optim = OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, fused=False)
    vae = _tiny_vae()
    module = AutoencoderModule(vae=vae, loss=loss_cfg, optim=optim, train="all", resolution=32, seed=5)
    ref_vae = _tiny_vae()
    ref_vae.load_state_dict(vae.state_dict())
    ref_disc = PatchDiscriminator(8, loss_cfg.disc_layers)
    ref_disc.load_state_dict(module.discriminator.state_dict())
    batches = [{"pixels": torch.rand(4, 3, 32, 32) * 2 - 1, "keys": ["k"] * 4, "skipped": {}} for _ in range(3)]

    throughput = ThroughputCallback()  # the VAE job's MFU, counted at the batches' pixel shape
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[throughput],
        log_every_n_steps=1,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert throughput._flops_by_shape == {(3, 32, 32): module.training_flops_per_image()} and throughput.images_per_s

    perceptual = InceptionPerceptual(loss_cfg.perceptual_size)
    opt = torch.optim.AdamW(
        [{"params": ref_vae.parameters()}, {"params": ref_disc.parameters(), "lr": 2e-3}], lr=1e-3, weight_decay=0.0
    )
    for step, batch in enumerate(batches):
        x = batch["pixels"]
        posterior = ref_vae.encode(x).latent_dist
        draws = step_generator(5, 0, step, 0, x.device)
        latents = posterior.sample(generator=draws)
        # latent_noise: std u * 0.4 * the batch's per-channel latent std, u ~ U[0, 1) per image
        strength = 0.4 * torch.rand(4, 1, 1, 1, generator=draws) * latents.detach().std(dim=(0, 2, 3), keepdim=True)
        recon = ref_vae.decode(latents + strength * torch.randn(latents.shape, generator=draws)).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean() + 0.5 * perceptual(recon, x)
        generator, disc = gan_losses(ref_disc, x, recon)
        loss = loss + float(step >= 1) * (0.3 * generator + disc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, tensor in ref_vae.state_dict().items():
        torch.testing.assert_close(module.vae.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in ref_disc.state_dict().items():
        torch.testing.assert_close(module.discriminator.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_gan_terms_reach_only_their_own_network():
    disc = PatchDiscriminator(8, 2)
    fake = torch.rand(2, 3, 32, 32, requires_grad=True)
    generator, discriminator = gan_losses(disc, torch.rand(2, 3, 32, 32), fake)
    generator.backward(retain_graph=True)
    assert fake.grad.abs().sum() > 0 and all(p.grad is None for p in disc.parameters())
    fake.grad = None
    discriminator.backward()
    assert fake.grad is None and all(p.grad is not None for p in disc.parameters())


def _vae_state(run):
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt, {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("vae.", "discriminator."))}


def test_resume_equals_an_uninterrupted_run(tmp_path, emoji_folders):
    common = [
        f"data.images={emoji_folders[0]}",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.random_crop=true",
        "data.random_flip=true",
        "loss.perceptual_weight=0.1",
        "loss.gan_weight=0.1",
        "loss.disc_start=2",
        "callbacks.checkpoint.every_n_steps=3",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train_vae(straight, *common, "trainer.max_steps=6").returncode == 0
    first = run_train_vae(resumed, *common, "trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train_vae(resumed, *common, "trainer.max_steps=6", "resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 3 (each rank's stream resumes after 3 batches)" in second.stdout + second.stderr
    (ckpt_a, a), (ckpt_b, b) = _vae_state(straight), _vae_state(resumed)
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 6
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])
    ]
    ema_a, ema_b = (next(v for k, v in c["callbacks"].items() if "EMACallback" in k) for c in (ckpt_a, ckpt_b))
    assert ema_a["num_updates"] == ema_b["num_updates"] == 6
    assert all(torch.equal(ema_a["shadow"][k], ema_b["shadow"][k]) for k in ema_a["shadow"])


def test_decoder_only_fine_tuning_of_a_released_vae_keeps_the_encoder(tmp_path, emoji_folders, vae_dir):
    run = tmp_path / "finetune"
    result = run_train_vae(
        run,
        f"data.images={emoji_folders[0]}",
        f"model.pretrained={vae_dir}",
        "model.train=decoder",
        "trainer.max_steps=4",
        "data.num_workers=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training the decoder (encoder frozen)" in result.stdout + result.stderr
    before, after = AutoencoderKL.from_pretrained(vae_dir), AutoencoderKL.from_pretrained(run / "vae")
    assert encoder_fingerprint(before) == encoder_fingerprint(after)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)


@pytest.mark.distributed
def test_ddp_and_zero2_train_the_same_weights(tmp_path, emoji_folders):
    common = [
        f"data.images={emoji_folders[0]}",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "loss.gan_weight=0.1",
        "loss.disc_start=1",
        "callbacks.ema.enabled=false",
    ]
    states = {}
    for strategy in ("ddp", "deepspeed_zero2"):
        result = run_train_vae(tmp_path / strategy, *common, f"strategy={strategy}")
        assert result.returncode == 0, result.stderr[-3000:]
        states[strategy] = AutoencoderKL.from_pretrained(tmp_path / strategy / "vae").state_dict()
    initial = _tiny_vae().state_dict()  # same seed: the runs start here
    ddp, zero = states["ddp"], states["deepspeed_zero2"]
    moved = torch.cat([(ddp[k] - initial[k]).flatten() for k in ddp]).norm()
    differ = torch.cat([(ddp[k] - zero[k]).flatten() for k in ddp]).norm()
    assert moved > 0 and differ < 1e-3 * moved, (differ, moved)


def test_bad_settings_end_with_one_line(tmp_path, emoji_folders):
    cases = {
        "fsdp": [f"data.images={emoji_folders[0]}", "strategy=fsdp"],
        "zero3": [f"data.images={emoji_folders[0]}", "strategy=deepspeed_zero3"],
        "train_part": [f"data.images={emoji_folders[0]}", "model.train=encoder"],
        "no_images": ["data.images=null"],
        "missing_folder": [f"data.images={tmp_path}/nowhere"],
        "bad_loss": [f"data.images={emoji_folders[0]}", "loss.reconstruction=l3"],
        "bad_noise": [f"data.images={emoji_folders[0]}", "loss.latent_noise=-0.5"],
    }
    results = run_train_cases(tmp_path, cases, job="sdtrain.launch.train_vae", base=["experiment=vae_demo"])
    expect = {
        "fsdp": "shards the parameters",
        "zero3": "shards the parameters",
        "train_part": "train must be all or decoder",
        "no_images": "data.images is not set",
        "missing_folder": "input not found",
        "bad_loss": "reconstruction must be l1 or l2",
        "bad_noise": "latent_noise must be >= 0",
    }
    for name, text in expect.items():
        result = results[name]
        lines = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
        assert result["returncode"] == 2 and len(lines) == 1 and text in lines[0], (name, result["stderr"][-1500:])
        assert "Traceback" not in result["stderr"], name


def test_images_come_from_folders_tars_and_tables_with_counted_skips(tmp_path, emoji_folders, raw_tars):
    import shutil
    from collections import Counter

    from sdtrain.vae.data import ImageDataConfig, ImageSet, ImageStream

    train = emoji_folders[0]
    names = sorted(p.name for p in train.glob("*.png"))[:20]
    table = tmp_path / "images.csv"  # a path column and no caption column: the VAE needs none
    table.write_text("image_path\n" + "".join(f"{train / n}\n" for n in names) + "nowhere.png\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    for n in names[:7]:
        shutil.copy(train / n, tmp_path / "broken" / n)
    tars = tmp_path / "tars"
    tars.mkdir()
    for tar in raw_tars:
        shutil.copy(tar, tars / tar.name)
    image_set = ImageSet.open([str(tars / "*.tar"), str(table), str(tmp_path / "broken")])
    assert image_set.counts == [16] * 6 + [21, 8]  # tars counted by reading them; table rows; folder files
    # img2dataset's NNNNN_stats.json gives a tar's count without reading it
    (tars / (raw_tars[0].stem + "_stats.json")).write_text('{"successes": 15, "failed_to_download": 3}')
    assert ImageSet.open([str(tars / raw_tars[0].name)]).counts == [15]

    cfg = ImageDataConfig(images=None, resolution=24, batch_size=1, num_workers=0, shuffle=False)
    stream = iter(ImageStream(image_set, cfg, seed=3))
    batches = [next(stream) for _ in range(125)]  # one epoch: 125 images, 2 unreadable (2 read again to fill)
    assert all(b["pixels"].shape == (1, 3, 24, 24) and b["pixels"].abs().max() <= 1 for b in batches)
    assert sum((Counter(b["skipped"]) for b in batches), Counter()) == {"missing_image": 1, "bad_image": 1}
