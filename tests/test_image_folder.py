"""data=image_folder: the folder read as the KDDataModule contract says, every bad input one line naming the path,
and an identity that changes when one image is added, removed, edited or moved to another class."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fake_images import write_corrupt, write_image, write_image_folder
from kd_lightning.config import compose_train_config
from kd_lightning.data import SPLITS, ImageFolderDataModule, KDDataModule
from kd_lightning.data.image_folder import UnreadableImageError, to_channels
from kd_lightning.errors import ConfigError, DataError, InputError
from kd_lightning.influence.compare import ImageSource
from kd_lightning.teacher import teacher_identity, teacher_key


def make(root: Path, **kwargs) -> ImageFolderDataModule:
    settings = {"image_size": 16, "num_workers": 0, "batch_size": 4, "eval_batch_size": 5,
                "cache_dir": root.parent / f"{root.name}-cache", **kwargs}
    return ImageFolderDataModule(root, **settings)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", per_class=10, splits=("train", "test"))


# ---- reading the folder -------------------------------------------------------------------------------------
def test_folder_is_read_with_sorted_classes_nested_files_and_skipped_non_images(folder: Path, caplog) -> None:
    (folder / "train" / ".hidden").mkdir()  # a dot-folder is no class
    with caplog.at_level(logging.INFO):
        dm = make(folder)
        dm.setup()
    assert dm.class_names == ["cat", "dog", "fox"] and dm.num_classes == 3
    assert [r.getMessage() for r in caplog.records if "not images" in r.getMessage()] == [
        f"Skipped 1 file(s) of {folder} that are not images (1 .txt)"]
    # train/: 10 + 10 + 5 (fox unbalanced) images, nested/img_0 included; val cut from it (0.2 of 25 = 5)
    assert dm.split_size("train") + dm.split_size("val") == 25 and dm.split_size("val") == 5
    assert dm.split_size("test") == 3 + 3 + 1 and dm.cut == ["val"]
    names = {name for name, _ in dm.data_files()}
    assert "train/cat/nested/img_0.png" in names and "train/cat/notes.txt" not in names and len(names) == 32
    assert dm.input_shape == (3, 16, 16) and dm.random_augmentation  # RandomResizedCrop + flip differ from eval
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_every_split_keeps_the_contract(folder: Path) -> None:
    """As tests/test_datamodules.py checks the built-in DataModules: eval_loader yields the standardized raw
    images in dataset order."""
    dm = make(folder)
    dm.setup("fit")
    assert isinstance(dm, KDDataModule)
    for split in SPLITS:
        x, y, idx = (torch.cat(parts) for parts in zip(*dm.eval_loader(split)))
        n = dm.split_size(split)
        assert torch.equal(idx, torch.arange(n))
        images, labels = dm.raw_images(split, range(n))
        assert images.shape == (n, 16, 16, 3) and images.dtype == torch.uint8 and torch.equal(labels, y)
        mean = torch.tensor(dm.mean).reshape(-1, 1, 1)
        std = torch.tensor(dm.std).reshape(-1, 1, 1)
        torch.testing.assert_close(x, (images.permute(0, 3, 1, 2).float() / 255 - mean) / std)
        shown, _ = ImageSource(dm)(split, [n - 1, 0])
        assert torch.equal(shown, images[[n - 1, 0]].float() / 255)


def test_training_batches_carry_split_indices(folder: Path) -> None:
    """Training batches are `(inputs, labels, indices)` with indices the examples' positions in the train split
    (CRD's memory bank and per-example caches are indexed by them); split_labels reads no image yet agrees with
    the contract's generic reading through raw_images."""
    dm = make(folder)
    dm.setup("fit")
    labels = dm.split_labels("train")
    assert labels.dtype == torch.long and len(labels) == dm.split_size("train") == 20
    assert torch.equal(labels, KDDataModule.split_labels(dm, "train"))
    assert torch.equal(dm.split_labels("val"), dm.raw_images("val", range(dm.split_size("val")))[1])
    order = []
    for _, y, idx in dm.train_dataloader():
        assert torch.equal(labels[idx], y)  # an index names the example the batch holds
        order.append(idx)
    order = torch.cat(order)
    assert torch.equal(order.sort().values, torch.arange(20))  # 20 examples in batches of 4: each once
    assert not torch.equal(order, torch.arange(20))  # shuffled, so the index is not the batch position


def test_test_split_is_cut_with_a_warning_or_refused(tmp_path: Path, caplog) -> None:
    root = write_image_folder(tmp_path / "images", per_class=10)
    with caplog.at_level(logging.WARNING):
        dm = make(root)
        dm.setup()
    assert dm.cut == ["test", "val"] and any("has no test/ folder" in r.getMessage() for r in caplog.records)
    # the three splits share no file and cover train/ (25 images)
    splits = [{p for p, _ in dm.items[s]} for s in SPLITS]
    assert sum(map(len, splits)) == 25 and not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    with pytest.raises(DataError, match=r"has no test/ folder and data.require_test=true"):
        make(root, require_test=True).setup()


def test_modes_are_converted_to_the_channels(tmp_path: Path) -> None:
    grey16 = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16))
    assert grey16.mode == "I;16"
    assert np.asarray(to_channels(grey16, 1)).tolist() == [[0, 100], [255, 7]]  # 16-bit scaled, not clipped
    rgba = Image.fromarray(np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], dtype=np.uint8), "RGBA")
    assert np.asarray(to_channels(rgba, 3)).tolist() == [[[10, 20, 30], [255, 255, 255]]]  # transparent: white
    palette = Image.fromarray(np.full((2, 2, 3), (200, 0, 0), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.asarray(to_channels(palette, 3))[0, 0].tolist() == [200, 0, 0]
    assert to_channels(palette, 1).mode == "L"
    root = write_image_folder(tmp_path / "images", per_class=5)
    dm = make(root, channels=1)
    dm.setup()
    x, _, _ = next(iter(dm.eval_loader("train")))
    assert x.shape[1] == 1 and dm.raw_images("train", [0])[0].shape == (1, 16, 16)


def test_normalization_imagenet_computed_given(folder: Path) -> None:
    assert make(folder, normalization="imagenet").mean == ()  # set by setup
    dm = make(folder, normalization="imagenet")
    dm.setup()
    assert dm.mean == (0.485, 0.456, 0.406) and dm.std == (0.229, 0.224, 0.225)
    dm = make(folder, normalization={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    dm.setup()
    assert dm.mean == (0.5, 0.5, 0.5)
    computed = make(folder, stats_sample=1000)
    computed.setup()
    # the eval views of all training images, by hand
    views = computed.raw_images("train", range(computed.split_size("train")))[0].double() / 255
    expected_mean = views.mean((0, 1, 2))
    expected_std = views.std((0, 1, 2), unbiased=False)
    torch.testing.assert_close(torch.tensor(computed.mean, dtype=torch.float64), expected_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(computed.std, dtype=torch.float64), expected_std, atol=1e-5, rtol=0)
    stats = list((folder.parent / "images-cache" / "stats").glob("*.json"))
    assert len(stats) == 1  # cached: a second setup reads the file
    again = make(folder)
    again.setup()
    assert again.mean == computed.mean


def test_cache_decoded_gives_the_same_eval_inputs(folder: Path) -> None:
    plain, decoded = make(folder), make(folder, cache_decoded=True)
    plain.setup()
    decoded.setup()
    for split in ("val", "test"):
        a = torch.cat([x for x, _, _ in plain.eval_loader(split)])
        b = torch.cat([x for x, _, _ in decoded.eval_loader(split)])
        torch.testing.assert_close(a, b)
    files = list((folder.parent / "images-cache" / "decoded").glob("*.pt"))
    assert sorted(f.name.split("-")[0] for f in files) == ["test", "val"]
    x, _, _ = next(iter(decoded.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)


def test_identical_pipelines_make_training_inputs_cacheable(folder: Path) -> None:
    same = [{"_target_": "torchvision.transforms.v2.Resize", "size": 16},
            {"_target_": "torchvision.transforms.v2.CenterCrop", "size": 16}]
    assert not make(folder, train_transforms=same, eval_transforms=same).random_augmentation


# ---- bad input: one line naming the path ------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_each_bad_folder_is_one_line_naming_the_path(tmp_path: Path) -> None:
    cases = {}
    cases["no root"] = (tmp_path / "missing", "is not a folder")
    (tmp_path / "no_train").mkdir()
    cases["no train"] = (tmp_path / "no_train", "train does not exist")
    one = write_image_folder(tmp_path / "one", classes=("only",), per_class=4, oddities=False)
    cases["one class"] = (one, "has 1 class folder(s) (only): at least 2 are needed")
    stray = write_image_folder(tmp_path / "stray", per_class=4, splits=("train", "val"), oddities=False)
    write_image(stray / "val" / "wolf" / "a.png", np.zeros((8, 8, 3), np.uint8), "RGB", "PNG")
    cases["val class missing from train"] = (stray, f"{stray / 'val' / 'wolf'} is a class folder that")
    empty = write_image_folder(tmp_path / "empty", per_class=4, oddities=False)
    (empty / "train" / "dog" / "notes.txt").write_text("x")
    for image in (empty / "train" / "dog").glob("*.*g"):
        image.unlink()
    cases["empty class"] = (empty, f"{empty / 'train' / 'dog'} is an empty class folder")
    empty_split = write_image_folder(tmp_path / "empty_split", per_class=4, oddities=False)
    (empty_split / "test").mkdir()
    cases["empty split"] = (empty_split, f"{empty_split / 'test'} is an empty split")
    for name, (root, expected) in cases.items():
        with pytest.raises(DataError) as info:
            make(root).setup()
        assert expected in _one_line(info.value), name


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"root": None}, "data.root=null is not accepted"),
    ({"channels": 2}, "data.channels=2 is not accepted: 1 (grey) or 3 (RGB)"),
    ({"image_size": 4}, "data.image_size=4 is not accepted"),
    ({"normalization": "cifar"}, "data.normalization='cifar' is not accepted: one of auto, imagenet, computed"),
    ({"normalization": "auto"}, "data.normalization=auto is not accepted here: train.py resolves it"),
    ({"normalization": "imagenet", "channels": 1}, "data.normalization=imagenet is not accepted with data.channels=1"),
    ({"train_transforms": [{"size": 3}]}, "data.train_transforms: {'size': 3} is not accepted: each entry needs a _target_"),
    ({"eval_transforms": [{"_target_": "torchvision.transforms.v2.Nope"}]}, "data.eval_transforms: torchvision.transforms.v2.Nope cannot be built"),
])
def test_each_bad_setting_is_one_line(folder: Path, kwargs: dict, expected: str) -> None:
    root = kwargs.pop("root", folder)
    with pytest.raises(ConfigError) as info:
        ImageFolderDataModule(root, num_workers=0, **kwargs)
    assert expected in _one_line(info.value)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_undecodable_image_is_one_line_at_first_read(folder: Path, num_workers: int) -> None:
    """Also when decoded in a DataLoader worker: torch re-raises it in the main process with the worker's
    traceback, which UnreadableImageError cuts back to its own line."""
    bad = write_corrupt(folder / "test" / "cat" / "zz_corrupt.png")
    dm = make(folder, num_workers=num_workers, normalization="imagenet")
    dm.setup()  # not read yet
    with pytest.raises(UnreadableImageError) as info:
        for _ in dm.eval_loader("test"):
            pass
    assert _one_line(info.value).startswith(f"{bad} cannot be decoded as an image (cannot identify image file")
    with pytest.raises(UnreadableImageError) as info:
        make(folder, verify_images=True, normalization="imagenet").setup()
    assert _one_line(info.value).startswith(f"{bad} cannot be decoded as an image")


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_truncated_jpeg_is_named(folder: Path) -> None:
    path = next((folder / "test" / "dog").glob("*.jpg"))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UnreadableImageError) as info:
        make(folder, verify_images=True, normalization="imagenet").setup()
    assert _one_line(info.value).startswith(f"{path} cannot be decoded as an image (")


def test_train_py_prints_one_line_for_a_bad_folder(tmp_path: Path, capsys) -> None:
    """Through the entry point's exit_on_error: exit 2 and the one line, before anything trains."""
    from kd_lightning.train import train

    stray = write_image_folder(tmp_path / "stray", per_class=4, splits=("train", "test"), oddities=False)
    write_image(stray / "test" / "wolf" / "a.png", np.zeros((8, 8, 3), np.uint8), "RGB", "PNG")
    cfg = compose_train_config(["experiment=folder_soft", f"data.root={stray}", f"paths.log_dir={tmp_path / 'logs'}",
                                "paths.output_dir=" + str(tmp_path / "out")])
    with pytest.raises(InputError, match=r"wolf is a class folder that .* lacks"):
        train(cfg)
    assert not (tmp_path / "logs" / "teachers").exists()  # nothing trained


# ---- identity ----------------------------------------------------------------------------------------------
def keys(root: Path, hash_content: bool) -> tuple[str, str]:
    """(teacher cache key, teacher-logit cache data key) of the folder as it is now."""
    dm = make(root, hash_content=hash_content, normalization="imagenet")
    dm.setup()
    tcfg = compose_train_config(["experiment=folder_teacher", f"data.root={root}", "data.image_size=16"])
    tcfg.paths.output_dir = ""
    identity = json.loads(json.dumps(dm.cache_identity()))
    data_key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()  # as cached_teacher_logits
    return teacher_key(teacher_identity(tcfg, dm.source)), data_key


@pytest.mark.parametrize("hash_content", [pytest.param(False, marks=pytest.mark.slow), True])
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_one_image_added_removed_edited_or_moved_changes_both_keys(folder: Path, hash_content: bool) -> None:
    seen = {keys(folder, hash_content)}
    assert keys(folder, hash_content) in seen  # stable when nothing changes
    image = folder / "train" / "dog" / "img_2.png"

    def changed(what: str) -> None:
        now = keys(folder, hash_content)
        assert now[0] not in {k for k, _ in seen} and now[1] not in {d for _, d in seen}, what
        seen.add(now)

    shutil.copy(image, folder / "train" / "dog" / "img_added.png")
    changed("added")
    (folder / "train" / "dog" / "img_added.png").unlink()
    os.remove(folder / "test" / "cat" / "img_0.png")
    changed("removed")
    Image.open(image).convert("RGB").rotate(90).save(image)  # an edit
    changed("edited")
    shutil.move(image, folder / "train" / "cat" / "img_2_relabelled.png")
    changed("moved to another class")


def test_transforms_and_size_change_the_logit_key_only_as_data(folder: Path) -> None:
    a, b = make(folder, normalization="imagenet"), make(folder, normalization="imagenet", image_size=24)
    a.setup()
    b.setup()
    assert a.source == b.source and a.cache_identity() != b.cache_identity()


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_teacher_shares_the_students_folder_and_pipeline(folder: Path) -> None:
    from kd_lightning.teacher import compose_teacher_config

    cfg = compose_train_config(["experiment=folder_soft", f"data.root={folder}", "data.image_size=48",
                                "data.normalization=computed", "data.batch_size=7"])
    tcfg = compose_teacher_config(cfg)
    assert tcfg.data.root == str(folder) and tcfg.data.image_size == 48 and tcfg.data.normalization == "computed"
    assert tcfg.data.batch_size == 32  # the teacher recipe's own loader settings
    assert tcfg.model.name == "resnet50" and tcfg.model.num_classes == 3 and cfg.model.num_classes == 3


# ---- data.normalization=auto -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "expected"), [
    # a distillation: the teacher's weights decide
    (["experiment=folder_soft", "data.normalization=auto"], "imagenet"),  # folder_teacher: timm, pretrained=true
    (["experiment=folder_soft", "data.normalization=auto", "teacher.overrides=['model.pretrained=false']"], "computed"),
    (["experiment=folder_soft", "data.normalization=auto", "teacher.overrides=['model.pretrained=false']",
      "teacher.ckpt_path=teacher.safetensors"], "imagenet"),  # a timm teacher trained elsewhere, given as a file
    (["experiment=folder_soft", "data.normalization=auto", "data.channels=1"], "computed"),
    (["experiment=soft", "data=image_folder"], "computed"),  # the MNIST CNN teacher: no ImageNet weights
    # the run's own net
    (["experiment=teacher", "data=image_folder", "model=timm"], "computed"),
    (["experiment=teacher", "data=image_folder", "model=timm", "model.pretrained=true"], "imagenet"),
    (["experiment=teacher", "data=image_folder", "model=torchvision", "model.weights=IMAGENET1K_V1"], "imagenet"),
    (["experiment=teacher", "data=image_folder", "model=torchvision", "model.weights_path=w.pth"], "imagenet"),
    (["experiment=folder_soft"], "imagenet"),  # given: left as it is
    (["experiment=folder_soft", "data.normalization=computed"], "computed"),
])
@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_auto_normalization_follows_the_teachers_weights(overrides: list[str], expected: str) -> None:
    from kd_lightning.config import resolve_auto_normalization

    cfg = compose_train_config([*overrides, "data.root=/some/images"])
    resolve_auto_normalization(cfg)
    assert cfg.data.normalization == expected


@pytest.mark.slow  # over 0.7 s: the inner loop keeps to faster tests
def test_a_saved_run_resolves_auto_as_the_run_did(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from kd_lightning.config import saved_run_config

    cfg = compose_train_config(["experiment=folder_soft", "data.normalization=auto", "data.root=/some/images"])
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # as Hydra records it: auto
    assert saved_run_config(tmp_path).data.normalization == "imagenet"
