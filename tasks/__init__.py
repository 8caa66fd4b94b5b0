"""tritonzoo's training tasks (LightningModules), data modules, CLI and benchmarks.

Tasks are importable by their short names in configs (`class_path: ImageClassification`).
"""

from .base import ZooTask
from .vision import ImageClassification

__all__ = ["ZooTask", "ImageClassification"]
