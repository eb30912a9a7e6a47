"""Reading DICOM that came from the network: never trusted, never allowed to be loud.

pydicom reports malformed values as warnings whose text can quote the value (a patient
name with a bad character, say). Input is untrusted, so those warnings are suppressed here
and the outcome (readable or not) is what the node records, without values.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom


@contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's warnings; element values convert lazily, so wrap accesses too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_untrusted(path: str | Path, **kwargs: Any) -> pydicom.Dataset:
    """``pydicom.dcmread`` with pydicom's value-quoting warnings silenced."""
    with quiet():
        return pydicom.dcmread(path, **kwargs)
