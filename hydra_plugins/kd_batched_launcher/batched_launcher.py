"""`hydra/launcher=batched`: the jobs of a sweep that differ only in seed, distill.T, distill.alpha and
distill.group train together as one stacked model (kd_lightning/batched/); other jobs run one by one as with
the basic launcher. Hydra finds launchers in the `hydra_plugins` namespace package only, hence this file.
"""

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class BatchedLauncher(Launcher):
    def __init__(self, memory_budget_mb: float = 2048, max_group_size: int = 64) -> None:
        self.memory_budget_mb, self.max_group_size = memory_budget_mb, max_group_size
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # The sweeper shares this context: the configs it composes to check a batch are kept for launch()
        if not isinstance(hydra_context.config_loader, KeptComposes):
            hydra_context.config_loader = KeptComposes(hydra_context.config_loader)
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _job_config(self, idx: int, overrides: Sequence[str]) -> DictConfig:
        cfg = self.hydra_context.config_loader.take(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = cfg.hydra.job.num = idx
        return cfg

    def _run(self, cfg: DictConfig, task_function: TaskFunction) -> JobReturn:
        """Hydra's own job set-up (job dir, .hydra/ config files, logging), then `task_function`."""
        ret = run_job(hydra_context=self.hydra_context, task_function=task_function, config=cfg,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kd_lightning.batched.groups import group_key, not_batchable
        from kd_lightning.batched.stacked import memory_per_student, remove_unusable_states, run_group

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        remove_unusable_states(Path(str(self.config.hydra.sweep.dir)) / ".batched")
        configs = [self._job_config(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        groups: dict[str, list[int]] = {}
        for i, cfg in enumerate(configs):
            groups.setdefault(group_key(cfg), []).append(i)
        log.info("Launching %d jobs as %d group(s)", len(configs), len(groups))
        returns: dict[int, JobReturn] = {}
        for members in groups.values():
            reason = not_batchable(configs[members[0]]) if len(members) > 1 else "a group of one"
            if reason is None:
                cap = int(self.memory_budget_mb * 2**20 // memory_per_student(configs[members[0]]))
                cap = max(1, min(self.max_group_size, cap))
                for start in range(0, len(members), cap):
                    returns.update(self._launch_batched(configs, members[start:start + cap], run_group))
            else:
                log.info("Jobs %s run one by one (%s)", [configs[i].hydra.job.num for i in members], reason)
                for i in members:
                    log.info("\t#%d : %s", configs[i].hydra.job.num, " ".join(filter_overrides(job_overrides[i])))
                    returns[i] = self._run(configs[i], self.task_function)
        return [returns[i] for i in range(len(configs))]

    def _launch_batched(self, configs: list[DictConfig], members: list[int], run_group: Any) -> dict[int, JobReturn]:
        """Set up each job as Hydra does (its dir and .hydra/), then train those not finished yet together. The
        group's saved state is keyed on all its members, finished or not: a rerun after a kill in the output
        phase finds it whichever jobs wrote their outputs, and resumes the others from it."""
        from kd_lightning.batched.stacked import state_key

        key = state_key([[configs[i].hydra.job.num, list(configs[i].hydra.overrides.task)] for i in members])
        returns = {i: self._run(configs[i], prepare_job) for i in members}
        prepared = {i: ret._return_value if ret.status == JobStatus.COMPLETED else None for i, ret in returns.items()}
        jobs = {i: value for i, value in prepared.items() if isinstance(value, PreparedJob)}
        for i, value in prepared.items():
            if isinstance(value, Finished):
                returns[i].return_value = value.metric
        ordinary = [i for i, job in jobs.items() if job.resume_ordinary]
        for i in ordinary:  # a job with checkpoints of an ordinary run: it resumes from them as the basic launcher does
            returns[i] = self._run(configs[i], self.task_function)
        batched = [i for i in jobs if i not in ordinary]
        if batched:
            log.info("Training jobs %s together (%s)", [configs[i].hydra.job.num for i in batched],
                     f"{torch.get_num_threads()} threads")
            results = run_group([jobs[i].job for i in batched], state_key=key)
            for i, result in zip(batched, results):
                metric = configs[i].get("optimized_metric")
                returns[i].return_value = None if result is None else result.get(metric)
                returns[i].status = JobStatus.COMPLETED
        return returns


class KeptComposes:
    """Hydra's config loader, keeping each config it composes for a sweep job until the launcher takes it.

    Hydra's sweepers compose every job's config once to check the batch (`validate_batch_is_legal`) and the
    launcher composes it again from the same master config and overrides (~0.16 s a job on a 2-core CPU): the
    launcher takes the first one instead. A config not composed before is composed on `take`."""

    def __init__(self, loader: Any) -> None:
        self._loader, self._kept = loader, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        cfg = self._loader.load_sweep_config(master_config, sweep_overrides)
        self._kept[(id(master_config), tuple(sweep_overrides))] = copy.deepcopy(cfg)  # as composed, whatever the caller does
        return cfg

    def take(self, master_config: DictConfig, sweep_overrides: Sequence[str]) -> DictConfig:
        kept = self._kept.pop((id(master_config), tuple(sweep_overrides)), None)
        return kept if kept is not None else self._loader.load_sweep_config(master_config, list(sweep_overrides))


class Finished:
    """A job that finished in an earlier run of this sweep (its metrics.json has the same overrides)."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric


class PreparedJob:
    def __init__(self, job: Any, resume_ordinary: bool) -> None:
        self.job, self.resume_ordinary = job, resume_ordinary


def written_batched(checkpoint: Path) -> bool:
    from kd_lightning.checkpoints import load_checkpoint
    from kd_lightning.errors import CheckpointError

    try:
        return bool(load_checkpoint(checkpoint).get("batched"))
    except CheckpointError:
        return False  # a damaged checkpoint: the ordinary resume names it and falls back


def prepare_job(cfg: DictConfig) -> Finished | PreparedJob | None:
    """The task function of a batched job, run by Hydra inside the job's context: the same skip / refuse rules
    as kd_lightning.sweeps.run_sweep_job, and the job's config with its output dir fixed."""
    from kd_lightning.batched.stacked import Job
    from kd_lightning.sweeps import earlier_outcome, write_json

    job_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    outcome = earlier_outcome(job_dir, overrides, OmegaConf.to_container(cfg, resolve=True), cfg.optimized_metric)
    if outcome is not None:
        kind, metric = outcome
        return Finished(metric) if kind == "finished" else None
    record = job_dir / "job.json"
    checkpoints = job_dir / "checkpoints"
    last = checkpoints / "last.ckpt"
    ordinary = (checkpoints / "interrupted.ckpt").is_file() or (last.is_file() and not written_batched(last))
    cfg = cfg.copy()  # trained after this job's Hydra context is gone: fix what it would resolve from there
    cfg.paths.output_dir = str(job_dir)
    if "trainer_choice" in cfg:
        cfg.trainer_choice = HydraConfig.get().runtime.choices.trainer
    job = Job(cfg, overrides)
    write_json(record, {"overrides": overrides, "config": job.settings()})
    return PreparedJob(job, ordinary)
