"""The heatmap SEG: one segment per positive finding, read back with highdicom, dciodvfy-clean."""

from __future__ import annotations

from collections.abc import Callable

import highdicom as hd
import numpy as np
import pytest
from outputs_helpers import DEMO, DETECTOR, STUDY_UID, make_result, make_source, save
from pydicom.dataset import Dataset

from ai.types import ImageResult
from dicom_node.outputs import OutputObject, OutputSettings, build_outputs
from dicom_node.outputs.common import prepare_sources, tracking

SEG_ONLY = OutputSettings(sr=False, sc=False, gsps=False, seg=True)  # binary by default
FRACTIONAL = OutputSettings(sr=False, sc=False, gsps=False, seg=True, seg_type="fractional")
SOP = "1.2.826.0.1.3680043.8.498.2.1"


def _maps(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A nodule map (a smooth bump) and an effusion map (a ramp over the lower part)."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    nodule = np.exp(-(((yy - rows * 0.3) / 30.0) ** 2 + ((xx - cols * 0.4) / 25.0) ** 2))
    effusion = np.zeros((rows, cols))
    effusion[rows // 2 :, :] = np.linspace(0.0, 1.0, cols)[np.newaxis, :]
    return nodule.astype(np.float32), effusion.astype(np.float32)


def _result(ds: Dataset, model=DETECTOR) -> ImageResult:
    """Nodule and effusion positive (each with its own Grad-CAM), cardiomegaly negative."""
    result = make_result(ds, model=model)
    nodule, effusion = _maps(int(ds.Rows), int(ds.Columns))
    result.heatmap = np.maximum(nodule, effusion)
    result.finding_heatmaps = {
        (model.device_uid, "Nodule"): nodule,
        (model.device_uid, "Effusion"): effusion,
        # a negative finding's map (never a segment)
        (model.device_uid, "Cardiomegaly"): np.ones_like(nodule),
    }
    return result


def _seg(ds: Dataset, result: ImageResult, settings: OutputSettings = SEG_ONLY,
         seed: str = "seed") -> OutputObject:
    outputs = build_outputs([(ds, result)], settings, seed)
    assert [o.kind for o in outputs] == ["seg"]
    return outputs[0]


def _read_back(output: OutputObject, tmp_path) -> hd.seg.Segmentation:
    path = save(output.dataset, tmp_path / "seg.dcm")
    return hd.seg.segread(path)


def test_off_by_default_and_the_usual_set_is_unchanged() -> None:
    ds = make_source()
    outputs = build_outputs([(ds, _result(ds))], OutputSettings(), "seed")
    assert [o.kind for o in outputs] == ["sr", "sc", "gsps"]


def test_one_segment_per_positive_finding_with_label_code_and_algorithm(tmp_path) -> None:
    ds = make_source()
    seg = _read_back(_seg(ds, _result(ds)), tmp_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == ["Nodule (CXR detector 2.1.0)", "Effusion (CXR detector 2.1.0)"]
    types = [d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in seg.SegmentSequence]
    assert types == ["27925004", "60046008"]
    colours = [tuple(d.RecommendedDisplayCIELabValue) for d in seg.SegmentSequence]
    assert len(set(colours)) == 2  # each its own colour (OHIF warns without one)
    for description in seg.SegmentSequence:
        assert description.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = description.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("CXR detector", "2.1.0")
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert family.CodeMeaning == "Artificial Intelligence"


def test_segments_share_the_sr_and_gsps_tracking_uids() -> None:
    ds = make_source()
    result = _result(ds)
    seg = _seg(ds, result).dataset
    (source,) = prepare_sources([(ds, result)])
    expected = [tracking("seed", source, 1, index)[1] for index in (0, 2)]
    assert [str(d.TrackingUID) for d in seg.SegmentSequence] == expected


def test_fractional_frames_match_the_heatmaps_within_quantisation(tmp_path) -> None:
    ds = make_source(rows=300, cols=200)
    seg = _read_back(_seg(ds, _result(ds), FRACTIONAL), tmp_path)
    pixels = seg.get_pixels_by_source_instance([SOP], rescale_fractional=True, dtype=np.float32)
    assert pixels.shape == (1, 300, 200, 2)
    nodule, effusion = _maps(300, 200)
    assert np.max(np.abs(pixels[0, :, :, 0] - nodule)) <= 0.5 / 255 + 1e-6
    assert np.max(np.abs(pixels[0, :, :, 1] - effusion)) <= 0.5 / 255 + 1e-6
    assert seg.MaximumFractionalValue == 255


def test_binary_frames_are_the_region_at_half_strength(tmp_path) -> None:
    ds = make_source(rows=300, cols=200)
    settings = OutputSettings(sr=False, sc=False, gsps=False, seg=True, seg_type="binary")
    seg = _read_back(_seg(ds, _result(ds), settings), tmp_path)
    assert seg.SegmentationType == "BINARY"
    pixels = seg.get_pixels_by_source_instance([SOP])
    nodule, effusion = _maps(300, 200)
    assert np.array_equal(pixels[0, :, :, 0] > 0, nodule >= 0.5)
    assert np.array_equal(pixels[0, :, :, 1] > 0, effusion >= 0.5)
    # the frame axes OHIF 3.13 needs to align a SEG frame with a radiograph
    (shared,) = seg.SharedFunctionalGroupsSequence
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        1, 0, 0, 0, 1, 0]
    assert "FrameOfReferenceUID" not in seg
    # OHIF's SEG viewport reads the shared Pixel Measures; highdicom needs Slice Thickness
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [1.0, 1.0]  # the CR has none
    assert float(measures.SliceThickness) == 1.0


def test_binary_seg_pixel_measures_follow_the_source_spacing(tmp_path) -> None:
    ds = make_source(modality="DX")  # ImagerPixelSpacing 0.15
    settings = OutputSettings(sr=False, sc=False, gsps=False, seg=True, seg_type="binary")
    seg = _read_back(_seg(ds, _result(ds), settings), tmp_path)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.15, 0.15]


def test_fractional_seg_claims_no_orientation() -> None:
    ds = make_source()
    seg = _seg(ds, _result(ds), FRACTIONAL).dataset
    assert "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]
    assert "FrameOfReferenceUID" not in seg


def test_source_pixel_spacing_does_not_make_the_seg_unreadable(tmp_path) -> None:
    ds = make_source(modality="DX")
    ds.PixelSpacing = [0.15, 0.15]
    seg = _read_back(_seg(ds, _result(ds), FRACTIONAL), tmp_path)  # highdicom refused it
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    binary = _read_back(_seg(ds, _result(ds)), tmp_path)
    measures = binary.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.15, 0.15]
    assert ds.PixelSpacing == [0.15, 0.15]  # the caller's dataset is untouched


def test_references_the_source_image_in_the_source_study() -> None:
    ds = make_source(modality="DX", photometric="MONOCHROME1")
    seg = _seg(ds, _result(ds)).dataset
    assert seg.StudyInstanceUID == STUDY_UID
    assert seg.SeriesInstanceUID != ds.SeriesInstanceUID
    assert seg.PatientID == ds.PatientID and seg.PatientName == ds.PatientName
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ds.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == SOP
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == SOP
        assert source.SpatialLocationsPreserved == "YES"
    assert list(seg.PatientOrientation) == ["L", "F"]
    assert seg.BodyPartExamined == "CHEST"
    assert seg.SeriesNumber == 9904 and seg.ContentLabel == "AI_GRADCAM"
    assert "NOT FOR PRIMARY DIAGNOSIS" in seg.ImageComments
    assert seg.SeriesDate and seg.ContentDate and seg.ContentTime


def test_uids_are_deterministic_across_reruns_and_follow_the_seed() -> None:
    ds = make_source()
    first, again = _seg(ds, _result(ds)), _seg(ds, _result(ds))
    other = _seg(ds, _result(ds), seed="other")
    assert first.sop_instance_uid == again.sop_instance_uid == first.dataset.SOPInstanceUID
    assert first.dataset.SeriesInstanceUID == again.dataset.SeriesInstanceUID
    assert other.sop_instance_uid != first.sop_instance_uid
    assert other.dataset.SeriesInstanceUID != first.dataset.SeriesInstanceUID


def test_series_seed_keeps_the_seg_series_across_versions() -> None:
    ds = make_source()
    runs = [build_outputs([(ds, _result(ds))], SEG_ONLY, seed, series_seed="study")
            for seed in ("v1", "v2")]
    assert runs[0][0].dataset.SeriesInstanceUID == runs[1][0].dataset.SeriesInstanceUID
    assert runs[0][0].sop_instance_uid != runs[1][0].sop_instance_uid


def test_no_heatmap_no_seg_and_combined_map_names_its_one_finding() -> None:
    ds = make_source()
    assert build_outputs([(ds, make_result(ds))], SEG_ONLY, "seed") == []
    assert build_outputs([(ds, make_result(ds, positive=False))], SEG_ONLY, "seed") == []
    one = make_result(ds, heat_box=(10, 60, 10, 60))
    one.findings = [f for f in one.findings if f.label != "Effusion"]
    seg = _seg(ds, one).dataset
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Nodule (CXR detector 2.1.0)"


def test_combined_map_of_several_findings_is_one_segment_naming_them() -> None:
    ds = make_source()
    seg = _seg(ds, make_result(ds, heat_box=(10, 60, 10, 60), model=DEMO)).dataset
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "AI heatmap: Nodule, Effusion"
    assert "TrackingUID" not in segment


@pytest.mark.parametrize(
    ("modality", "photometric"), [("CR", "MONOCHROME1"), ("DX", "MONOCHROME2")]
)
def test_dciodvfy_has_no_error(modality: str, photometric: str,
                               dciodvfy_errors: Callable[[Dataset, str], list[str]]) -> None:
    ds = make_source(modality=modality, photometric=photometric)
    for seg_type in ("fractional", "binary"):
        settings = OutputSettings(sr=False, sc=False, gsps=False, seg=True, seg_type=seg_type)
        seg = _seg(ds, _result(ds, model=DEMO), settings).dataset
        assert dciodvfy_errors(seg, f"seg-{modality}-{seg_type}") == []


def test_dciodvfy_has_no_error_on_real_radiographs(
    real_cr: Dataset, real_nih: Dataset, dciodvfy_errors: Callable[[Dataset, str], list[str]]
) -> None:
    for name, ds in (("cr", real_cr), ("nih", real_nih)):
        for settings in (SEG_ONLY, FRACTIONAL):
            seg = _seg(ds, _result(ds), settings).dataset
            assert seg.StudyInstanceUID == ds.StudyInstanceUID
            kind = f"seg-real-{name}-{settings.seg_type}"
            assert dciodvfy_errors(seg, kind) == [], kind


def test_sources_without_orientation_get_an_empty_one() -> None:
    ds = make_source(type2=False)
    seg = _seg(ds, _result(ds)).dataset
    assert "PatientOrientation" in seg and not seg.PatientOrientation


def test_a_heatmap_of_the_wrong_size_is_a_clear_error() -> None:
    ds = make_source(rows=300, cols=200)
    result = _result(ds)
    result.finding_heatmaps[(DETECTOR.device_uid, "Nodule")] = np.zeros((200, 300), np.float32)
    with pytest.raises(ValueError, match=r'"Nodule \(CXR detector 2.1.0\)" has shape \(200, 300\)'):
        build_outputs([(ds, result)], SEG_ONLY, "seed")


def test_bad_seg_type_is_refused() -> None:
    with pytest.raises(ValueError, match="seg_type"):
        OutputSettings(seg_type="labelmap")


def test_dated_with_the_rest_of_the_set() -> None:
    ds = make_source()
    outputs = build_outputs([(ds, _result(ds))], OutputSettings(seg=True), "seed")
    assert [o.kind for o in outputs] == ["sr", "sc", "gsps", "seg"]
    sr, seg = outputs[0].dataset, outputs[-1].dataset
    for keyword in ("SeriesDate", "SeriesTime", "ContentDate", "ContentTime",
                    "InstanceCreationDate", "InstanceCreationTime"):
        assert seg.get(keyword) == sr.get(keyword), keyword
