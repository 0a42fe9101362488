"""The CIFAR-100 distillation benchmark (docs/benchmark.md): the references' data protocol, the sweep and its report.

- `ReferenceCIFAR100`: the split RepDistiller and mdistiller train and report on (conf/experiment/cifar100_teacher.yaml);
- `sweep_arguments`: `python train.py sweep=benchmark_cifar100 pair=[...] methods=[...] seeds=N` as pairs x methods x
  seeds (conf/sweep/benchmark_cifar100.yaml; hydra_plugins/kd_benchmark_sweeper calls it);
- `write_benchmark_report`: when the sweep ends, `benchmark.md` and `benchmark.csv` in the sweep dir, per pair and
  method: runs, best- and last-epoch test accuracy (mean ± std over seeds), the published number
  (kd_lightning/benchmark_cifar100_published.yaml, with its sources), Δ, and each teacher's file and sha256.
  Again by hand: `python -m kd_lightning.benchmark <sweep dir>`.
"""

import csv
import io
import json
import logging
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd_lightning.checkpoints import atomic_write_text
from kd_lightning.config import CONF_DIR
from kd_lightning.data.cifar import CIFAR100DataModule, IndexedSubset
from kd_lightning.report import job_dirs, job_settings

log = logging.getLogger(__name__)

PUBLISHED_FILE = Path(__file__).with_name("benchmark_cifar100_published.yaml")
EXPERIMENT_PREFIX = "cifar100_"  # experiment=cifar100_<method>
# The methods of the benchmark sweep and the published tables. crd joins when its method is registered
# (kd_lightning/methods) and conf/experiment/cifar100_crd.yaml exists: then `methods=[...,crd]` runs it, and its
# published column is already in the data file.
METHODS = ("kd", "dkd", "fitnet", "at", "rkd")


class ReferenceCIFAR100(CIFAR100DataModule):
    """CIFAR-100 split as RepDistiller and mdistiller use it: all 50,000 training images train (randomly cropped
    and flipped), and the 10,000 test images are evaluated after every epoch, as the validation split; the
    references report the best epoch's test accuracy. `train_val_split` is not used."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        train_file = self.splits["train"].dataset
        everything = range(len(train_file))
        self.train_set = IndexedSubset(train_file, everything, self.train_transform)
        self.splits["train"] = IndexedSubset(train_file, everything, self.eval_transform)
        self.splits["val"] = self.splits["test"]
        self.train_val_split = (1.0, 0.0)  # as recorded in cache identities: no held-out training images


# ---- the sweep: pairs x methods x seeds ---------------------------------------------------------------------
def _values(argument: str) -> list[str]:
    """The values of one `key=value` override: `[a,b]`, `a,b` and `a` all name a list of values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_overrides([argument])[0]
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    value = override.value()
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def pair_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "pair").glob("*.yaml"))


def method_names() -> list[str]:
    """The methods with a benchmark experiment, conf/experiment/cifar100_<method>.yaml."""
    return sorted(p.stem[len(EXPERIMENT_PREFIX):] for p in (CONF_DIR / "experiment").glob(f"{EXPERIMENT_PREFIX}*.yaml")
                  if p.stem != f"{EXPERIMENT_PREFIX}teacher")


def sweep_arguments(config: DictConfig, arguments: list[str]) -> list[str]:
    """The overrides of the benchmark sweep: `pair=[...]` (default: the sweep config's `pairs`), `methods=[...]`
    (default `methods`) and `seeds=N` (default `seeds`; seeds 1..N) become the sweeps `pair=...`,
    `experiment=cifar100_<method>,...` and `seed=1,...,N`, pairs outermost (the first job of a pair trains its
    teacher, the others reuse it from the cache); every other argument passes through. A bad value raises a
    one-line ConfigError."""
    from kd_lightning.errors import ConfigError

    given: dict[str, list[str]] = {}
    rest = []
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+")
        if key in ("pair", "pairs", "methods", "seeds") and "=" in argument:
            given["pair" if key == "pairs" else key] = _values(argument)
        else:
            rest.append(argument)
    pairs = given.get("pair") or [str(p) for p in config.pairs]
    methods = given.get("methods") or [str(m) for m in config.methods]
    seeds_value = given.get("seeds") or [str(config.seeds)]
    if unknown := [p for p in pairs if p not in pair_names()]:
        raise ConfigError(f"pair={unknown[0]} is not accepted: one of {', '.join(pair_names())} (conf/pair/)")
    if unknown := [m for m in methods if m not in method_names()]:
        raise ConfigError(f"methods: {unknown[0]} is not accepted: one of {', '.join(method_names())} "
                          f"(conf/experiment/{EXPERIMENT_PREFIX}<method>.yaml)")
    if len(seeds_value) != 1 or not seeds_value[0].isdigit() or int(seeds_value[0]) < 1:
        raise ConfigError(f"seeds={','.join(seeds_value)} is not accepted: the number of seeds per cell, an integer >= 1 "
                          "(seeds=3 runs seeds 1, 2, 3)")
    seeds = range(1, int(seeds_value[0]) + 1)
    return [f"pair={','.join(pairs)}", f"experiment={','.join(EXPERIMENT_PREFIX + m for m in methods)}",
            f"seed={','.join(map(str, seeds))}", *rest]


# ---- the report -----------------------------------------------------------------------------------------------
REPORT_COLUMNS = ["pair", "method", "runs", "best_mean", "best_std", "last_mean", "last_std", "published", "delta",
                  "teacher_acc", "teacher_sha256"]


def published() -> dict[str, Any]:
    """The published numbers (%), their sources: kd_lightning/benchmark_cifar100_published.yaml."""
    return yaml.safe_load(PUBLISHED_FILE.read_text())


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of the benchmark sweep: pair, method, seed, status, best- and last-epoch test accuracy (%),
    the teacher's test accuracy and the sha256 of its file, from each job's records."""
    rows = []
    for job in job_dirs(sweep_dir):
        config = job_settings(job)
        pair = (config.get("benchmark") or {}).get("pair")
        row: dict[str, Any] = {"job": int(job.name), "pair": pair, "method": config.get("distill", {}).get("method"),
                               "seed": config.get("seed"), "status": "unfinished", "error": None}
        if (job / "metrics.json").is_file():
            m = json.loads((job / "metrics.json").read_text())
            percent = {k: 100 * m[k] if isinstance(m.get(k), (int, float)) else None
                       for k in ("test/acc", "last/test/acc", "test/teacher_acc")}
            row.update(status="done", best=percent["test/acc"], last=percent["last/test/acc"],
                       teacher_acc=percent["test/teacher_acc"], teacher_sha256=m.get("teacher_sha256"),
                       teacher_file=m.get("teacher_file"))
        elif (job / "failed.json").is_file():
            row.update(status="failed", error=json.loads((job / "failed.json").read_text()).get("error"))
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_runs(rows: list[dict[str, Any]], numbers: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (pair, method) in run order: runs done, best/last mean and std over seeds, published, delta = best mean -
    published (both best-epoch numbers), the teacher's accuracy and the sha256 of its file (one per pair)."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        cells[(row["pair"], row["method"])].append(row)
    summary = []
    for (pair, method), runs in cells.items():
        done = [r for r in runs if r["status"] == "done"]
        best_mean, best_std = _mean_std([r["best"] for r in done if r["best"] is not None])
        last_mean, last_std = _mean_std([r["last"] for r in done if r["last"] is not None])
        reference = (numbers.get("pairs", {}).get(pair) or {}).get(method)
        shas = sorted({r["teacher_sha256"] for r in done if r.get("teacher_sha256")})
        summary.append({
            "pair": pair, "method": method, "runs": len(done), "best_mean": best_mean, "best_std": best_std,
            "last_mean": last_mean, "last_std": last_std, "published": reference,
            "delta": best_mean - reference if best_mean is not None and reference is not None else None,
            "teacher_acc": _mean_std([r["teacher_acc"] for r in done if r.get("teacher_acc") is not None])[0],
            "teacher_sha256": ",".join(shas) or None,
        })
    return summary


def _pm(mean: float | None, std: float | None, runs: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if runs == 1 else f"{mean:.2f} ± {std:.2f}"


def benchmark_markdown(rows: list[dict[str, Any]], numbers: dict[str, Any]) -> str:
    summary = summarize_runs(rows, numbers)
    lines = ["# CIFAR-100 benchmark", "",
             "| pair | method | runs | best epoch (%) | last epoch (%) | published (%) | Δ |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for e in summary:
        published_cell = "-" if e["published"] is None else f"{e['published']:.2f}"
        delta = "-" if e["delta"] is None else f"{e['delta']:+.2f}"
        lines.append(f"| {e['pair']} | {e['method']} | {e['runs']} | {_pm(e['best_mean'], e['best_std'], e['runs'])} | "
                     f"{_pm(e['last_mean'], e['last_std'], e['runs'])} | {published_cell} | {delta} |")
    lines += ["", "Top-1 test accuracy, mean ± std over seeds (one run: its value). Best epoch: the epoch of highest "
              "test accuracy, as the references report; last epoch: after the last epoch. Published: the references' "
              "best-epoch numbers; Δ = best-epoch mean − published.",
              "Sources: " + "; ".join(f"{k}: {v}" for k, v in numbers.get("sources", {}).items())
              + " (kd_lightning/benchmark_cifar100_published.yaml).", "", "Teachers (the file each pair's students learned from):", ""]
    teachers: dict[str, set[tuple]] = defaultdict(set)
    for r in rows:
        if r["status"] == "done":
            teachers[r["pair"]].add((r.get("teacher_file"), r.get("teacher_sha256")))
    for e in summary:
        if e["pair"] in teachers:
            acc = "-" if e["teacher_acc"] is None else f"{e['teacher_acc']:.2f}%"
            for file, sha in sorted(teachers.pop(e["pair"]), key=str):
                lines.append(f"- {e['pair']}: `{file}` sha256 `{sha}`, test accuracy {acc}")
    problems = [r for r in rows if r["status"] != "done"]
    lines += ["", f"{len(rows) - len(problems)} of {len(rows)} jobs done."]
    lines += [f"- job {r['job']} ({r['pair']}, {r['method']}, seed {r['seed']}) {r['status']}: {r['error'] or 'no result yet'}"
              for r in problems]
    return "\n".join(lines) + "\n"


def write_benchmark_report(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """benchmark.md and benchmark.csv in the sweep dir; returns the table's rows."""
    sweep_dir = Path(sweep_dir)
    numbers = published()
    rows = load_runs(sweep_dir)
    summary = summarize_runs(rows, numbers)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=REPORT_COLUMNS)
    writer.writeheader()
    writer.writerows(summary)
    atomic_write_text(sweep_dir / "benchmark.csv", table.getvalue())
    markdown = benchmark_markdown(rows, numbers)
    atomic_write_text(sweep_dir / "benchmark.md", markdown)
    log.info("Benchmark report %s:\n%s", sweep_dir / "benchmark.md", markdown)
    return summary


class BenchmarkReport(Callback):
    """Hydra callback of sweep=benchmark_cifar100: the benchmark report when the multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and job_dirs(sweep_dir):
            write_benchmark_report(sweep_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m kd_lightning.benchmark <benchmark sweep dir>")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_benchmark_report(sys.argv[1])
