"""The model card (teacher vs student) and the TensorBoard pictures of a run."""

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image, ImageChops
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from kd_lightning.card import PANEL, calibration_error, plot, reliability_bins, run_config, write_card
from kd_lightning.card import test_logits as split_logits  # not collected as a test
from kd_lightning.checkpoints import load_net
from kd_lightning.config import compose_train_config
from kd_lightning.errors import CheckpointError, InputError
from kd_lightning.tensorboard_figures import log_test_figures
from kd_lightning.train import train

TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch `experiment=soft` run (and its 1-epoch teacher) on the offline MNIST sample, in-process."""
    tmp = tmp_path_factory.mktemp("soft")
    run = tmp / "run"
    cfg = compose_train_config([
        "experiment=soft", *TINY, f"paths.log_dir={tmp / 'logs'}", f"paths.output_dir={run}",
        "paths.data_dir=/nonexistent", "data.download=false", "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null", "teacher.overrides=[" + ",".join(f"'{o}'" for o in TINY) + "]",
    ])
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # as Hydra records a run (the config text reads it)
    train(cfg)
    return run


@pytest.mark.slow  # the module's trained run (fixture)
def test_card_numbers_equal_the_runs_metrics(soft_run: Path) -> None:
    metrics = json.loads((soft_run / "metrics.json").read_text())
    assert (soft_run / "MODEL_CARD.md").is_file() and (soft_run / "card.png").read_bytes()[:4] == b"\x89PNG"
    written = (soft_run / "MODEL_CARD.md").read_text()  # from the run's own datamodule and cached teacher logits
    card = write_card(soft_run)  # what the run wrote, recomputed here: the same numbers
    assert (soft_run / "MODEL_CARD.md").read_text() == written
    student, teacher = card["student"], card["teacher"]
    assert card["data_source"] == metrics["data_source"] == "mnist-sample-5k"
    assert (student["params"], teacher["params"]) == (metrics["params"], metrics["teacher_params"])
    assert student["quality"]["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert student["quality"]["nll"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert teacher["quality"]["acc"] == pytest.approx(metrics["test/teacher_acc"], abs=1e-6)
    assert card["agreement"] == pytest.approx(metrics["test/agreement"], abs=1e-6)
    assert sum(student["quality"]["class_counts"]) == card["n_test"] == 1000
    assert student["mult_adds"] == 784 * 16 + 16 * 10  # the MLP's two matrix products
    markdown = (soft_run / "MODEL_CARD.md").read_text()
    assert f"| test accuracy | {teacher['quality']['acc']:.4f} | {student['quality']['acc']:.4f} |" in markdown
    assert "| 9 |" in markdown and "not measured" in markdown  # per-class rows; the cheap card has no latency
    assert "experiment=teacher" in markdown  # the teacher's equivalent command


@pytest.mark.slow  # the module's trained run (fixture)
def test_tensorboard_holds_the_confusion_matrix_config_and_dark_knowledge(soft_run: Path) -> None:
    events = EventAccumulator(str(soft_run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"test/confusion_matrix", "distill/dark_knowledge"} <= set(tags["images"])
    image = events.Images("distill/dark_knowledge")[0]
    assert image.width > 500 and image.encoded_image_string[:4] == b"\x89PNG"
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "group: soft" in config_text and "${" not in config_text  # resolved
    teacher_runs = list((soft_run.parent / "logs" / "teachers").glob("*/run"))
    teacher_events = EventAccumulator(str(teacher_runs[0] / "tensorboard"), size_guidance={"images": 0})
    teacher_events.Reload()
    assert teacher_events.Tags()["images"] == ["test/confusion_matrix"]  # no teacher of its own: no dark knowledge


@pytest.mark.slow  # the module's trained run (fixture)
def test_card_from_given_logits_equals_the_card_computed_from_the_checkpoints(
        soft_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = json.loads((soft_run / "metrics.json").read_text())
    cfg = run_config(soft_run)
    cfg.paths.cache_dir = str(tmp_path / "no-cache")  # no teacher-logit cache: both nets run on the test split
    computed = write_card(soft_run, cfg)
    computed_markdown = (soft_run / "MODEL_CARD.md").read_text()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    teacher, _, _ = split_logits(load_net(metrics["teacher_ckpt"]), datamodule)
    student, labels, _ = split_logits(load_net(soft_run / metrics["best_ckpt"]), datamodule)
    given = write_card(soft_run, cfg, datamodule=datamodule, teacher_logits=teacher, student_logits=student,
                       labels=labels)
    assert (soft_run / "MODEL_CARD.md").read_text() == computed_markdown
    assert given == computed
    with caplog.at_level(logging.INFO, logger="kd_lightning.card"):
        from_cache = write_card(soft_run)  # the run's config: its teacher-logit cache holds this teacher's logits
    assert "the teacher's test logits from the verified cache" in caplog.text
    assert from_cache == given and (soft_run / "MODEL_CARD.md").read_text() == computed_markdown
    with pytest.raises(ValueError, match="not the whole test split"):
        write_card(soft_run, cfg, datamodule=datamodule, teacher_logits=teacher[:10])


@pytest.mark.slow  # the module's trained run (fixture)
def test_card_never_trusts_a_damaged_teacher_logit_cache(
        soft_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = run_config(soft_run)
    expected = write_card(soft_run, cfg)
    cache = tmp_path / "cache"
    shutil.copytree(Path(cfg.paths.cache_dir) / "logits", cache / "logits")
    (entry,) = (cache / "logits").glob("*.pt")
    cached = torch.load(entry, weights_only=True)
    cached["logits"]["test"][:, 0] += 5.0  # other values under the stored checksum
    torch.save(cached, entry)
    cfg.paths.cache_dir = str(cache)
    with caplog.at_level(logging.INFO, logger="kd_lightning.card"):
        card = write_card(soft_run, cfg)
    assert "has damaged test logits (checksum mismatch): the card runs the teacher" in caplog.text
    assert card["teacher"]["quality"] == expected["teacher"]["quality"]


@pytest.mark.slow  # the module's trained run (fixture)
def test_log_test_figures_logs_what_the_callback_logs(soft_run: Path, tmp_path: Path) -> None:
    """The functions a loop without a Lightning Trainer calls (kd_lightning/batched) draw the callback's images."""
    metrics = json.loads((soft_run / "metrics.json").read_text())
    cfg = run_config(soft_run)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    teacher, _, _ = split_logits(load_net(metrics["teacher_ckpt"]), datamodule)
    student, labels, _ = split_logits(load_net(soft_run / metrics["best_ckpt"]), datamodule)
    writer = SummaryWriter(str(tmp_path / "tb"))
    log_test_figures(writer, student, labels, 7, teacher_logits=teacher, T=cfg.distill.T, run_dir=soft_run)
    writer.close()
    ours = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    ours.Reload()
    callbacks = EventAccumulator(str(soft_run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    callbacks.Reload()
    assert set(ours.Tags()["images"]) == {"test/confusion_matrix", "distill/dark_knowledge"}
    assert ours.Images("test/confusion_matrix")[0].step == 7
    assert (ours.Images("test/confusion_matrix")[0].encoded_image_string
            == callbacks.Images("test/confusion_matrix")[0].encoded_image_string)  # the same counts, the same pixels
    dark, theirs = ours.Images("distill/dark_knowledge")[0], callbacks.Images("distill/dark_knowledge")[0]
    assert (dark.width, dark.height) == (theirs.width, theirs.height)
    assert (ours.Tensors("config/text_summary")[0].tensor_proto.string_val
            == callbacks.Tensors("config/text_summary")[0].tensor_proto.string_val)


@pytest.mark.slow  # the module's trained run (fixture)
def test_card_png_draws_each_panel_from_the_cards_numbers(soft_run: Path) -> None:
    """Changing one number of the card changes the pixels of its own panel only (3 x 2 panels under a title)."""
    card = write_card(soft_run)
    image = plot(card)
    assert Image.open(soft_run / "card.png").size == image.size == (3 * PANEL[0], 44 + 540 + PANEL[1])

    def changed_panels(edit) -> set[tuple[int, int]]:  # (row, column) of the panels whose pixels differ
        other = json.loads(json.dumps(card))
        edit(other)
        other["teacher"]["latency"] = other["student"]["latency"] = None  # as write_card leaves them
        diff = np.asarray(ImageChops.difference(image, plot(other)).convert("L")) > 0
        rows, cols = np.nonzero(diff[44:])
        return {(int(r >= PANEL[1]), int(c // PANEL[0])) for r, c in zip(rows, cols)}

    def student(key: str, value: object) -> Callable[[dict], None]:
        return lambda c: c["student"]["quality"].__setitem__(key, value)

    assert changed_panels(lambda c: None) == set()
    flipped = [row[::-1] for row in card["student"]["quality"]["confusion"]]
    assert changed_panels(student("confusion", flipped)) == {(1, 1)}
    assert changed_panels(student("per_class_acc", [0.5] * 10)) == {(1, 2)}
    bins = {**card["student"]["quality"]["reliability"], "accuracy": [0.5] * 15}
    assert changed_panels(student("reliability", bins)) == {(0, 1)}
    assert changed_panels(lambda c: c["teacher"]["quality"].__setitem__("ece", 0.5)) == {(0, 0)}
    assert changed_panels(lambda c: c["teacher"].__setitem__("mult_adds", 10 ** 9)) == {(0, 2)}


def test_ece_equals_the_hand_computed_value() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.75, 0.125, 0.125], [0.2, 0.5, 0.3], [0.1, 0.35, 0.55],
                          [0.88, 0.06, 0.06]])
    labels = torch.tensor([0, 1, 1, 0, 2])
    # Bins of width 1/15: 0.9 and 0.88 share bin 13 (accuracy 1/2, mean confidence 0.89); 0.75, 0.5 and 0.55 are
    # alone in theirs, correct only at 0.5. ECE = (2 * |0.5 - 0.89| + |0 - 0.75| + |1 - 0.5| + |0 - 0.55|) / 5.
    expected = (2 * 0.39 + 0.75 + 0.5 + 0.55) / 5
    assert calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)
    bins = reliability_bins(probs, labels)  # the diagram's bins give the same number
    from_bins = sum(n / 5 * abs(a - c) for a, c, n in zip(bins["accuracy"], bins["confidence"], bins["count"]))
    assert from_bins == pytest.approx(expected, abs=1e-6)
    assert bins["count"][13] == 2 and bins["accuracy"][13] == 0.5


@pytest.mark.slow  # the module's trained run (fixture)
def test_card_of_a_run_without_teacher_is_a_one_line_error(soft_run: Path) -> None:
    teacher_run = next((soft_run.parent / "logs" / "teachers").glob("*/run"))
    with pytest.raises(InputError, match=r"names no teacher \(no teacher_ckpt in its metrics.json\)"):
        write_card(teacher_run)


@pytest.mark.slow  # the module's trained run (fixture)
def test_card_of_a_copied_run_reads_the_copys_checkpoint(soft_run: Path, tmp_path: Path) -> None:
    """metrics.json names the run's own checkpoint relative to its dir: the card of a copy reads the copy's, and a
    damaged one there is an error, not the original's read instead."""
    copy = tmp_path / "cöpy"
    shutil.copytree(soft_run, copy)
    assert json.loads((copy / "metrics.json").read_text())["best_ckpt"] == "checkpoints/best.ckpt"
    card = write_card(copy)
    assert card["student"]["ckpt"] == str(copy / "checkpoints" / "best.ckpt")
    for ckpt in (copy / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=rf"^{copy / 'checkpoints' / 'best.ckpt'} is truncated"):
        write_card(copy)


@pytest.mark.slow  # the module's trained run (fixture)
def test_card_checks_the_teacher_against_its_recorded_sha256(soft_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(soft_run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["teacher_ckpts_sha256"] = ["f" * 64]  # the teacher's file has changed since the run used it
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(CheckpointError, match=rf"^the teacher {metrics['teacher_ckpt']} changed since {copy} was "
                                              r"distilled from it \(sha256 \w{12}\.\.\., recorded ffffffffffff\.\.\.\)"):
        write_card(copy)


@pytest.mark.slow  # the module's trained run (fixture)
def test_card_of_a_multi_teacher_run_is_one_line(soft_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(soft_run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    teacher, sha = metrics["teacher_ckpt"], metrics["teacher_ckpts_sha256"][0]
    metrics.update(teacher_ckpt=None, teacher_ckpts=[teacher, teacher], teacher_ckpts_sha256=[sha, sha])  # as written
    (copy / "metrics.json").write_text(json.dumps(metrics))  # by a multi_teacher run
    with pytest.raises(InputError) as err:
        write_card(copy)
    assert str(err.value) == (f"student_run={copy} was distilled from 2 teachers (multi_teacher): multi-teacher cards "
                              "are not supported; the card compares one teacher with its student")


@pytest.mark.slow
def test_full_card_has_onnx_sizes_and_latencies(soft_run: Path) -> None:
    card = write_card(soft_run, timing=True, threads=1, min_run_time=0.05)
    for role in ("teacher", "student"):
        assert card[role]["onnx_bytes"] > 0 and set(card[role]["latency"]) == {1, 256}
        assert all(m["median_ms"] > 0 and m["iqr_ms"] >= 0 for m in card[role]["latency"].values())
    assert card["teacher"]["onnx_bytes"] > 50 * card["student"]["onnx_bytes"]  # 1.2 M vs 12.7 k parameters
    markdown = (soft_run / "MODEL_CARD.md").read_text()
    assert "CPU latency, batch 256 (1 thread), median" in markdown and "speed-up" in markdown


def test_confusion_panel_keys_its_indices_to_class_names() -> None:
    """With class names (an image folder's), card.png's confusion panel carries a key "0 cat · 1 dog · ...",
    wrapped to the panel's width; without them the panel is as before."""
    from kd_lightning.tensorboard_figures import class_key_lines, confusion_image

    assert class_key_lines(["cat", "dog", "fox"], 1000) == ["0 cat · 1 dog · 2 fox"]
    assert class_key_lines(["cat", "dog", "fox"], 40) == ["0 cat", "1 dog", "2 fox"]  # one entry per line
    confusion = torch.tensor([[3, 1, 0], [0, 4, 0], [1, 0, 2]])
    plain, keyed = confusion_image(confusion), confusion_image(confusion, class_names=["cat", "dog", "fox"])
    assert keyed.shape[0] == plain.shape[0] + 16 and keyed.shape[1] == plain.shape[1]
    assert np.array_equal(keyed[: plain.shape[0] - 8], plain[: plain.shape[0] - 8])  # the matrix itself unchanged
    assert (keyed[plain.shape[0] - 8:] < 128).any()  # the key is drawn
    many = [f"class{c}" for c in range(30)]  # beyond 20 classes the axes thin out: no key
    assert confusion_image(torch.eye(30, dtype=torch.long), class_names=many).shape == \
        confusion_image(torch.eye(30, dtype=torch.long)).shape
