"""Sharded checkpoint directories: atomic replacement, clean-up of interrupted saves, one-line errors."""

import pytest

from sdtrain.checkpoint.files import load_checkpoint_meta
from sdtrain.checkpoint.resume import find_resume_checkpoint, remove_partial_writes
from sdtrain.checkpoint.sharded import replace_directory
from sdtrain.errors import CheckpointError


class OneRank:
    is_global_zero = True

    def barrier(self, name=None):
        pass


def _dcp_dir(path, step):
    import torch

    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    torch.save({"global_step": step, "callbacks": {}}, path / "meta.pt")
    return path


def test_replace_directory_swaps_whole_directories(tmp_path):
    final = _dcp_dir(tmp_path / "last.ckpt", 3)
    new = _dcp_dir(tmp_path / "last.ckpt.tmp-save", 6)
    replace_directory(OneRank(), str(new), str(final))
    assert load_checkpoint_meta(str(final))["global_step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_interrupted_saves_are_cleaned_up_or_restored(tmp_path):
    _dcp_dir(tmp_path / "step_000006.ckpt.tmp-save", 6)  # killed before its rename: never complete
    _dcp_dir(tmp_path / "last.ckpt.old-save", 3)  # killed between the two renames: the old one is the good one
    _dcp_dir(tmp_path / "step_000003.ckpt", 3)
    remove_partial_writes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step_000003.ckpt"]
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "last.ckpt")


def test_a_damaged_sharded_checkpoint_is_one_line(tmp_path):
    broken = _dcp_dir(tmp_path / "last.ckpt", 3)
    (broken / "meta.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"last.ckpt is unreadable \(meta.pt\)"):
        load_checkpoint_meta(str(broken))
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="neither a DeepSpeed nor a torch DCP checkpoint"):
        load_checkpoint_meta(str(tmp_path / "plain"))
    ds = tmp_path / "ds.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match="is incomplete: no model states file"):
        load_checkpoint_meta(str(ds))
