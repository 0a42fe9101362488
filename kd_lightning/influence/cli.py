"""`python tracin.py student_run=<run dir>`: TracIn scores of a student run and its teacher run over the epochs at
which both saved a checkpoint, compared (conf/tracin.yaml). Writes to its Hydra run dir (logs/tracin/runs/<time>/):

- overlap.csv, overlap.md, overlap.png: mean top-k overlap of teacher and student (proponents, opponents, and
  train→test), with the count expected by chance, k²/N;
- summary.json: Spearman rank correlations, ms per TracIn value, the checkpoints and learning rates used;
- proponents.png (top proponents of a few test examples under both models) and self_influence.png (the
  training examples with the highest self-influence).
"""

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import matplotlib
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from torch import Tensor

from kd_lightning import config  # registers the ${kd_root:} resolver
from kd_lightning.checkpoints import load_net
from kd_lightning.data import KDDataModule
from kd_lightning.errors import ConfigError, InputError, exit_on_error
from kd_lightning.influence import compare
from kd_lightning.influence.gradients import GradientEmbedder, RandomProjection, select_parameters
from kd_lightning.influence.tracin import (
    Batches,
    TracInResult,
    common_epochs,
    cross_entropy_loss,
    tracin,
    tracin_checkpoints,
    trained_loss,
)
from kd_lightning.run_dir import teacher_ckpts_of
from kd_lightning.teacher import compute_teacher_logits, dataset_identity

log = logging.getLogger(__name__)

LOSSES = ("ce", "trained")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _positive_int_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


def validate(cfg: DictConfig) -> None:
    for key in ("n_train", "n_test"):
        if not _positive_int_or_null(cfg[key]):
            raise ConfigError(f"{key}={cfg[key]!r} is not accepted: a positive integer, or null for the whole split")
    for key in ("chunk_size", "projection_dim"):
        if not _positive_int_or_null(cfg[key]) or (key == "chunk_size" and cfg[key] is None):
            raise ConfigError(f"{key}={cfg[key]!r} is not accepted: a positive integer" +
                              (", or null" if key == "projection_dim" else ""))
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss={cfg.loss!r} is not accepted: one of {', '.join(LOSSES)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r} is not accepted: one of {', '.join(DTYPES)}")
    if not isinstance(cfg.params, ListConfig) and cfg.params not in ("all", "last", "auto"):
        raise ConfigError(f"params={cfg.params!r} is not accepted: all, last, auto or a list of layer names")
    if not cfg.top_k or not all(_positive_int_or_null(k) and k is not None for k in cfg.top_k):
        raise ConfigError(f"top_k={list(cfg.top_k or [])} is not accepted: a list of positive integers")


# ---- the two runs ------------------------------------------------------------------------------------------
def run_config(run_dir: Path) -> DictConfig:
    """The saved config of a train.py run dir, with its output dir set to that dir (outside its Hydra job)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise InputError(f"run dir {run_dir} does not exist: pass a train.py run dir (logs/train/runs/<time>)")
    if not saved.is_file():
        raise InputError(f"{run_dir} has no .hydra/config.yaml: pass a train.py run dir (logs/train/runs/<time>)")
    return config.saved_run_config(run_dir)


def teacher_ckpt_of(student_run: Path) -> Path | None:
    """The one teacher checkpoint the student's metrics.json names (None: none, or several), checked against its
    recorded sha256."""
    metrics = student_run / "metrics.json"
    if not metrics.is_file():
        return None
    teachers = teacher_ckpts_of(student_run, json.loads(metrics.read_text()))
    return teachers[0] if len(teachers) == 1 else None


def teacher_run_of(student_run: Path) -> Path:
    """The run dir of the student's teacher: `<cache>/<hash>/run` for a cached teacher.ckpt, or the run dir of a
    teacher given as `<run dir>/checkpoints/<name>.ckpt`."""
    ckpt = teacher_ckpt_of(student_run)
    if ckpt is None:
        raise InputError(f"student_run={student_run} names no teacher (no teacher_ckpt in its metrics.json): "
                         "pass teacher_run=<the teacher's run dir>")
    for candidate in (ckpt.parent / "run", ckpt.parent.parent):
        if (candidate / "checkpoints").is_dir():
            return candidate
    raise InputError(f"the run dir of the student's teacher {ckpt} was not found: pass teacher_run=<its run dir>")


def check_same_data(teacher_cfg: DictConfig, student_cfg: DictConfig, teacher_run: Path, student_run: Path) -> None:
    """Score matrices are compared index by index: both runs must have trained on the same examples."""
    if dataset_identity(teacher_cfg) != dataset_identity(student_cfg):
        raise InputError(f"teacher_run={teacher_run} and student_run={student_run} were trained on different data "
                         f"configs ({dataset_identity(teacher_cfg)} vs {dataset_identity(student_cfg)})")


# ---- the examples ------------------------------------------------------------------------------------------
def loader_batches(datamodule: KDDataModule, split: str, n: int, teacher_logits: Tensor | None = None) -> Batches:
    """The first n examples of `split` in dataset order, unaugmented; targets (labels,) or (labels, teacher logits)
    with `teacher_logits` the whole split's, row i for dataset index i."""

    def batches(chunk_size: int) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        seen = 0
        for x, y, idx in datamodule.eval_loader(split, batch_size=chunk_size):
            take = min(len(x), n - seen)
            targets = (y[:take],) if teacher_logits is None else (y[:take], teacher_logits[idx[:take]])
            yield x[:take], targets
            seen += take
            if seen >= n:
                return

    return batches


def choose_params(cfg: DictConfig, first_ckpt: Path, n_test: int) -> Any:
    """`params`, with auto resolved: all parameters when the held embeddings and a chunk's flat gradients fit
    in auto_memory_gb (float32), else the last layer."""
    if cfg.params != "auto":
        return OmegaConf.to_container(cfg.params) if isinstance(cfg.params, ListConfig) else cfg.params
    net = load_net(first_ckpt)
    embedder = GradientEmbedder(net, select_parameters(net, "all"), cross_entropy_loss, cfg.factor_linear)
    width = cfg.projection_dim or embedder.exact_width
    needed = 4 * ((n_test + cfg.chunk_size) * width + cfg.chunk_size * embedder.flat_numel)
    return "all" if needed <= cfg.auto_memory_gb * 2**30 else "last"


# ---- the analysis ------------------------------------------------------------------------------------------
def analyse(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    student_run = Path(cfg.student_run)
    student_cfg = run_config(student_run)
    teacher_run = Path(cfg.teacher_run) if cfg.teacher_run else teacher_run_of(student_run)
    teacher_cfg = run_config(teacher_run)
    check_same_data(teacher_cfg, student_cfg, teacher_run, student_run)
    epochs = common_epochs(teacher_run, student_run)

    datamodule = instantiate(student_cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    sizes = {split: datamodule.split_size(split) for split in ("train", "test")}
    n_train, n_test = min(cfg.n_train or sizes["train"], sizes["train"]), min(cfg.n_test or sizes["test"], sizes["test"])
    log.info("TracIn over epochs %s of %s (teacher) and %s (student); %d train x %d test examples of %s",
             epochs, teacher_run, student_run, n_train, n_test, datamodule.source)

    projection = RandomProjection(cfg.projection_dim, cfg.projection_seed) if cfg.projection_dim else None
    results: dict[str, TracInResult] = {}
    modes: dict[str, Any] = {}
    for model, run_dir, run_cfg in (("teacher", teacher_run, teacher_cfg), ("student", student_run, student_cfg)):
        checkpoints = tracin_checkpoints(run_dir, epochs)
        loss, needs_teacher = (cross_entropy_loss, False) if cfg.loss == "ce" else trained_loss(run_cfg)
        teacher_logits: dict[str, Tensor | None] = {"train": None, "test": None}
        if needs_teacher:
            ckpt = teacher_ckpt_of(run_dir)
            if ckpt is None:
                raise InputError(f"loss=trained: {run_dir} trained against a teacher but names no teacher_ckpt")
            teacher_net = load_net(ckpt)  # the final teacher: the soft targets the student trained on
            teacher_logits = {split: compute_teacher_logits(teacher_net, datamodule.eval_loader(split))
                              for split in teacher_logits}
        modes[model] = choose_params(cfg, checkpoints[0].path, n_test)
        results[model] = tracin(
            checkpoints,
            loader_batches(datamodule, "train", n_train, teacher_logits["train"]),
            loader_batches(datamodule, "test", n_test, teacher_logits["test"]),
            n_train, n_test,
            params=modes[model], loss=loss, chunk_size=cfg.chunk_size, projection=projection,
            factor_linear=cfg.factor_linear, dtype=DTYPES[cfg.dtype], device=cfg.device, label=model,
        )
        log.info("%s: %.1f s, %.2e ms per TracIn value (%d parameters, %d numbers per embedding)", model,
                 results[model].seconds, results[model].ms_per_value, results[model].num_params,
                 results[model].embedding_width)

    teacher, student = results["teacher"].scores.cpu(), results["student"].scores.cpu()
    rows = compare.overlap_rows(teacher, student, list(cfg.top_k))
    per_query = compare.spearman_per_row(teacher.T, student.T)
    summary = {
        "teacher_run": str(teacher_run), "student_run": str(student_run), "data_source": datamodule.source,
        "epochs": epochs, "n_train": n_train, "n_test": n_test, "loss": cfg.loss,
        "projection_dim": cfg.projection_dim,
        "spearman": {
            "per_test_example_mean": per_query.mean().item(),
            "per_test_example_median": per_query.median().item(),
            "all_scores": compare.spearman(teacher, student),
            "self_influence": compare.spearman(results["teacher"].self_influence.cpu(),
                                               results["student"].self_influence.cpu()),
        },
        "models": {
            model: {
                "params": modes[model], "num_params": r.num_params, "embedding_width": r.embedding_width,
                "checkpoints": [{"epoch": c.epoch, "lr": c.lr, "path": str(c.path)} for c in r.checkpoints],
                "seconds": r.seconds, "ms_per_value": r.ms_per_value,
            }
            for model, r in results.items()
        },
    }

    output_dir.mkdir(parents=True, exist_ok=True)
    compare.write_overlap_csv(rows, output_dir / "overlap.csv")
    markdown = compare.overlap_markdown(rows)
    (output_dir / "overlap.md").write_text(markdown)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    compare.plot_overlap(rows, output_dir / "overlap.png")
    images = compare.ImageSource(datamodule)
    queries = list(range(min(cfg.n_query_images, n_test)))
    compare.plot_proponents(images, queries, {"teacher": teacher, "student": student}, min(cfg.n_proponents_shown, n_train),
                            output_dir / "proponents.png")
    compare.plot_self_influence(images, {m: r.self_influence.cpu() for m, r in results.items()},
                                min(cfg.n_self_influence_shown, n_train), output_dir / "self_influence.png")
    if cfg.save_scores:
        for model, r in results.items():
            torch.save({"scores": r.scores.cpu(), "self_influence": r.self_influence.cpu()},
                       output_dir / f"scores_{model}.pt")

    print(markdown)  # plain: rich would wrap the table's lines
    console = Console()
    console.print(f"Spearman (teacher vs student): {json.dumps(summary['spearman'])}")
    console.print(" · ".join(f"{m}: {r.ms_per_value:.2e} ms per TracIn value ({r.seconds:.1f} s)" for m, r in results.items()))
    console.print(f"Written to {output_dir}")
    return summary


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="tracin")
def main(cfg: DictConfig) -> None:
    matplotlib.use("Agg")  # figures are written to files; never open a window
    with exit_on_error(log):
        analyse(cfg)


if __name__ == "__main__":
    main()
