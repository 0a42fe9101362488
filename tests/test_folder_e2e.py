"""`python train.py experiment=folder_soft data.root=DIR` end to end on a tiny generated folder and tiny timm nets:
the teacher is fine-tuned once and cached, the student distilled, tested, its card written with class names;
its ONNX export and predict.py give the same top-1 as its checkpoint; a teacher given as a plain safetensors
file (trained elsewhere) distills the same way. The frozen-teacher guarantees hold for a timm teacher."""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import save_file

from fake_images import write_corrupt, write_image_folder
from helpers import run_script
from kd_lightning.checkpoints import load_checkpoint, net_state_dict
from kd_lightning.predict import predict

TINY = ["data.image_size=32", "data.num_workers=0", "model.name=test_efficientnet", "model.pretrained=false",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]
TINY_TEACHER = "teacher.overrides=['model.name=test_resnet','model.pretrained=false','trainer.max_epochs=2']"


def run_dir_of(stdout_and_logs: Path) -> Path:
    return next(stdout_and_logs.glob("train/runs/*/metrics.json")).parent


@pytest.mark.slow
def test_folder_soft_end_to_end_then_predict_and_an_outside_teacher(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", per_class=12, splits=("train", "test"))
    logs = tmp_path / "logs"
    proc = run_script("train.py", "experiment=folder_soft", f"data.root={root}", f"paths.log_dir={logs}", *TINY,
                      TINY_TEACHER)
    run = run_dir_of(logs)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["cat", "dog", "fox"] and metrics["data_source"].startswith("image_folder:")
    assert metrics["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert "Training the teacher (experiment=folder_teacher)" in proc.stdout + proc.stderr
    card = (run / "MODEL_CARD.md").read_text()
    assert "| 0 cat |" in card and "| 2 fox |" in card  # per-class accuracy by index and class name

    # The frozen teacher: not in the student's checkpoint, which holds the class names
    best = load_checkpoint(run / "checkpoints" / "best.ckpt")
    assert not any(k.startswith("teacher.") for k in best["state_dict"])
    assert best["ImageFolderDataModule"]["class_names"] == ["cat", "dog", "fox"]
    teacher_ckpt = Path(metrics["teacher_ckpt"])
    assert teacher_ckpt.parent.parent == logs / "teachers"

    # predict.py on the checkpoint and on its verified ONNX export: same top-1; a corrupt image is one line
    run_script("export.py", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "formats=[onnx]")
    onnx_file = run / "checkpoints" / "best.onnx"
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(meta["class_names"]) == ["cat", "dog", "fox"]
    inputs = root / "test"
    outputs = {}
    for name, ckpt in (("ckpt", run / "checkpoints" / "best.ckpt"), ("onnx", onnx_file)):
        out = tmp_path / f"{name}.csv"
        predict(OmegaConf.create({"ckpt_path": str(ckpt), "input": str(inputs), "top_k": 2, "batch_size": 4,
                                  "out": str(out), "paths": {"output_dir": str(tmp_path)}}))
        outputs[name] = list(csv.DictReader(out.open()))
    assert len(outputs["ckpt"]) == len(list(inputs.rglob("*.*g"))) == 10
    assert [r["class_1"] for r in outputs["ckpt"]] == [r["class_1"] for r in outputs["onnx"]]
    assert all(r["class_1"] in ("cat", "dog", "fox") and 0 < float(r["prob_1"]) <= 1 for r in outputs["ckpt"])
    write_corrupt(inputs / "cat" / "broken.png")
    bad = run_script("predict.py", f"ckpt_path={onnx_file}", f"input={inputs}", f"paths.log_dir={logs}", expect_rc=2)
    errors = [line for line in bad.stderr.splitlines() + bad.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 2 and "broken.png cannot be decoded as an image" in errors[0], errors
    assert "1 of 11 images could not be read" in errors[1]
    (inputs / "cat" / "broken.png").unlink()

    # A teacher trained elsewhere, given as a plain .safetensors state_dict with its net config
    outside = tmp_path / "my_teacher.safetensors"
    save_file({k: v.contiguous() for k, v in net_state_dict(load_checkpoint(teacher_ckpt)).items()}, str(outside))
    logs2 = tmp_path / "logs2"
    # data.normalization=auto: a timm teacher given as a file was fine-tuned from ImageNet weights -> imagenet
    proc2 = run_script("train.py", "experiment=folder_hard_soft", f"data.root={root}", f"paths.log_dir={logs2}", *TINY,
                       TINY_TEACHER, f"teacher.ckpt_path={outside}", "data.normalization=auto")
    assert "data.normalization=auto: imagenet (teacher test_resnet starts from ImageNet weights)" in proc2.stdout + proc2.stderr
    metrics2 = json.loads((run_dir_of(logs2) / "metrics.json").read_text())
    assert metrics2["normalization"] == metrics["normalization"]
    converted = Path(metrics2["teacher_ckpt"])  # converted once into the cache, as a trained teacher
    assert converted.parent.parent == logs2 / "teachers" / "weights" and converted.name == "teacher.ckpt"
    # the same teacher weights: the same teacher accuracy on the same test split
    assert metrics2["test/teacher_acc"] == pytest.approx(metrics["test/teacher_acc"])
    assert (run_dir_of(logs2) / "MODEL_CARD.md").is_file()


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_folder_experiments_compose(tmp_path: Path) -> None:
    from kd_lightning.config import compose_train_config

    root = write_image_folder(tmp_path / "images", per_class=4, oddities=False)
    for name in ("folder_teacher", "folder_soft", "folder_hard_soft"):
        cfg = compose_train_config([f"experiment={name}", f"data.root={root}"])
        assert cfg.model.num_classes == 3 and cfg.data.normalization == "imagenet"
        assert cfg.model.pretrained is True and cfg.module.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.distill.group == "hard_soft" and cfg.teacher.experiment == "folder_teacher"
    assert cfg.model.name == "mobilenetv3_small_100"
    sweep = compose_train_config(["experiment=folder_soft", f"data.root={root}", "sweep=t_alpha"])
    assert sweep.data.root == str(root)
    cpu_teacher = compose_train_config(["experiment=folder_teacher", f"data.root={root}"])
    assert cpu_teacher.model.name == "resnet50" and cpu_teacher.module.scheduler.T_max == 5
