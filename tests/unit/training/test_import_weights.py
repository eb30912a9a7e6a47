"""``training import-weights``: public DenseNet121 checkpoints become bundles that compute
exactly what the source network computes.

No weights can be downloaded, so each test writes a randomly initialised state dict in the
source's exact key layout, taken from an independent reference written here with plain
``torch.nn`` modules under torchvision's DenseNet121 module names (torchvision itself is not
installed). The reference's own forward is the truth the imported MONAI network must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from ai.bundle.load import load_bundle
from ai.inference import Analyzer
from ai.pixels import PreprocessParams, load_display_image, preprocess_image
from tests.helpers.torchvision_densenet import RefDenseNet121, old_style, randomised
from training.cli import main
from training.densenet_keys import monai_key
from training.export import ExportOutcome
from training.import_weights import (
    CHEXNET_LABELS,
    XRV_LABELS,
    ImportWeightsError,
    import_weights,
)
from training.synth import synthesize

TOLERANCE = 1e-5
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Checkpoints in the sources' layouts


class CheXNetWrapper(nn.Module):
    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        self.densenet121 = densenet


@pytest.fixture(scope="module")
def chexnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """The arnoweng CheXNet layout: DataParallel("module.") around a wrapper
    ("densenet121.") with a Linear+Sigmoid classifier, old key names, no BN counters,
    inside {"epoch", "state_dict"}."""
    reference = randomised(RefDenseNet121(3, 14, sigmoid_head=True), seed=1)
    state = {f"module.densenet121.{old_style(k)}": v
             for k, v in CheXNetWrapper(reference).densenet121.state_dict().items()
             if not k.endswith("num_batches_tracked")}  # fmt: skip
    path = tmp_path_factory.mktemp("chexnet") / "m-25012018-123527.pth.tar"
    torch.save({"epoch": 7, "best_loss": 0.15, "state_dict": state}, path)
    return reference, path


@pytest.fixture(scope="module")
def xrv(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, list[float]]:
    """torchxrayvision's layout: 1 channel, 18 outputs, an ``op_threshs`` buffer whose NaN
    entries mark outputs the model never trained (the "nih" weights: the last four)."""
    reference = randomised(RefDenseNet121(1, 18), seed=2)
    with torch.no_grad():  # a trained xrv conv0 is scaled for inputs in [-1024, 1024]
        reference.features.conv0.weight /= 1024
    state = dict(reference.state_dict())
    thresholds = [0.05 + 0.01 * i for i in range(14)] + [float("nan")] * 4
    state["op_threshs"] = torch.tensor(thresholds)
    path = tmp_path_factory.mktemp("xrv") / "nih-densenet121-state.pt"
    torch.save(state, path)
    return reference, path, thresholds


@pytest.fixture(scope="module")
def phantom_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("import_phantom")
    synthesize(out, 1, seed=5, size=(200, 160), prevalence=0.5)
    return sorted(out.rglob("*.dcm"))[0]


@pytest.fixture(scope="module")
def chexnet_bundle(chexnet: tuple[nn.Module, Path], tmp_path_factory: pytest.TempPathFactory) -> ExportOutcome:
    out = tmp_path_factory.mktemp("chexnet_bundle") / "bundle"
    return import_weights("torchvision-densenet121", chexnet[1], out)


@pytest.fixture(scope="module")
def xrv_bundle(xrv: tuple[nn.Module, Path, list[float]],
               tmp_path_factory: pytest.TempPathFactory) -> ExportOutcome:  # fmt: skip
    out = tmp_path_factory.mktemp("xrv_bundle") / "bundle"
    return import_weights("torchxrayvision-densenet121", xrv[1], out)


def _inputs(channels: int, seed: int = 3) -> torch.Tensor:
    """Small images keep the test fast: the networks pool adaptively, any size runs."""
    return torch.randn(2, channels, 96, 96, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Equivalence


def test_chexnet_checkpoint_imports_to_the_same_function(chexnet: tuple[nn.Module, Path],
                                                         chexnet_bundle: ExportOutcome) -> None:  # fmt: skip
    reference, outcome = chexnet[0], chexnet_bundle
    bundle = load_bundle(outcome.out)
    x = _inputs(3)
    with torch.no_grad():
        expected = reference(x)  # the CheXNet head ends in a Sigmoid
        got = torch.sigmoid(bundle.model(x))
    diff = float((expected - got).abs().max())
    assert diff < TOLERANCE, diff
    meta = bundle.metadata
    assert meta.label_names == list(CHEXNET_LABELS)
    assert (meta.input.channels, meta.input.size) == (3, 224)
    assert meta.input.mean == IMAGENET_MEAN and meta.input.std == IMAGENET_STD
    assert all(spec.threshold == 0.5 for spec in meta.labels)
    assert any("calibrate" in w for w in outcome.warnings)
    assert meta.training["imported"]["format"] == "torchvision-densenet121"


def test_xrv_checkpoint_keeps_trained_outputs_and_thresholds(
    xrv: tuple[nn.Module, Path, list[float]], xrv_bundle: ExportOutcome
) -> None:
    reference, _, thresholds = xrv
    outcome = xrv_bundle
    bundle = load_bundle(outcome.out)
    x = _inputs(1) * 600  # xrv inputs live in [-1024, 1024]
    with torch.no_grad():
        expected = reference(x)[:, :14]
        got = bundle.model(x)
    diff = float((expected - got).abs().max())
    assert diff < TOLERANCE, diff
    meta = bundle.metadata
    assert meta.label_names == list(XRV_LABELS[:14])  # NaN thresholds: untrained, dropped
    assert [s.threshold for s in meta.labels] == pytest.approx(thresholds[:14])
    assert meta.input.channels == 1 and meta.input.value_range == (-1024.0, 1024.0)
    assert "calibration" in meta.training
    doc = json.loads((outcome.out / "configs" / "metadata.json").read_text())
    image = doc["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["value_range"] == [-1024.0, 1024.0]


def test_node_feeds_imported_bundles_their_own_input_space(
    chexnet: tuple[nn.Module, Path], xrv: tuple[nn.Module, Path, list[float]],
    chexnet_bundle: ExportOutcome, xrv_bundle: ExportOutcome, phantom_dicom: Path,
) -> None:  # fmt: skip
    """The node's Analyzer on a phantom DICOM gives the probabilities the reference gives
    on the same image scaled by hand (ImageNet statistics; [-1024, 1024])."""
    ds = pydicom.dcmread(phantom_dicom)
    bundles = [chexnet_bundle.out, xrv_bundle.out]
    (result,) = Analyzer(bundles, device="cpu", gradcam=False).analyze([ds])
    grey, _ = preprocess_image(load_display_image(ds), PreprocessParams())  # plain [0, 1]
    grey_t = torch.from_numpy(np.ascontiguousarray(grey))[None]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want_a = chexnet[0]((grey_t.repeat(1, 3, 1, 1) - mean) / std)[0]
        want_b = torch.sigmoid(xrv[0](grey_t * 2048 - 1024)[0, :14])
    by_model = {}
    for finding in result.findings:
        by_model.setdefault(finding.model.name, {})[finding.label] = finding.probability
    got_a = torch.tensor([by_model["chexnet-densenet121"][n] for n in CHEXNET_LABELS])
    got_b = torch.tensor([by_model["xrv-densenet121"][n] for n in XRV_LABELS[:14]])
    assert float((got_a - want_a).abs().max()) < TOLERANCE
    assert float((got_b - want_b).abs().max()) < TOLERANCE


# --------------------------------------------------------------------------------------------
# Names, refusals, CLI


def test_key_conversion_follows_monai() -> None:
    assert monai_key("module.densenet121.features.denseblock1.denselayer1.norm.1.weight") == (
        "features.denseblock1.layers.denselayer1.norm1.weight".replace(
            "layers.denselayer1", "denselayer1.layers"))  # fmt: skip
    assert monai_key("features.denseblock4.denselayer16.conv2.weight") == (
        "features.denseblock4.denselayer16.layers.conv2.weight")
    assert monai_key("classifier.0.bias") == "class_layers.out.bias"
    assert monai_key("classifier.weight") == "class_layers.out.weight"
    assert monai_key("features.transition2.conv.weight") == "features.transition2.conv.weight"
    assert monai_key("op_threshs") is None


def test_refusals_name_the_problem(chexnet: tuple[nn.Module, Path], tmp_path: Path) -> None:
    weights = chexnet[1]
    with pytest.raises(ImportWeightsError, match="expects 1 input channel"):
        import_weights("torchxrayvision-densenet121", weights, tmp_path / "x")
    with pytest.raises(ImportWeightsError, match="names 2 output"):
        import_weights("torchvision-densenet121", weights, tmp_path / "y", labels="A,B")
    pickled = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(ImportWeightsError, match="pickled objects, not a state dict"):
        import_weights("torchvision-densenet121", pickled, tmp_path / "z")
    partial = tmp_path / "partial.pt"
    torch.save({"features.conv0.weight": torch.zeros(64, 3, 7, 7),
                "classifier.weight": torch.zeros(2, 1024)}, partial)  # fmt: skip
    with pytest.raises(ImportWeightsError, match="missing"):
        import_weights("torchvision-densenet121", partial, tmp_path / "w", labels="A,B")


def test_cli_imports_with_labels_and_thresholds(chexnet: tuple[nn.Module, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    labels = ",".join(["Atelectasis", "Cardiomegaly", "Effusion"] + [""] * 11)  # keep three
    thresholds = ",".join(["0.2", "0.3", "0.4"] + ["0.5"] * 11)
    out = tmp_path / "cli"
    code = main(["-q", "import-weights", "--format", "torchvision-densenet121", "--weights",
                 str(chexnet[1]), "--labels", labels, "--thresholds", thresholds, "--out",
                 str(out)])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "Effusion" in stdout and "threshold 0.4" in stdout
    meta = load_bundle(out).metadata
    assert [(s.name, s.threshold) for s in meta.labels] == [
        ("Atelectasis", 0.2), ("Cardiomegaly", 0.3), ("Effusion", 0.4)]
    assert meta.labels[2].code.value == "60046008"  # Effusion -> SNOMED pleural effusion
    assert main(["-q", "import-weights", "--format", "torchvision-densenet121", "--weights",
                 str(chexnet[1]), "--out", str(out)]) == 1  # exists, no --force  # fmt: skip


def test_imported_bundle_calibrates_on_local_labels(chexnet: tuple[nn.Module, Path],
                                                    tmp_path: Path) -> None:  # fmt: skip
    """No thresholds in a CheXNet file: ``training calibrate`` sets them on local data."""
    data = tmp_path / "local"
    synthesize(data, 6, seed=9, size=(96, 80), prevalence=0.5)
    bundle = tmp_path / "imported"
    labels = ",".join(["cardiomegaly", "", "pleural_effusion"] + [""] * 11)
    import_weights("torchvision-densenet121", chexnet[1], bundle, labels=labels)
    assert main(["-q", "calibrate", "--bundle", str(bundle), "--data", str(data), "--labels",
                 str(data / "labels.csv"), "--device", "cpu", "--youden", "--all-images"]) == 0  # fmt: skip
    meta = load_bundle(bundle).metadata
    assert meta.version == "1.0.1" and "calibration" in meta.training
    assert meta.input.channels == 3 and meta.input.mean == IMAGENET_MEAN  # kept by calibrate


def test_evaluate_prints_the_chexnet_table_for_nih_labels(
    chexnet_bundle: ExportOutcome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An imported CheXNet evaluated on local DICOM labelled with ChestX-ray14 names."""
    data = tmp_path / "local"
    synthesize(data, 6, seed=9, size=(96, 80), prevalence=0.5)
    rows = (data / "labels.csv").read_text().splitlines()
    header = rows[0].replace("cardiomegaly", "Cardiomegaly").replace("pleural_effusion", "Effusion")
    (data / "nih_names.csv").write_text("\n".join([header, *rows[1:]]) + "\n")
    code = main(["-q", "evaluate", "--bundle", str(chexnet_bundle.out), "--data", str(data),
                 "--labels", str(data / "nih_names.csv"), "--out", str(tmp_path / "rep"),
                 "--device", "cpu", "--bootstrap", "50", "--no-curves", "--all-images"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "| Pathology | This run (evaluated) | 95 % CI | CheXNet (published) |" in stdout
    assert "| Cardiomegaly |" in stdout and "0.9248" in stdout
