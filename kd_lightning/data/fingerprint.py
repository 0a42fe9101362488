"""The content fingerprint of a dataset's files: part of every DataModule's `cache_identity()`.

A DataModule lists the files `setup()` reads (`KDDataModule.data_files()`, as `(name, path)` pairs where `name`
is stable across machines: a path relative to the data dir). Their fingerprint is the sha256 over the sorted
names, sizes and content hashes, so that replacing a split's images with others of the same count and shape
changes the key of the teacher and of the teacher-logit cache.

Content hashes are memoized by (absolute path, size, mtime_ns) in one JSON file per user
(`$KD_FINGERPRINT_MEMO`, default `~/.cache/kd-lightning/fingerprints.json`): a repeated run re-hashes only files
that changed. The memo is a speed-up, never a source of truth for a changed file (its size or mtime differs, so
its entry does not match); it is written atomically, and a missing, damaged or unwritable memo only costs time.
A file modified less than `RACY_S` seconds ago is hashed but not memoized (as git treats "racily clean" index
entries): a second edit within the file system's timestamp granularity could keep both its size and its mtime.

`hash_content=False` keys each file on its size and mtime instead of its bytes (for folders too large to hash
once): an edit that keeps both the size and the mtime is then not seen.
"""

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from kd_lightning.checkpoints import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

RACY_S = 2.0  # files modified more recently than this are not memoized


def memo_path() -> Path:
    return Path(os.environ.get("KD_FINGERPRINT_MEMO", Path.home() / ".cache" / "kd-lightning" / "fingerprints.json"))


def files_digest(files: Iterable[tuple[str, Path]], hash_content: bool = True) -> str:
    """sha256 over `(name, size, content sha256 | mtime_ns)` of every file, sorted by name."""
    memo_file = memo_path()
    memo = _read_memo(memo_file) if hash_content else {}
    changed = False
    digest = hashlib.sha256()
    racy_after = time.time_ns() - int(RACY_S * 1e9)
    for name, path in sorted(files, key=lambda item: item[0]):
        stat = path.stat()
        if hash_content:
            key = str(path.resolve())
            stamp = [stat.st_size, stat.st_mtime_ns]
            entry = memo.get(key)
            if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp and isinstance(entry[2], str)):
                entry = [*stamp, file_sha256(path)]
                if stat.st_mtime_ns < racy_after:
                    memo[key] = entry
                    changed = True
                elif memo.pop(key, None) is not None:
                    changed = True
            token = entry[2]
        else:
            token = str(stat.st_mtime_ns)
        digest.update(f"{name}\0{stat.st_size}\0{token}\n".encode())
    if changed:
        _write_memo(memo_file, memo)
    return digest.hexdigest()


def _read_memo(path: Path) -> dict[str, list]:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(path: Path, memo: dict[str, list]) -> None:
    try:
        atomic_write_text(path, json.dumps(memo))
    except OSError as err:  # a read-only home only costs the next run a re-hash
        log.debug("could not write the fingerprint memo %s: %s", path, err)
