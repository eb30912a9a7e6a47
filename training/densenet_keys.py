"""torchvision / torchxrayvision DenseNet121 parameter names -> MONAI's DenseNet121 names.

Used by ``training import-weights`` (whole public checkpoints) and by ``training fit
--pretrained`` (e.g. torchvision's ImageNet DenseNet121 weights as CheXNet's starting point).
The rules are those of :func:`monai.networks.nets.densenet._load_state_dict` (``denselayerN.
norm.1`` -> ``denselayerN.layers.norm1``), extended to the new torchvision names (``norm1``),
the wrappers training scripts add (``module.``, ``densenet121.``) and CheXNet's
``classifier.0`` head.
"""

from __future__ import annotations

import re

_WRAPPERS = ("module.", "densenet121.", "model.", "net.")
_DENSE_LAYER = re.compile(
    r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\."
    r"(weight|bias|running_mean|running_var|num_batches_tracked)$"
)  # new (norm1) and old (norm.1) torchvision names; MONAI puts them under ``layers.``
_CLASSIFIER = re.compile(r"^classifier(?:\.0)?\.(weight|bias)$")  # CheXNet: Sequential(Linear, Sigmoid)


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def monai_key(key: str) -> str | None:
    """The MONAI DenseNet121 name of a torchvision / torchxrayvision DenseNet121 key, or None
    for ``op_threshs`` (the thresholds, not a weight)."""
    key = _strip_wrappers(key)
    if key == "op_threshs":
        return None
    dense = _DENSE_LAYER.match(key)
    if dense:
        block, kind, index, tensor = dense.groups()
        return f"{block}.layers.{kind}{index}.{tensor}"
    classifier = _CLASSIFIER.match(key)
    if classifier:
        return f"class_layers.out.{classifier.group(1)}"
    return key
