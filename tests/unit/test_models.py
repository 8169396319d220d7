import random
import string

import open_clip
import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf

from sdtrain.launch.config import compose_config
from sdtrain.models.text_encoder import FrozenOpenCLIPText, TextEncoderConfig, build_text_encoder, build_tokenizer


def test_real_bpe_tokenizer():
    tokens = build_tokenizer()(["a cat", ""])
    assert tokens.shape == (2, 77)
    assert tokens[0, :4].tolist() == [49406, 320, 2368, 49407]  # <start> a</w> cat</w> <end> in CLIP's vocab
    assert tokens[1, :3].tolist() == [49406, 49407, 0]


def test_text_encoder_is_frozen_and_uses_the_penultimate_layer():
    torch.manual_seed(0)
    enc = build_text_encoder(TextEncoderConfig(width=32, heads=2, layers=3))
    assert isinstance(enc, FrozenOpenCLIPText)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    tokens = build_tokenizer()(["a red apple"])
    tower = enc.tower
    x, mask = tower._embeds(tokens)
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=mask)
    assert torch.allclose(enc(tokens), tower.ln_final(x), atol=1e-6)
    assert enc(tokens).shape == (1, 77, 32)


@pytest.mark.parametrize(("preset", "millions"), [("sd15", 859.5), ("sd2", 865.9), ("sdxl", 2567.5)])
def test_size_presets_are_the_real_sd_unets(preset, millions):
    cfg = compose_config([f"model={preset}"])
    config = OmegaConf.to_container(cfg.model.unet.config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(millions, abs=0.5)


def test_tokenizer_tokenises_exactly_like_open_clip():
    from sdtrain.demo.emoji_images import emoji_pairs

    reference = open_clip.tokenizer.SimpleTokenizer()
    captions = [p.caption for p in emoji_pairs()] + [
        "A  Photo of\ta CAT",
        "fish &amp; chips",
        "caf\u00e9 au lait",
        "\u201cquoted\u201d",
        "line\r\nbreak",
        "ctrl\x07char",
        "  spaced  ",
        "",
        "ALL CAPS 123 !?",
        "m\u00f6tley cr\u00fce",
        "\u00c3\u00a9 mojibake",
        "it's the cat's toy, isn't it? we'll see; they'd've 3.14159 <start_of_text> ok",
        "word " * 100,  # longer than the context: truncated, last token = end of text
        "\u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \U0001f600 emoji",
    ]
    rng = random.Random(0)
    captions += ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 200))) for _ in range(500)]
    assert torch.equal(build_tokenizer()(captions), reference(captions))
    short = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    assert torch.equal(build_tokenizer(16)(captions), short(captions))
