import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """64 synthetic samples of 4x8x8 moments in 4 shards of 16, with a manifest."""
    return make_dataset(tmp_path_factory.mktemp("latents"), n=64, per_shard=16)
