"""Patient identifiers: which attributes carry them, which values this process has seen, and
how free text (log records, stored errors, API responses) is scrubbed of them.

Two complementary nets, because a message format cannot be known in advance:

* **Patterns**: the ways pydicom and highdicom quote a value in a warning or an exception
  (``Invalid value for VR DA: '...'``, ``Unable to convert '...' to 'DA' object``,
  ``Value "..." is not valid for elements with a VR of DS``, element and dataset reprs
  ``(0010,0010) Patient's Name  PN: '...'``). The quoted value is replaced whatever it is.
* **Values seen**: :func:`remember_phi` registers the identifying values of every header the
  node parses (ingest, worker, dashboard) in a bounded, thread-safe registry; any later text
  that contains one of them, with any separators, has it replaced. A person name is
  registered as written (family^given^middle) and in the given-first order messages use
  ("John Q Doe"); its single words are not: a patient called "Test^First" must not turn
  every "first" and "test" in the logs into noise (libraries quote whole values, and the
  pattern net above catches how they quote them). Values shorter than
  :data:`MIN_LENGTH` characters are not registered: redacting every "M" or "12" would make
  logs unreadable and protect nothing.

The registry is process-wide on purpose: logging is process-wide, and a log record written
by any thread must be scrubbed of values any other thread parsed.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TypeVar

import pydicom
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from dicom_node.dicomio import quiet

REDACTED = "[redacted]"
MIN_LENGTH = 3
MAX_VALUES = 50_000

# Attributes whose values identify a patient (PS3.15 E.1 basic profile, the ones a chest
# radiograph header carries in practice). Names are person names: their words count too.
NAME_KEYWORDS = (
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician", "ResponsiblePerson",
)
VALUE_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "PatientBirthDate",
    "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator",
    "AccessionNumber", "StudyID", "AdmissionID", "InstitutionName", "InstitutionAddress",
)
PHI_KEYWORDS = NAME_KEYWORDS + VALUE_KEYWORDS

_TOKEN = re.compile(r"[^\W_]+")  # a run of letters and digits (any script)
_SEP = r"[\W_]+"
_TAGS = sorted({f"{Tag(k).group:04X},{Tag(k).element:04X}" for k in PHI_KEYWORDS
                if Tag(k).group != 0x0010})
# (0010,xxxx) is the Patient group: every element of it is treated as identifying.
_TAG_ALT = "|".join(["0010,[0-9A-F]{4}", *(re.escape(t) for t in _TAGS)])
_KEYWORD_ALT = "|".join(PHI_KEYWORDS)

# pydicom 3.0 / highdicom 0.28 messages that quote a value (pydicom/valuerep.py, values.py,
# jsonrep.py, dataelem.py reprs); each keeps the words and replaces the value.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(Invalid value for VR [A-Z]{2}: ).*"), rf"\1{REDACTED}"),
    (re.compile(r"(Unable to convert (?:non-conformant value )?)'.*'( to '[A-Z]{2}' object)"),
     rf"\1'{REDACTED}'\2"),
    (re.compile(r"(Value )\".*\"( is not valid for elements with a VR of)"),
     rf'\1"{REDACTED}"\2'),
    (re.compile(r"(Invalid value )'.*'( for AT element)"), rf"\1'{REDACTED}'\2"),
    # Python's own conversion errors, as pydicom's DS / IS / DA / TM conversions raise them
    (re.compile(r"(could not convert string to float: |invalid literal for int\(\) with "
                r"base \d+: ).*"), rf"\1{REDACTED}"),
    (re.compile(r"(time data )'.*'( does not match format)"), rf"\1'{REDACTED}'\2"),
    # element / dataset repr: "(0010,0010) Patient's Name   PN: 'Doe^John'"
    (re.compile(rf"(\((?:{_TAG_ALT})\)[^\n]*?\b[A-Z]{{2}}: ).*", re.IGNORECASE),
     rf"\1{REDACTED}"),
    # keyword=value / keyword: value with a quoted value
    (re.compile(rf"(\b(?:{_KEYWORD_ALT})['\"]?\s*[:=]\s*)(['\"]).*?\2"), rf"\1{REDACTED}"),
)


def redact_patterns(text: str) -> str:
    """Replace the values that known library messages quote."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class PhiRegistry:
    """A bounded set of identifying values (least recently seen dropped first).

    A one-word value is matched as a whole word, case-insensitively; a value of several
    words ("Canary Institute", "PAT-00123", "Doe^John") as those words in that order with
    any separators between them.
    """

    def __init__(self, max_values: int = MAX_VALUES) -> None:
        self.max_values = max_values
        self._lock = threading.Lock()
        # casefolded value -> None (one word) or the pattern of a phrase
        self._values: OrderedDict[str, re.Pattern[str] | None] = OrderedDict()
        self._by_first_word: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: str) -> None:
        words = _TOKEN.findall(value)
        key = " ".join(words).casefold()
        if len(key) < MIN_LENGTH:
            return
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return
            if len(words) == 1:
                self._values[key] = None
            else:
                body = _SEP.join(re.escape(w) for w in words)
                self._values[key] = re.compile(rf"{body}(?![^\W_])", re.IGNORECASE)
                self._by_first_word.setdefault(words[0].casefold(), set()).add(key)
            while len(self._values) > self.max_values:
                self._forget(*self._values.popitem(last=False))

    def _forget(self, key: str, phrase: re.Pattern[str] | None) -> None:
        if phrase is not None:
            first = key.split(" ", 1)[0]
            keys = self._by_first_word.get(first, set())
            keys.discard(key)
            if not keys:
                self._by_first_word.pop(first, None)

    def add_name(self, value: str) -> None:
        """A person name (PS3.5 PN: component groups split by ``=``, components by ``^``):
        each group as written and given-first (given middle family)."""
        for group in value.split("="):
            self.add(group)
            parts = [p for p in group.split("^")]
            given_first = [*parts[1:3], parts[0]] if len(parts) > 1 else []
            if given_first:
                self.add(" ".join(p for p in given_first if p))

    def redact(self, text: str) -> str:
        """``text`` with every registered value replaced by :data:`REDACTED`."""
        spans: list[tuple[int, int]] = []
        pos = 0
        with self._lock:
            for m in _TOKEN.finditer(text):
                if m.start() < pos:
                    continue
                end = self._match_at(text, m)
                if end is not None:
                    spans.append((m.start(), end))
                    pos = end
        if not spans:
            return text
        out, last = [], 0
        for start, end in spans:
            out += [text[last:start], REDACTED]
            last = end
        out.append(text[last:])
        return "".join(out)

    def _match_at(self, text: str, word: re.Match[str]) -> int | None:
        folded = word.group().casefold()
        longest = None
        for key in self._by_first_word.get(folded, ()):
            phrase = self._values[key]
            m = phrase.match(text, word.start()) if phrase is not None else None
            if m and (longest is None or m.end() > longest):
                longest = m.end()
        if longest is not None:
            return longest
        return word.end() if folded in self._values and self._values[folded] is None else None


_SEEN = PhiRegistry()
D = TypeVar("D", bound=pydicom.Dataset)


def _texts(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [t for v in value for t in _texts(v)]
    if isinstance(value, bytes):
        return [value.decode("latin-1", "replace")]
    return [str(value)]


def _element_texts(ds: pydicom.Dataset, keyword: str) -> list[str]:
    tag = Tag(keyword)
    if tag not in ds:
        return []
    try:
        return _texts(ds[tag].value)  # converted inside quiet(): no value-quoting warning
    except Exception:  # noqa: BLE001 - not convertible: its raw bytes, split into values
        raw = getattr(ds.get_item(tag), "value", None)
        return [v for t in _texts(raw) for v in t.split("\\")]


def identifying_values(ds: pydicom.Dataset) -> tuple[list[str], list[str]]:
    """(names, other values) of ``ds``'s identifying attributes."""
    names: list[str] = []
    values: list[str] = []
    with quiet():
        for keyword in PHI_KEYWORDS:
            found = _element_texts(ds, keyword)
            (names if keyword in NAME_KEYWORDS else values).extend(found)
        for item in ds.get("OtherPatientIDsSequence", None) or []:
            values += _element_texts(item, "PatientID")
    return names, values


def remember_phi(ds: D, registry: PhiRegistry | None = None) -> D:
    """Register the identifying values of a parsed header, so no later text carries them;
    returns ``ds`` (``remember_phi(dcmread(...))``).

    Call it wherever the node parses a received header (ingest, worker, dashboard); cheap
    (a dozen attribute reads) and safe on any dataset, even a malformed one.
    """
    reg = _SEEN if registry is None else registry
    try:
        names, values = identifying_values(ds)
    except Exception:  # noqa: BLE001 - never let scrubbing break the caller
        return ds
    for name in names:
        reg.add_name(name)
    for value in values:
        reg.add(value)
    return ds


def remember_values(values: Iterable[str], *, names: Iterable[str] = ()) -> None:
    """Register values known without a dataset (e.g. read from a header elsewhere)."""
    for name in names:
        _SEEN.add_name(name)
    for value in values:
        _SEEN.add(value)


def redact(text: str | None) -> str | None:
    """Scrub free text: known message patterns, then every identifying value seen."""
    if not text:
        return text
    return _SEEN.redact(redact_patterns(text))
