"""Opening remote files retries transient failures (with backoff) and turns what cannot succeed into one line;
the real S3 paths are tested against moto's server in tests/integration/test_object_storage.py."""

import io

import pytest

from sdtrain.data import storage
from sdtrain.errors import DataError


class FlakyStore:
    """An fsspec-like filesystem whose open fails `failures` times (a dropped connection), then works."""

    def __init__(self, failures, error=None):
        self.failures, self.calls = failures, 0
        self.error = error or ConnectionResetError("connection reset by peer")

    def open(self, url, mode):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return io.BytesIO(b"shard bytes")


@pytest.fixture
def store(monkeypatch):
    sleeps = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)

    def use(fake):
        monkeypatch.setattr(storage, "_filesystem", lambda url: fake)
        return sleeps

    return use


def test_transient_failures_are_retried_with_backoff(store):
    flaky = FlakyStore(failures=2)
    sleeps = store(flaky)
    assert storage.open_url("s3://bucket/000000.tar").read() == b"shard bytes"
    assert flaky.calls == 3 and sleeps == [0.5, 1.0]


def test_a_failure_that_persists_is_one_line_after_the_retries(store):
    flaky = FlakyStore(failures=99)
    store(flaky)
    with pytest.raises(DataError, match=r"s3://bucket/000000.tar: ConnectionResetError: connection reset") as info:
        storage.open_url("s3://bucket/000000.tar")
    assert flaky.calls == storage.ATTEMPTS and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("error", "message"),
    [(FileNotFoundError("no such key"), "does not exist"), (PermissionError("Forbidden"), "access denied")],
)
def test_missing_and_forbidden_are_not_retried(store, error, message):
    flaky = FlakyStore(failures=99, error=error)
    store(flaky)
    with pytest.raises(DataError, match=message):
        storage.open_url("s3://bucket/x.tar")
    assert flaky.calls == 1
