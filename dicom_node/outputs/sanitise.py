"""The one gate between a received header and the outputs built from it.

Real radiographs carry values that break their VR: a hash in a DA, an SH of 30 characters,
a PN with seven components, control characters, a DS of ``"abc"``. highdicom copies the
patient, study and equipment attributes of the source into the SR, the SC and the GSPS
(``copy_patient_and_study_information``, ``SCImage.from_ref_dataset``, the contributing
equipment, the SR Image Library), and pydicom refuses or warns on such values, so one bad
value would cost the study its results. :func:`sanitise` therefore checks every attribute
of the working copy the builders read, before any builder sees it:

* a value that does not fit its VR (pydicom's own validators, plus the rules pydicom does
  not check: value multiplicity, control characters, PN component count, real dates and
  times, finite numbers, enumerated values, the character set) is *emptied* when the
  attribute is Type 2 in an output, and *dropped* otherwise;
* a sequence item with any bad value is dropped whole (a half item is worse than none);
* the fact is logged with the keyword and the reason, never the value (it may be PHI);
* the UIDs that tie the outputs to the source (Study, Series, SOP Instance and SOP Class,
  Frame of Reference) and the pixel description are kept exactly as received, even when
  they break UID rules: the results must land in the same study as the image.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map
from highdicom.enum import LateralityValues, PatientSexValues, VOILUTFunctionValues
from pydicom import config
from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import DA, DT, MAX_VALUE_LEN, TM, PersonName, validate_value

from dicom_node.dicomio import quiet

logger = logging.getLogger(__name__)

# Source references and the pixel description: copied or used exactly as received.
KEPT_EXACT: frozenset[str] = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "FrameOfReferenceUID",
        "Modality",  # highdicom checks it on every referenced image; outputs set their own
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "PixelData",
        "SpecificCharacterSet",  # checked on its own: it decides how every string decodes
    }
)
# The IODs the node writes; the Type of a copied attribute is its Type there.
_OUTPUT_IODS = ("comprehensive-sr", "secondary-capture-image", "grayscale-softcopy-presentation-state")
_COPIED_IES = ("Patient", "Study", "Series", "Equipment")
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
     "UR", "UT"}
)
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_NUMERIC_LIKE = frozenset({"AS", "DA", "DS", "DT", "IS", "TM", "UI"})  # no empty among several  # may hold TAB, LF, FF and CR (PS3.5 6.1.3)
# C0 and C1 control characters and DEL; ESC (1B) stays (ISO 2022 code extension)
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f-\x9f]")
_FREE_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f]")
_ORIENTATION = re.compile(r"[APRLHF]{1,3}")  # PS3.3 C.7.6.1.1.1, biped
_MAX_PN_COMPONENTS = 5  # family^given^middle^prefix^suffix (PS3.5 6.2.1.2)
_PN_MAX_TOTAL = 64
_INT32 = (-(2**31), 2**31 - 1)


def _values_of(enum: Iterable) -> frozenset[str]:
    return frozenset(str(member.value) for member in enum)


# Enumerated values of attributes the builders copy (PS3.3), where a wrong term is an Error.
_ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": _values_of(PatientSexValues),
    "Laterality": _values_of(LateralityValues),
    "VOILUTFunction": _values_of(VOILUTFunctionValues),
    "LossyImageCompression": frozenset({"00", "01"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
}


class _ThreadSilence(logging.Filter):
    """Drops the records of the threads that are inside :meth:`active` (others pass).

    pydicom reports a bad value twice: as a warning (``dicomio.quiet`` silences those) and
    as a WARNING record on the ``pydicom`` logger that quotes the value, which may be PHI.
    A filter on that logger, switched per thread, keeps the worker's conversions quiet
    without muting another thread's pydicom messages.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self._local, "depth", 0)

    @contextmanager
    def active(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1


_PYDICOM_SILENCE = _ThreadSilence()
logging.getLogger("pydicom").addFilter(_PYDICOM_SILENCE)


@contextmanager
def silent_pydicom() -> Iterator[None]:
    """No pydicom warning and no pydicom log record (they quote values) from this thread."""
    with quiet(), _PYDICOM_SILENCE.active():
        yield


@dataclass(frozen=True)
class Removal:
    """One attribute the outputs do not copy as received (keyword and reason, no value)."""

    keyword: str
    action: str  # "dropped" | "emptied" | "replaced"
    reason: str


def sanitise(work: Dataset, label: str) -> list[Removal]:
    """Drop or empty every value in ``work`` that does not fit its VR; return what changed.

    ``work`` must be the builders' own copy (its elements are replaced, never edited, and
    sequence items are dropped, never changed, so datasets shared with the caller stay as
    they were). ``label`` names the source in the log (a UID, never a patient value).
    """
    removals: list[Removal] = []
    with silent_pydicom():  # converting a raw bad value makes pydicom quote the value
        charset = _check_charset(work, removals)
        # no Specific Character Set: the default repertoire, ASCII (pydicom would read
        # and write Latin-1, which validators rightly refuse)
        encodings = convert_encodings(charset) if charset else ["ascii"]
        for tag in list(work.keys()):
            keyword = keyword_for_tag(tag)
            if tag.group == 0x0002 or not keyword or keyword in KEPT_EXACT:
                continue
            reason = _element_problem(work, tag, encodings)
            if reason is None:
                continue
            action = _remove(work, tag, keyword)
            removals.append(Removal(keyword, action, reason))
        removals += _enforce_together(work)
    for removal in removals:
        logger.warning(
            "Source %s: %s %s in the outputs (%s)",
            label,
            removal.keyword,
            removal.action,
            removal.reason,
        )
    return removals


def _remove(work: Dataset, tag: int, keyword: str) -> str:
    if keyword in _type2_keywords():
        vr = dictionary_VR(tag)
        work[tag] = DataElement(tag, vr, [] if vr == "SQ" else None)
        return "emptied"
    del work[tag]
    return "dropped"


# Attributes that only mean something together (PS3.3 C.11.2 VOI LUT, C.11.1 Modality
# LUT: Type 1C pairs); highdicom's GSPS refuses a centre without its width, and so on.
_TOGETHER: tuple[tuple[str, ...], ...] = (
    ("WindowCenter", "WindowWidth"),
    ("RescaleSlope", "RescaleIntercept"),
)
_DEPENDENTS = {"WindowCenter": ("WindowCenterWidthExplanation",), "RescaleSlope": ("RescaleType",)}


def _enforce_together(work: Dataset) -> list[Removal]:
    """Drop a VOI window or rescale whose partner went (or never was), whose value counts
    differ, or whose width is not positive; and an explanation that does not match."""
    removals = []
    for group in _TOGETHER:
        problem = _group_problem(work, group)
        if problem is None:
            continue
        for keyword in (*group, *_DEPENDENTS.get(group[0], ())):
            if keyword in work:
                del work[keyword]
                removals.append(Removal(keyword, "dropped", problem))
    explanation = work.get("WindowCenterWidthExplanation")
    if explanation is not None and _count(explanation) != _count(work.get("WindowCenter")):
        del work.WindowCenterWidthExplanation
        removals.append(
            Removal("WindowCenterWidthExplanation", "dropped", "does not match the windows")
        )
    return removals


def _group_problem(work: Dataset, group: tuple[str, ...]) -> str | None:
    present = [keyword in work for keyword in group]
    if not any(present):
        return None
    if not all(present):
        return f"{' and '.join(group)} must come together"
    counts = {_count(work.get(keyword)) for keyword in group}
    if 0 in counts:
        return f"{' and '.join(group)} need values"
    if len(counts) > 1:
        return f"{' and '.join(group)} differ in number of values"
    if group[0] == "WindowCenter" and any(float(w) <= 0 for w in _as_values(work.WindowWidth)):
        return "window width not positive"
    return None


def _as_values(value: object) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def _count(value: object) -> int:
    return len(_as_values(value))


def _check_charset(work: Dataset, removals: list[Removal]) -> list[str] | None:
    """An unknown Specific Character Set term made pydicom decode with its default
    (ISO 8859-1); writing that back under ISO_IR 100 keeps every byte of every string."""
    if "SpecificCharacterSet" not in work:
        return None
    try:
        value = work.SpecificCharacterSet
    except (ValueError, TypeError):
        value = ["?"]
    terms = list(value) if isinstance(value, MultiValue) else [value]
    known = all(
        (str(term) in python_encoding) or (index == 0 and not term)
        for index, term in enumerate(terms)
    )
    if known:
        return [str(term) for term in terms]
    work.SpecificCharacterSet = "ISO_IR 100"
    removals.append(Removal("SpecificCharacterSet", "replaced", "unknown character set term"))
    return ["ISO_IR 100"]


def _element_problem(ds: Dataset, tag: int, encodings: list[str]) -> str | None:
    """Why the element at ``tag`` cannot be copied, or None when it can."""
    try:
        elem = ds[tag]  # converts a raw element; a value pydicom cannot convert raises
    except Exception as exc:  # noqa: BLE001 - any conversion failure means "unusable"
        return f"value cannot be decoded ({type(exc).__name__})"
    vr = str(elem.VR)
    if vr == "SQ":
        return _sequence_problem(elem.value, encodings)
    if vr not in _TEXT_VRS or elem.value is None:
        return None  # binary VRs: any bytes are a valid value of their VR
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    if values in ([], [""]):
        return None
    problem = _multiplicity_problem(elem.tag, len(values))
    if problem is None and vr in _NUMERIC_LIKE and any(_text(v).strip() == "" for v in values):
        problem = f"empty {vr} value among several"
    for value in values:
        problem = problem or _value_problem(vr, _text(value), encodings)
    keyword = keyword_for_tag(elem.tag)
    allowed = _ENUMERATED.get(keyword)
    if problem is None and allowed is not None and any(str(v) not in allowed for v in values):
        problem = "not one of its enumerated values"
    if problem is None and keyword == "PatientOrientation":
        if not all(_ORIENTATION.fullmatch(str(v)) for v in values):
            problem = "not a patient orientation"
    return problem


def _sequence_problem(items: Sequence, encodings: list[str]) -> str | None:
    """Drop the items that hold a bad value; report only when the sequence changed."""
    kept = [item for item in items if _item_is_clean(item, encodings)]
    if len(kept) == len(items):
        return None
    # A rebuilt sequence would share nothing with the caller's dataset, but whether the
    # remaining items still mean what the source meant is unknowable: drop the attribute.
    return f"{len(items) - len(kept)} of {len(items)} item(s) hold a value that breaks its VR"


def _item_is_clean(item: Dataset, encodings: list[str]) -> bool:
    for tag in list(item.keys()):
        if not keyword_for_tag(tag):
            continue  # private or unknown: never copied by keyword
        if _element_problem(item, tag, encodings) is not None:
            return False
    return True


def _text(value: object) -> str:
    """The value as it was written (DS/IS/DA/TM keep their original string)."""
    if isinstance(value, PersonName):
        return str(value)  # its original_string is the encoded bytes
    original = getattr(value, "original_string", None)
    if isinstance(original, bytes):
        return original.decode("latin-1")
    if isinstance(original, str):
        return original
    return str(value)


def _value_problem(vr: str, text: str, encodings: list[str]) -> str | None:
    if not text:
        return None
    try:
        validate_value(vr, text, config.RAISE)
    except ValueError:
        limit = MAX_VALUE_LEN.get(vr)
        if limit is not None and len(text) > limit:
            return f"longer than {limit} characters allowed for {vr}"
        return f"does not match VR {vr}"
    pattern = _FREE_TEXT_CONTROL if vr in _FREE_TEXT_VRS else _CONTROL
    if pattern.search(text):
        return f"control character in {vr}"
    check = _EXTRA_CHECKS.get(vr)
    problem = check(text) if check is not None else None
    if problem is None and not _encodable(text, encodings):
        problem = "not encodable in the dataset's character set"
    return problem


def _encodable(text: str, encodings: list[str]) -> bool:
    for encoding in encodings:
        try:
            text.encode(encoding)
        except (UnicodeError, LookupError):
            continue
        return True
    return text.isascii()


def _date_time_problem(kind: type, name: str) -> Callable[[str], str | None]:
    def check(text: str) -> str | None:
        stripped = text.strip()
        if not stripped:
            return None
        try:
            kind(stripped)
        except (ValueError, TypeError, OverflowError):
            return f"not a real {name} (or a range)"
        return None

    return check


def _integer_problem(text: str) -> str | None:
    value = int(text.strip())  # the IS regex already passed
    if not _INT32[0] <= value <= _INT32[1]:
        return "outside the 32-bit range of IS"
    return None


def _decimal_problem(text: str) -> str | None:
    return None if math.isfinite(float(text.strip())) else "not a finite DS"


def _person_name_problem(text: str) -> str | None:
    if len(text) > _PN_MAX_TOTAL:
        # PS3.5 allows 64 per component group; dciodvfy (the gate every output passes)
        # holds the whole value to 64, so a longer name is not copied
        return f"PN longer than {_PN_MAX_TOTAL} characters"
    for group in text.split("="):
        if group.count("^") >= _MAX_PN_COMPONENTS:
            return f"PN with more than {_MAX_PN_COMPONENTS} components"
    return None


_EXTRA_CHECKS: dict[str, Callable[[str], str | None]] = {
    "DA": _date_time_problem(DA, "date"),
    "TM": _date_time_problem(TM, "time"),
    "DT": _date_time_problem(DT, "date-time"),
    "IS": _integer_problem,
    "DS": _decimal_problem,
    "PN": _person_name_problem,
}


def _multiplicity_problem(tag: int, count: int) -> str | None:
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return None
    low, high, step = _parse_vm(vm)
    if count < low or (high is not None and count > high) or (count - low) % step:
        return f"{count} values where VM is {vm}"
    return None


def _parse_vm(vm: str) -> tuple[int, int | None, int]:
    """PS3.5 VM notation: "1", "2", "1-3", "1-n", "2-2n", "3-3n" -> (min, max, step)."""
    if "-" not in vm:
        return int(vm), int(vm), 1
    low_text, high_text = vm.split("-", 1)
    low = int(low_text)
    if high_text.endswith("n"):
        multiple = int(high_text[:-1] or 1)
        return low, None, multiple
    return low, int(high_text), 1


@cache
def _type2_keywords() -> frozenset[str]:
    """Attributes that are Type 2 or 2C in a patient/study/series/equipment module of an
    output IOD, per highdicom's copy of the standard: emptied, never dropped."""
    modules = get_module_attribute_map()
    keywords = set()
    for iod in _OUTPUT_IODS:
        for module in get_iod_module_map()[iod]:
            if module["ie"] not in _COPIED_IES:
                continue
            for attribute in modules[module["key"]]:
                if not attribute["path"] and str(attribute["type"]).startswith("2"):
                    keywords.add(str(attribute["keyword"]))
    return frozenset(keywords)
