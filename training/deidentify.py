"""``training deidentify``: PS3.15 Annex E Basic Application Level Confidentiality Profile.

Every DICOM file under ``--in`` is rewritten under ``--out`` with the actions of Table E.1-1
(:data:`PROFILE`, by attribute keyword) applied at every nesting level:

- ``X`` remove, ``Z`` zero length, ``D`` dummy value of the VR, ``U`` new UID;
- compound codes resolve to a choice that leaks nothing and keeps CR/DX/SC/SR/GSPS objects
  valid without knowing each IOD's module table: ``X/Z`` and ``X/Z/D`` -> empty (present
  but zero length, valid whether the attribute is Type 2 or 3), except sequences, which are
  removed (a Type 3 sequence may not be empty) unless Type 2 (:data:`TYPE2_SEQUENCES`, the
  DX Acquisition Context Sequence); ``X/D`` -> remove; ``Z/D`` -> empty; a dummy instead where the attribute is Type 1
  in those IODs (:data:`TYPE1_DUMMY`: SR Content Date/Time, GSPS Presentation Creation
  Date/Time); ``X/Z/U*`` (Source/Referenced Image Sequence) -> kept, cleaned, with every
  UID inside replaced, so references keep pointing at the de-identified instances;
- Patient ID and Patient's Name (``Z``; the profile allows a dummy) become one consistent
  pseudonym per patient, so patient-level train/validation splits stay possible;
- beyond the table, as safety nets: all private elements (and their creators), curves
  (50xx), overlays (60xx), group lengths, public elements unknown to the dictionary and the
  128-byte preamble are removed; any other Person Name is emptied; any other date or
  date-time is emptied; any other UID that is not a registered DICOM UID (SOP classes,
  transfer syntaxes, coding schemes are kept) is replaced;
- file meta: Media Storage SOP Instance UID follows the new SOP Instance UID; source /
  sending / receiving AE titles and private information are removed;
- added: Patient Identity Removed = YES, De-identification Method and its code sequence
  (DCM 113100 "Basic Application Confidentiality Profile"), Longitudinal Temporal
  Information Modified = REMOVED.

UIDs are replaced with ``2.25.<128-bit integer>`` from HMAC-SHA256(salt, UID) (RFC 9562
version-8 layout): the same input UID gives the same new UID in every file and every run with
the same salt, and cannot be reversed without it. Without a salt a random one is used: the
output is then consistent within the run only.

Pixel data is never decoded or re-encoded: its bytes (native or encapsulated) are written
back exactly. Images flagged Burned In Annotation = YES are refused (not written) unless
``allow_burned_in``. Output names are ``<patient pseudonym>/<new Study UID>/<new SOP UID>.dcm``.
Non-DICOM files are not copied. The report (``deidentify_report.json``) and logs hold
counts only; pydicom's value warnings (which quote values) are suppressed while reading.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import os
import secrets
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_has_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from training.errors import TrainingError

logger = logging.getLogger(__name__)

SALT_ENV = "TRAINING_DEID_SALT"
METHOD = "PS3.15 E.1 Basic Profile; training deidentify 1"
METHOD_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
UID_ROOT = "2.25."
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
REPORT_NAME = "deidentify_report.json"

# PS3.15 Table E.1-1, Basic Profile column, for the attributes a radiograph export carries
# (patient, visit, study, series, equipment, request, physicians and operators, dates and
# comments, references, SR/GSPS content, UIDs). Keys are pydicom keywords.
PROFILE: dict[str, str] = {
    # patient
    "PatientName": "Z", "PatientID": "Z/D", "IssuerOfPatientID": "X",
    "IssuerOfPatientIDQualifiersSequence": "X",
    "PatientBirthDate": "Z", "PatientBirthTime": "X", "PatientSex": "Z", "PatientAge": "X",
    "PatientSize": "X", "PatientWeight": "X", "PatientAddress": "X",
    "PatientTelephoneNumbers": "X", "PatientTelecomInformation": "X",
    "PatientMotherBirthName": "X", "PatientBirthName": "X", "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X", "OtherPatientNames": "X", "PatientComments": "X",
    "PatientInsurancePlanCodeSequence": "X", "PatientPrimaryLanguageCodeSequence": "X",
    "PatientReligiousPreference": "X", "MilitaryRank": "X", "BranchOfService": "X",
    "MedicalRecordLocator": "X", "EthnicGroup": "X", "Occupation": "X",
    "AdditionalPatientHistory": "X", "PregnancyStatus": "X", "LastMenstrualDate": "X",
    "SmokingStatus": "X", "Allergies": "X", "MedicalAlerts": "X", "SpecialNeeds": "X",
    "PatientState": "X", "CountryOfResidence": "X", "RegionOfResidence": "X",
    "ResponsiblePerson": "X", "ResponsibleOrganization": "X", "PatientSexNeutered": "X/Z",
    "ReferencedPatientSequence": "X", "ReferencedPatientPhotoSequence": "X",
    "ReferencedPatientAliasSequence": "X", "InsurancePlanIdentification": "X",
    # visit / admission
    "AdmissionID": "X", "IssuerOfAdmissionID": "X", "IssuerOfAdmissionIDSequence": "X",
    "AdmittingDate": "X", "AdmittingTime": "X", "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X", "CurrentPatientLocation": "X",
    "PatientInstitutionResidence": "X", "DischargeDate": "X", "DischargeTime": "X",
    "DischargeDiagnosisDescription": "X", "ServiceEpisodeID": "X",
    "ServiceEpisodeDescription": "X", "IssuerOfServiceEpisodeID": "X", "VisitComments": "X",
    "ReasonForVisit": "X", "ReasonForVisitCodeSequence": "X", "PatientTransportArrangements": "X",
    # study
    "StudyInstanceUID": "U", "StudyDate": "Z", "StudyTime": "Z", "AccessionNumber": "Z",
    "IssuerOfAccessionNumberSequence": "X", "StudyID": "Z", "StudyIDIssuer": "X",
    "StudyDescription": "X", "StudyComments": "X", "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X", "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X", "ConsultingPhysicianName": "Z",
    "ConsultingPhysicianIdentificationSequence": "X", "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X", "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X", "RequestingPhysician": "X",
    "RequestingService": "X", "ReasonForStudy": "X", "RequestedProcedureDescription": "X/Z",
    "RequestedContrastAgent": "X", "ReferencedStudySequence": "X/Z",
    "StudyArrivalDate": "X", "StudyArrivalTime": "X", "StudyCompletionDate": "X",
    "StudyCompletionTime": "X", "StudyVerifiedDate": "X", "StudyVerifiedTime": "X",
    "StudyReadDate": "X", "StudyReadTime": "X", "ScheduledStudyStartDate": "X",
    "ScheduledStudyStartTime": "X", "ScheduledStudyStopDate": "X",
    "ScheduledStudyStopTime": "X", "ScheduledStudyLocation": "X",
    "ScheduledStudyLocationAETitle": "X",
    # series / image / instance
    "SeriesInstanceUID": "U", "SOPInstanceUID": "U", "SeriesDate": "X/D", "SeriesTime": "X/D",
    "SeriesDescription": "X", "AcquisitionDate": "X/Z", "AcquisitionTime": "X/Z",
    "AcquisitionDateTime": "X/Z/D", "ContentDate": "Z/D", "ContentTime": "Z/D",
    "InstanceCreationDate": "X/D", "InstanceCreationTime": "X/Z/D", "InstanceCreatorUID": "U",
    "ImageComments": "X", "FrameComments": "X", "ImagePresentationComments": "X",
    "AcquisitionComments": "X", "DerivationDescription": "X", "ProtocolName": "X/D",
    "AcquisitionProtocolDescription": "X", "AcquisitionDeviceProcessingDescription": "X/D",
    "IconImageSequence": "X", "FrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U", "IrradiationEventUID": "U",
    "ConcatenationUID": "U", "DimensionOrganizationUID": "U", "AcquisitionUID": "U",
    "TimezoneOffsetFromUTC": "X", "DateOfSecondaryCapture": "X", "TimeOfSecondaryCapture": "X",
    "ModifiedImageDate": "X", "ModifiedImageTime": "X", "ModifiedImageDescription": "X",
    "ModifyingDeviceID": "X", "OverlayDate": "X", "OverlayTime": "X", "CurveDate": "X",
    "CurveTime": "X", "IdentifyingComments": "X", "TextComments": "X", "TextString": "X",
    "Arbitrary": "X", "DataSetTrailingPadding": "X", "DigitalSignaturesSequence": "X",
    "OriginalAttributesSequence": "X", "ModifiedAttributesSequence": "X",
    "ReferencedImageSequence": "X/Z/U*", "SourceImageSequence": "X/Z/U*",
    "ReferencedSOPInstanceUID": "U", "ReferencedSOPInstanceUIDInFile": "U",
    "ReferencedFrameOfReferenceUID": "U", "RelatedFrameOfReferenceUID": "U",
    "StorageMediaFileSetUID": "U", "TargetUID": "U", "UID": "U", "TrackingUID": "U",
    "TransactionUID": "U", "FailedSOPInstanceUIDList": "U", "FiducialUID": "U",
    "PaletteColorLookupTableUID": "U", "LargePaletteColorLookupTableUID": "U",
    "TemplateExtensionOrganizationUID": "U", "TemplateExtensionCreatorUID": "U",
    "AffectedSOPInstanceUID": "X", "RequestedSOPInstanceUID": "U",
    # equipment
    "InstitutionName": "X/Z/D", "InstitutionAddress": "X", "InstitutionCodeSequence": "X/Z/D",
    "InstitutionalDepartmentName": "X", "InstitutionalDepartmentTypeCodeSequence": "X",
    "StationName": "X/Z/D", "DeviceSerialNumber": "X/Z/D", "DeviceUID": "U",
    "DeviceDescription": "X", "LongDeviceDescription": "X", "DetectorID": "X/D",
    "PlateID": "X", "CassetteID": "X", "GantryID": "X", "GeneratorID": "X",
    "DateOfLastCalibration": "X", "TimeOfLastCalibration": "X",
    "DateTimeOfLastCalibration": "X", "DateOfLastDetectorCalibration": "X/D",
    "TimeOfLastDetectorCalibration": "X/D", "DateOfManufacture": "X",
    "DateOfInstallation": "X", "UniqueDeviceIdentifier": "X", "UDISequence": "X",
    "ManufacturerDeviceClassUID": "U", "SourceSerialNumber": "X/Z", "NetworkID": "X",
    "StationAETitle": "X", "RetrieveAETitle": "X", "XRayDetectorID": "D",
    "XRayDetectorLabel": "X", "XRaySourceID": "D",
    # operators, performers, request and procedure steps
    "OperatorsName": "X/Z/D", "OperatorIdentificationSequence": "X/D",
    "PerformingPhysicianName": "X", "PerformingPhysicianIdentificationSequence": "X",
    "RequestAttributesSequence": "X", "RequestedProcedureID": "X",
    "RequestedProcedureComments": "X", "RequestedProcedureLocation": "X",
    "ReasonForTheRequestedProcedure": "X", "ReasonForRequestedProcedureCodeSequence": "X",
    "ReasonForTheImagingServiceRequest": "X", "ImagingServiceRequestComments": "X",
    "IssueDateOfImagingServiceRequest": "X", "IssueTimeOfImagingServiceRequest": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z",
    "FillerOrderNumberImagingServiceRequest": "Z", "OrderEnteredBy": "X",
    "OrderEntererLocation": "X", "OrderCallbackPhoneNumber": "X",
    "OrderCallbackTelecomInformation": "X", "NamesOfIntendedRecipientsOfResults": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X",
    "ReferencedPerformedProcedureStepSequence": "X/Z/D", "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X", "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X", "PerformedProcedureStepEndTime": "X",
    "PerformedProcedureStepDescription": "X", "CommentsOnThePerformedProcedureStep": "X",
    "PerformedStationAETitle": "X", "PerformedStationName": "X", "PerformedLocation": "X",
    "PerformedStationNameCodeSequence": "X", "ScheduledProcedureStepID": "X",
    "ScheduledProcedureStepDescription": "X", "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X", "ScheduledProcedureStepEndDate": "X",
    "ScheduledProcedureStepEndTime": "X", "ScheduledProcedureStepLocation": "X",
    "ScheduledPerformingPhysicianName": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X", "ScheduledStationAETitle": "X",
    "ScheduledStationName": "X", "ScheduledHumanPerformersSequence": "X",
    "ActualHumanPerformersSequence": "X", "HumanPerformerName": "X",
    "HumanPerformerOrganization": "X", "PreMedication": "X", "CommentsOnRadiationDose": "X",
    "ContrastBolusAgent": "Z/D", "ContrastBolusStartTime": "X", "ContrastBolusStopTime": "X",
    "AcquisitionContextSequence": "X/Z",
    # structured reports, presentation states, persons
    "ContentSequence": "X", "ContentCreatorName": "Z/D",
    "ContentCreatorIdentificationCodeSequence": "X", "PresentationCreationDate": "X",
    "PresentationCreationTime": "X", "GraphicAnnotationSequence": "D",
    "VerifyingObserverName": "D", "VerifyingObserverSequence": "D",
    "VerifyingObserverIdentificationCodeSequence": "Z", "VerifyingOrganization": "D",
    "VerificationDateTime": "D", "AuthorObserverSequence": "X",
    "ParticipantSequence": "X", "ParticipationDateTime": "Z",
    "CustodialOrganizationSequence": "X", "PersonName": "D",
    "PersonIdentificationCodeSequence": "D", "PersonAddress": "X",
    "PersonTelephoneNumbers": "X", "PersonTelecomInformation": "X", "ObservationDateTime": "X/D",
    "ObservationUID": "U", "Date": "D", "Time": "D", "DateTime": "D",
    "ReferencedDateTime": "D", "HL7DocumentEffectiveTime": "X",
    "TemplateVersion": "X", "TemplateLocalVersion": "X",
    "ContextGroupVersion": "D", "ContextGroupLocalVersion": "D",
    # clinical trial
    "ClinicalTrialSponsorName": "D", "ClinicalTrialProtocolID": "D",
    "ClinicalTrialProtocolName": "Z", "ClinicalTrialSiteID": "Z", "ClinicalTrialSiteName": "Z",
    "ClinicalTrialSubjectID": "D", "ClinicalTrialSubjectReadingID": "D",
    "ClinicalTrialTimePointID": "Z", "ClinicalTrialTimePointDescription": "X",
    "ClinicalTrialCoordinatingCenterName": "Z", "ClinicalTrialSeriesID": "X",
    "ClinicalTrialSeriesDescription": "X",
    "ClinicalTrialProtocolEthicsCommitteeName": "D",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber": "X",
    # interpretation and results (retired, still met in old exports)
    "InterpretationAuthor": "X", "InterpretationText": "X", "InterpretationID": "X",
    "InterpretationRecorder": "X", "InterpretationTranscriber": "X",
    "InterpretationDiagnosisDescription": "X", "InterpretationRecordedDate": "X",
    "InterpretationRecordedTime": "X", "InterpretationApprovalDate": "X",
    "InterpretationApprovalTime": "X", "InterpretationApproverSequence": "X",
    "PhysicianApprovingInterpretation": "X", "Impressions": "X", "ResultsComments": "X",
    "ResultsID": "X", "ResultsIDIssuer": "X", "DistributionName": "X",
    "DistributionAddress": "X", "ResultsDistributionListSequence": "X",
    "InterpretationIDIssuer": "X", "InterpretationTranscriptionDate": "X",
    "InterpretationTranscriptionTime": "X",
    # specimen, misc
    "SpecimenAccessionNumber": "X", "SpecimenUID": "U", "ContainerIdentifier": "D",
    "SlideIdentifier": "X", "BarcodeValue": "X/Z", "LabelText": "X/Z",
    "GPSLatitude": "X", "GPSLongitude": "X", "GPSAltitude": "X",
    "CameraOwnerName": "X", "LensSerialNumber": "X", "MakerNote": "X",
    "TopicAuthor": "X", "TopicKeywords": "X", "TopicSubject": "X", "TopicTitle": "X",
    "Originator": "X", "DestinationAE": "D", "CreationDate": "X", "CreationTime": "X",
}  # fmt: skip

TYPE1_DUMMY = frozenset(
    {"ContentDate", "ContentTime", "PresentationCreationDate", "PresentationCreationTime"}
)
"""Attributes given a dummy instead of being emptied or removed: Type 1 in the SR Document
General (Content Date/Time) and Presentation State Identification modules."""

TYPE2_SEQUENCES = frozenset({"AcquisitionContextSequence"})
"""X/Z sequences kept as an empty sequence (Type 2 in the DX IODs); others are removed."""

KEEP_UIDS = frozenset(
    {
        "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
        "ImplementationClassUID", "AffectedSOPClassUID", "RequestedSOPClassUID",
        "CodingSchemeUID", "ContextUID", "MappingResourceUID", "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID", "SOPClassesInStudy", "ReferencedSOPClassUIDInFile",
        "PrivateInformationCreatorUID",
    }
)  # fmt: skip
"""UI attributes naming classes, syntaxes or schemes, not instances: never replaced."""

FILE_META_REMOVE = (
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle", "SourcePresentationAddress",
    "SendingPresentationAddress", "ReceivingPresentationAddress",
    "PrivateInformationCreatorUID", "PrivateInformation",
)  # fmt: skip

_DUMMY: dict[str, Any] = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0",
    "DS": "0", "PN": "ANONYMIZED^", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "LT": "ANONYMIZED",
    "ST": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANONYMIZED",
    "AE": "ANONYMIZED", "UR": "", "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0,
    "UV": 0, "SV": 0,
}  # fmt: skip
_DATE_VRS = frozenset({"DA", "DT", "TM"})


class DeidentificationError(TrainingError, ValueError):
    """The tree cannot be de-identified as asked (bad folders, nothing to do, ...)."""


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise DeidentificationError(f'profile keyword "{keyword}" is not in the dictionary')
    return BaseTag(tag)


PROFILE_TAGS: dict[BaseTag, tuple[str, str]] = {_tag(k): (k, a) for k, a in PROFILE.items()}


# --------------------------------------------------------------------------------------------
# Keyed replacement of identifiers


class Pseudonymizer:
    """Keyed, deterministic replacements: UIDs (``2.25.`` + 128 bits) and patient pseudonyms."""

    def __init__(self, salt: bytes) -> None:
        if not salt:
            raise DeidentificationError("the salt must not be empty")
        self._key = hashlib.sha256(b"cxr-ai-node deidentify\0" + salt).digest()
        self.new_uids: set[str] = set()

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """The replacement of ``value`` (same input, same output, for the same salt)."""
        value = str(value).strip().rstrip("\0")
        if not value:
            return value
        raw = bytearray(self._digest("uid", value)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # RFC 9562 version 8 (custom)
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        new = UID_ROOT + str(int.from_bytes(raw, "big"))
        self.new_uids.add(new)
        return new

    def patient(self, patient_id: str) -> str:
        """Pseudonymous Patient ID (also used as the patient's name and folder name)."""
        value = str(patient_id).strip()
        if not value:
            return ""
        return "ANON-" + self._digest("patient", value)[:8].hex().upper()


# --------------------------------------------------------------------------------------------
# Dataset cleaning


@dataclass
class Stats:
    """Counts for the report (never values)."""

    actions: Counter[str] = field(default_factory=Counter)
    files: Counter[str] = field(default_factory=Counter)


def _is_repeating_group(tag: BaseTag) -> bool:
    group = tag.group
    return (0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF) and group % 2 == 0


def _registered(uid: str) -> bool:
    return uid in UID_dictionary


def _replace_uids(elem: DataElement, ids: Pseudonymizer, force: bool) -> int:
    """Replace instance UIDs in ``elem`` (``force``: even registered ones are not kept)."""
    if elem.VM == 0 or elem.value is None:
        return 0
    values = list(elem.value) if isinstance(elem.value, MultiValue | list) else [elem.value]
    new = [v if (not force and _registered(str(v))) else ids.uid(str(v)) for v in values]
    elem.value = new if len(new) > 1 else new[0]
    return sum(1 for a, b in zip(values, new, strict=True) if str(a) != str(b))


def _empty(ds: Dataset, elem: DataElement) -> None:
    if elem.VR == "SQ":
        elem.value = Sequence()
    else:
        ds[elem.tag] = DataElement(elem.tag, elem.VR, None)


def _dummy(ds: Dataset, elem: DataElement, ids: Pseudonymizer) -> None:
    if elem.VR == "SQ":
        elem.value = Sequence()  # a dummy item would carry nothing useful
    elif elem.VR == "UI":
        _replace_uids(elem, ids, force=True)
    elif elem.VR in _DUMMY:
        ds[elem.tag] = DataElement(elem.tag, elem.VR, _DUMMY[elem.VR])
    else:
        _empty(ds, elem)


def _resolve(keyword: str, action: str, vr: str) -> str:
    """Compound action code -> the single action this tool takes (see module docstring)."""
    if keyword in TYPE1_DUMMY:
        return "D"
    if action in ("X/Z", "X/Z/D") and vr == "SQ":
        return "Z" if keyword in TYPE2_SEQUENCES else "X"
    if action in ("X/Z", "X/Z/D", "Z/D"):
        return "Z"
    if action == "X/D":
        return "X"
    if action == "X/Z/U*":
        return "U*"
    return action


def _apply(ds: Dataset, elem: DataElement, keyword: str, action: str, ctx: _Context) -> None:
    ctx.stats.actions[action] += 1
    if keyword in ("PatientID", "PatientName"):
        value = ctx.ids.patient(ctx.patient_id)
        suffix = "^" if keyword == "PatientName" and value else ""  # family name component
        ds[elem.tag] = DataElement(elem.tag, elem.VR, value + suffix)
    elif action == "X":
        del ds[elem.tag]
    elif action == "Z":
        _empty(ds, elem)
    elif action == "D":
        _dummy(ds, elem, ctx.ids)
    elif action == "U":
        _replace_uids(elem, ctx.ids, force=True)
    elif action == "U*":
        for item in elem.value or []:
            clean_dataset(item, ctx)
    else:  # pragma: no cover - the table only holds the codes above
        raise DeidentificationError(f'unknown action "{action}" for {keyword}')


@dataclass
class _Context:
    ids: Pseudonymizer
    stats: Stats
    patient_id: str


def clean_dataset(ds: Dataset, ctx: _Context) -> None:
    """Apply the profile to ``ds`` and, recursively, to every sequence item in it."""
    for tag in list(ds.keys()):
        tag = BaseTag(tag)
        if tag.is_private:
            del ds[tag]
            ctx.stats.actions["private removed"] += 1
            continue
        if _is_repeating_group(tag) or tag.element == 0 or not dictionary_has_tag(tag):
            del ds[tag]
            ctx.stats.actions["curve/overlay/group length/unknown removed"] += 1
            continue
        elem = ds[tag]
        if tag in PROFILE_TAGS:
            keyword, code = PROFILE_TAGS[tag]
            _apply(ds, elem, keyword, _resolve(keyword, code, elem.VR), ctx)
        elif elem.VR == "SQ":
            for item in elem.value or []:
                clean_dataset(item, ctx)
        elif elem.VR == "PN" and not elem.is_empty:
            _empty(ds, elem)
            ctx.stats.actions["other person name emptied"] += 1
        elif elem.VR in _DATE_VRS and elem.VR != "TM" and not elem.is_empty:
            _empty(ds, elem)
            ctx.stats.actions["other date emptied"] += 1
        elif elem.VR == "UI" and elem.keyword not in KEEP_UIDS:
            if _replace_uids(elem, ctx.ids, force=False):
                ctx.stats.actions["other UID replaced"] += 1


def _mark(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = METHOD_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"


def _clean_meta(meta: FileMetaDataset, sop_uid: str) -> None:
    for keyword in FILE_META_REMOVE:
        if keyword in meta:
            delattr(meta, keyword)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXR_DEID_1"


def deidentify_dataset(ds: Dataset, ids: Pseudonymizer, stats: Stats | None = None) -> Dataset:
    """De-identify ``ds`` in place (file meta included) and return it."""
    stats = stats or Stats()
    ctx = _Context(ids, stats, str(ds.get("PatientID", "") or ""))
    clean_dataset(ds, ctx)
    _mark(ds)
    if "SOPInstanceUID" in ds and hasattr(ds, "file_meta"):
        _clean_meta(ds.file_meta, str(ds.SOPInstanceUID))
    ds.preamble = b"\0" * 128
    return ds


# --------------------------------------------------------------------------------------------
# Trees of files


@dataclass
class TreeResult:
    """What :func:`deidentify_tree` did; ``paths`` maps input relative -> output relative
    path and is kept in memory only (input paths may carry PHI)."""

    out_dir: Path
    stats: Stats
    paths: dict[str, str]
    written_sops: set[str]
    written_studies: set[str]
    patients: set[str]
    salt_given: bool
    report: dict[str, Any] = field(default_factory=dict)


def _files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _read(path: Path) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's value warnings quote the values (PHI)
        try:
            return pydicom.dcmread(path)
        except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError):
            return None


def _output_name(ds: Dataset) -> str:
    patient = str(ds.get("PatientID", "") or "") or "ANON-UNKNOWN"
    return f"{patient}/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"


def _check_dirs(in_dir: Path, out_dir: Path, force: bool) -> None:
    if not in_dir.is_dir():
        raise DeidentificationError(f'--in "{in_dir}" is not a folder')
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents:
        raise DeidentificationError(f'--out "{out_dir}" must not be inside --in')
    if dst in src.parents:
        raise DeidentificationError(f'--out "{out_dir}" must not contain --in')
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise DeidentificationError(f'--out "{out_dir}" is not empty; add --force to write into it')


def _process_file(path: Path, rel: str, out_dir: Path, ids: Pseudonymizer, result: TreeResult,
                  allow_burned_in: bool) -> None:  # fmt: skip
    stats = result.stats
    ds = _read(path)
    if ds is None:
        stats.files["not DICOM (not copied)"] += 1
        return
    sop_class = str(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        stats.files["DICOMDIR (not copied)"] += 1
        return
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
        stats.files["no SOP or Study Instance UID (not copied)"] += 1
        return
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES" and not allow_burned_in:
        stats.files["refused: BurnedInAnnotation YES"] += 1
        return
    if burned == "YES":
        stats.files["written with BurnedInAnnotation YES (review pixels)"] += 1
    elif not burned:
        stats.files["BurnedInAnnotation absent (not asserted clean)"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deidentify_dataset(ds, ids, stats)
    name = _output_name(ds)
    target = out_dir / name
    if target.exists():
        stats.files["duplicate SOP Instance UID (second copy not written)"] += 1
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    stats.files["written"] += 1
    result.paths[rel] = name
    result.written_sops.add(str(ds.SOPInstanceUID))
    result.written_studies.add(str(ds.StudyInstanceUID))
    result.patients.add(str(ds.get("PatientID", "")))


def deidentify_tree(
    in_dir: Path,
    out_dir: Path,
    ids: Pseudonymizer,
    *,
    salt_given: bool = True,
    allow_burned_in: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> TreeResult:
    """De-identify every DICOM file under ``in_dir`` into ``out_dir`` with ``ids``."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _check_dirs(in_dir, out_dir, force)
    files = list(_files(in_dir))
    if on_total:
        on_total(len(files))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = TreeResult(out_dir, Stats(), {}, set(), set(), set(), salt_given)
    for path in files:
        _process_file(path, path.relative_to(in_dir).as_posix(), out_dir, ids, result,
                      allow_burned_in)  # fmt: skip
        if progress:
            progress(1)
    if not result.stats.files["written"]:
        raise DeidentificationError(f'no DICOM file under --in "{in_dir}" could be written')
    result.report = tree_report(result, len(files), len(ids.new_uids))
    return result


def tree_report(result: TreeResult, files_in: int, uids: int) -> dict[str, Any]:
    """The mapping report: counts only, no values from the input."""
    return {
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "method": METHOD,
        "method_code": list(METHOD_CODE),
        "uid_scheme": "2.25.<HMAC-SHA256(salt, UID), 128 bits>",
        "salt": "given (reproducible)" if result.salt_given else "random (this run only)",
        "files_in": files_in,
        "files": dict(result.stats.files),
        "patients": len(result.patients),
        "studies": len(result.written_studies),
        "instances": len(result.written_sops),
        "distinct_uids_replaced": uids,
        "actions": dict(sorted(result.stats.actions.items())),
    }


# --------------------------------------------------------------------------------------------
# Labels that refer to the tree


UID_COLUMNS = frozenset({"sop_instance_uid", "study_instance_uid", "series_instance_uid"})
KEEP_TEXT_COLUMNS = frozenset({"label", "view", "split", "fold"})


def _numeric(value: str) -> bool:
    if not value.strip():
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def rewrite_labels(
    labels_csv: Path, target: Path, result: TreeResult, ids: Pseudonymizer
) -> dict[str, Any]:
    """Rewrite a labels CSV onto the de-identified tree (UIDs, paths, patient pseudonyms).

    Text columns other than identifiers and ``label``/``view``/``split``/``fold`` are
    dropped (they may hold identifying text); rows whose image or study was not written are
    dropped. Returns counts for the report.
    """
    with Path(labels_csv).open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "") for k, v in r.items()} for r in reader]
    keep = [c for c in columns if c in UID_COLUMNS or c in ("path", "patient_id")
            or c in KEEP_TEXT_COLUMNS or all(_numeric(r.get(c, "")) for r in rows)]  # fmt: skip
    dropped_columns = [c for c in columns if c not in keep]
    out_rows, dropped = [], Counter()
    for row in rows:
        new = {c: row.get(c, "") for c in keep}
        for c in UID_COLUMNS & set(keep):
            new[c] = ids.uid(row[c]) if row[c].strip() else ""
        if "patient_id" in keep:
            new["patient_id"] = ids.patient(row["patient_id"])
        if "path" in keep and row["path"].strip():
            mapped = result.paths.get(Path(row["path"].strip()).as_posix())
            if mapped is None:
                dropped["path not written"] += 1
                continue
            new["path"] = mapped
        if new.get("sop_instance_uid") and new["sop_instance_uid"] not in result.written_sops:
            dropped["instance not written"] += 1
            continue
        if (
            new.get("study_instance_uid")
            and new["study_instance_uid"] not in result.written_studies
        ):
            dropped["study not written"] += 1
            continue
        out_rows.append(new)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keep)
        writer.writeheader()
        writer.writerows(out_rows)
    return {"rows_in": len(rows), "rows_written": len(out_rows), "rows_dropped": dict(dropped),
            "columns_dropped": dropped_columns}  # fmt: skip


def rewrite_boxes(boxes_json: Path, target: Path, result: TreeResult) -> dict[str, Any]:
    """Rewrite a YOLO JSON map (relative path -> box lines) onto the new paths."""
    import json

    doc = json.loads(Path(boxes_json).read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise DeidentificationError(f'--boxes "{boxes_json}": expected an object of path -> boxes')
    out = {}
    for rel, boxes in doc.items():
        mapped = result.paths.get(Path(str(rel)).as_posix())
        if mapped is not None:
            out[mapped] = boxes
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return {"entries_in": len(doc), "entries_written": len(out)}


def salt_from(value: str | None) -> bytes | None:
    """The salt from ``--salt`` or the environment (``TRAINING_DEID_SALT``)."""
    text = value if value is not None else os.environ.get(SALT_ENV)
    return text.encode("utf-8") if text else None


def run_deidentify(
    in_dir: Path,
    out_dir: Path,
    *,
    salt: bytes | None = None,
    labels_csv: Path | None = None,
    boxes_json: Path | None = None,
    allow_burned_in: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> TreeResult:
    """``training deidentify`` end to end: tree, labels, boxes, report."""
    from training.report import write_json

    for option, path in (("--labels", labels_csv), ("--boxes", boxes_json)):
        if path is not None and not Path(path).is_file():
            raise DeidentificationError(f'{option} "{path}" is not a file')
    if not salt:
        logger.warning("no salt given: new UIDs and pseudonyms are consistent within this run "
                       "only (use --salt or %s to reproduce them)", SALT_ENV)  # fmt: skip
    ids = Pseudonymizer(salt or secrets.token_bytes(32))
    result = deidentify_tree(in_dir, out_dir, ids, salt_given=bool(salt),
                             allow_burned_in=allow_burned_in, force=force, progress=progress,
                             on_total=on_total)  # fmt: skip
    if labels_csv is not None:
        result.report["labels"] = rewrite_labels(labels_csv, out_dir / "labels.csv", result, ids)
    if boxes_json is not None:
        result.report["boxes"] = rewrite_boxes(boxes_json, out_dir / "boxes.json", result)
    write_json(out_dir / REPORT_NAME, result.report)
    logger.info("de-identified %d instance(s) of %d patient(s) into %s",
                len(result.written_sops), len(result.patients), out_dir)  # fmt: skip
    return result
