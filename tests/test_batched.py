"""The batched launcher's stacked training equals separate train.py runs, job by job (float64 on the CPU)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.func import stack_module_state

from fake_data import write_mnist
from kd_lightning.batched.groups import group_key, not_batchable
from kd_lightning.batched.stacked import Job, mlp_layers, run_group, stacked_mlp
from kd_lightning.checkpoints import load_checkpoint, load_net
from kd_lightning.config import compose_train_config
from kd_lightning.influence.tracin import checkpoint_lr
from kd_lightning.losses import kd_term, stacked_cross_entropy, stacked_kd_term, stacked_log_softmax
from kd_lightning.models import MLP, MnistCNN
from kd_lightning.train import resume_config, train

# Different seeds (initial weights, data order), loss groups, T and alpha; a large min_delta makes some stop early.
JOBS = [
    ["seed=1", "distill.group=hard_soft", "distill.T=2", "distill.alpha=0.5"],
    ["seed=2", "distill.group=soft", "distill.T=4"],
    ["seed=1", "distill.group=hard"],
    ["seed=3", "distill.group=hard_soft", "distill.T=8", "distill.alpha=0.9"],
]
EPOCHS = 5


@pytest.fixture(scope="module")
def common(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("batched")
    write_mnist(tmp / "data", n_train=320, n_test=100)
    teacher = tmp / "teacher.ckpt"
    torch.manual_seed(0)
    torch.save({"state_dict": {f"net.{k}": v for k, v in MnistCNN().state_dict().items()},
                "net_config": {"_target_": "kd_lightning.models.MnistCNN", "num_classes": 10}}, teacher)
    return [
        "experiment=hard_soft", f"paths.data_dir={tmp / 'data'}", f"paths.log_dir={tmp / 'logs'}",
        "data.download=false", "data.batch_size=32", "data.eval_batch_size=30", f"teacher.ckpt_path={teacher}",
        f"trainer.max_epochs={EPOCHS}", "+trainer.limit_train_batches=5", "+trainer.precision=64-true",
        "trainer.log_every_n_steps=3", "callbacks.early_stopping.min_delta=0.03", "callbacks.early_stopping.patience=1",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
    ]


def config(common: list[str], overrides: list[str], out: Path):
    return compose_train_config([*common, *overrides, f"paths.output_dir={out}"])


def images(run_dir: Path) -> dict[str, list[tuple[int, bytes]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    return {tag: [(e.step, e.encoded_image_string) for e in events.Images(tag)] for tag in events.Tags()["images"]}


def quality_rows(card: str) -> list[str]:
    """The model card's table rows but the checkpoint's file size (a batched checkpoint holds no RNG state)."""
    return [row for row in card.splitlines() if row.startswith("|") and not row.startswith("| checkpoint file")]


def callback_states(checkpoint: dict, run_dir: Path) -> dict[str, object]:
    """The checkpoint's callback states flattened to {"callback/key/...": value}: paths relative to the run dir,
    tensors as numbers, the Timer's seconds left out (its keys kept)."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}".replace(str(run_dir), "<run>"), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value.item()
        else:
            flat[prefix] = value.replace(str(run_dir), "<run>") if isinstance(value, str) else value

    walk("", checkpoint["callbacks"])
    return {k: (None if k.startswith("/Timer/") else v) for k, v in flat.items()}


def assert_same_callback_states(batched: dict, batched_dir: Path, alone: dict, alone_dir: Path) -> None:
    ours, theirs = callback_states(batched, batched_dir), callback_states(alone, alone_dir)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():  # scores to float32 rounding: a single run's are float32 tensors
        assert ours[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    # In the order written: a run's writer is reopened after test(), and the accumulator reads files by name.
    return {tag: [(e.step, e.value) for e in sorted(events.Scalars(tag), key=lambda e: e.wall_time)]
            for tag in events.Tags()["scalars"]}


def test_the_stacked_forward_and_kd_term_are_each_students_own() -> None:
    """stacked_mlp on one shared batch and on a batch per student, stacked_kd_term and stacked_cross_entropy
    (values and gradients), against each net and loss alone."""
    torch.manual_seed(0)
    nets = [MLP(hidden=(16, 8)).double() for _ in range(3)]
    layers = mlp_layers(stack_module_state(nets)[0])
    shared, own = torch.randn(5, 784, dtype=torch.float64), torch.randn(3, 5, 784, dtype=torch.float64)
    T = torch.tensor([1.0, 2.5, 8.0], dtype=torch.float64)
    targets = F.log_softmax(torch.randn(3, 5, 10, dtype=torch.float64) / T[:, None, None], dim=-1)
    labels = torch.randint(0, 10, (3, 5))
    logits_shared, logits_own = stacked_mlp(layers, shared), stacked_mlp(layers, own)
    kd, ce = stacked_kd_term(logits_own, targets, T), stacked_cross_entropy(logits_own, labels)
    kd_grad, ce_grad = (torch.autograd.grad(term.sum(), logits_own, retain_graph=True)[0] for term in (kd, ce))
    for i, net in enumerate(nets):
        torch.testing.assert_close(logits_shared[i], net(shared), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logits_own[i], net(own[i]), rtol=1e-12, atol=1e-12)
        alone = logits_own[i].detach().requires_grad_()
        for stacked, grad, term in ((kd, kd_grad, kd_term(alone, targets[i], float(T[i]))),
                                    (ce, ce_grad, F.cross_entropy(alone, labels[i]))):
            torch.testing.assert_close(stacked[i], term, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad[i], torch.autograd.grad(term, alone)[0], rtol=1e-12, atol=1e-12)
    extreme = torch.tensor([[[1e4, -1e4, 0.0], [-1e30, 5.0, 5.0]]], dtype=torch.float64)  # no overflow: shifted by the max
    torch.testing.assert_close(stacked_log_softmax(extreme), F.log_softmax(extreme, dim=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # several full runs in-process
@pytest.mark.parametrize("cached", ["true", "false"])  # the teacher's logits cached, or the teacher run every batch
def test_batched_jobs_equal_separate_runs(common: list[str], tmp_path: Path, cached: str) -> None:
    job_overrides = [[*o, f"distill.cache_teacher_logits={cached}"] for o in JOBS]
    alone = [train(config(common, o, tmp_path / "alone" / str(i))) for i, o in enumerate(job_overrides)]
    jobs = [Job(config(common, o, tmp_path / "batched" / str(i)), o) for i, o in enumerate(job_overrides)]
    assert len({group_key(j.cfg) for j in jobs}) == 1 and not_batchable(jobs[0].cfg) is None
    batched = run_group(jobs)

    epochs = [r["epochs"] for r in alone]
    assert min(epochs) < max(epochs), f"no job stopped before another: {epochs}"  # early stopping is exercised
    for i, (one, many) in enumerate(zip(alone, batched)):
        assert many is not None
        assert set(many) == set(one)
        for key, value in one.items():
            if isinstance(value, float) and key not in ("wall_seconds", "seconds_per_epoch"):
                assert many[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (i, key)
        assert (many["epochs"], many["best_epoch"]) == (one["epochs"], one["best_epoch"])
        run_alone, run_batched = tmp_path / "alone" / str(i), tmp_path / "batched" / str(i)
        curves_alone, curves_batched = scalars(run_alone), scalars(run_batched)
        assert set(curves_batched) == set(curves_alone)
        for tag, points in curves_alone.items():  # per-epoch val and train metrics, step losses, lr, test
            assert [s for s, _ in curves_batched[tag]] == [s for s, _ in points], (i, tag)
            assert [v for _, v in curves_batched[tag]] == pytest.approx([v for _, v in points], rel=1e-6), (i, tag)
        pictures_alone, pictures_batched = images(run_alone), images(run_batched)  # confusion matrix, dark knowledge
        assert set(pictures_alone) == set(pictures_batched) == {"test/confusion_matrix", "distill/dark_knowledge"}
        assert pictures_batched == pictures_alone, i  # the same steps and the same pixels
        cards = [(run / "MODEL_CARD.md").read_text().replace(str(run), "<run>") for run in (run_alone, run_batched)]
        assert quality_rows(cards[1]) == quality_rows(cards[0]), i
        names = sorted(p.name for p in (run_alone / "checkpoints").glob("*.ckpt"))
        assert sorted(p.name for p in (run_batched / "checkpoints").glob("*.ckpt")) == names
        for name in names:  # final (last), best and periodic: weights, optimizer state, loop counters
            a, b = load_checkpoint(run_alone / "checkpoints" / name), load_checkpoint(run_batched / "checkpoints" / name)
            assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"], (i, name)
            for key, tensor in a["state_dict"].items():
                torch.testing.assert_close(b["state_dict"][key], tensor, rtol=1e-9, atol=1e-12)
            assert b["loops"] == a["loops"], (i, name)
            assert_same_callback_states(b, run_batched, a, run_alone)
            (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
            assert opt_b["param_groups"] == opt_a["param_groups"] and opt_b["state"].keys() == opt_a["state"].keys()
            assert checkpoint_lr(b, run_batched) == checkpoint_lr(a, run_alone)  # TracIn's learning rate η
            for k, state in opt_a["state"].items():
                assert state.keys() == opt_b["state"][k].keys()
                for name_, tensor in state.items():
                    torch.testing.assert_close(opt_b["state"][k][name_], tensor, rtol=1e-9, atol=1e-15)
        load_net(run_batched / "checkpoints" / "best.ckpt")  # what eval.py and tracin.py do

    # `train.py resume=<job dir>` continues a batched job as it continues a separate run: two more epochs each.
    full = next(i for i, r in enumerate(alone) if r["epochs"] == EPOCHS)  # one that early stopping let run on
    resumed = []
    for run in (tmp_path / "alone" / str(full), tmp_path / "batched" / str(full)):
        (run / ".hydra").mkdir(exist_ok=True)  # as Hydra records a run; resume= reads it
        OmegaConf.save(config(common, job_overrides[full], run), run / ".hydra" / "config.yaml")
        resumed.append(train(resume_config(run, [f"trainer.max_epochs={EPOCHS + 2}"])))
    assert resumed[0]["epochs"] > EPOCHS and resumed[1]["epochs"] == resumed[0]["epochs"]
    for key, value in resumed[0].items():
        if isinstance(value, float) and key not in ("wall_seconds", "seconds_per_epoch"):
            assert resumed[1][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    a, b = (load_checkpoint(tmp_path / run / str(full) / "checkpoints" / "last.ckpt") for run in ("alone", "batched"))
    assert a["epoch"] == b["epoch"] == resumed[0]["epochs"] - 1
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], tensor, rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # several full runs in-process
def test_a_non_finite_loss_fails_its_own_job_only(common: list[str], tmp_path: Path, monkeypatch) -> None:
    """A NaN injected into the student with T=4: its job gets failed.json, the others train as without it."""
    import kd_lightning.batched.stacked as stacked

    overrides = [*common, "trainer.max_epochs=2"]
    good = [Job(config(overrides, o, tmp_path / "without" / str(i)), o) for i, o in enumerate([JOBS[0], JOBS[2]])]
    without = run_group(good)

    real_kd_term = stacked.stacked_kd_term
    monkeypatch.setattr(stacked, "stacked_kd_term", lambda s, t, T: torch.where(T == 4, torch.nan, real_kd_term(s, t, T)))
    # The NaN student shares the others' seed: both groups take the same path (one batch for all students).
    bad = ["seed=1", "distill.group=soft", "distill.T=4"]
    mixed = [Job(config(overrides, o, tmp_path / "with" / str(i)), o) for i, o in enumerate([JOBS[0], bad, JOBS[2]])]
    with_bad = run_group(mixed)
    assert with_bad[1] is None
    failure = json.loads((tmp_path / "with" / "1" / "failed.json").read_text())
    assert failure["error"].startswith("NonFiniteLossError: non-finite training loss at step 0 (epoch 0)")
    assert not (tmp_path / "with" / "1" / "metrics.json").exists()
    for one, other, a, b in ((with_bad[0], without[0], "with/0", "without/0"), (with_bad[2], without[1], "with/2", "without/1")):
        assert one["test/acc"] == other["test/acc"] and one["best_val_loss"] == other["best_val_loss"]
        wa = load_checkpoint(tmp_path / a / "checkpoints" / "last.ckpt")["state_dict"]
        wb = load_checkpoint(tmp_path / b / "checkpoints" / "last.ckpt")["state_dict"]
        assert wa.keys() == wb.keys()
        for k in wa:  # float64; one matrix product over 2 or 3 students' columns may sum in another order
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-12, atol=1e-15)


def test_the_launcher_takes_the_configs_the_sweeper_composed() -> None:
    """Each job's config is composed once: the sweeper's check composes it, the launcher takes that one (as it
    was composed, whatever the checker did with its copy); a config not composed before is composed then."""
    from hydra_plugins.kd_batched_launcher.batched_launcher import KeptComposes

    calls: list[list[str]] = []

    class Loader:
        def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
            calls.append(list(sweep_overrides))
            return OmegaConf.create({"overrides": list(sweep_overrides)})

    loader, master = KeptComposes(Loader()), OmegaConf.create()
    for overrides in (["seed=1"], ["seed=2"]):
        loader.load_sweep_config(master, overrides).overrides.append("changed by the checker")
    assert loader.take(master, ("seed=2",)) == {"overrides": ["seed=2"]}
    assert loader.take(master, ["seed=1"]) == {"overrides": ["seed=1"]}
    assert calls == [["seed=1"], ["seed=2"]]
    assert loader.take(master, ["seed=1"]) == {"overrides": ["seed=1"]} and calls[-1] == ["seed=1"] and len(calls) == 3
    assert loader.take(OmegaConf.create(), ["seed=2"]) == {"overrides": ["seed=2"]} and len(calls) == 4  # another master


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_grouping_and_fallback_reasons(common: list[str], tmp_path: Path) -> None:
    base = config(common, JOBS[0], tmp_path / "a")
    assert group_key(base) == group_key(config(common, JOBS[1], tmp_path / "b"))  # seed, group, T, alpha
    assert group_key(base) != group_key(config(common, [*JOBS[0], "data.batch_size=64"], tmp_path / "c"))
    assert not_batchable(config(common, ["distill.cache_teacher_logits=false"], tmp_path)) is None  # teacher online
    assert not_batchable(config(common, ["model=mnist_cnn"], tmp_path)) == "the model is not an MLP without dropout"
    assert not_batchable(config(common, ["+trainer.gradient_clip_val=1.0"], tmp_path)) == "trainer.gradient_clip_val=1.0"
    assert not_batchable(config(common, ["test_last=true"], tmp_path)).startswith("test_last=true")  # last/test/* too


@pytest.mark.slow
def test_train_py_multirun_with_the_batched_launcher(common: list[str], tmp_path: Path) -> None:
    """`python train.py -m ... hydra/launcher=batched`: batchable jobs train together, the others (a CNN
    student) the ordinary way; every job dir as the basic launcher writes it, and the sweep report."""
    from helpers import job_dir, run_script

    sweep = tmp_path / "sweep"
    overrides = [o for o in common if not o.startswith("+trainer.precision")]
    proc = run_script("train.py", "-m", *overrides, "trainer.max_epochs=2", "hydra/launcher=batched",
                      f"hydra.sweep.dir={sweep}", "distill.T=2,4", "model=mlp_784_16_10,mnist_cnn")
    assert "Training jobs [0, 2] together" in proc.stdout + proc.stderr
    assert "Jobs [1, 3] run one by one (the model is not an MLP without dropout)" in proc.stdout + proc.stderr
    # Job dirs named by what the sweep varies, as the basic launcher names them.
    assert [job_dir(sweep, j).name for j in range(4)] == [
        "000_distill.T:2+model:mlp_784_16_10", "001_distill.T:2+model:mnist_cnn",
        "002_distill.T:4+model:mlp_784_16_10", "003_distill.T:4+model:mnist_cnn"]
    for job in range(4):
        d = job_dir(sweep, job)
        assert {"config.yaml", "overrides.yaml", "hydra.yaml"} <= {p.name for p in (d / ".hydra").iterdir()}
        job_cfg = OmegaConf.load(d / ".hydra" / "config.yaml")  # its own config (the launcher reuses the checked ones)
        assert OmegaConf.load(d / ".hydra" / "overrides.yaml")[-2:] == [f"distill.T={job_cfg.distill.T}",
               f"model={'mlp_784_16_10' if job_cfg.model._target_.endswith('MLP') else 'mnist_cnn'}"]
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["epochs"] == 2 and metrics["best_ckpt"] == "checkpoints/best.ckpt"  # relative to the job dir
        assert {"best.ckpt", "last.ckpt", "epoch001.ckpt"} <= {p.name for p in (d / "checkpoints").iterdir()}
    keys = [set(json.loads((job_dir(sweep, j) / "metrics.json").read_text())) for j in range(4)]
    assert keys[0] == keys[1] == keys[2] == keys[3]
    assert (sweep / "results.md").is_file() and (sweep / "curves.png").is_file()


@pytest.mark.slow  # several full runs in-process
def test_an_interrupted_group_resumes_where_it_stopped(common: list[str], tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C / SIGTERM during epoch 2: running the group again continues after epoch 1 and ends where an
    uninterrupted run ends (weights, metrics, checkpoints)."""
    import kd_lightning.batched.stacked as stacked

    overrides = [*common, "trainer.max_epochs=3", "callbacks.early_stopping=null"]
    uninterrupted = run_group([Job(config(overrides, o, tmp_path / "once" / str(i)), o) for i, o in enumerate(JOBS[:2])])

    real_evaluate, calls = stacked.evaluate, []

    def interrupted_evaluate(*args, **kwargs):
        calls.append(args[2])  # the split
        if calls.count("val") == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    def jobs() -> list[Job]:
        return [Job(config(overrides, o, tmp_path / "twice" / str(i)), o) for i, o in enumerate(JOBS[:2])]

    monkeypatch.setattr(stacked, "evaluate", interrupted_evaluate)
    with pytest.raises(KeyboardInterrupt):
        run_group(jobs())
    assert len(list((tmp_path / "twice" / ".batched").glob("*.pt"))) == 1
    monkeypatch.setattr(stacked, "evaluate", real_evaluate)
    resumed = run_group(jobs())
    assert not list((tmp_path / "twice" / ".batched").glob("*.pt"))
    for i, (one, two) in enumerate(zip(uninterrupted, resumed)):
        assert {k: v for k, v in one.items() if k not in ("wall_seconds", "seconds_per_epoch", "output_dir", "best_ckpt")} == \
               {k: v for k, v in two.items() if k not in ("wall_seconds", "seconds_per_epoch", "output_dir", "best_ckpt")}
        for name in ("last.ckpt", "best.ckpt", "epoch001.ckpt"):
            once, twice = tmp_path / "once" / str(i), tmp_path / "twice" / str(i)
            a, b = (load_checkpoint(run / "checkpoints" / name) for run in (once, twice))
            assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), (i, name)
            assert a["loops"] == b["loops"], (i, name)
            assert_same_callback_states(b, twice, a, once)


@pytest.mark.slow  # a run alone and a group, in-process
def test_bf16_mixed_jobs_train_together_under_autocast(common: list[str], tmp_path: Path, monkeypatch) -> None:
    """trainer=gpu's settings (bf16-mixed, channels_last) are batched: the students' forward runs under bf16
    autocast as a single run's does, and a job ends near the same job run alone (bf16 rounds differently)."""
    import kd_lightning.batched.stacked as stacked

    overrides = [*(o for o in common if "precision" not in o), "+trainer.precision=bf16-mixed", "trainer.max_epochs=2",
                 "+callbacks.channels_last._target_=kd_lightning.callbacks.ChannelsLast"]
    alone = train(config(overrides, JOBS[0], tmp_path / "alone"))
    jobs = [Job(config(overrides, o, tmp_path / "batched" / str(i)), o) for i, o in enumerate([JOBS[0], JOBS[2]])]
    assert not_batchable(jobs[0].cfg) is None

    dtypes = []

    def recording_forward(layers, x):
        logits = stacked_mlp(layers, x)
        dtypes.append(logits.dtype)
        return logits

    monkeypatch.setattr(stacked, "stacked_mlp", recording_forward)
    batched = run_group(jobs)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    for key in ("best_val_loss", "test/loss"):
        assert batched[0][key] == pytest.approx(alone[key], rel=0.05), key
    assert batched[0]["test/acc"] == pytest.approx(alone["test/acc"], abs=0.05)


class Killed(BaseException):
    """A kill -9 at that point: nothing after it runs (no handler catches a BaseException of this kind)."""


@pytest.mark.slow  # three in-process sweeps of three small jobs
def test_a_group_killed_while_writing_its_outputs_resumes_from_its_state(
        common: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Issue 25.9: killed after some jobs of a group had written their outputs, the rerun retrained the others
    from epoch 0 (the group's key changed when the finished jobs dropped out) and left its state behind. The key
    covers the whole group: the rerun trains nothing, writes the other jobs' outputs from the saved state (equal
    to an uninterrupted sweep's), and removes that state and any state no group can use."""
    import sys

    import kd_lightning.batched.stacked as stacked
    from kd_lightning.sweeps import job_dirs
    from kd_lightning.train import main

    def sweep(sweep_dir: Path) -> str:
        argv = ["train.py", "-m", *(o for o in common if "max_epochs" not in o), "trainer.max_epochs=2",
                "callbacks.early_stopping=null", "hydra/launcher=batched", f"hydra.sweep.dir={sweep_dir}",
                "distill.T=2,4,8"]
        monkeypatch.setattr(sys, "argv", argv)
        try:
            main()
        except SystemExit as exited:
            assert not exited.code, capsys.readouterr()
        return "".join(capsys.readouterr())

    def metrics(sweep_dir: Path, job: int) -> dict:
        m = json.loads((job_dirs(sweep_dir)[job] / "metrics.json").read_text())
        return {k: v for k, v in m.items() if k.startswith(("test/", "val/")) or k in ("best_val_loss", "best_epoch", "epochs")}

    sweep(tmp_path / "once")  # uninterrupted

    real_finish, finished = stacked.finish, []

    def killed_after_one(*args, **kwargs):
        if finished:
            raise Killed
        finished.append(real_finish(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(stacked, "finish", killed_after_one)
    with pytest.raises(Killed):
        sweep(tmp_path / "twice")
    capsys.readouterr()
    twice = tmp_path / "twice"
    assert [(d / "metrics.json").is_file() for d in job_dirs(twice)] == [True, False, False]
    (state,) = (twice / ".batched").glob("*.pt")
    # States no group can use: one written before states were keyed on the whole group (no job list), and
    # one whose jobs all finished.
    (twice / ".batched" / "0123456789abcdef.pt").write_bytes(state.read_bytes())
    (twice / ".batched" / "fedcba9876543210.pt").write_bytes(b"x")
    (twice / ".batched" / "fedcba9876543210.json").write_text(json.dumps(
        {"jobs": [[str(job_dirs(twice)[0]), json.loads((job_dirs(twice)[0] / "metrics.json").read_text())["overrides"]]]}))

    monkeypatch.setattr(stacked, "finish", real_finish)
    real_evaluate, splits = stacked.evaluate, []

    def recording_evaluate(*args, **kwargs):
        splits.append(args[2])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(stacked, "evaluate", recording_evaluate)
    output = sweep(twice)
    assert "Group of 2 jobs resumes at epoch 3" in output, output[-3000:]
    assert "val" not in splits  # no epoch was trained again: only the tests of the two jobs left
    assert splits == ["test", "test"]
    for job in range(3):
        assert metrics(twice, job) == metrics(tmp_path / "once", job), job
    assert list((twice / ".batched").iterdir()) == []
