import json

import pytest

from sdtrain.data.shards import count_samples, resolve_shards
from sdtrain.errors import DataError


def test_manifest_file_and_folder_give_exact_counts(dataset):
    by_file = resolve_shards(str(dataset))
    by_folder = resolve_shards(str(dataset.parent))
    assert by_file.sample_counts == by_folder.sample_counts == [16, 16, 16, 16]
    assert by_file.total_samples == 64
    assert all(s.url.startswith(str(dataset.parent)) for s in by_file.shards)


def test_brace_glob_and_list_resolve_the_same_shards(dataset):
    d = dataset.parent
    brace = resolve_shards(f"{d}/{{000000..000003}}.tar")
    glob = resolve_shards(f"{d}/*.tar")
    listed = resolve_shards([f"{d}/000000.tar", f"{d}/00000[1-3].tar"])
    assert [s.url for s in brace.shards] == [s.url for s in glob.shards] == [s.url for s in listed.shards]
    assert brace.total_samples == 64  # counted from tar headers when there is no manifest


def test_count_samples_reads_headers(dataset):
    assert count_samples(str(dataset.parent / "000002.tar")) == 16


@pytest.mark.parametrize("spec", ["", None, []])
def test_empty_pattern_is_a_clear_error(spec):
    with pytest.raises(DataError, match="empty"):
        resolve_shards(spec)


def test_missing_shard_and_glob_without_match_name_the_pattern(tmp_path):
    with pytest.raises(DataError, match="shard not found: .*nope.tar"):
        resolve_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(DataError, match="no shards match"):
        resolve_shards(str(tmp_path / "*.tar"))


def test_foreign_json_is_refused(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not an sdtrain latent manifest"):
        resolve_shards(str(bad))
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        resolve_shards(str(bad))
