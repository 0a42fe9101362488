"""Reading checkpoints safely and writing files atomically, on any filesystem.

Every checkpoint is read with `weights_only=True`: a file whose unpickling would run code is refused.
Every file a user depends on (checkpoints, the teacher cache, metrics) is written by `atomic_write`: a temporary
file in the destination's own directory, flushed and fsynced, then renamed over the destination (a rename is
atomic only within one filesystem, so the temporary file is never in /tmp). A reader sees the old file or the
whole new one, also after a full disk or a crash. A temporary file names its writer (host and pid): the
temporaries of a writer that died (kill -9) are removed by the next write of the same file, and by the caches'
next start (`remove_dead_temporaries`). Lightning's checkpoints go through it via
`AtomicCheckpointIO` (conf/trainer/default.yaml `plugins`), whose epoch-end saves leave the fsyncs and the rename to a
background thread.
"""

import contextlib
import glob
import hashlib
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from hydra.utils import instantiate
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH
from torch import nn

from kd_lightning.errors import CheckpointError

log = logging.getLogger(__name__)

NET_PREFIX = "net."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read by `read_checkpoint_file`; one without a state_dict is a CheckpointError too."""
    checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint: it has no state_dict")
    return checkpoint


def read_checkpoint_file(path: str | Path) -> Any:
    """torch.load with weights_only=True, on the CPU; every failure is a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any GLOBAL but tensors' and plain data's: a class, a function such as os.system.
        if unsafe := re.search(r"GLOBAL (\S+)", str(err)):
            raise CheckpointError(
                f"{path} was refused: loading it would run code ({unsafe.group(1)});"
                " only checkpoints of tensors and plain data are loaded"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it does not unpickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({first_line})") from None
    return checkpoint


def net_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The `net.*` weights of a Lightning checkpoint written by ClassifierModule/DistillModule, unprefixed."""
    state = checkpoint["state_dict"]
    return {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}


def load_net(path: str | Path, net_config: Any = None) -> nn.Module:
    """Build the net described by `net_config` (default: the checkpoint's own) and load the checkpoint's weights.

    Weights that do not fit the net are an error naming the first missing or unexpected key or shape mismatch.
    """
    from kd_lightning.models.library import initial_weights_off, load_weights

    if net_config is not None and Path(path).suffix in (".pth", ".pt", ".bin", ".safetensors"):
        # A teacher trained elsewhere (teacher.ckpt_path): a plain state_dict of the configured net, all keys strict.
        net = instantiate(net_config, **initial_weights_off(net_config))
        load_weights(net, path)
        return net
    checkpoint = load_checkpoint(path)
    if net_config is None:
        net_config = checkpoint.get("net_config")
        if net_config is None:
            raise CheckpointError(f"{path} has no net_config (not written by kd-lightning): pass the model config")
    net = instantiate(net_config, **initial_weights_off(net_config))  # no download: the checkpoint has the weights
    state, expected = net_state_dict(checkpoint), net.state_dict()
    name = type(net).__name__
    if missing := [k for k in expected if k not in state]:
        raise CheckpointError(f"{path} does not fit {name}: missing key net.{missing[0]} ({len(missing)} missing)")
    if unexpected := [k for k in state if k not in expected]:
        raise CheckpointError(f"{path} does not fit {name}: unexpected key net.{unexpected[0]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path} does not fit {name}: net.{key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    net.load_state_dict(state)
    return net


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it and putting it straight back (which
    another thread creating a file at that instant could notice)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; not every OS or filesystem lets a directory be opened or synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(dst: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file beside `dst`, fsync it, then rename: readers see the old file or the whole
    new one. The file gets the mode of any new file (0644 under umask 022), not mkstemp's private 0600, so a
    group can share a cache. An OSError that names no file (a full disk met by `write`) is raised naming `dst`."""
    with _naming(dst):
        _publish(_write_temporary(dst, write), dst)


@contextlib.contextmanager
def _naming(dst: str | Path) -> Iterator[None]:
    """Give an OSError without a file name (a write or fsync on a full disk), or naming our temporary file, the
    destination's name, so that the one-line message of kd_lightning.errors says which file could not be written."""
    try:
        yield
    except OSError as err:
        ours = err.filename is None or Path(str(err.filename)).name.startswith(f".{Path(dst).name}.")  # our temporary
        if ours and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(dst)) from err
        raise


def torch_save_file(obj: Any, path: str | Path) -> None:
    """torch.save through a Python file: a full disk is then an OSError(ENOSPC), not torch's RuntimeError
    "[enforce fail at inline_container.cc] unexpected pos" that names neither the cause nor the file."""
    with open(path, "wb") as f:
        torch.save(obj, f)


# A temporary file is named `.<dst name>.<host tag>-<pid>.<random>.tmp`: who wrote it, so that the temporaries
# of a writer that died (kill -9, power loss) can be told from those of a writer still at work.
HOST_TAG = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMPORARY = re.compile(r"^\.(?P<dst>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
FOREIGN_TEMPORARY_AGE_S = 24 * 3600  # another host's temporary (shared filesystem): removed only when this old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_temporaries(directory: str | Path, dst_name: str | None = None) -> list[Path]:
    """Remove the temporaries in `directory` (of `dst_name` only, when given) whose writer is dead: written on
    this host by a process that no longer exists, or on another host more than a day ago. Returns them."""
    directory = Path(directory)
    pattern = f".{glob.escape(dst_name)}.*.tmp" if dst_name else ".*.tmp"
    removed = []
    try:
        candidates = list(directory.glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        match = _TEMPORARY.match(path.name)
        if match is None or (dst_name is not None and match["dst"] != dst_name):
            continue
        try:
            if match["host"] == HOST_TAG:
                dead = int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))
            else:
                dead = time.time() - path.stat().st_mtime > FOREIGN_TEMPORARY_AGE_S
            if dead:
                path.unlink()
                removed.append(path)
        except OSError:  # gone already (another cleaner), or not ours to remove
            continue
    if removed:
        log.info("Removed %d temporary file(s) left by dead writers in %s", len(removed), directory)
    return removed


def _write_temporary(dst: str | Path, write: Callable[[str], None]) -> str:
    """`write(tmp)` to a new temporary file in `dst`'s directory; the file is removed if `write` fails. The
    temporaries of `dst` left by dead writers are removed first."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(dst.parent, dst.name)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.{HOST_TAG}-{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _publish(tmp: str, dst: str | Path) -> None:
    """fsync the written temporary file `tmp`, rename it over `dst`, fsync the directory."""
    dst = Path(dst)
    try:
        with open(tmp, "rb+") as f:  # `write` may have closed its own handle without syncing
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)


def _publish_naming(tmp: str, dst: str | Path) -> None:
    with _naming(dst):
        _publish(tmp, dst)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_torch_save(obj: Any, dst: str | Path) -> None:
    atomic_write(dst, lambda tmp: torch_save_file(obj, tmp))


def atomic_write_text(dst: str | Path, text: str) -> None:
    atomic_write(dst, lambda tmp: Path(tmp).write_text(text))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with local checkpoints written by `atomic_write`.

    Lightning's own writer serializes to memory and moves the file into place through fsspec, which stages it
    in /tmp: with the run dir on another filesystem, a full disk leaves a truncated checkpoint. Remote paths
    (s3://, ...) keep Lightning's writer.

    Inside `deferred_sync()` (the epoch-end saves of kd_lightning.callbacks.ModelCheckpoint) a save writes the
    checkpoint to its temporary file and returns; the fsync of the file, the rename and the fsync of the
    directory follow in order on one background thread, so training does not wait for the disk (on this
    project's machine the two fsyncs were 2-10 ms a checkpoint, 2-3 checkpoints an epoch). Nothing else changes:
    each file is still replaced only once its bytes are on disk. Every other call (a save outside, a load, a
    removal, the teardown at the end of fit) first waits for those pending, and raises their error if one failed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._deferring = False
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    @contextlib.contextmanager
    def deferred_sync(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def wait(self) -> None:
        """Until every deferred rename is done; the first error of one is raised (the others still finish)."""
        pending, self._pending = self._pending, []
        errors = [err for future in pending if (err := future.exception()) is not None]
        if errors:
            raise errors[0]

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        local = storage_options is None and isinstance(get_filesystem(path), LocalFileSystem)
        if not (local and self._deferring):
            self.wait()
            if not local:
                return super().save_checkpoint(checkpoint, path, storage_options)
            return atomic_torch_save(checkpoint, path)
        with _naming(path):
            tmp = _write_temporary(path, lambda tmp: torch_save_file(checkpoint, tmp))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-sync")
        self._pending.append(self._executor.submit(_publish_naming, tmp, path))

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: _PATH) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        super().teardown()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file (a teacher checkpoint: the key of its logit cache, checked before a run uses it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def intact_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint in `checkpoint_dir` that loads (last, interrupted, periodic epochNNN or best, by
    modification time); damaged ones are named in one warning line each. None when there is no checkpoint;
    a CheckpointError when every one is damaged."""
    candidates = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    damaged = []
    for path in candidates:
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s: skipped", err)
            damaged.append(path.name)
            continue
        if damaged:
            log.warning("Resuming from %s, the newest intact checkpoint (damaged: %s)", path, ", ".join(damaged))
        return path
    if damaged:
        raise CheckpointError(
            f"every checkpoint in {checkpoint_dir} is damaged ({', '.join(damaged)}): nothing to resume from; "
            f"delete them to train from the beginning in this dir, or start a new run"
        )
    return None
