"""OpenCLIP text towers <-> transformers CLIPTextModel (diffusers' SD2 conversion): the same conditioning, every
tensor back, and a CLIPTokenizer made from open_clip's BPE that tokenises as open_clip does."""

import pytest
import torch

from sdtrain.models.clip_layout import clip_to_open_clip, clip_tokenizer, kept_layers, open_clip_to_clip
from sdtrain.models.text_encoder import TextEncoderConfig, build_text_encoder, build_tokenizer

# "!" is the exported tokenizer's pad token (SD 2's), which transformers splits out of a caption, and open_clip
# unescapes HTML entities: captions with either tokenise differently in diffusers, as for released SD 2 folders
CAPTIONS = ["a red heart", "", "A  PHOTO of a Cat", "naïve café 😀", "x " * 200, "don't   stop\tbelieving\n", "3:45pm"]


def _random_encoder(layer: str):
    torch.manual_seed(0)
    encoder = build_text_encoder(TextEncoderConfig(width=64, heads=4, layers=3, layer=layer))
    with torch.no_grad():  # open_clip's init leaves biases and LayerNorms trivial: perturb every tensor
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return encoder


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_converted_tower_gives_the_same_hidden_states_and_converts_back(layer):
    encoder = _random_encoder(layer)
    clip, unused = open_clip_to_clip(encoder.tower, layer)
    assert clip.config.num_hidden_layers == kept_layers(encoder.tower, layer) == (2 if layer == "penultimate" else 3)
    tokens = build_tokenizer(77)(CAPTIONS)
    with torch.no_grad():
        ours, theirs = encoder(tokens), clip(input_ids=tokens).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    back, original = clip_to_open_clip(clip.state_dict(), unused), encoder.tower.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_clip_tokenizer_from_open_clips_vocabulary_tokenises_as_open_clip(tmp_path):
    exported = clip_tokenizer(str(tmp_path), pad_token="!")
    theirs = exported(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(build_tokenizer(77)(CAPTIONS), theirs)
    assert exported.pad_token_id == 0 and exported.model_max_length == 77
