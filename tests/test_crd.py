"""CRD (kd_lightning/methods/crd.py): the NCE loss and a whole step by hand, the memory bank's update rule and
momentum, the normalization constant, negatives, refusals in one line, gradients, a resumed fit continuing
with the saved bank, and the training-batch index contract every DataModule keeps (it indexes the bank)."""

import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import Tensor

import kd_lightning.methods.crd as crd_module
from helpers import QUICK_RUN, fake_cifar10_with_a_tiny_teacher, save_random_teacher
from kd_lightning.config import compose_train_config
from kd_lightning.data import KDDataModule, TensorLoader
from kd_lightning.errors import ConfigError
from kd_lightning.methods import check_method, get_method
from kd_lightning.methods.base import StepInputs
from kd_lightning.methods.crd import CRD, momentum_update, nce_loss, sample_contrast
from kd_lightning.models import MnistCNN, MnistConvStudent
from kd_lightning.modules import DistillModule


def crd_hparams(**hp: object) -> dict:
    return {**compose_train_config([]).distill.crd, **hp}


def make(**hp: object) -> CRD:
    return CRD({"group": "soft", "T": 2.0, "alpha": 0.8, "crd": crd_hparams(**hp)})


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def nce_by_hand(p: list[list[float]], n_data: int) -> float:
    k = len(p[0]) - 1
    noise, eps = k / n_data, 1e-7
    total = 0.0
    for row in p:
        total += math.log(row[0] / (row[0] + noise + eps))
        total += sum(math.log(noise / (q + noise + eps)) for q in row[1:])
    return -total / len(p)


# ---- the loss by hand -----------------------------------------------------------------------------------------
def test_nce_loss_by_hand() -> None:
    p = [[0.5, 0.1, 0.2], [2.0, 0.05, 0.7]]
    got = nce_loss(torch.tensor(p, dtype=torch.float64), n_data=10)
    assert got.item() == pytest.approx(nce_by_hand(p, 10), rel=1e-12)
    # by the formula written out for the first row alone: K/N = 0.2
    row = -(math.log(0.5 / 0.7000001) + math.log(0.2 / 0.3000001) + math.log(0.2 / 0.4000001))
    assert nce_loss(torch.tensor(p[:1], dtype=torch.float64), 10).item() == pytest.approx(row, rel=1e-12)


def fixed_crd(monkeypatch: pytest.MonkeyPatch, **hp: object) -> tuple[CRD, list[Tensor]]:
    """A CRD on 2-d embeddings, 6 examples of 3 classes, feat_dim 2, 2 negatives; the drawn rows recorded."""
    torch.manual_seed(0)
    m = make(feat_dim=2, nce_k=2, **hp)
    m.student_layers, m.teacher_layers = ["s"], ["t"]
    m.make_bank(torch.tensor([0, 0, 1, 1, 2, 2]))
    m.build({"s": torch.zeros(2, 3)}, {"t": torch.zeros(2, 2)})
    m.double()
    with torch.no_grad():
        m.embed_s.linear.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        m.embed_s.linear.bias.copy_(torch.tensor([0.5, 0.0]))
        m.embed_t.linear.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
        m.embed_t.linear.bias.zero_()
    drawn: list[Tensor] = []

    def record(*args: object) -> Tensor:
        drawn.append(sample_contrast(*args))
        return drawn[-1]

    monkeypatch.setattr(crd_module, "sample_contrast", record)
    return m, drawn


def test_a_crd_step_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    m, drawn = fixed_crd(monkeypatch)
    fs = [[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]]
    ft = [[2.0, -1.0], [0.5, 0.5]]
    idx, labels = [1, 4], [0, 2]
    old_s, old_t = m.memory_s.tolist(), m.memory_t.tolist()
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    step = StepInputs(logits, torch.tensor(labels), features={"s": torch.tensor(fs, dtype=torch.float64)},
                      teacher_features={"t": torch.tensor(ft, dtype=torch.float64)}, indices=torch.tensor(idx))
    terms = m(step)

    rows = drawn[0].tolist()
    assert [r[0] for r in rows] == idx
    v_s = [unit([f[0] + 2 * f[2] + 0.5, f[1] - f[2]]) for f in fs]
    v_t = [unit([f[0] + f[1], -f[0] + 2 * f[1]]) for f in ft]
    tau, n = 0.07, 6
    e_s = [[math.exp(dot(old_t[j], v) / tau) for j in r] for r, v in zip(rows, v_s)]  # student anchors, teacher bank
    e_t = [[math.exp(dot(old_s[j], v) / tau) for j in r] for r, v in zip(rows, v_t)]
    z_s = n * sum(map(sum, e_s)) / 6  # N * the mean over the batch's B x (K+1) scores
    z_t = n * sum(map(sum, e_t)) / 6
    crd = nce_by_hand([[x / z_s for x in r] for r in e_s], n) + nce_by_hand([[x / z_t for x in r] for r in e_t], n)
    ce = sum(-math.log(math.exp(r[y]) / sum(math.exp(v) for v in r)) for r, y in zip(logits.tolist(), labels)) / 2
    assert terms["crd_loss"].item() == pytest.approx(crd, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(ce + 0.8 * crd, rel=1e-9)
    assert m.z.tolist() == pytest.approx([z_s, z_t], rel=1e-12)
    # the banks moved towards the batch: unit(0.5 * old + 0.5 * v) at the batch's rows, the others unchanged
    for i, vs, vt in zip(idx, v_s, v_t):
        assert m.memory_s[i].tolist() == pytest.approx(unit([0.5 * a + 0.5 * b for a, b in zip(old_s[i], vs)]), rel=1e-12)
        assert m.memory_t[i].tolist() == pytest.approx(unit([0.5 * a + 0.5 * b for a, b in zip(old_t[i], vt)]), rel=1e-12)
    for i in set(range(6)) - set(idx):
        assert m.memory_s[i].tolist() == old_s[i] and m.memory_t[i].tolist() == old_t[i]


def test_normalization_constant_is_set_once_and_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ = fixed_crd(monkeypatch)
    step = StepInputs(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]),
                      features={"s": torch.randn(2, 3, dtype=torch.float64)},
                      teacher_features={"t": torch.randn(2, 2, dtype=torch.float64)}, indices=torch.tensor([0, 2]))
    m(step)
    z = m.z.clone()
    assert (z > 0).all()
    step.features["s"] = step.features["s"] * 3  # other scores: Z stays what the first batch set
    m(step)
    assert torch.equal(m.z, z)
    assert "z" in m.state_dict() and "memory_s" in m.state_dict() and "labels" not in m.state_dict()


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_momentum_update_rule(momentum: float) -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    v = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    momentum_update(bank, torch.tensor([0, 2]), v, momentum)
    assert bank[0].tolist() == pytest.approx(unit([momentum, 1 - momentum]), rel=1e-12)
    assert bank[2].tolist() == pytest.approx(unit([0.6 * momentum + (1 - momentum), 0.8 * momentum]), rel=1e-12)
    assert bank[1].tolist() == [0.0, 1.0]
    if momentum == 0:
        assert bank[0].tolist() == [0.0, 1.0]  # the new embedding replaces the row


def test_negatives_are_other_classes_without_replacement_or_uniform() -> None:
    torch.manual_seed(0)
    labels = torch.arange(40) % 4
    idx = torch.tensor([0, 5, 13, 39])
    rows = sample_contrast(idx, labels, 30, "other_classes")
    assert rows.shape == (4, 31) and rows[:, 0].tolist() == idx.tolist()
    for r, i in zip(rows.tolist(), idx.tolist()):
        assert all(labels[j] != labels[i] for j in r[1:]) and len(set(r[1:])) == 30  # all 30 of the other classes
    uniform = sample_contrast(idx, labels, 1000, "uniform")
    assert uniform[:, 0].tolist() == idx.tolist() and 0 <= uniform.min() and uniform.max() < 40
    assert (labels[uniform[:, 1:]] == labels[idx][:, None]).any()  # the same class is not excluded


def test_a_batch_of_one_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ = fixed_crd(monkeypatch)
    step = StepInputs(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([1]),
                      features={"s": torch.randn(1, 3, dtype=torch.float64)},
                      teacher_features={"t": torch.randn(1, 2, dtype=torch.float64)}, indices=torch.tensor([3]))
    before = m.memory_s[3].clone()
    terms = m(step)
    assert torch.isfinite(terms["loss"]) and terms["crd_loss"] > 0 and not torch.equal(m.memory_s[3], before)


# ---- refusals: one line naming the value and what is accepted -------------------------------------------------
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_nce_k_beyond_the_negatives_and_memory_over_the_limit_are_refused() -> None:
    labels = torch.arange(100) % 10  # 90 examples of other classes per anchor
    make(nce_k=90).make_bank(labels)
    with pytest.raises(ConfigError, match=r"^distill.crd.nce_k=91 is not accepted: the training split of 100 "
                                          r"examples has at most 90 of other classes per anchor; use nce_k <= 90"):
        make(nce_k=91).make_bank(labels)
    with pytest.raises(ConfigError, match=r"^distill.crd.nce_k=100 is not accepted: it must be below the training "
                                          r"split's 100 examples$"):
        make(nce_k=100, negatives="uniform").make_bank(labels)
    # 100 x 128 x 4 B x 2 = 0.1 MiB of banks; 64 x (16 + 1) x 128 x 4 B x 2 = 1.06 MiB of rows a step
    with pytest.raises(ConfigError, match=r"^distill.crd.max_memory_mib=1 is exceeded: the memory banks \(N 100 x "
                                          r"feat_dim 128 x 4 B x 2 = 0.1 MiB\) and one step's sampled rows \(batch 64 x "
                                          r"\(nce_k 16 \+ 1\) x 128 x 4 B x 2 = 1.1 MiB\) need 1.2 MiB"):
        make(nce_k=16, max_memory_mib=1).make_bank(labels, batch_size=64)
    make(nce_k=16, max_memory_mib=2).make_bank(labels, batch_size=64)


@pytest.mark.parametrize(("override", "message"), [
    ("distill.crd.feat_dim=0", "distill.crd.feat_dim=0 is not accepted: an integer > 0"),
    ("distill.crd.nce_k=1.5", "distill.crd.nce_k=1.5 is not accepted: an integer > 0"),
    ("distill.crd.momentum=1.0", "distill.crd.momentum=1.0 is not accepted: a number in [0, 1)"),
    ("distill.crd.negatives=same_class", "distill.crd.negatives='same_class' is not accepted: one of other_classes, uniform"),
    ("distill.crd.nce_t=0", "distill.crd.nce_t=0 is not accepted: a number > 0"),
])
def test_bad_settings_are_one_line_config_errors(override: str, message: str) -> None:
    cfg = compose_train_config(["experiment=soft", "model=mnist_conv_student", "distill.method=crd", override])
    with pytest.raises(ConfigError) as err:
        check_method(cfg)
    assert str(err.value) == message


def test_the_log_names_the_bank_memory(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="kd_lightning.methods.crd"):
        make(nce_k=16).make_bank(torch.arange(1000) % 10, batch_size=64)
    assert "memory banks N 1000 x feat_dim 128 x 4 B x 2 = 1.0 MiB" in caplog.text


# ---- gradients: student and embedding heads; never the teacher or the bank ------------------------------------
@pytest.mark.parametrize("kd_weight", [0.0, 1.0])
def test_gradients_reach_student_and_embedding_heads_only(kd_weight: float) -> None:
    torch.manual_seed(0)
    student, teacher = MnistConvStudent(), MnistCNN()
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1), method="crd",
                           method_hparams=crd_hparams(nce_k=8, kd_weight=kd_weight))
    module.method.make_bank(torch.arange(30) % 3)
    module.build_method((1, 28, 28))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 3, (6,))
    module.training_step((x, y, torch.arange(6) * 5), 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    method_params = list(module.method.parameters())
    assert len(method_params) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in method_params)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not module.method.memory_s.requires_grad and not module.method.memory_t.requires_grad
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in [*student.parameters(), *method_params]}
    assert module.method.needs_teacher_targets == (kd_weight > 0)


# ---- the index contract, and a resumed fit continuing with the saved bank --------------------------------------
class ToyData(KDDataModule):
    """64 random 28x28 images of 4 classes, kept in memory; training batches `(inputs, labels, indices)`."""

    name, num_classes, input_shape, mean, std = "toy", 4, (1, 28, 28), 0.0, 1.0
    random_augmentation, split_seed, train_val_split, source = False, 0, (1.0,), "toy"

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (64, 28, 28), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(64) % 4
        self.batch_size = batch_size

    def split_size(self, split: str) -> int:
        return 64

    def raw_images(self, split: str, indices: object) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.images[idx], self.labels[idx]

    def train_dataloader(self) -> TensorLoader:
        return TensorLoader(self.images, self.labels, self.batch_size, lambda x: x.unsqueeze(1).float() / 255,
                            shuffle=True, seed=1)


class Record(pl.Callback):
    """The banks at the fit's start, and at the first batch: its indices, the banks before and after it, and the
    student embeddings it projected."""

    def __init__(self) -> None:
        self.start: dict[str, Tensor] = {}
        self.first: dict[str, Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, module: DistillModule) -> None:
        self.start = {k: v.clone() for k, v in module.method.state_dict().items() if k in ("memory_s", "memory_t", "z")}
        module.method.embed_s.register_forward_hook(lambda m, a, out: self.first.setdefault("v_s", out.detach().clone()))

    def on_train_batch_start(self, trainer: pl.Trainer, module: DistillModule, batch: tuple, batch_idx: int) -> None:
        if batch_idx == 0 and "idx" not in self.first:
            self.first["idx"], self.first["before"] = batch[2].clone(), module.method.memory_s.clone()

    def on_train_batch_end(self, trainer: pl.Trainer, module: DistillModule, outputs: object, batch: tuple,
                           batch_idx: int) -> None:
        self.first.setdefault("after", module.method.memory_s.clone())


def fit(epochs: int, ckpt_path: Path | None, seed: int) -> tuple[DistillModule, pl.Trainer, Record]:
    pl.seed_everything(seed)
    module = DistillModule(MnistConvStudent(num_classes=4), MnistCNN(num_classes=4),
                           optimizer=partial(torch.optim.SGD, lr=0.05), method="crd",
                           method_hparams=crd_hparams(nce_k=32))
    record = Record()
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[record], accelerator="cpu")
    trainer.fit(module, datamodule=ToyData(), ckpt_path=ckpt_path)
    return module, trainer, record


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_a_resumed_fit_continues_with_the_saved_bank(tmp_path: Path) -> None:
    module, trainer, _ = fit(1, None, seed=0)
    ckpt = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved["method.memory_s"].shape == (64, 128) and (saved["method.z"] > 0).all()
    assert all(k.startswith(("net.", "method.")) for k in saved)

    _, _, record = fit(2, ckpt, seed=1)  # another seed: a fresh bank would start elsewhere
    for name in ("memory_s", "memory_t", "z"):
        assert torch.equal(record.start[name], saved[f"method.{name}"]), name
    # the first resumed step moved the saved rows: unit(0.5 * saved + 0.5 * v_s), other rows as saved
    idx, v_s = record.first["idx"], record.first["v_s"]
    expected = saved["method.memory_s"].clone()
    expected[idx] = torch.nn.functional.normalize(0.5 * expected[idx] + 0.5 * v_s, dim=1)
    torch.testing.assert_close(record.first["after"], expected)


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_training_batches_carry_split_indices_on_mnist_and_cifar(tmp_path: Path, cifar_root: Path) -> None:
    for overrides in (["experiment=soft", f"paths.data_dir={tmp_path / 'mnist'}", "data.download=false"],
                      ["experiment=cifar10_soft", f"paths.data_dir={cifar_root}", "data.download=false",
                       "data.num_workers=0", "data.batch_size=8"]):
        datamodule = instantiate(compose_train_config(overrides).data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        labels = datamodule.split_labels("train")
        assert labels.dtype == torch.long and len(labels) == datamodule.split_size("train")
        assert torch.equal(labels[:5], datamodule.raw_images("train", range(5))[1])
        seen = []
        for _, y, idx in datamodule.train_dataloader():
            assert torch.equal(labels[idx], y)  # an index names the example the batch holds
            seen.append(idx)
        seen = torch.cat(seen)
        assert 0 <= seen.min() and seen.max() < len(labels) and len(seen.unique()) == len(seen)


# ---- through train.py --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_crd_trains_through_train_py_on_mnist(tmp_path: Path) -> None:
    from kd_lightning.train import train

    torch.manual_seed(0)
    teacher = save_random_teacher(tmp_path / "t.ckpt", MnistCNN(), {"_target_": "kd_lightning.models.MnistCNN"})
    cfg = compose_train_config(["experiment=soft", "model=mnist_conv_student", "distill.method=crd",
                                "distill.crd.nce_k=1024", f"teacher.ckpt_path={teacher}", *QUICK_RUN,
                                f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / 'run'}",
                                f"paths.data_dir={tmp_path / 'data'}", "data.download=false"])
    result = train(cfg)
    assert 0 <= result["test/acc"] <= 1
    state = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    assert state["method.memory_s"].shape == (3200, 128) and (state["method.z"] > 0).all()  # the 3,200-digit sample


@pytest.mark.slow
def test_crd_trains_through_train_py_on_fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_lightning.train import train

    _, cifar = fake_cifar10_with_a_tiny_teacher(tmp_path, monkeypatch)
    cfg = compose_train_config([*cifar, "distill.method=crd", "distill.crd.nce_k=16", *QUICK_RUN,
                                f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / 'run'}"])
    result = train(cfg)
    state = torch.load(result["best_ckpt"], weights_only=True)["state_dict"]
    assert state["method.memory_t"].shape == (36, 128)  # 40 images, 0.9 of them for training
    assert get_method("crd") is CRD
    shutil.rmtree(tmp_path / "data")


def test_scores_stay_float32_under_mixed_precision() -> None:
    bank = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    anchors = bank[:2].bfloat16()  # an anchor equal to its own bank row: exp(1 / 0.07) = 1.6e6, past float16
    rows = torch.tensor([[0, 3], [1, 4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = crd_module.contrast_scores(bank, anchors, rows, 0.07)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, crd_module.contrast_scores(bank, anchors.float(), rows, 0.07))


# ---- DDP: every rank's bank takes the whole global batch ----------------------------------------------------------
def ddp_rank(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same bank and heads on both ranks
        m = make(feat_dim=3, nce_k=2)
        m.student_layers, m.teacher_layers = ["s"], ["t"]
        m.make_bank(torch.arange(12) % 3)
        m.build({"s": torch.zeros(2, 5)}, {"t": torch.zeros(2, 4)})
        torch.manual_seed(1)
        features, teacher = torch.randn(5, 5), torch.randn(5, 4)  # the same 5 examples drawn on both ranks
        take = slice(0, 3) if rank == 0 else slice(3, 5)  # batches of 3 and 2: uneven
        step = StepInputs(torch.zeros(5, 3)[take], torch.zeros(5, dtype=torch.long)[take],
                          features={"s": features[take]}, teacher_features={"t": teacher[take]},
                          indices=torch.tensor([0, 4, 8, 2, 7])[take])
        m(step)
        torch.save({"memory_s": m.memory_s, "memory_t": m.memory_t, "z": m.z}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_ddp_ranks_update_their_banks_with_the_global_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(ddp_rank, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("memory_s", "memory_t", "z"):
        torch.testing.assert_close(r0[name], r1[name])
    # one process, the whole batch of 5: the same bank rows
    torch.manual_seed(0)
    m = make(feat_dim=3, nce_k=2)
    m.student_layers, m.teacher_layers = ["s"], ["t"]
    m.make_bank(torch.arange(12) % 3)
    m.build({"s": torch.zeros(2, 5)}, {"t": torch.zeros(2, 4)})
    torch.manual_seed(1)
    features, teacher = torch.randn(5, 5), torch.randn(5, 4)
    m(StepInputs(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), features={"s": features},
                 teacher_features={"t": teacher}, indices=torch.tensor([0, 4, 8, 2, 7])))
    torch.testing.assert_close(r0["memory_s"], m.memory_s)
    torch.testing.assert_close(r0["memory_t"], m.memory_t)
