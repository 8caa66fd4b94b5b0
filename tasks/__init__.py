"""tritonzoo's training tasks (LightningModules), data modules, CLI and benchmarks.

Tasks are importable by their short names in configs (`class_path: tasks.ImageClassification`).
They load lazily, so `zoo --help` and the CLI's message about missing extras work where
only `pip install tritonzoo` (torch and triton) is installed.
"""

import importlib

_TASKS = {
    "ZooTask": "tasks.base",
    "ImageClassification": "tasks.vision",
    "CausalLM": "tasks.text",
    "MaskedLM": "tasks.text",
    "Seq2Seq": "tasks.seq2seq",
    "AudioClassification": "tasks.speech",
    "SpeechRecognition": "tasks.speech",
}

__all__ = list(_TASKS)


def __getattr__(name: str):
    if name in _TASKS:
        return getattr(importlib.import_module(_TASKS[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
