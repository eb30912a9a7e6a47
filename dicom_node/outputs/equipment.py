"""The algorithm identity on every output: IHE AI Results' Contributing Equipment items.

IHE Radiology AI Results (AIR, Rev. 1.1, 6.5.3.1 "General Result Encoding Requirements")
asks the creator of a result to describe *each algorithm* that produced it as one item of
the Contributing Equipment Sequence (0018,A001) of every result object, whatever its IOD,
with Manufacturer, Manufacturer's Model Name, Software Versions and Device UID, and the
Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm"). That code is IHE's own
placeholder: DICOM's CID 7005 "Contributing Equipment Purpose of Reference" (pydicom 3.0.2,
DICOM 2024) has no algorithm purpose, its nearest term, (109102, DCM, "Processing
Equipment"), is what highdicom writes for *itself* in the same sequence, and highdicom's
``ContributingEquipment`` accepts only CID 7005 codes, so the items are built here as plain
datasets. MONAI Deploy's IHE AIR writers (``monai.deploy.operators.dicom_utils``) use the
same code.

Everything comes from the one :class:`ai.types.ModelIdentity` that the SR's device observer
and Algorithm Identification (TID 4019) also read: the bundle's manufacturer, name,
version and device UID (a new version has a new device UID), and its display name with
"DEMO, not for clinical use" for demo bundles, as the Contribution Description. dicom3tools'
dciodvfy (the Debian release here) answers Device UID in this sequence with a *Warning*
"not present in standard DICOM IOD": its dictionary predates the attribute's addition to
the Contributing Equipment Sequence; IHE AIR requires it, so it stays.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from pydicom.dataset import Dataset

from ai.types import ModelIdentity
from dicom_node.outputs.common import node_version

PROCESSING_ALGORITHM: tuple[str, str, str] = ("Newcode1", "99IHE", "Processing Algorithm")
_LO = 64  # Manufacturer, Manufacturer's Model Name, Software Versions are LO


def algorithm_equipment(model: ModelIdentity, created: datetime.datetime) -> Dataset:
    """One Contributing Equipment item naming ``model`` as the algorithm of the result."""
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
        PROCESSING_ALGORITHM
    )
    item = Dataset()
    item.Manufacturer = model.manufacturer[:_LO]
    item.ManufacturerModelName = model.name[:_LO]
    item.SoftwareVersions = [model.version[:_LO], node_version()[:_LO]]
    item.DeviceUID = model.device_uid
    item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S.%f")
    item.ContributionDescription = (
        f"AI model {model.display_name}, {model.task}: produced the findings of this object"
    )[:1024]
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def add_algorithm_equipment(
    output: Dataset, models: Sequence[ModelIdentity], created: datetime.datetime
) -> None:
    """Append one item per model to the output's Contributing Equipment Sequence.

    Items already there (highdicom's own "Processing Equipment" item, the source's
    acquisition equipment) are kept; ``created`` is the set's instant, in local time.
    """
    if not models:
        raise ValueError("No model identity found in the results: no algorithm to name")
    items = list(output.get("ContributingEquipmentSequence") or [])
    items += [algorithm_equipment(model, created) for model in models]
    output.ContributingEquipmentSequence = items


def is_algorithm_item(item: Dataset) -> bool:
    """True for an item this module wrote (the IHE AIR purpose code)."""
    codes = item.get("PurposeOfReferenceCodeSequence") or []
    return any(
        (c.get("CodeValue"), c.get("CodingSchemeDesignator")) == PROCESSING_ALGORITHM[:2]
        for c in codes
    )
