"""The cluster launch modes, run for real on the CPU with gloo and 2 ranks (docs/cluster.md):
torchrun, SLURM-style (two processes with the variables srun sets), pre-emption and requeue, a submitit sweep;
and the teacher provided by one rank. Each is compared with the same run as `trainer=ddp_cpu` (spawned ranks)
or as a single process."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import ROOT, job_dir, run_script, subprocess_env
from kd_lightning.config import compose_train_config
from kd_lightning.data import MNISTDataModule
from kd_lightning.models import MnistCNN
from kd_lightning.train import train

# The student of experiment=soft for 2 short epochs; its teacher 1 short epoch (trained once, then cached).
STUDENT = ["experiment=soft", "seed=1", "trainer.max_epochs=2", "+trainer.limit_train_batches=8",
           "teacher.overrides=['trainer.max_epochs=1','+trainer.limit_train_batches=10']"]
METRICS = ("test/acc", "test/loss", "val/acc", "val/loss", "best_val_loss", "best_epoch", "epochs")


def offline(tmp: Path) -> list[str]:
    return [f"paths.log_dir={tmp / 'logs'}", f"paths.data_dir={tmp / 'data'}", "data.download=false",
            "trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may run inside a SLURM job), plus `extra`."""
    launcher_vars = ("SLURM_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                     "MASTER_ADDR", "MASTER_PORT", "PL_")
    return subprocess_env({k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}, **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun(ntasks: int, *overrides: str, nodes: int = 1, job_id: str = "4242", path: str | None = None,
         expect_rc: int = 0) -> list[str]:
    """Start `ntasks` processes of train.py the way `srun` does for `--nodes=<nodes> --ntasks-per-node=<ntasks/nodes>`
    (here all on this machine): the variables Lightning's SLURMEnvironment reads
    (lightning_fabric/plugins/environments/slurm.py). The processes' outputs, by rank."""
    port, per_node = str(free_port()), ntasks // nodes
    procs = []
    for rank in range(ntasks):
        env = clean_env(SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NNODES=str(nodes),
                        SLURM_NODEID=str(rank // per_node), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                        SLURM_JOB_ID=job_id, SLURM_JOB_NAME="kd-test", SLURM_NODELIST="localhost",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if path:
            env["PATH"] = path
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == expect_rc, f"rank {rank} exited with {p.returncode}, not {expect_rc}:\n{out[-6000:]}"
    return outputs


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_result(run: dict, reference: dict) -> None:
    for key in METRICS:
        assert run[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


def assert_written_once(run_dir: Path) -> None:
    """One set of checkpoints, and TensorBoard event files of one process, in the shared run dir (rank 0's)."""
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "epoch001.ckpt", "last.ckpt"]
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # events.out.tfevents.<t>.<host>.<pid>.<n>
    assert events and len({e.name.split(".")[-2] for e in events}) == 1


def assert_two_ranks(rank0: str, rank1: str) -> None:
    """Each process was its own rank of one world of 2 (Lightning's announcement), and rank 0 alone printed
    the run summary."""
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in rank0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1
    assert "Run summary" in rank0 and "Run summary" not in rank1


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def torchrun_run(work: Path) -> tuple[Path, list[str]]:
    """torchrun, 2 ranks, into an empty teacher cache: rank 0 trains the teacher, rank 1 waits for it. Runs first,
    so the other runs of this module use the same cached teacher. The run dir and each rank's output."""
    run_dir, logs = work / "torchrun", work / "torchrun_logs"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--log-dir={logs}",
         "--redirects=3", str(ROOT / "train.py"), *STUDENT, *offline(work), "trainer=ddp_cpu_external",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    outputs = [
        "".join(f.read_text() for f in sorted(logs.glob(f"**/attempt_0/{rank}/*.log"))) for rank in (0, 1)
    ]
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{proc.stderr[-3000:]}\n{outputs}"
    return run_dir, outputs


@pytest.fixture(scope="module")
def reference(work: Path, torchrun_run: tuple[Path, list[str]]) -> dict:
    """The same run with trainer=ddp_cpu: 2 ranks spawned by the job itself, from the teacher the torchrun run got
    (the trainer a teacher is trained with is part of its cache key: ddp_cpu alone would train its own)."""
    teacher = metrics_of(torchrun_run[0])["teacher_ckpt"]
    run_script("train.py", *STUDENT, *offline(work), "trainer=ddp_cpu", f"teacher.ckpt_path={teacher}",
               f"hydra.run.dir={work / 'reference'}")
    return metrics_of(work / "reference")


@pytest.mark.slow
def test_torchrun_matches_ddp_cpu(work: Path, torchrun_run: tuple[Path, list[str]], reference: dict) -> None:
    run_dir, (rank0, rank1) = torchrun_run
    assert_same_result(metrics_of(run_dir), reference)
    assert_written_once(run_dir)
    assert_two_ranks(rank0, rank1)
    assert "Training the teacher" in rank0 and "Training the teacher" not in rank1
    assert "Waiting for rank 0 to provide the teacher" in rank1
    # The teacher was trained once, in rank 0's process alone: a single-device fit in the cache.
    (teacher_run,) = (work / "logs" / "teachers").glob("*/run")
    teacher_trainer = OmegaConf.load(teacher_run / ".hydra" / "config.yaml").trainer
    assert (teacher_trainer.devices, teacher_trainer.strategy, teacher_trainer.num_nodes) == (1, "auto", 1)


@pytest.mark.slow
def test_multi_node_slurm_job_shares_one_run_dir_and_matches_ddp_cpu(work: Path, reference: dict) -> None:
    """Two nodes of one task each (srun --nodes=2 --ntasks-per-node=1), as `trainer.num_nodes=2`: the
    multi-node command of docs/cluster.md in CPU form. (1 node x 2 tasks: the pre-emption test below.)"""
    run_dir = work / "slurm"
    rank0, rank1 = srun(2, *STUDENT, *offline(work), "trainer=ddp_cpu_external", "trainer.devices=1",
                        "trainer.num_nodes=2", f"hydra.run.dir={run_dir}", nodes=2)
    assert_same_result(metrics_of(run_dir), reference)
    assert_written_once(run_dir)
    assert [p.name for p in work.iterdir() if p.name.startswith("slurm")] == ["slurm"]  # no per-rank run dirs
    assert "Using the cached teacher" in rank0 and "Waiting for rank 0 to provide the teacher" not in rank0
    assert_two_ranks(rank0, rank1)


@pytest.mark.slow
def test_preempted_slurm_job_saves_and_the_requeued_job_finishes_the_same(work: Path, reference: dict) -> None:
    """SIGUSR1 (`#SBATCH --signal=USR1@<s>`): Lightning's SLURM plugin saves hpc_ckpt_1.ckpt and calls
    `scontrol requeue <job id>`; SLURM then stops the job with SIGTERM: checkpoints/interrupted.ckpt. The
    requeued job (same command, same SLURM_JOB_ID, so the same run dir) ends with the uninterrupted result."""
    run_dir, bin_dir = work / "preempted", work / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records the requeue request in place of SLURM's
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {work / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    command = [*STUDENT, *offline(work), "trainer=ddp_cpu_external", f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    signals = ["+callbacks.usr1._target_=probes.SendSignalAt", "+callbacks.usr1.step=5",
               "+callbacks.usr1.signal=SIGUSR1", "+callbacks.term._target_=probes.SendSignalAt",
               "+callbacks.term.step=11", "+callbacks.term.signal=SIGTERM"]
    outputs = srun(2, *command, *signals, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", expect_rc=143)
    assert (work / "scontrol.log").read_text() == "requeue 4242\n"  # once, by rank 0
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    interrupted = torch.load(run_dir / "checkpoints" / "interrupted.ckpt", weights_only=False)
    assert interrupted["global_step"] == 11
    assert not (run_dir / "metrics.json").exists()
    assert f"resume with: python train.py resume={run_dir}" in outputs[0]

    srun(2, *command)  # the requeued job: the same command (without the test's signals)
    assert_same_result(metrics_of(run_dir), reference)


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path: Path) -> None:
    """hydra/launcher=submitit_local: the jobs pickled, run in their own processes and collected by submitit
    (the SLURM launcher's path minus sbatch); a failing job is recorded and reported as with the basic launcher."""
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "hydra/launcher=submitit_local", *STUDENT, "distill.T=2.0,-1",
                      *offline(tmp_path), f"hydra.sweep.dir={sweep}", expect_rc=1)  # as the basic launcher: 1 failed
    assert f"1 job(s) of the sweep failed; their errors: {job_dir(sweep, 1) / 'failed.json'}" in proc.stderr + proc.stdout
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit's own job folders
    # Named by their settings in submitit's own processes too (the sweep's command line from its sweep.json).
    assert [job_dir(sweep, j).name for j in (0, 1)] == ["000_distill.T:2.0", "001_distill.T:-1"]
    failure = json.loads((job_dir(sweep, 1) / "failed.json").read_text())
    assert failure["error"].startswith("ConfigError: distill.T=-1 is not accepted: a temperature in [0.05, 100]")
    assert "- job 1 failed: ConfigError: distill.T=-1" in (sweep / "results.md").read_text()
    # Job 0 equals the same run in one process here.
    single = train(compose_train_config([*STUDENT, "distill.T=2.0", *offline(tmp_path),
                                         f"paths.output_dir={tmp_path / 'single'}"]))
    assert_same_result(metrics_of(job_dir(sweep, 0)), single)


# --- The teacher under many ranks and many jobs ------------------------------------------------------------------

def provide_as(rank: int, run_id: str, work: Path, delay: float) -> None:
    """One process of a launch: provide the teacher as torchrun's rank `rank` of job `run_id` would, with the
    teacher's training replaced by a stand-in that records who trained it and writes a checkpoint."""
    import kd_lightning.train
    from kd_lightning.checkpoints import load_net
    from kd_lightning.teacher import compose_teacher_config

    time.sleep(delay)
    os.environ.update(TORCHELASTIC_RUN_ID=run_id, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")

    def stand_in(tcfg: object) -> dict:
        with open(work / "trainings.log", "a") as f:
            f.write(f"{run_id} rank {rank} devices={tcfg.trainer.devices} strategy={tcfg.trainer.strategy}\n")
        time.sleep(1.0)  # long enough for the others to arrive while it trains
        torch.manual_seed(10 * rank + ord(run_id[-1]))  # each stand-in its own weights: "the same weights" can fail
        path = work / f"best-{run_id}-{rank}.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in MnistCNN().state_dict().items()}}, path)
        return {"best_ckpt": str(path)}

    kd_lightning.train.train = stand_in  # ensure_teacher trains the teacher through the module's `train`
    cfg = compose_train_config(["experiment=soft", "trainer=ddp_cpu_external", *offline(work),
                                f"paths.output_dir={work / run_id}"])
    datamodule = MNISTDataModule(data_dir=str(work / "data"), download=False)  # the offline sample
    datamodule.prepare_data()
    datamodule.setup("fit")
    teacher = load_net(kd_lightning.train.ensure_teacher(cfg, datamodule), compose_teacher_config(cfg).model)
    torch.save({k: v for k, v in teacher.state_dict().items()}, work / f"loaded-{run_id}-{rank}.pt")


@pytest.mark.slow  # 4 spawned processes: about a minute on 2 busy cores
def test_one_rank_of_one_job_trains_the_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs of two ranks each start together on an empty cache, ranks > 0 first: one rank 0 trains the
    teacher, in one process on one device; every other process waits and loads the same weights."""
    env = subprocess_env()  # the spawned processes read the MNIST sample as train.py runs of the tests do
    for var in ("PYTHONPATH", "KD_TEST_MNIST_SAMPLE"):
        monkeypatch.setenv(var, env[var])
    context = multiprocessing.get_context("spawn")  # not fork: a fork after torch's thread pools started can hang
    starts = [(1, "jobA", 0.0), (1, "jobB", 0.0), (0, "jobA", 0.5), (0, "jobB", 0.5)]
    procs = [context.Process(target=provide_as, args=(rank, job, tmp_path, delay)) for rank, job, delay in starts]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    (training,) = (tmp_path / "trainings.log").read_text().splitlines()
    assert training.endswith("rank 0 devices=1 strategy=auto")
    loaded = [torch.load(tmp_path / f"loaded-{job}-{rank}.pt") for rank, job, _ in starts]
    for weights in loaded[1:]:
        assert all(torch.equal(weights[k], loaded[0][k]) for k in loaded[0])


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_spawned_ranks_number_themselves_inside_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer=ddp_cpu/ddp_spawn start their ranks themselves: inside a SLURM task (or under torchrun) they must
    not take their rank from SLURM_PROCID (RANK): every spawned process would claim the task's rank."""
    from lightning_fabric.plugins.environments import LightningEnvironment

    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_JOB_NAME", "kd-test")
    for choice in ("ddp_cpu", "ddp_spawn"):
        cfg = compose_train_config([f"trainer={choice}", "trainer.accelerator=cpu", "trainer.devices=2",
                                    "++trainer.precision=32-true", f"paths.output_dir={tmp_path}"])
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer.strategy.cluster_environment, LightningEnvironment), choice
    # Without the plugin Lightning would take SLURM's: the hazard the configs avoid.
    cfg = compose_train_config(["trainer=ddp_cpu_external", f"paths.output_dir={tmp_path}"])
    assert type(instantiate(cfg.trainer, logger=False).strategy.cluster_environment).__name__ == "SLURMEnvironment"


def test_ddp_in_a_sweep_job_not_started_by_torchrun_or_srun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning would re-run such a job's command line (the whole -m sweep) once per further device."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from kd_lightning.config import CONF_DIR
    from kd_lightning.errors import ConfigError
    from kd_lightning.launch import check_launch

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["trainer=ddp_cpu_external", "hydra.mode=MULTIRUN"], return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"^trainer.strategy=ddp is not accepted in a -m sweep .*trainer=ddp_spawn"):
        check_launch(cfg.trainer)
    check_launch(OmegaConf.merge(cfg.trainer, {"devices": 1}))  # one device: nothing to re-run
    monkeypatch.setenv("SLURM_NTASKS", "2")  # started by srun (a submitit SLURM job): the ranks exist already
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    check_launch(cfg.trainer)


def test_slurm_launcher_asks_for_the_preemption_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sbatch script submitit writes from conf/hydra/launcher/slurm.yaml (as the Hydra plugin passes it):
    one task per GPU, the requeue signal before the time limit, requeues after time-outs allowed."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from kd_lightning.config import CONF_DIR

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit's SLURM executor checks that srun exists
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    # What hydra_submitit_launcher's BaseSubmititLauncher.launch does with them:
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    sbatch = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=240"):
        assert line in sbatch.splitlines()
    assert executor._executor.max_num_timeout == 3


def test_only_rank_0_of_a_torchrun_job_writes_the_sweep_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep job whose ranks torchrun/srun started: every rank runs run_sweep_job, one writes its records."""
    from kd_lightning.sweeps import write_json

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    monkeypatch.setenv("RANK", "1")
    write_json(tmp_path / "metrics.json", {"rank": 1})
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.setenv("RANK", "0")
    write_json(tmp_path / "metrics.json", {"rank": 0})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"rank": 0}
