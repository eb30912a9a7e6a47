"""What MONAI's RetinaNet needs to run without torchvision: the project's only such shims.

``monai.apps.detection`` was ported from torchvision and still reaches for it in three
places (checked against MONAI 1.6.1). Each gets a small replacement here, so the rest of
the code base uses MONAI's detector unchanged and never imports torchvision:

1. **Feature extractor.** MONAI's ``BackboneWithFPN`` (behind
   ``resnet_fpn_feature_extractor``) wraps the backbone in torchvision's
   ``IntermediateLayerGetter``. :class:`ResNetFPNExtractor` does the same job in a few
   lines: it runs the MONAI ResNet stem and the requested ``layerN`` stages and feeds their
   outputs to MONAI's own :class:`~monai.networks.blocks.FeaturePyramidNetwork` (with
   MONAI's ``LastLevelMaxPool`` extra level, as ``BackboneWithFPN`` does). The module names
   (``body.conv1``, ``body.layer1``, ``fpn.*``) follow ``BackboneWithFPN``.
2. **Matcher and sampler.** The defaults torchvision would provide (``Matcher``,
   ``BalancedPositiveNegativeSampler``) are replaced by MONAI's own ATSS matcher and hard
   negative sampler (:func:`configure_training`); hard negatives are also what makes
   negative images useful in training.
3. **isinstance guards.** ``RetinaNetDetector.compute_anchor_matched_idxs`` and
   ``get_cls_train_sample_per_image`` test ``isinstance(x, Matcher)`` /
   ``isinstance(x, BalancedPositiveNegativeSampler)`` *before* trying MONAI's classes. Without
   torchvision those names are lazy import placeholders whose ``isinstance`` raises
   ``OptionalImportError``. :func:`install` swaps them for empty placeholder classes (only
   when they are placeholders: an installed torchvision is left alone), so the checks fall
   through to ATSS / hard negatives. It is idempotent and called by every builder here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from monai.apps.detection.networks import retinanet_detector
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class TorchvisionMatcherPlaceholder:
    """Stands in for ``torchvision...Matcher``: nothing is ever an instance of it."""


class TorchvisionSamplerPlaceholder:
    """Stands in for ``torchvision...BalancedPositiveNegativeSampler`` (never instantiated)."""


def install() -> None:
    """Replace the lazy torchvision placeholders in ``retinanet_detector`` (idempotent)."""
    for name, placeholder in (
        ("Matcher", TorchvisionMatcherPlaceholder),
        ("BalancedPositiveNegativeSampler", TorchvisionSamplerPlaceholder),
    ):
        if not isinstance(getattr(retinanet_detector, name, None), type):
            setattr(retinanet_detector, name, placeholder)
            logger.debug("retinanet_detector.%s replaced by a placeholder class", name)


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage: those of its last convolution."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
    if not convs:
        raise ValueError("a ResNet stage without convolutions")
    return int(convs[-1].out_channels)


class _ResNetBody(nn.Module):
    """The ResNet stem and stages up to the deepest returned one (no pooling head)."""

    def __init__(self, backbone: ResNet, returned_layers: Sequence[int]) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act = backbone.conv1, backbone.bn1, backbone.act
        self.maxpool = None if backbone.no_max_pool else backbone.maxpool
        self.returned = tuple(int(k) for k in returned_layers)
        for k in range(1, max(self.returned) + 1):
            self.add_module(f"layer{k}", getattr(backbone, f"layer{k}"))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.act(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        out: OrderedDict[str, Tensor] = OrderedDict()
        for k in range(1, max(self.returned) + 1):
            x = getattr(self, f"layer{k}")(x)
            if k in self.returned:
                out[str(len(out))] = x
        return out


class ResNetFPNExtractor(nn.Module):
    """MONAI ResNet stages + MONAI FPN: the torchvision-free ``BackboneWithFPN``.

    Returns an ordered dict of ``len(returned_layers) + 1`` maps (highest resolution first),
    each with :attr:`out_channels` channels, as ``RetinaNet`` expects.
    """

    def __init__(
        self, backbone: ResNet, returned_layers: Sequence[int], out_channels: int, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        layers = sorted({int(k) for k in returned_layers})
        if not layers or layers[0] < 1 or layers[-1] > 4:
            raise ValueError(f"returned_layers {list(returned_layers)} must lie in 1..4")
        self.body = _ResNetBody(backbone, layers)
        in_channels = [_out_channels(getattr(self.body, f"layer{k}")) for k in layers]
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=spatial_dims,
            in_channels_list=in_channels,
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(spatial_dims),
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = self.fpn(self.body(x))
        return features


def configure_training(
    detector: RetinaNetDetector,
    *,
    atss_candidates: int = 4,
    batch_size_per_image: int = 64,
    positive_fraction: float = 0.3,
    pool_size: float = 20.0,
    min_neg: int = 16,
) -> RetinaNetDetector:
    """ATSS matcher (no centre-in-box rule: small objects) and hard negative sampler.

    Defaults are those of MONAI's LUNA16 nodule detection tutorial. On an image without
    boxes every anchor is a negative, so the sampler trains on its highest-scoring
    background anchors: negative images teach the detector what is *not* a nodule.
    """
    install()
    detector.set_atss_matcher(num_candidates=atss_candidates, center_in_gt=False)
    detector.set_hard_negative_sampler(
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        pool_size=pool_size,
        min_neg=min_neg,
    )
    return detector
