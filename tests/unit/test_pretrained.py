"""Starting from pretrained weights: diffusers folders, exports, ldm single files; clear errors otherwise."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from omegaconf import OmegaConf
from safetensors.torch import save_file

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.export.ldm import unet_to_ldm, vae_to_ldm
from sdtrain.launch.config import compose_config
from sdtrain.models.diffusers_parts import UNetConfig, build_unet


def _config(*overrides):
    cfg = compose_config(list(overrides))
    return OmegaConf.to_container(cfg.model.unet.config)


@pytest.mark.parametrize("overrides", [["model=tiny"], ["experiment=demo"], ["model=sd15"], ["model=sd2"]])
def test_ldm_export_maps_back_through_diffusers_converter(overrides):
    config = _config(*overrides)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    back = convert_ldm_unet_checkpoint(unet_to_ldm(state, dict(unet.config)), dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)  # each diffusers name comes back to its own tensor


@pytest.mark.parametrize("overrides", [["model=tiny"], ["model=sd15"], ["model=sd2"]])
def test_vae_ldm_names_map_back_through_diffusers_converter(overrides):
    config = OmegaConf.to_container(compose_config(list(overrides)).model.vae.config)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    state = vae.state_dict()
    ldm = vae_to_ldm(state, dict(vae.config))
    assert all(k.startswith("first_stage_model.") for k in ldm)
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)  # 1x1-conv attention squeezed back to linear


def test_unet_from_ldm_single_file_diffusers_file_and_folder(tmp_path):
    config = _config("model=tiny")
    torch.manual_seed(1)
    source = UNet2DConditionModel.from_config(config)
    state = source.state_dict()
    save_file(unet_to_ldm(state, dict(source.config)), tmp_path / "ldm.safetensors")
    save_file(state, tmp_path / "diffusers.safetensors")
    source.save_pretrained(tmp_path / "export" / "unet")  # an export root: the unet/ subfolder is used
    for path in ("ldm.safetensors", "diffusers.safetensors", "export"):
        built = build_unet(UNetConfig(config=config, pretrained=str(tmp_path / path)))
        assert all(torch.equal(built.state_dict()[k], v) for k, v in state.items()), path


def test_wrong_model_size_and_missing_file_are_clear_errors(tmp_path):
    small = UNet2DConditionModel.from_config(_config("model=tiny"))
    save_file(small.state_dict(), tmp_path / "small.safetensors")
    bigger = _config("model=tiny", "model.unet.config.block_out_channels=[64,128,256]")
    with pytest.raises(ConfigError, match=r"tensors differ in shape \(first: .* wrong model size"):
        build_unet(UNetConfig(config=bigger, pretrained=str(tmp_path / "small.safetensors")))
    with pytest.raises(CheckpointError, match="not found: /nonexistent/unet.safetensors"):
        build_unet(UNetConfig(config=bigger, pretrained="/nonexistent/unet.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError, match="is unreadable"):
        build_unet(UNetConfig(config=bigger, pretrained=str(tmp_path / "junk.safetensors")))
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="has no tensor of model.unet"):
        build_unet(UNetConfig(config=bigger, pretrained=str(tmp_path / "other.safetensors")))
