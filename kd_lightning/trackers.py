"""Experiment trackers beside TensorBoard: `logger=csv|mlflow|wandb|aim|many` (conf/logger/, docs/trackers.md).

Each is a Lightning logger (Lightning's own CSVLogger, MLFlowLogger and WandbLogger; Aim through its SDK), so it
gets every metric Lightning logs (per step and per epoch, the test metrics at the best checkpoint). On top, each
records what TensorBoard gets from this project:

- names: a run lives in the experiment (MLflow experiment, W&B group, Aim experiment) named by its parent dir
  relative to `paths.log_dir`: single runs in `train/runs`, the jobs of one sweep together in
  `train/multiruns/<sweep>`. A sweep job is named by its settings (Hydra's `override_dirname`, read from its
  `.hydra/hydra.yaml`, so the batched launcher's jobs get theirs too), a single run by its run dir's name;
- params: the short settings of TensorBoard's HParams tab, and the whole resolved config under `config/`, with
  the command that reproduces the run, the git commit of the code and the run's `tags`;
- files: when the run ends (`finish_run`), its metrics.json, MODEL_CARD.md, card.png and .hydra/config.yaml;
  when a multirun ends (`LogSweepReport`, a Hydra callback), the sweep report in a run named `sweep report`.

Defaults work offline and start nothing: MLflow writes a SQLite store under `logs/mlflow/`, W&B runs offline
(set `WANDB_MODE=online` or `logger.wandb.offline=false` to upload), Aim writes a repo under `logs/aim/`.
Without the package a tracker needs, `check_loggers` stops the run before anything trains, naming what to install.
"""

import importlib.util
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger as _CSVLogger
from pytorch_lightning.loggers import Logger
from pytorch_lightning.loggers import MLFlowLogger as _MLFlowLogger
from pytorch_lightning.loggers import WandbLogger as _WandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from kd_lightning.config import saved_run_config
from kd_lightning.errors import ConfigError
from kd_lightning.summary import run_identity

log = logging.getLogger(__name__)
logging.getLogger("aim").setLevel(logging.WARNING)  # Aim logs each run's status reporter thread at INFO

RUN_FILES = ("metrics.json", "MODEL_CARD.md", "card.png", ".hydra/config.yaml")  # a run's files, when present
SWEEP_FILES = ("results.csv", "results.md", "heatmap.png", "curves.png")  # kd_lightning/report.py
SWEEP_REPORT_RUN = "sweep report"
INSTALL = "pip install 'kd-lightning[trackers]'"


# ---- what a run is called, and what it records ---------------------------------------------------------------
def run_names(run_dir: str | Path, log_dir: str | Path | None = None) -> tuple[str, str]:
    """(experiment, run name) of the run in `run_dir`: the experiment is the run's parent dir relative to `log_dir`
    (`train/runs`, `train/multiruns/<sweep>`), or that dir's name elsewhere; a sweep job is named by its settings
    (Hydra's override_dirname), any other run by its dir's name."""
    run_dir = Path(run_dir).resolve()
    parent = run_dir.parent
    try:
        experiment = parent.relative_to(Path(log_dir).resolve()).as_posix() if log_dir else parent.name
    except ValueError:
        experiment = parent.name
    name = run_dir.name
    record = run_dir / ".hydra" / "hydra.yaml"
    if record.is_file():
        hydra = OmegaConf.load(record).hydra
        if str(OmegaConf.select(hydra, "mode", default="")).endswith("MULTIRUN"):
            name = OmegaConf.select(hydra, "job.override_dirname", default=None) or name
    return experiment, name


def run_params(run_dir: Path | None) -> dict[str, Any]:
    """The run's resolved config (from its `.hydra/config.yaml`) under `config`, the command that reproduces it and
    the git commit of the code; {} when the dir holds no config."""
    if run_dir is None or not (run_dir / ".hydra" / "config.yaml").is_file():
        return {}
    cfg = saved_run_config(run_dir)
    return {"config": OmegaConf.to_container(cfg, resolve=True), **run_identity(cfg, run_dir)}


def run_files(run_dir: Path | None) -> list[Path]:
    return [run_dir / name for name in RUN_FILES if run_dir and (run_dir / name).is_file()]


class _Tracker:
    """What this project adds to a tracker's Lightning logger: the run's config logged once, before its first
    metrics (a run that fails later still has it), and `close`: the run's files, then the tracker's run ended."""

    run_dir: Path | None = None
    _config_logged = False

    def _log_run_config(self) -> None:
        if self._config_logged or self.run_dir is None:
            return
        self._config_logged = True
        if params := run_params(self.run_dir):
            tags = params["config"].get("tags") or []
            self._record_config(params, [str(t) for t in tags])

    def _record_config(self, params: dict[str, Any], tags: list[str]) -> None:
        raise NotImplementedError

    def close(self, status: str = "success") -> None:
        """Log the run's files, then end the tracker's run (a sweep runs its jobs one after another in a process)."""


def finish_run(loggers: Iterable[Logger], run_dir: str | Path, status: str = "success") -> None:
    """At the end of a run: the trackers log the run's files and end their runs; every logger is finalized."""
    for lg in loggers:
        if isinstance(lg, _Tracker):
            lg.close(status)
        lg.finalize(status)


def check_loggers(cfg: DictConfig) -> None:
    """Stop before anything trains when a configured logger's package is missing, naming what to install."""
    for key, node in (cfg.get("logger") or {}).items():
        target = str(node.get("_target_", "")) if node is not None else ""
        cls = globals().get(target.rsplit(".", 1)[-1]) if target.startswith(__name__ + ".") else None
        package = getattr(cls, "package", None)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logger.{key} needs the {package} package, which is not installed: {INSTALL} "
                              f"(or pip install {package})")


# ---- the trackers --------------------------------------------------------------------------------------------
class CSVLogger(_Tracker, _CSVLogger):
    """Lightning's CSVLogger (metrics.csv; hparams.yaml with the settings and the resolved config)."""

    def __init__(self, save_dir: str, run_dir: str | None = None, name: str = "", version: str = "") -> None:
        super().__init__(save_dir=save_dir, name=name, version=version)
        self.run_dir = Path(run_dir) if run_dir else None

    def _record_config(self, params: dict[str, Any], tags: list[str]) -> None:
        _CSVLogger.log_hyperparams(self, {**params, "tags": tags})

    @rank_zero_only
    def log_hyperparams(self, params: Any = None, metrics: Mapping[str, float] | None = None) -> None:
        self._log_run_config()
        super().log_hyperparams(params)
        if metrics:
            self.log_metrics(dict(metrics))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._log_run_config()
        super().log_metrics(metrics, step)

    @rank_zero_only
    def close(self, status: str = "success") -> None:
        self.save()  # the run's files are beside metrics.csv already


class MLFlowLogger(_Tracker, _MLFlowLogger):
    """Lightning's MLFlowLogger: a local SQLite store by default (conf/logger/mlflow.yaml), named as above."""

    package = "mlflow"

    def __init__(self, tracking_uri: str, run_dir: str | None = None, log_dir: str | None = None,
                 experiment_name: str | None = None, run_name: str | None = None,
                 artifact_location: str | None = None, **kwargs: Any) -> None:
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(f"logger=mlflow needs the mlflow package, which is not installed: {INSTALL}")
        self.run_dir = Path(run_dir) if run_dir else None
        experiment, name = run_names(run_dir, log_dir) if run_dir else ("default", None)
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(experiment_name=experiment_name or experiment, run_name=run_name or name,
                         tracking_uri=tracking_uri, artifact_location=artifact_location, **kwargs)

    def _record_config(self, params: dict[str, Any], tags: list[str]) -> None:
        _MLFlowLogger.log_hyperparams(self, params)  # flattened: config/model/_target_, config/distill/T, ...
        # Whole, where params stop at 250 characters: the commit and the command in MLflow's own tags (the
        # command is the run's description in the UI).
        if params.get("git_commit"):
            self.experiment.set_tag(self.run_id, "mlflow.source.git.commit", params["git_commit"])
        if params.get("command"):
            self.experiment.set_tag(self.run_id, "mlflow.note.content", f"`{params['command']}`")
        for tag in tags:
            self.experiment.set_tag(self.run_id, tag, "true")

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: Mapping[str, float] | None = None) -> None:
        self._log_run_config()
        super().log_hyperparams(params)
        if metrics:
            self.log_metrics(dict(metrics))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._log_run_config()
        super().log_metrics(metrics, step)

    @rank_zero_only
    def close(self, status: str = "success") -> None:
        if not self._initialized:
            return
        for path in run_files(self.run_dir):
            self.experiment.log_artifact(self.run_id, str(path))

    @staticmethod
    def log_sweep_report(node: DictConfig, sweep_dir: Path, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(node.tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=node.get("artifact_location"))
        run = client.create_run(experiment_id, run_name=SWEEP_REPORT_RUN)
        for name in SWEEP_FILES:
            if (sweep_dir / name).is_file():
                client.log_artifact(run.info.run_id, str(sweep_dir / name))
        client.set_terminated(run.info.run_id)


class WandbLogger(_Tracker, _WandbLogger):
    """Lightning's WandbLogger, offline unless `offline=false` or WANDB_MODE=online (upload an offline run later
    with `wandb sync <run dir>/wandb/offline-run-*`); the run's files go to the W&B run's files."""

    package = "wandb"

    def __init__(self, save_dir: str, run_dir: str | None = None, log_dir: str | None = None,
                 project: str = "kd-lightning", group: str | None = None, name: str | None = None,
                 offline: bool | None = None, **kwargs: Any) -> None:
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(f"logger=wandb needs the wandb package, which is not installed: {INSTALL}")
        import wandb

        if wandb.run is not None:  # a run left open by a failed job of the same sweep process
            wandb.run.finish(exit_code=1)
        self.run_dir = Path(run_dir) if run_dir else None
        experiment, run_name = run_names(run_dir, log_dir) if run_dir else (None, None)
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "offline") != "online"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(save_dir=save_dir, project=project, group=group or experiment, name=name or run_name,
                         offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # passed on as None, wandb warns that it has no effect
            self._wandb_init.pop("anonymous", None)

    def _record_config(self, params: dict[str, Any], tags: list[str]) -> None:
        self.experiment.config.update(params, allow_val_change=True)
        if tags:
            self.experiment.tags = tuple(tags)

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: Mapping[str, float] | None = None) -> None:
        self._log_run_config()
        super().log_hyperparams(params)
        if metrics:
            self.experiment.summary.update(dict(metrics))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._log_run_config()
        super().log_metrics(metrics, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "success" and self._experiment is not None:  # Lightning's call on an exception
            self._experiment.finish(exit_code=1)

    @rank_zero_only
    def close(self, status: str = "success") -> None:
        if self._experiment is None:
            return
        _save_files(self._experiment, run_files(self.run_dir), self.run_dir)
        self._experiment.finish(exit_code=0 if status == "success" else 1)

    @staticmethod
    def log_sweep_report(node: DictConfig, sweep_dir: Path, experiment: str) -> None:
        import wandb

        offline = node.get("offline")
        offline = os.environ.get("WANDB_MODE", "offline") != "online" if offline is None else offline
        run = wandb.init(project=node.get("project", "kd-lightning"), group=experiment, name=SWEEP_REPORT_RUN,
                         job_type="report", dir=str(sweep_dir), mode="offline" if offline else "online")
        _save_files(run, [sweep_dir / n for n in SWEEP_FILES if (sweep_dir / n).is_file()], sweep_dir)
        run.finish()


def _save_files(run: Any, files: list[Path], base: Path | None) -> None:
    """Copy files into a W&B run's files dir (as wandb.save does, without its symlinks), to be uploaded with it."""
    for path in files:
        target = Path(run.dir) / path.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        run.save(str(target), base_path=run.dir, policy="end")


class AimLogger(_Tracker, Logger):
    """A Lightning logger writing to an Aim repo through Aim's SDK (`aim up --repo logs/aim` shows it). Metrics
    keep their names (train/loss, val/acc, ...); the settings are the run's `hparams`; files are Aim artifacts."""

    package = "aim"

    def __init__(self, repo: str, run_dir: str | None = None, log_dir: str | None = None,
                 experiment: str | None = None, run_name: str | None = None,
                 artifacts_uri: str | None = None, system_tracking_interval: int | None = None,
                 capture_terminal_logs: bool = False) -> None:
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(f"logger=aim needs the aim package, which is not installed: {INSTALL}")
        super().__init__()
        self.repo = repo
        self.run_dir = Path(run_dir) if run_dir else None
        names = run_names(run_dir, log_dir) if run_dir else ("default", None)
        self._experiment_name, self._run_name = experiment or names[0], run_name or names[1]
        self.artifacts_uri = artifacts_uri
        self.system_tracking_interval, self.capture_terminal_logs = system_tracking_interval, capture_terminal_logs
        self._run: Any = None

    @property
    def name(self) -> str:
        return self._experiment_name

    @property
    def version(self) -> str | None:
        return self._run.hash if self._run is not None else None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._run is None:
            self._run = self.open_run(self.repo, self._experiment_name, self._run_name, self.artifacts_uri,
                                      self.system_tracking_interval, self.capture_terminal_logs)
        return self._run

    @staticmethod
    def open_run(repo: str, experiment: str, name: str | None, artifacts_uri: str | None,
                 system_tracking_interval: int | None = None, capture_terminal_logs: bool = False) -> Any:
        from aim import Run

        Path(repo).mkdir(parents=True, exist_ok=True)
        run = Run(repo=repo, experiment=experiment, system_tracking_interval=system_tracking_interval,
                  log_system_params=False, capture_terminal_logs=capture_terminal_logs)
        if name:
            run.name = name
        if artifacts_uri:
            run.set_artifacts_uri(artifacts_uri)
        return run

    def _record_config(self, params: dict[str, Any], tags: list[str]) -> None:
        for key, value in params.items():
            self.experiment.set(("hparams", key), value, strict=False)
        for tag in tags:
            self.experiment.add_tag(tag)

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: Mapping[str, float] | None = None) -> None:
        self._log_run_config()
        for key, value in dict(params or {}).items():
            self.experiment.set(("hparams", key), value, strict=False)
        if metrics:
            self.log_metrics(dict(metrics))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._log_run_config()
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        for key, value in metrics.items():
            self.experiment.track(float(value), name=key, step=step, epoch=None if epoch is None else int(epoch))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status != "success":
            self.close(status)

    @rank_zero_only
    def close(self, status: str = "success") -> None:
        if self._run is None:
            return
        if self.artifacts_uri:
            for path in run_files(self.run_dir):
                self._run.log_artifact(str(path), name=path.relative_to(self.run_dir).as_posix())
        self._run.close()
        self._run = None

    @staticmethod
    def log_sweep_report(node: DictConfig, sweep_dir: Path, experiment: str) -> None:
        run = AimLogger.open_run(node.repo, experiment, SWEEP_REPORT_RUN, node.get("artifacts_uri"))
        for name in SWEEP_FILES:
            if (sweep_dir / name).is_file() and node.get("artifacts_uri"):
                run.log_artifact(str(sweep_dir / name), name=name)
        run.close()


# ---- the sweep report ------------------------------------------------------------------------------------------
class LogSweepReport(Callback):
    """Hydra callback (conf/hydra/default.yaml, called after the report is written): each tracker of the multirun's
    config gets the sweep report (results.csv, results.md, heatmap.png, curves.png) as the files of a run named
    `sweep report` in the sweep's experiment."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not (sweep_dir / "results.csv").is_file():
            return
        log_dir = OmegaConf.select(config, "paths.log_dir", default=None)
        experiment = run_names(sweep_dir / "job", log_dir)[0]  # the experiment its jobs are in
        for key, node in (config.get("logger") or {}).items():
            target = str(node.get("_target_", "")) if node is not None else ""
            cls = globals().get(target.rsplit(".", 1)[-1]) if target.startswith(__name__ + ".") else None
            if cls is None or not hasattr(cls, "log_sweep_report"):
                continue
            settings = OmegaConf.create({k: OmegaConf.select(node, k, throw_on_resolution_failure=False)
                                         for k in node if k not in ("run_dir", "save_dir")})
            try:
                cls.log_sweep_report(settings, sweep_dir, experiment)
            except Exception as err:  # noqa: BLE001 - the sweep's results are on disk; the tracker copy is extra
                log.error("logger.%s: the sweep report was not logged (%s: %s)", key, type(err).__name__, err)
