"""Process-wide set-up: the ${kd_root:} resolver, composing the train config from code, what a config says
(`is_distillation`), quieter logs."""

import ctypes
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning_fabric  # noqa: F401 - sets PYTORCH_NVML_BASED_CUDA_CHECK, adjusted below
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.methods import get_method
from kd_lightning.modules import DistillModule

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"


def project_root() -> Path:
    """$KD_ROOT, else the checkout this package lives in (an editable install), else the working directory."""
    if root := os.environ.get("KD_ROOT"):
        return Path(root).resolve()
    return PACKAGE_DIR.parent if CONF_DIR.is_dir() else Path.cwd()


OmegaConf.register_new_resolver("kd_root", lambda: str(project_root()), replace=True)


def _if_null(value: Any, if_null: Any, *otherwise: Any) -> Any:
    """${kd_if_null:x,a}: a when x is null, else x; ${kd_if_null:x,a,b}: a when x is null, else b.
    Lets `resume=<run dir>` choose Hydra's run dir (conf/hydra/default.yaml)."""
    if value is None:
        return if_null
    return otherwise[0] if otherwise else value


OmegaConf.register_new_resolver("kd_if_null", _if_null, replace=True)


def _folder_classes(root: Any) -> int | None:
    """${kd_folder_classes:${data.root}}: the number of class folders of an image folder's train/ (null while it
    cannot be read: the DataModule names the problem)."""
    from kd_lightning.data.image_folder import folder_num_classes

    return folder_num_classes(root)


OmegaConf.register_new_resolver("kd_folder_classes", _folder_classes, replace=True)
# ${kd_resize:224}: the shorter side an eval pipeline resizes to before its centre crop (224 -> 256, ImageNet's).
OmegaConf.register_new_resolver("kd_resize", lambda size: round(int(size) / 0.875), replace=True)


def _nvidia_driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


# Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 at import so that asking whether CUDA is available does not
# initialize it (fork safety). Without an NVIDIA driver that check re-opens libnvidia-ml on every call, and
# torch's optimizers make one call per step: ~0.3 ms a step, as much as a small student's whole step on a CPU.
# Without a driver there is no CUDA to protect, so the plain check (cached by the CUDA runtime) is used.
if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and not _nvidia_driver_present():
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def compose_train_config(overrides: list[str]) -> DictConfig:
    """Compose conf/train.yaml with overrides, inside a running Hydra app or outside one.

    `trainer_choice` is set to the trainer config Hydra selected, as a plain value: inside a Hydra app
    train.yaml's `${hydra:runtime.choices.trainer}` gives it, here Hydra's record of this composition does.
    """
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.trainer_choice = cfg.hydra.runtime.choices.trainer
        del cfg["hydra"]
    return cfg


def compose_teacher_recipe(cfg: DictConfig) -> DictConfig:
    """The config `cfg.teacher` names (its experiment and overrides, with the run's trainer choice), as composed:
    kd_lightning/teacher.py's compose_teacher_config puts it on the run's data and paths."""
    return compose_train_config([f"trainer={cfg.trainer_choice}", f"experiment={cfg.teacher.experiment}",
                                 *cfg.teacher.overrides])


LIBRARY_NETS = ("kd_lightning.models.timm_net", "kd_lightning.models.torchvision_net")


def imagenet_weights(model: DictConfig, given_file: bool = False) -> bool:
    """Whether a net's config starts it from ImageNet weights: timm `pretrained=true`, torchvision `weights=<enum>`,
    a `weights_path` file (timm/torchvision files are ImageNet weights), or a timm/torchvision net whose trained
    weights are given as a file (`teacher.ckpt_path`: fine-tuned from ImageNet weights, as library nets are)."""
    return bool(model.get("pretrained") or model.get("weights") or model.get("weights_path")
                or (given_file and model.get("_target_") in LIBRARY_NETS))


def resolve_auto_normalization(cfg: DictConfig) -> None:
    """`data.normalization=auto` (data=image_folder), in place: `imagenet` when the net these inputs are made for
    starts from ImageNet weights (a distillation's teacher, every teacher of multi_teacher; else the run's own
    net), `computed` otherwise. Deterministic from the run's config: train.py and every reader of a saved run
    (saved_run_config) get the same answer. Other values are left as they are."""
    if OmegaConf.select(cfg, "data.normalization") != "auto":
        return
    if is_distillation(cfg):
        runs = get_method(cfg.distill.method).teacher_runs(cfg)
        teachers = [(compose_teacher_recipe(r).model, bool(r.teacher.ckpt_path)) for r in runs]
        nets = {f"teacher {m.get('name') or m._target_}": imagenet_weights(m, given) for m, given in teachers}
    else:
        nets = {f"net {cfg.model.get('name') or cfg.model._target_}": imagenet_weights(cfg.model)}
    rgb = OmegaConf.select(cfg, "data.channels", default=3) == 3  # ImageNet statistics are per RGB channel
    choice = "imagenet" if rgb and nets and all(nets.values()) else "computed"
    with open_dict(cfg):
        cfg.data.normalization = choice
    log.info("data.normalization=auto: %s (%s)", choice, ", ".join(
        f"{name} {'starts from ImageNet weights' if pretrained else 'does not start from ImageNet weights'}"
        for name, pretrained in nets.items()))


def saved_run_config(run_dir: str | Path) -> DictConfig:
    """A train.py run dir's `.hydra/config.yaml`, resolvable outside its Hydra job: what Hydra filled in at run
    time is set (the output dir; the trainer choice, from the run's `.hydra/hydra.yaml`)."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(run_dir)
    if "trainer_choice" in cfg and OmegaConf.is_interpolation(cfg, "trainer_choice"):
        record = run_dir / ".hydra" / "hydra.yaml"
        choices = OmegaConf.load(record).hydra.runtime.choices if record.is_file() else {}
        cfg.trainer_choice = choices.get("trainer", "default")
    resolve_auto_normalization(cfg)  # data.normalization=auto as the run resolved it (the same answer)
    return cfg


def is_distillation(cfg: Mapping[str, Any]) -> bool:
    """Whether a run's config distills a teacher into a student: its module is a DistillModule (or subclass).
    Takes a DictConfig or the plain mapping of a saved `.hydra/config.yaml`."""
    return issubclass(get_class(cfg["module"]["_target_"]), DistillModule)


class _DropLightningTips(logging.Filter):
    """Lightning 2.6 logs advertising tips ("💡 Tip: ...") on every run; keep the console for results."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropLightningTips())


# Warnings about Lightning's own behaviour that a user can do nothing about:
# - with an on-exception checkpoint (InterruptCheckpoint), fit(ckpt_path=None) means "last" and says so, and then
#   that a new run has no last checkpoint; train.py reports a missing checkpoint itself when resuming was asked for;
# - Lightning 2.6 calls an API that torch deprecated.
for message in (
    r"`\.fit\(ckpt_path=None\)` was called without a model",
    r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint available",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
):
    warnings.filterwarnings("ignore", message=message)
