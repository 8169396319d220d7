"""The lean tar reader gives exactly what webdataset's tarfile path gives, for every tar flavour, and stops at
the same place on damage (always reporting it)."""

import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from sdtrain.data.shards import iter_raw_samples
from sdtrain.data.tar_reader import TarDamage, iter_samples


def _tar(path, fmt, names):
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = (f"payload {i} " * (i * 37 % 300)).encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000 + i
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    return path


def _reference(path):
    with open(path, "rb") as f:
        return list(group_by_keys({**x, "__url__": str(path)} for x in tar_file_iterator(f)))


NAMES = [
    "a/000001.moments.npy",
    "a/000001.TXT",
    "a/000001.json",
    "000002.txt",
    "__meta__.json",
    "d/" + "long" * 40 + "/000003.txt",
    "000004.text.npy",
    "000004.txt",
    "x" * 120 + ".txt",
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_samples_as_webdataset(tmp_path, fmt):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if len(n) < 100]
    path = _tar(tmp_path / "s.tar", fmt, names)
    with open(path, "rb") as f:
        ours = list(iter_samples(f, str(path)))
    assert ours == _reference(path) and len(ours) >= 4


def test_damage_stops_where_webdataset_stops(tmp_path):
    path = _tar(tmp_path / "s.tar", tarfile.USTAR_FORMAT, [f"{i:04d}.{e}" for i in range(20) for e in ("a", "b")])
    data = path.read_bytes()
    for cut in (700, 5000, len(data) // 2, len(data) - 1500):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        errors = []
        ours = list(iter_raw_samples(str(tmp_path / "cut.tar"), errors.append))
        reference = []
        try:
            with open(tmp_path / "cut.tar", "rb") as f:
                for s in group_by_keys({**x, "__url__": str(tmp_path / "cut.tar")} for x in tar_file_iterator(f)):
                    reference.append(s)
        except Exception:  # noqa: BLE001 - webdataset raises on damage; what it yielded before is the reference
            pass
        # the same samples, except that a sample cut mid-way is dropped (tarfile may read a cut header as EOF)
        assert ours == reference[: len(ours)] and len(ours) >= len(reference) - 1, cut
        assert bool(errors) == (len(ours) < 20), cut  # damage is reported; a cut in the end padding loses nothing
    flipped = bytearray(data)
    flipped[1536 + 10] ^= 0xFF  # a byte of the third header (0000.a: empty, 0000.b: 370 bytes): checksum mismatch
    with pytest.raises(TarDamage, match="checksum"):
        list(iter_samples(io.BytesIO(bytes(flipped)), "x"))


def test_gzip_shards_take_the_general_path(tmp_path):
    path = _tar(tmp_path / "s.tar", tarfile.USTAR_FORMAT, ["0001.txt", "0001.json", "0002.txt"])
    import gzip

    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(path.read_bytes()))
    ours = list(iter_raw_samples(str(tmp_path / "s.tar.gz"), print))
    assert [s["__key__"] for s in ours] == ["0001", "0002"] and ours[0]["json"]


def test_counting_reading_and_raw_tars_split_member_names_the_same_way(tmp_path):
    """One rule (split_member) for every reader and counter: a count without a manifest is what the loader reads,
    and sdtrain-encode's raw-tar reader groups the same keys."""
    from sdtrain.data.shards import count_samples
    from sdtrain.prep.sources import _iter_tar

    names = [*NAMES, "noextension", "b/__hidden__", "b/000009.Moments.NPY", "b/000009.txt", "b/000010.png"]
    path = _tar(tmp_path / "t.tar", tarfile.GNU_FORMAT, names)
    read = list(iter_raw_samples(str(path), lambda reason: None))
    assert count_samples(str(path)) == len(read) == len({s["__key__"] for s in read})
    assert {"b/000009", "b/000010"} <= {s["__key__"] for s in read} and "moments.npy" in read[-2]
    raw_keys = [s.key for s in _iter_tar(str(path), lambda reason: None)]
    assert raw_keys == [s["__key__"] for s in read]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_sparse_read_gives_the_wanted_samples_and_reports_damage(tmp_path, fmt):
    """What a resumed loader reads: only the wanted ordinals, the same bytes as a full read, up to `stop`; the
    others' payloads are seeked past, and a tar cut short inside a seeked-past member is still reported."""
    from sdtrain.data.shards import iter_shard_samples

    path = _tar(tmp_path / "s.tar", fmt, [*NAMES, *(f"{i:04d}.{e}" for i in range(30) for e in ("a", "b"))])
    full = list(iter_raw_samples(str(path), print))
    wanted = {1, 4, 7, 8, 20, 31}
    sparse = list(iter_shard_samples(str(path), print, wanted.__contains__, stop=21))
    assert sparse == [(i, full[i]) for i in sorted(wanted) if i < 21]
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    errors = []
    got = list(iter_shard_samples(str(tmp_path / "cut.tar"), errors.append, lambda i: i in (1, 34)))
    assert [i for i, _ in got] == [1] and errors and "truncated" in errors[0]
