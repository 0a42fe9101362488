"""LightningModules: ClassifierModule trains one net (teachers); DistillModule trains a student from a teacher."""

from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distill import DistillModule

__all__ = ["ClassifierModule", "DistillModule"]
