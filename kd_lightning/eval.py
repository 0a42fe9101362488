"""Test a saved net: `python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [data=...]`.

The checkpoint alone rebuilds the net (students hold no teacher), so any train.py checkpoint evaluates here. The test
split is that of the data the checkpoint's run trained on (its run dir's `.hydra/config.yaml`, as export.py finds
it); `data=`/`data.*=` on the command line replace it, and metrics.json records which (`data_from`).
A missing or damaged checkpoint, a net that does not fit the data and missing data are one-line errors with
exit code 2, as in train.py.
"""

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from kd_lightning import config
from kd_lightning.checkpoints import atomic_write_text, load_net
from kd_lightning.errors import CheckpointError, exit_on_error
from kd_lightning.export import data_config_for
from kd_lightning.modules import ClassifierModule
from kd_lightning.run_dir import CheckResumeDir  # noqa: F401 - registers ${kd_run_name:} (conf/hydra)

log = logging.getLogger(__name__)


@torch.no_grad()
def check_net_fits_data(net: nn.Module, ckpt_path: str, datamodule: Any) -> None:
    """One example's shape through the net: it must take the data's inputs and give one logit per class."""
    shape, n_classes = tuple(datamodule.input_shape), datamodule.num_classes
    name = type(net).__name__
    try:
        out = net.eval()(torch.zeros(1, *shape))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt_path} holds a {name} that does not take {datamodule.source} inputs of shape "
                              f"{shape} ({first_line}): evaluate it on the data it was trained on") from None
    if out.shape[-1] != n_classes:
        raise CheckpointError(f"{ckpt_path} holds a {name} with {out.shape[-1]} outputs, but {datamodule.source} "
                              f"has {n_classes} classes: evaluate it on the data it was trained on")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `cfg.ckpt_path` on the test split of the data its run trained on (export.py's rule); `data=`/`data.*=`
    given explicitly are used instead, and recorded as such."""
    ckpt = Path(cfg.ckpt_path)
    net = load_net(ckpt)
    data_cfg, data_from = data_config_for(ckpt, cfg)
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    check_net_fits_data(net, cfg.ckpt_path, datamodule)
    module = ClassifierModule(net, optimizer=None)
    trainer = instantiate(cfg.trainer, logger=False)
    metrics = trainer.test(module, datamodule=datamodule)[0]
    result = {**{k: float(v) for k, v in metrics.items()}, "ckpt_path": str(cfg.ckpt_path),
              "data_source": datamodule.source, "data_from": data_from}
    atomic_write_text(Path(cfg.paths.output_dir) / "metrics.json", json.dumps(result, indent=2))
    log.info("%s", result)
    return result


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    with exit_on_error(log):
        return evaluate(cfg)["test/acc"]


if __name__ == "__main__":
    main()
