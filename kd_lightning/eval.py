"""Test a saved net: `python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [data=...]`.

The checkpoint alone rebuilds the net (students hold no teacher), so any train.py checkpoint evaluates here.
"""

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd_lightning import config
from kd_lightning.checkpoints import load_net
from kd_lightning.modules import ClassifierModule

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    net = load_net(cfg.ckpt_path)
    module = ClassifierModule(net, optimizer=None)
    datamodule = instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, logger=False)
    metrics = trainer.test(module, datamodule=datamodule)[0]
    result = {**{k: float(v) for k, v in metrics.items()}, "ckpt_path": str(cfg.ckpt_path),
              "data_source": datamodule.source}
    out = Path(cfg.paths.output_dir) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("%s", result)
    return result


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["test/acc"]


if __name__ == "__main__":
    main()
