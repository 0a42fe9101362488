"""TracIn: exact against a plain autograd loop, learning rates from checkpoints, chunking, projection, and
`python tracin.py` end to end on a tiny teacher and student."""

import csv
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import run_script
from kd_lightning.config import CONF_DIR
from kd_lightning.errors import ConfigError, InputError
from kd_lightning.influence import compare
from kd_lightning.influence.gradients import (
    GradientEmbedder,
    RandomProjection,
    dot,
    loop_gradients,
    select_parameters,
)
from kd_lightning.influence.tracin import (
    TracInCheckpoint,
    checkpoint_lr,
    cross_entropy_loss,
    periodic_checkpoints,
    tensor_batches,
    tracin,
)
from kd_lightning.losses import soft_group, soft_targets
from kd_lightning.models import CifarResNet

LRS = (0.5, 0.125)  # η of the two fake checkpoints


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The in-process tests use tiny tensors: a second OpenMP thread only adds spin-waiting on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_net(seed: int) -> nn.Module:
    """A conv layer (flat per-example gradients) and two Linear layers (factored), in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 3, 3)), ("relu1", nn.ReLU()), ("flatten", nn.Flatten()),
        ("hidden", nn.Linear(3 * 4 * 4, 6)), ("relu2", nn.ReLU()), ("dropout", nn.Dropout(0.5)),
        ("head", nn.Linear(6, 4)),
    ])).double()


def soft_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return soft_group(logits, soft_targets(teacher_logits, 2.0), labels, 2.0, 0.8)["loss"]


@pytest.fixture
def examples() -> dict[str, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g),
                torch.randn(n, 4, generator=g, dtype=torch.float64))

    return {"train": split(11), "test": split(7)}


def fake_checkpoints() -> tuple[list[TracInCheckpoint], dict[Path, nn.Module]]:
    nets = {Path(f"ckpt{i}"): small_net(i) for i in range(len(LRS))}
    return [TracInCheckpoint(path, i, lr) for i, (path, lr) in enumerate(zip(nets, LRS))], nets


def run_tracin(examples, params, loss=cross_entropy_loss, chunk_size=4, **kwargs):
    checkpoints, nets = fake_checkpoints()
    n_targets = 2 if loss is soft_loss else 1
    train, test = examples["train"], examples["test"]
    return tracin(checkpoints, tensor_batches(train[0], *train[1:1 + n_targets]),
                  tensor_batches(test[0], *test[1:1 + n_targets]), len(train[0]), len(test[0]), params=params,
                  loss=loss, chunk_size=chunk_size, load=nets.__getitem__, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize("loss", [cross_entropy_loss, soft_loss], ids=["ce", "soft"])
@pytest.mark.parametrize("params", ["all", ["conv", "hidden.weight", "head.bias"], "last"],
                         ids=["all", "named", "last"])
def test_scores_equal_a_plain_autograd_loop(examples, params, loss) -> None:
    result = run_tracin(examples, params, loss)
    checkpoints, nets = fake_checkpoints()
    n_targets = 2 if loss is soft_loss else 1
    expected = torch.zeros(11, 7, dtype=torch.float64)
    for ckpt in checkpoints:
        net = nets[ckpt.path]
        names = select_parameters(net, params)
        train = loop_gradients(net, names, loss, examples["train"][0], examples["train"][1:1 + n_targets])
        test = loop_gradients(net, names, loss, examples["test"][0], examples["test"][1:1 + n_targets])
        expected += ckpt.lr * train @ test.T
    assert result.param_names == names
    if params == "last":
        assert names == ["head.weight", "head.bias"]
    assert expected.abs().max() > 0
    torch.testing.assert_close(result.scores, expected, rtol=1e-6, atol=1e-12)
    self_expected = sum(ckpt.lr * loop_gradients(nets[ckpt.path], names, loss, examples["train"][0],
                                                 examples["train"][1:1 + n_targets]).square().sum(1)
                        for ckpt in checkpoints)
    torch.testing.assert_close(result.self_influence, self_expected, rtol=1e-6, atol=1e-12)


def test_factored_linear_equals_flattened_linear(examples) -> None:
    net = small_net(0)
    names = select_parameters(net, "all")
    x, y = examples["train"][:2]
    factored = GradientEmbedder(net, names, cross_entropy_loss).embed(x, (y,))
    flattened = GradientEmbedder(net, names, cross_entropy_loss, factor_linear=False).embed(x, (y,))
    assert len(factored.linear) == 2 and not flattened.linear
    assert factored.width < flattened.width
    torch.testing.assert_close(dot(factored, factored), dot(flattened, flattened), rtol=1e-10, atol=1e-14)


def test_chunk_size_does_not_change_scores(examples) -> None:
    by_chunk = [run_tracin(examples, "all", chunk_size=c) for c in (1, 3, 64)]
    for other in by_chunk[1:]:
        torch.testing.assert_close(other.scores, by_chunk[0].scores, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(other.self_influence, by_chunk[0].self_influence, rtol=1e-12, atol=1e-14)


def test_projection_error_shrinks_with_dim(examples) -> None:
    exact = run_tracin(examples, "all").scores
    errors = []
    for dim in (8, 128, 2048):
        projected = run_tracin(examples, "all", projection=RandomProjection(dim, seed=0)).scores
        errors.append(((projected - exact).norm() / exact.norm()).item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.15, errors


def test_spearman_of_ranks() -> None:
    scores = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert compare.spearman(scores, scores.exp()) == pytest.approx(1.0)  # a monotone map keeps every rank
    assert compare.spearman(scores, -scores) == pytest.approx(-1.0)
    per_row = compare.spearman_per_row(scores.T, torch.stack([scores[:, 0], -scores[:, 1], scores[:, 2] ** 3]))
    torch.testing.assert_close(per_row, torch.tensor([1.0, -1.0, 1.0]))


def test_top_k_overlap_counts_shared_columns() -> None:
    a = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    b = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]])  # top-2 {0, 2} against a's {0, 1}; bottom-2 {1, 3} vs {3, 4}
    assert compare.top_k_overlap(a, a, 2).tolist() == [2]
    assert compare.top_k_overlap(a, b, 2).tolist() == [1]
    assert compare.top_k_overlap(a, b, 2, largest=False).tolist() == [1]
    assert compare.top_k_overlap(a, b, 5).tolist() == [5]


def test_learning_rate_read_from_checkpoint_is_the_schedulers(tmp_path: Path) -> None:
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        checkpoint = {"optimizer_states": [optimizer.state_dict()], "state_dict": {}}
        assert checkpoint_lr(checkpoint, tmp_path) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-15)
    assert checkpoint_lr(checkpoint, tmp_path) == pytest.approx(0.3 * 0.5**3)


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_cifar_nets_run_through_the_gradient_code() -> None:
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    student, teacher = CifarResNet(stages=2).eval(), CifarResNet(stages=4).eval()
    for net, params in ((student, "last"), (teacher, "last"), (student, ["layer2.1", "fc"])):
        names = select_parameters(net, params)
        emb = GradientEmbedder(net, names, cross_entropy_loss).embed(x, (y,))
        reference = loop_gradients(net, names, cross_entropy_loss, x, (y,))
        torch.testing.assert_close(dot(emb, emb), reference @ reference.T, rtol=1e-4, atol=1e-6)
    assert select_parameters(teacher, "last") == ["fc.weight", "fc.bias"]


def test_bad_parameter_names_and_run_dirs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'nope' names no parameter"):
        select_parameters(small_net(0), ["nope"])
    with pytest.raises(InputError, match="does not exist"):
        periodic_checkpoints(tmp_path / "missing")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(InputError, match="no periodic checkpoints"):
        periodic_checkpoints(tmp_path / "run")


# ---- end to end ----------------------------------------------------------------------------------------------
def compose_tracin(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="tracin", overrides=list(overrides))


@pytest.mark.slow  # subprocess
def test_tracin_end_to_end_on_a_tiny_teacher_and_student(tmp_path: Path, offline_overrides: list[str]) -> None:
    run_script(
        "train.py", "experiment=soft", *offline_overrides, "trainer.max_epochs=2", "+trainer.limit_train_batches=4",
        "teacher.overrides=['trainer.max_epochs=2','+trainer.limit_train_batches=4']",
        f"hydra.run.dir={tmp_path / 'student'}",
    )
    out = tmp_path / "tracin"
    proc = run_script("tracin.py", f"student_run={tmp_path / 'student'}", "n_train=120", "n_test=40",
                      "top_k=[10,50,100,500]", *offline_overrides[:2], f"hydra.run.dir={out}")
    assert "Spearman" in proc.stdout

    rows = list(csv.DictReader(open(out / "overlap.csv")))
    assert {r["direction"] for r in rows} == {"proponents", "opponents", "train→test"}
    assert [int(r["k"]) for r in rows if r["direction"] == "proponents"] == [10, 50, 100, 120]  # 500 clipped
    assert [int(r["k"]) for r in rows if r["direction"] == "train→test"] == [10, 40]
    for r in rows:
        k, n, overlap = int(r["k"]), int(r["N"]), float(r["overlap"])
        assert 0 <= overlap <= k and float(r["chance"]) == pytest.approx(k * k / n)
        if k == n:
            assert overlap == k
    assert "| proponents | 10 | 120 |" in (out / "overlap.md").read_text()
    for png in ("overlap.png", "proponents.png", "self_influence.png"):
        assert (out / png).stat().st_size > 5_000

    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == [1] and summary["n_train"] == 120 and summary["n_test"] == 40
    assert all(-1 <= v <= 1 for v in summary["spearman"].values())
    teacher_ckpts = summary["models"]["teacher"]["checkpoints"]
    # The teacher's StepLR (lr 1.0, gamma 0.7 per epoch) has stepped after epoch 1 when epoch001.ckpt is saved.
    assert [c["lr"] for c in teacher_ckpts] == [pytest.approx(0.7**2)]
    saved = torch.load(teacher_ckpts[0]["path"], weights_only=True)
    assert teacher_ckpts[0]["lr"] == saved["lr_schedulers"][0]["_last_lr"][0]
    assert [c["lr"] for c in summary["models"]["student"]["checkpoints"]] == [pytest.approx(1e-3)]  # Adam
    for model in ("teacher", "student"):
        assert summary["models"][model]["params"] == "all" and summary["models"][model]["ms_per_value"] > 0

    # In process: the training loss (soft targets from the teacher), last layer, projected.
    from kd_lightning.influence.cli import analyse

    cfg = compose_tracin(f"student_run={tmp_path / 'student'}", "n_train=30", "n_test=10", "loss=trained",
                         "params=last", "projection_dim=32", *offline_overrides[:2],
                         f"paths.output_dir={tmp_path / 'tracin2'}")
    summary = analyse(cfg)
    assert summary["models"]["student"]["embedding_width"] == 32
    assert summary["models"]["teacher"]["num_params"] == 128 * 10 + 10

    no_checkpoints = tmp_path / "no_checkpoints"
    shutil.copytree(tmp_path / "student" / ".hydra", no_checkpoints / ".hydra")
    with pytest.raises(InputError, match=f"{no_checkpoints} has no periodic checkpoints"):
        analyse(compose_tracin(f"student_run={tmp_path / 'student'}", f"teacher_run={no_checkpoints}",
                               f"paths.output_dir={tmp_path / 'tracin3'}"))


@pytest.mark.slow  # subprocess
def test_cli_bad_input_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    proc = run_script("tracin.py", f"student_run={tmp_path}", "n_train=0", f"hydra.run.dir={tmp_path / 'out'}",
                      expect_rc=2)
    output = proc.stdout + proc.stderr
    assert "n_train=0 is not accepted: a positive integer" in output and "Traceback" not in output
    with pytest.raises(InputError, match="does not exist"):
        from kd_lightning.influence.cli import analyse

        analyse(compose_tracin(f"student_run={tmp_path / 'missing'}", f"paths.output_dir={tmp_path / 'o'}"))


def test_checkpoints_that_all_store_learning_rate_zero_are_refused_in_one_line(tmp_path: Path) -> None:
    """A 2-epoch run on a cosine schedule has one periodic checkpoint, stored after the rate reached 0: every TracIn
    score would be 0. One with a non-zero rate beside it is used as it is."""
    from kd_lightning.influence.tracin import tracin_checkpoints

    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    (tmp_path / "checkpoints").mkdir()
    for epoch in range(4):
        optimizer.step()
        scheduler.step()
        if epoch % 2 == 1:  # epoch001.ckpt (rate 0.05) and epoch003.ckpt (rate 0), as ModelCheckpoint(every 2) saves
            torch.save({"optimizer_states": [optimizer.state_dict()], "state_dict": {}},
                       tmp_path / "checkpoints" / f"epoch{epoch:03d}.ckpt")
    with pytest.raises(InputError, match=r"epochs \[3\] store learning rate 0 .* train 4 epochs or more") as err:
        tracin_checkpoints(tmp_path, [3])
    assert "\n" not in str(err.value)
    used = tracin_checkpoints(tmp_path, [1, 3])
    assert [c.lr for c in used] == [pytest.approx(0.05), 0.0]
