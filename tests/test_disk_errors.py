"""Issue 25 items 6 and 7: a full disk (ENOSPC), a read-only file system (EROFS) or a missing permission (EACCES)
anywhere in a run prints one line naming the path, what happened and what to do, and exits non-zero; a sweep
records what it can and still writes its report. The errno is injected (monkeypatch), nothing is mounted; the
entry point runs in this process as `python train.py ...` would."""

import errno
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import kd_lightning.checkpoints as checkpoints
import kd_lightning.sweeps as sweeps
from kd_lightning.checkpoints import atomic_torch_save, atomic_write_text
from kd_lightning.errors import ConfigError, disk_error_message, exit_on_error
from kd_lightning.sweeps import job_dirs, job_number
from kd_lightning.train import main

ERRNOS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
          errno.EACCES: "permission denied"}


def quick(tmp_path: Path, *overrides: str) -> list[str]:
    """A 2-batch, 1-epoch run of a small MLP, offline, inside tmp_path."""
    return [
        f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}", "data.download=false",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "model=mlp_784_20_20_10",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2", *overrides,
    ]


def run_train(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """`python train.py *args` in this process: its exit code and everything it printed."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exited:
        main()
        sys.exit(0)
    out = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1 if code else 0), out.out + out.err


def one_line(output: str, *needles: str) -> str:
    """The single line of `output` holding every needle; no traceback anywhere."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, (needles, output[-3000:])
    return lines[0]


# ---- the translation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", sorted(ERRNOS))
def test_each_errno_is_one_line_with_path_cause_and_remedy(code: int) -> None:
    message = disk_error_message(OSError(code, os.strerror(code), "/x/run/metrics.json"))
    assert message is not None and "\n" not in message
    assert message.startswith("/x/run/metrics.json: " + ERRNOS[code]) and os.strerror(code) in message
    assert "paths.log_dir" in message  # what to do
    wrapped = RuntimeError("during the fit")
    wrapped.__cause__ = OSError(code, os.strerror(code), "/x/a.ckpt")
    assert disk_error_message(wrapped).startswith("/x/a.ckpt: ")  # found under what raised it
    assert disk_error_message(OSError(errno.ENOENT, "No such file", "/x")) is None
    assert disk_error_message(ValueError("no")) is None


def test_exit_on_error_prints_the_line_and_exits_1(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test")
    full = OSError(errno.ENOSPC, "No space left on device", "/x/last.ckpt")
    with pytest.raises(SystemExit) as exited, exit_on_error(log):
        raise full
    assert exited.value.code == 1
    assert [r.getMessage() for r in caplog.records] == [disk_error_message(full)]
    assert caplog.records[0].getMessage().startswith("/x/last.ckpt: the disk is full (No space left on device); ")
    with pytest.raises(FileNotFoundError), exit_on_error(log):  # any other error is raised as it was
        raise FileNotFoundError(errno.ENOENT, "No such file", "/x")


def test_a_log_file_on_a_full_disk_prints_no_traceback_per_record(capsys: pytest.CaptureFixture) -> None:
    """Hydra logs each run to <run dir>/train.log: on a full disk every record's write fails, which Python's
    logging reports with a traceback each ("--- Logging error ---"). Inside exit_on_error it does not."""

    class FullDisk:
        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    log = logging.getLogger("test.full_disk_log")
    handler = logging.StreamHandler(FullDisk())
    log.addHandler(handler)
    try:
        with exit_on_error(log):
            log.warning("a record that cannot be written")
        assert "Traceback" not in capsys.readouterr().err
        assert logging.raiseExceptions  # restored
        log.warning("outside, logging reports it as always")
        assert "--- Logging error ---" in capsys.readouterr().err
    finally:
        log.removeHandler(handler)


class RefusesInConstructor:
    def __init__(self, what: str) -> None:
        if what == "config":
            raise ConfigError("data.thing='x' is not accepted: one of a, b")
        raise OSError(errno.EROFS, "Read-only file system", "/data/cache")


@pytest.mark.parametrize(("what", "code", "line"), [
    ("config", 2, "data.thing='x' is not accepted: one of a, b"),
    ("disk", 1, "/data/cache: the file system is read-only (Read-only file system); "),
])
def test_instantiation_exception_around_our_error_prints_its_line(what: str, code: int, line: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Hydra wraps an error raised in a constructor into InstantiationException ("Error in call to target
    ..." with the key): the user sees our line, as if it had not been wrapped."""
    with pytest.raises(InstantiationException) as wrapped:
        instantiate({"_target_": f"{__name__}.RefusesInConstructor", "what": what})
    with pytest.raises(SystemExit) as exited, exit_on_error(logging.getLogger("test")):
        raise wrapped.value
    assert exited.value.code == code
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith(line)


# ---- the writers name the file they could not write -------------------------------------------------------
def test_a_full_disk_during_torch_save_is_an_oserror_naming_the_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save to a path on a full disk raises RuntimeError("[enforce fail at inline_container.cc:672]
    unexpected pos ..."), which names neither the cause nor the file. Through a Python file, ENOSPC stays
    an OSError; the writer names the destination. /dev/full answers every write with ENOSPC."""
    real_open = open
    monkeypatch.setattr(checkpoints, "open", lambda path, mode="r", *a, **k: real_open(
        "/dev/full" if "w" in mode else path, mode, *a, **k), raising=False)
    target = tmp_path / "logits.pt"
    with pytest.raises(OSError) as err:
        atomic_torch_save({"x": torch.zeros(100_000)}, target)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert disk_error_message(err.value).startswith(f"{target}: the disk is full")
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_refused_temporary_file_is_named_by_its_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkstemp = tempfile.mkstemp

    def read_only(*args: object, dir: str, prefix: str, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / f"{prefix}abc.tmp"))

    monkeypatch.setattr(checkpoints.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as err:
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert err.value.filename == str(tmp_path / "metrics.json") and err.value.errno == errno.EROFS
    monkeypatch.setattr(checkpoints.tempfile, "mkstemp", real_mkstemp)


# ---- a whole run: one line, exit 1 ----------------------------------------------------------------------------
def failing_checkpoint_save(code: int, where):
    """checkpoints.torch_save_file raising `code` for files whose path `where` accepts (as the disk would: no
    file name)."""
    real = checkpoints.torch_save_file

    def save(obj: object, path: str | Path) -> None:
        if where(str(path)):
            raise OSError(code, os.strerror(code))
        real(obj, path)

    return save


@pytest.mark.slow  # a small run in-process
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_checkpoint_write_on_a_full_disk_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture, code: int) -> None:
    """Issue 25.6: a run on a full disk ended with `RuntimeError: [enforce fail at inline_container.cc:672]`
    after 88 lines and never said the disk was full."""
    monkeypatch.setattr(checkpoints, "torch_save_file", failing_checkpoint_save(code, lambda p: "checkpoints" in p))
    rc, output = run_train(monkeypatch, capsys, "experiment=teacher", *quick(tmp_path),
                           f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 1
    line = one_line(output, ERRNOS[code])
    assert f"{tmp_path / 'run' / 'checkpoints'}/" in line and ".ckpt: " in line and "paths.log_dir" in line


@pytest.mark.slow  # a small run in-process
def test_a_read_only_metrics_json_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: object, dir: str, prefix: str, **kwargs: object) -> tuple[int, str]:
        if prefix.startswith(".metrics.json."):
            raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / f"{prefix}x.tmp"))
        return real_mkstemp(*args, dir=dir, prefix=prefix, **kwargs)

    monkeypatch.setattr(checkpoints.tempfile, "mkstemp", mkstemp)
    rc, output = run_train(monkeypatch, capsys, "experiment=teacher", *quick(tmp_path),
                           f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 1
    one_line(output, f"{tmp_path / 'run' / 'metrics.json'}: the file system is read-only")


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_a_read_only_teacher_cache_lock_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Issue 25.7: the teacher cache's lock on a read-only cache dir gave three tracebacks."""
    real_open = os.open

    def os_open(path, flags, *args, **kwargs):
        if str(path).endswith(".lock") and "teachers" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    rc, output = run_train(monkeypatch, capsys, "experiment=soft", *quick(tmp_path),
                           f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 1
    line = one_line(output, "the file system is read-only")
    assert f"{tmp_path / 'logs' / 'teachers'}/" in line and ".lock: " in line
    assert not any(p.is_dir() for p in (tmp_path / "logs" / "teachers").iterdir())  # no entry was made


@pytest.mark.parametrize("multirun", [False, True])
@pytest.mark.parametrize("code", [errno.EROFS, *(pytest.param(c, marks=pytest.mark.slow) for c in (errno.EACCES, errno.ENOSPC))])
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_hydras_run_dir_creation_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture, code: int, multirun: bool) -> None:
    """Issue 25.7: Hydra creating the run dir on a read-only file system printed its traceback."""
    real_mkdir = Path.mkdir
    refused = tmp_path / "ro"

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == refused or refused in self.parents:
            raise OSError(code, os.strerror(code), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    where = ["-m", f"hydra.sweep.dir={refused / 'sweep'}", "seed=1,2"] if multirun else \
        [f"hydra.run.dir={refused / 'run'}"]
    rc, output = run_train(monkeypatch, capsys, *sorted(where, key=lambda a: a != "-m"), "experiment=teacher",
                           *quick(tmp_path))
    assert rc == 1, output
    line = one_line(output, ERRNOS[code])
    assert str(refused) in line
    assert not (tmp_path / "logs").exists()  # nothing ran


# ---- a sweep records what it can and still writes its report --------------------------------------------------
@pytest.mark.slow  # a 2-job sweep in-process
def test_a_sweep_on_a_full_disk_records_what_it_can_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """Issue 25.6: in a 3-job sweep on a full disk, writing job 2's failed.json itself hit ENOSPC and the sweep
    aborted with three chained tracebacks and no report. Here job 1's checkpoint and then its failed.json hit
    ENOSPC: the sweep goes on, the report is written from job 0, and the command exits 1 naming job 1."""
    sweep_dir = tmp_path / "sweep"

    def in_job_1(path: str) -> bool:
        return path.startswith(f"{sweep_dir}/") and job_number(Path(Path(path).relative_to(sweep_dir).parts[0])) == 1

    monkeypatch.setattr(checkpoints, "torch_save_file", failing_checkpoint_save(errno.ENOSPC, in_job_1))
    real_write_json = sweeps.write_json

    def write_json(path: Path, record: dict) -> None:
        if path.name == "failed.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_json(path, record)

    monkeypatch.setattr(sweeps, "write_json", write_json)
    rc, output = run_train(monkeypatch, capsys, "-m", "experiment=teacher", *quick(tmp_path),
                           f"hydra.sweep.dir={sweep_dir}", "seed=1,2")
    assert rc == 1
    assert "Traceback" not in output
    job0, job1 = job_dirs(sweep_dir)
    one_line(output, f"Job {job1.name} failed", f"{job1}/checkpoints/", "the disk is full")
    one_line(output, f"Job {job1.name}: failed.json could not be written", "the disk is full")
    one_line(output, "have no record", str(job1))
    assert json.loads((job0 / "metrics.json").read_text())["config"]["seed"] == 1
    assert not (job1 / "metrics.json").exists() and not (job1 / "failed.json").exists()
    assert (sweep_dir / "results.csv").is_file()  # the report, from job 0
    assert sweeps.UNRECORDED == [str(job1)]


def test_a_batched_jobs_failure_on_a_full_disk_costs_its_record_not_the_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The batched launcher records a job's failure as run_sweep_job does: a failed.json the disk refuses is
    named in one line and the job counted as unrecorded; nothing is raised into the launcher."""
    from kd_lightning.batched.stacked import Job, record_failure
    from kd_lightning.config import compose_train_config

    job = Job(compose_train_config(["experiment=soft", f"paths.output_dir={tmp_path / 'job'}"]), ["distill.T=2"])

    def full(path: Path, record: dict) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(sweeps, "write_json", full)
    monkeypatch.setattr(sweeps, "UNRECORDED", [])
    record_failure(job, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "job" / "last.ckpt")))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == (f"Job job failed ({tmp_path / 'job' / 'last.ckpt'}: the disk is full (No space left on "
                           f"device); free space there (or point paths.log_dir / paths.cache_dir at another disk) "
                           f"and run again: resume=<run dir> continues a run from its last checkpoint, a sweep "
                           f"command run again with hydra.sweep.dir=<sweep dir> continues the sweep); the sweep goes on")
    assert messages[1].startswith(f"Job job: failed.json could not be written, so the job counts as unfinished "
                                  f"({tmp_path / 'job' / 'failed.json'}: the disk is full")
    assert sweeps.UNRECORDED == [str(tmp_path / "job")]
