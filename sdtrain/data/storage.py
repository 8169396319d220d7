"""Where shards and manifests live: local paths, or object storage through fsspec (`s3://`, `gs://`, ...).

Credentials and endpoints come only from the environment the storage library reads (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), never from the
config, so they stay out of run folders and logs. Opening retries transient failures with backoff (s3fs also
retries each request); what cannot succeed (a missing bucket or key, refused credentials, a scheme without its
library) is one DataError line naming the URL. Remote files are read in large ranges (s3fs's 50 MiB blocks) and
can seek, so the loader's sparse resume reads work on them as on local files.
"""

from __future__ import annotations

import io
import os
import time
from typing import IO, Any

from sdtrain.errors import DataError

ATTEMPTS = 4  # opening a remote file: the first try and three retries, 0.5 s, 1 s, 2 s apart


def is_remote(url: str) -> bool:
    """An fsspec URL other than a local file (`pipe:` commands are webdataset's and stay local)."""
    return "://" in url and not url.startswith("file://")


def _filesystem(url: str) -> Any:
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)[0]
    except ImportError as exc:  # s3fs, gcsfs, ... are optional
        raise DataError(f"{url}: reading {url.split('://')[0]}:// needs {exc.name} (pip install sdtrain[s3])") from None
    except ValueError as exc:
        raise DataError(f"{url}: {exc}") from None


def _one_line(url: str, exc: BaseException) -> DataError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{url} does not exist ({text})")
    if isinstance(exc, PermissionError):
        return DataError(
            f"{url}: access denied ({text}): check the credentials in the environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"
        )
    return DataError(f"{url}: {type(exc).__name__}: {text}")


def open_url(url: str, mode: str = "rb") -> IO[Any]:
    """A file object for a local path or a remote URL (retrying transient failures)."""
    if not is_remote(url):
        try:
            return open(url.removeprefix("file://"), mode)  # noqa: SIM115 - the caller closes it
        except OSError as exc:
            raise _one_line(url, exc) from None
    fs = _filesystem(url)
    for attempt in range(ATTEMPTS):
        try:
            return fs.open(url, mode)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise _one_line(url, exc) from None
        except Exception as exc:  # noqa: BLE001 - network and service errors: retried, then one line
            if attempt == ATTEMPTS - 1:
                raise _one_line(url, exc) from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def peek_head(stream: Any) -> bytes:
    """The first two bytes of a stream (compression magic) without consuming them."""
    if hasattr(stream, "peek"):
        return stream.peek(2)[:2]
    if stream.seekable():
        head = stream.read(2)
        stream.seek(0)
        return head
    return b""


def read_text(url: str) -> str:
    with open_url(url, "rb") as f:
        return io.TextIOWrapper(f, encoding="utf-8").read()


def exists(url: str) -> bool:
    if not is_remote(url):
        return os.path.exists(url)
    try:
        return bool(_filesystem(url).exists(url))
    except PermissionError as exc:
        raise _one_line(url, exc) from None


def glob(pattern: str) -> list[str]:
    """The URLs a remote glob matches, sorted, with their scheme."""
    fs = _filesystem(pattern)
    scheme = pattern.split("://", 1)[0]
    try:
        return sorted(f"{scheme}://{path}" for path in fs.glob(pattern))
    except (FileNotFoundError, PermissionError) as exc:
        raise _one_line(pattern, exc) from None


def put(local: str, url: str) -> None:
    """Upload a local file to `url` (one object: readers see all of it or nothing), retrying transient failures."""
    fs = _filesystem(url)
    for attempt in range(ATTEMPTS):
        try:
            fs.put_file(local, url)
            return
        except (FileNotFoundError, PermissionError) as exc:
            raise _one_line(url, exc) from None
        except Exception as exc:  # noqa: BLE001 - network and service errors: retried, then one line
            if attempt == ATTEMPTS - 1:
                raise _one_line(url, exc) from None
            time.sleep(0.5 * 2**attempt)


def join(base: str, relative: str) -> str:
    """`relative` next to `base` (a folder URL or path)."""
    return f"{base.rstrip('/')}/{relative}"
