"""OpenCLIP text towers as transformers `CLIPTextModel`s (and back), and CLIP tokenizer files from open_clip's BPE.

This is how Stable Diffusion 2's OpenCLIP-H reached diffusers: the tower's weights renamed by diffusers' own
`convert_open_clip_checkpoint`, keeping the blocks the conditioning uses (SD2 takes the penultimate block's
output through the final LayerNorm, so its `CLIPTextModel` has 23 of 24 layers and gives `last_hidden_state`),
and a `CLIPTokenizer` that pads with "!" (id 0, open_clip's pad). Exports of OpenCLIP runs use it to write a
text_encoder/ + tokenizer/ that plain diffusers loads; single files in the original layout keep the whole tower.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from sdtrain.errors import CheckpointError

OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x single files
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x single files
TOWER_PREFIX = "text_tower."  # any prefix but SD 2's, for diffusers' converter
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def clip_tokenizer(folder: str, pad_token: str = EOT, context_length: int = 77) -> Any:
    """A transformers CLIPTokenizer whose vocabulary and merges are open_clip's (written to `folder`); pad "!" is
    SD 2.x's (and open_clip's id 0), EOT SD 1.x's."""
    import open_clip
    from transformers import CLIPTokenizer

    reference = open_clip.tokenizer.SimpleTokenizer()
    vocab = dict(reference.encoder)
    vocab[SOT] = vocab.pop("<start_of_text>")
    vocab[EOT] = vocab.pop("<end_of_text>")
    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token=pad_token
    )
    tokenizer.model_max_length = context_length
    return tokenizer


def open_clip_text_config(tower: nn.Module, kept_layers: int) -> Any:
    """The CLIPTextConfig of an open_clip TextTransformer with its first `kept_layers` blocks."""
    from transformers import CLIPTextConfig

    block = tower.transformer.resblocks[0]
    quick = type(block.mlp.gelu).__name__ == "QuickGELU"
    projection = tower.text_projection  # None, a (width, dim) Parameter or a Linear
    if projection is None:
        projection_dim = tower.width
    else:
        projection_dim = projection.shape[1] if isinstance(projection, torch.Tensor) else projection.out_features
    return CLIPTextConfig(
        vocab_size=tower.vocab_size,
        hidden_size=tower.width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=kept_layers,
        num_attention_heads=tower.heads,
        max_position_embeddings=tower.context_length,
        hidden_act="quick_gelu" if quick else "gelu",
        layer_norm_eps=tower.ln_final.eps,
        projection_dim=int(projection_dim),
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )


def kept_layers(tower: nn.Module, layer: str) -> int:
    """Blocks the conditioning uses: all for `last`, all but the final one for `penultimate` (then LayerNorm)."""
    return len(tower.transformer.resblocks) - (1 if layer == "penultimate" else 0)


def _is_text_tensor(key: str) -> bool:
    return key.startswith(("transformer.resblocks.", "token_embedding.", "positional_embedding", "ln_final."))


def open_clip_to_clip(
    tower: nn.Module, layer: str, *, with_projection: bool = False
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(CLIPTextModel giving the tower's conditioning, the tower's tensors it does not hold) - the second lets
    `clip_to_open_clip` give back every tensor of the tower. `with_projection`: a CLIPTextModelWithProjection
    with every block and the projection, as SDXL's second encoder (its pipelines read hidden_states[-2] and
    text_embeds; call it with layer="last" to keep every block)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    keep = kept_layers(tower, layer)
    state = tower.state_dict()
    projected = with_projection and tower.text_projection is not None
    if projected and isinstance(tower.text_projection, nn.Linear):
        raise CheckpointError("an OpenCLIP projection with a bias has no CLIPTextModelWithProjection layout")
    unused = {
        k: v
        for k, v in state.items()
        if not (_is_text_tensor(k) or (projected and k.startswith("text_projection"))) or _block(k) >= keep
    }
    model = (CLIPTextModelWithProjection if projected else CLIPTextModel)(open_clip_text_config(tower, keep))
    # not SD 2's cond_stage_model.model. prefix: diffusers then ignores block 23 and the projection (SD 2's
    # unused ones), which deeper towers and SDXL's bigG need
    used = {TOWER_PREFIX + k: v for k, v in state.items() if k not in unused}
    converted = convert_open_clip_checkpoint(model, used, prefix=TOWER_PREFIX)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    if not projected:
        converted.pop("text_projection.weight", None)
    model.load_state_dict(converted, strict=True)
    return model.eval(), unused


OPEN_CLIP_NAMES = [  # CLIPTextModel name piece -> open_clip name piece (diffusers' map, reversed)
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
    ("encoder.layers.", "transformer.resblocks."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]


def clip_to_open_clip(clip_state: dict[str, torch.Tensor], unused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip tower's state dict from `open_clip_to_clip`'s two halves (q/k/v joined into in_proj)."""
    clip_state = {k.removeprefix("text_model."): v for k, v in clip_state.items()}
    out: dict[str, torch.Tensor] = dict(unused)
    for key, tensor in clip_state.items():
        if ".self_attn." in key and key.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            if ".q_proj." in key:
                kind = key.rsplit(".", 1)[-1]
                base = key.split(".self_attn.")[0].replace("encoder.layers.", "transformer.resblocks.")
                parts = [clip_state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{base}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            continue
        for ours, theirs in OPEN_CLIP_NAMES:
            key = key.replace(ours, theirs)
        out[key] = tensor
    return out


def _block(key: str) -> int:
    """The resblock index of an open_clip tensor name (-1 if it is not in a block)."""
    if not key.startswith("transformer.resblocks."):
        return -1
    return int(key.split(".")[2])
