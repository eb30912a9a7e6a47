"""STOW-RS: the multipart request the node builds, and what each response means for the
object it carried. Bodies are real: the request is parsed back with the stdlib MIME parser,
responses are Store Instances Responses written by pydicom's DICOM JSON writer."""

from __future__ import annotations

import email
import email.policy
import io
import json

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.delivery.outcome import Verdict
from dicom_node.delivery.stow import multipart_related, outcome, store_response

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
OURS = "1.2.826.0.1.3680043.8.498.1001"
OTHER = "1.2.826.0.1.3680043.8.498.1002"
DEST = "stow-rs:http://pacs.example/dicom-web"


def _item(uid: str, **extra: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = SR_CLASS
    item.ReferencedSOPInstanceUID = uid
    for keyword, value in extra.items():
        setattr(item, keyword, value)
    return item


def _response(stored: list[Dataset] = (), failed: list[Dataset] = ()) -> bytes:  # type: ignore[assignment]
    ds = Dataset()
    ds.RetrieveURL = "http://pacs.example/dicom-web/studies/1.2.3"
    ds.ReferencedSOPSequence = Sequence(list(stored))
    ds.FailedSOPSequence = Sequence(list(failed))
    return json.dumps(ds.to_json_dict()).encode()


def _verdict(status: int, body: bytes = b"") -> tuple[Verdict, str | None, int | None]:
    result = outcome(status, None, body, sop_instance_uid=OURS, sop_class_uid=SR_CLASS,
                     destination=DEST)
    return result.verdict, result.detail, result.code


def _part10(uid: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SR_CLASS, uid
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_request_is_multipart_related_with_the_files_unchanged() -> None:
    files = [_part10(OURS), _part10(OTHER) + b"\r\n--not-a-boundary\r\n"]
    body, content_type = multipart_related(files)
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP)
    assert message.is_multipart()
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * 2
    assert [p.get_payload(decode=True) for p in parts] == files
    assert pydicom.dcmread(io.BytesIO(parts[0].get_payload(decode=True))).SOPInstanceUID == OURS
    with pytest.raises(ValueError, match="boundary 'x' occurs inside a part"):
        multipart_related([b"...--x..."], boundary="x")


def test_stored_object_is_sent_and_a_warning_reason_is_kept() -> None:
    assert _verdict(200, _response([_item(OURS)])) == (Verdict.SENT, None, 0)
    verdict, detail, code = _verdict(202, _response([_item(OURS, WarningReason=0xB000)]))
    assert (verdict, code) == (Verdict.SENT, 0xB000)
    assert detail == "stored with warning: status 0xB000 (coercion of data elements)"
    # 200 means every instance was stored (PS3.18 10.5.3), whatever the body lists
    assert _verdict(200, b"")[0] is Verdict.SENT
    assert _verdict(200, _response([_item(OTHER)]))[0] is Verdict.SENT


@pytest.mark.parametrize(("status", "reason", "verdict", "text"), [
    (202, 0x0122, Verdict.NOT_ACCEPTED, "Comprehensive SR Storage, status 0x0122"),
    (409, 0x0122, Verdict.NOT_ACCEPTED, "(HTTP 409 Conflict)"),
    (202, 0xC122, Verdict.NOT_ACCEPTED, "transfer syntax not supported (0xC122"),
    (202, 0xA700, Verdict.BUSY, "status 0xA700 (out of resources)"),
    (409, 0xA900, Verdict.RETRY, "status 0xA900 (data set does not match)"),
    (409, 0xC000, Verdict.RETRY, "status 0xC000 (cannot understand) (HTTP 409 Conflict)"),
    (202, 0x0110, Verdict.RETRY, "status 0x0110 (processing failure) (HTTP 202 Accepted)"),
])
def test_failed_sop_item_is_classified_like_a_c_store_status(
        status: int, reason: int, verdict: Verdict, text: str) -> None:
    body = _response([_item(OTHER)], [_item(OURS, FailureReason=reason)])
    got, detail, code = _verdict(status, body)
    assert (got, code) == (verdict, reason)
    assert detail is not None and text in detail


def test_failed_item_without_a_reason_and_a_202_that_does_not_list_the_object() -> None:
    failed = _item(OURS)
    assert _verdict(202, _response([], [failed]))[:2] == (
        Verdict.RETRY, "failed without a failure reason (HTTP 202 Accepted)")
    verdict, detail, _ = _verdict(202, _response([_item(OTHER)]))
    assert verdict is Verdict.RETRY and "without a record of the object" in detail  # type: ignore[operator]


@pytest.mark.parametrize(("status", "verdict", "text"), [
    (400, Verdict.DEAD, "HTTP 400 Bad Request"),
    (401, Verdict.DEAD, "HTTP 401 Unauthorized: check the destination's auth"),
    (403, Verdict.DEAD, "HTTP 403 Forbidden"),
    (404, Verdict.DEAD, "HTTP 404 Not Found: check the DICOMweb root url"),
    (413, Verdict.DEAD, "HTTP 413 Request Entity Too Large"),
    (415, Verdict.NOT_ACCEPTED, "HTTP 415 Unsupported Media Type"),
    (307, Verdict.DEAD, "redirects are not followed"),
    (409, Verdict.RETRY, "HTTP 409 Conflict"),
    (429, Verdict.BUSY, "HTTP 429 Too Many Requests"),
    (503, Verdict.BUSY, "HTTP 503 Service Unavailable"),
    (500, Verdict.RETRY, "HTTP 500 Internal Server Error"),
    (502, Verdict.RETRY, "HTTP 502 Bad Gateway"),
])
def test_http_status_without_a_record_of_the_object(status: int, verdict: Verdict,
                                                      text: str) -> None:
    got, detail, code = _verdict(status, b'{"Message": "Patient DOE^JOHN refused"}')
    assert (got, code) == (verdict, None)
    assert detail is not None and detail.startswith(f"{DEST} answered ") and text in detail
    assert "DOE" not in detail  # a response body is never copied into the error


def test_a_body_that_is_not_a_store_response_is_ignored() -> None:
    assert store_response(b"<NativeDicomModel/>") is None
    assert store_response(b'{"00081198": {"vr": "SQ", "Value": ["x"]}}') is None
    assert _verdict(202, b'{"00081198": {"vr": "XX"}}')[0] is Verdict.RETRY
    assert store_response(b"[]") is None
    body = store_response(b"[" + _response([_item(OURS)]) + b"]")  # wrapped in an array
    assert body is not None and body.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == OURS
