"""Sizes of nets (parameters, mult-adds); `python -m kd_lightning.models.stats` prints the CIFAR table of docs/cifar.md.

Mult-adds are counted by torch's FlopCounterMode on one 32x32 image: it counts 2 FLOPs per multiply-add of
convolutions and matrix products (and nothing for batch norm, ReLU or pooling), so mult-adds = FLOPs / 2.
"""

import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kd_lightning.config import compose_train_config

CIFAR_MODELS = {
    "cifar_resnet34": "teacher: ResNet34",
    "cifar_resnet34_2stage": "student: ResNet34's stem, layer1, layer2",
    "cifar_resnet18": "student: ResNet18",
}


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def mult_adds(net: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> int:
    """Multiply-adds of one forward pass on one input."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(torch.zeros(1, *input_shape))
    return counter.get_total_flops() // 2


def build(model: str, data: str) -> nn.Module:
    return instantiate(compose_train_config([f"model={model}", f"data={data}"]).model)


def table() -> str:
    rows = [
        "| `model=` | net | parameters (CIFAR-10) | parameters (CIFAR-100) | mult-adds per image |",
        "|---|---|---:|---:|---:|",
    ]
    for model, description in CIFAR_MODELS.items():
        net10, net100 = build(model, "cifar10"), build(model, "cifar100")
        rows.append(
            f"| `{model}` | {description} | {count_params(net10):,} | {count_params(net100):,} "
            f"| {mult_adds(net10) / 1e6:,.1f} M |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
