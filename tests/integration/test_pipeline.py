"""End to end with real peers: DCMTK storescu -> node (real models, real outputs) -> DCMTK
storescp; every output validated with dciodvfy and placed in the source study."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from conftest import StoreSCP, dciodvfy_errors, free_port, storescu, wait_until
from helpers.node import node_settings, query, start_node, studies
from sqlalchemy import select

from dicom_node.analysis import load_analyzer
from dicom_node.store import db

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ANALYSABLE = ["dx_mono2_explicit", "dx_mono1_j2k", "cr_mono1_jpeg_lossless", "cr_mono2_jpegls",
              "dx_mono2_rle", "cr_mono1_voi_lut_seq", "dx_mono2_implicit_12bit",
              "cr_mono2_16bit_rescale"]
SR, SC, GSPS = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7", \
    "1.2.840.10008.5.1.4.1.1.11.1"


def _received_by_study(dest: StoreSCP) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for f in dest.files():
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # noqa: BLE001 - a file storescp is still writing
            continue
        ds.filename = str(f)
        out.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return out


def test_every_variant_gets_sr_sc_gsps_in_its_study(tmp_path: Path, tiny_bundle: Path) -> None:
    from training.synth import make_dataset

    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", destinations=[dest.destination], quiet=0.5,
                             **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu"})
    node = start_node(settings, load_analyzer)
    try:
        sources: dict[str, pydicom.Dataset] = {}
        sent_at: dict[str, float] = {}
        for i, variant in enumerate(ANALYSABLE):
            ds = make_dataset(variant, seed=100 + i, rows=700 + 37 * i, columns=600 + 53 * i)
            path = tmp_path / "in" / f"{variant}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            res = storescu(settings.dicom.port, [path])
            assert res.returncode == 0, f"{variant}: {res.stderr}"
            sources[variant] = pydicom.dcmread(path, stop_before_pixels=True)
            sent_at[variant] = time.time()
        want = {str(s.StudyInstanceUID) for s in sources.values()}
        got = wait_until(lambda: (r := _received_by_study(dest)) and all(
            len(r.get(u, [])) == 3 for u in want) and r, 240, interval=0.5,
            what="SR, SC and GSPS for every variant")
        for variant, src in sources.items():
            objs = got[str(src.StudyInstanceUID)]
            classes = sorted(str(o.SOPClassUID) for o in objs)
            assert classes == sorted([SR, SC, GSPS]), variant
            for o in objs:
                assert o.StudyInstanceUID == src.StudyInstanceUID
                assert o.SeriesInstanceUID != src.SeriesInstanceUID
                assert o.PatientID == src.PatientID
                errors = dciodvfy_errors(Path(o.filename))
                assert errors == [], f"{variant} {o.SOPClassUID.name}: {errors}"
            arrived = max(Path(o.filename).stat().st_mtime for o in objs)
            print(f"latency {variant}: {arrived - sent_at[variant]:.2f} s "
                  f"(incl. {settings.studies.quiet_period_s} s quiet period)")
            gsps = next(o for o in objs if str(o.SOPClassUID) == GSPS)
            expect = "INVERSE" if src.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
            assert gsps.PresentationLUTShape == expect, variant
    finally:
        node.stop()
        dest.stop()


def test_real_radiographs(tmp_path: Path, tiny_bundle: Path, realdicom: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", destinations=[dest.destination], quiet=0.5,
                             **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu"})
    node = start_node(settings, load_analyzer)
    try:
        files = sorted(realdicom.glob("*.dcm"))
        for f in files:
            assert storescu(settings.dicom.port, [f]).returncode == 0
        hdr = {f.name: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
        chest = [str(hdr[n].StudyInstanceUID) for n in ("cr_chest_pa_philips_j2k.dcm",
                                                         "dx_chest_nih_cxr14_sc.dcm")]
        got = wait_until(lambda: (r := _received_by_study(dest)) and all(
            len(r.get(u, [])) == 3 for u in chest) and r, 180, interval=0.5,
            what="results for the two real chest radiographs")
        for uid in chest:
            for o in got[uid]:
                assert dciodvfy_errors(Path(o.filename)) == []
        hip = str(hdr["cr_hip_fuji_j2k.dcm"].StudyInstanceUID)
        state = studies(settings)[hip]
        assert state.state == "ignored" and "HIP" in state.reason
        assert hip not in got
    finally:
        node.stop()
        dest.stop()


def test_destination_down_then_up_delivers_once_with_same_uids(tmp_path: Path,
                                                                tiny_bundle: Path) -> None:
    from training.synth import make_dataset

    dest_port = free_port()
    settings = node_settings(tmp_path / "node", destinations=[f"DEST@127.0.0.1:{dest_port}"],
                             quiet=0.3, **{"models.bundles": [str(tiny_bundle)],
                                           "models.device": "cpu"})
    node = start_node(settings, load_analyzer)
    dest = None
    try:
        path = tmp_path / "in.dcm"
        make_dataset("dx_mono2_explicit", seed=7, rows=512, columns=512).save_as(
            path, enforce_file_format=True)
        assert storescu(settings.dicom.port, [path]).returncode == 0
        wait_until(lambda: (rows := query(settings, select(db.deliveries))) and all(
            r.attempts >= 2 and r.state == "retrying" for r in rows), 60,
            what="failed delivery attempts while the destination is down")
        first_uids = sorted(r.sop_instance_uid for r in query(settings, select(db.outputs)))
        dest = StoreSCP(tmp_path / "dest", dest_port)
        wait_until(lambda: all(r.state == "sent" for r in query(settings, select(db.deliveries)))
                   , 60, what="deliveries sent after the destination came up")
        time.sleep(1.0)
        got = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in dest.files())
        assert got == first_uids and len(got) == 3  # once each, same UIDs as generated first
    finally:
        node.stop()
        if dest:
            dest.stop()


def test_large_images_get_the_same_overlay_whatever_the_syntax(tmp_path: Path,
                                                               tiny_bundle: Path) -> None:
    """A 2304 x 2048 radiograph sent uncompressed, RLE, JPEG Lossless and JPEG 2000: each is
    analysed at 1152 x 1024 (the JPEG 2000 decoded at level 1, the others shrunk after one
    decode), so every SC has that size, while the SR and the GSPS stay in source pixels."""
    from training.synth import make_dataset

    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(tmp_path / "node", destinations=[dest.destination], quiet=0.5,
                             **{"models.bundles": [str(tiny_bundle)], "models.device": "cpu"})
    node = start_node(settings, load_analyzer)
    variants = ["dx_mono2_explicit", "dx_mono2_rle", "cr_mono1_jpeg_lossless", "dx_mono1_j2k"]
    try:
        sources: dict[str, pydicom.Dataset] = {}
        for i, variant in enumerate(variants):
            ds = make_dataset(variant, seed=300 + i, rows=2304, columns=2048)
            path = tmp_path / "in" / f"{variant}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            assert storescu(settings.dicom.port, [path]).returncode == 0, variant
            sources[variant] = pydicom.dcmread(path, stop_before_pixels=True)
        want = {str(s.StudyInstanceUID) for s in sources.values()}
        got = wait_until(lambda: (r := _received_by_study(dest)) and all(
            len(r.get(u, [])) == 3 for u in want) and r, 240, interval=0.5,
            what="SR, SC and GSPS for every syntax")
        for variant, src in sources.items():
            objs = {str(o.SOPClassUID): o for o in got[str(src.StudyInstanceUID)]}
            sc = objs[SC]
            assert (sc.Rows, sc.Columns) == (1152, 1024), variant
            assert sc.pixel_array.shape == (1152, 1024, 3), variant
            gsps = objs[GSPS]
            for area in gsps.DisplayedAreaSelectionSequence:
                assert tuple(area.DisplayedAreaBottomRightHandCorner) == (2048, 2304), variant
            points = [float(v) for item in gsps.get("GraphicAnnotationSequence", [])
                      for obj in item.get("GraphicObjectSequence", [])
                      for v in obj.GraphicData]
            assert all(0 <= v <= 2304 for v in points), variant
            assert dciodvfy_errors(Path(sc.filename)) == [], variant
    finally:
        node.stop()
        dest.stop()
