"""DistillModule: the teacher stays frozen and in eval mode, is never optimized, and is not checkpointed."""

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning.checkpoints import load_net
from kd_lightning.data import MNISTDataModule
from kd_lightning.models import MLP, MnistCNN
from kd_lightning.modules import ClassifierModule, DistillModule


def fit(module: pl.LightningModule, tmp_path: Path, epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=6, limit_val_batches=1, limit_test_batches=1,
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    datamodule = MNISTDataModule(data_dir=tmp_path / "data", download=False)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_teacher_frozen_in_eval_mode_and_not_optimized(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = MnistCNN()  # has dropout: in train mode its outputs would be random
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes: list[bool] = []
    teacher.register_forward_hook(lambda m, i, o: modes.append(any(sub.training for sub in m.modules())))
    student = MLP([16])
    student_before = [p.clone() for p in student.parameters()]
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1), group="hard_soft")

    trainer = fit(module, tmp_path)

    assert len(modes) >= 2 * 6 and not any(modes), "the teacher ran in train mode"
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights changed"
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters()}
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters())), "student did not train"
    module.train()  # Lightning calls this at every epoch start; the teacher must not follow
    assert not teacher.training and student.training


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_student_checkpoint_holds_no_teacher_and_evaluates_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DistillModule(MLP([16]), MnistCNN(), optimizer=partial(torch.optim.Adam, lr=1e-3), group="soft")
    module.net_config = {"_target_": "kd_lightning.models.MLP", "hidden": [16]}
    trainer = fit(module, tmp_path, epochs=1)
    path = trainer.checkpoint_callback.best_model_path
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and all(k.startswith("net.") for k in state)

    student = load_net(path)  # rebuilt from the checkpoint alone
    alone = ClassifierModule(student, optimizer=None)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(alone(x), module.eval()(x))

    # Testing the best checkpoint through the DistillModule restores the student and keeps the teacher.
    teacher_state = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    metrics = trainer.test(module, datamodule=trainer.datamodule, ckpt_path=path, verbose=False)[0]
    assert {"test/acc", "test/loss", "test/agreement", "test/soft_loss", "test/teacher_acc"} <= set(metrics)
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in teacher_state.items())


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_hard_group_never_runs_the_teacher_in_training(tmp_path: Path) -> None:
    calls = {"train": 0}
    teacher = MnistCNN()
    module = DistillModule(MLP([16]), teacher, optimizer=partial(torch.optim.Adam, lr=1e-3), group="hard")
    teacher.register_forward_hook(lambda m, i, o: calls.__setitem__("train", calls["train"] + module.training))
    fit(module, tmp_path, epochs=1)
    assert calls["train"] == 0
