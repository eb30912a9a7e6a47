"""What to propose to a destination, and what its answer means for each object.

Every (SOP class, transfer syntax) pair is proposed as a presentation context of its own,
in the node's order of preference, so the destination's choice cannot override that order
and the accepted set says exactly which syntaxes it takes. After the association is
established each object gets a :class:`Decision`: the syntax to send it in, or why the
destination does not take it (a terminal ``not_accepted``, never an exception).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from dicom_node.config import Destination
from dicom_node.delivery.syntaxes import UNCOMPRESSED

# PS3.8 9.3.3.2: presentation context result/reason
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04
MAX_CONTEXTS = 128  # PS3.8: odd context ids 1..255


@dataclass(frozen=True)
class Decision:
    """The syntax to send one object in, or the reason the destination does not take it."""

    syntax: UID | None
    reason: str | None = None


def preferred_syntaxes(kind: str, destination: Destination, sc_syntax: str | None = None
                       ) -> tuple[UID, ...]:
    """The SC goes in the destination's configured syntaxes; SR and GSPS uncompressed.

    A destination that names no ``sc_transfer_syntaxes`` is offered the syntax the SC was
    written in (``sc_syntax``, ``outputs.sc_transfer_syntax``) first, so the file goes out
    as it is, then the uncompressed defaults (the sender decompresses for those).
    """
    if kind != "sc":
        return UNCOMPRESSED
    configured = tuple(UID(u) for u in destination.sc_transfer_syntaxes)
    if sc_syntax is None or "sc_transfer_syntaxes" in destination.model_fields_set:
        return configured
    return tuple(dict.fromkeys((UID(sc_syntax), *configured)))


def requested_contexts(objects: Iterable[tuple[str, str]], destination: Destination,
                       sc_syntax: str | None = None) -> list[PresentationContext]:
    """Contexts for the ``(kind, sop_class_uid)`` pairs of a batch (plus commitment)."""
    pairs: dict[tuple[str, UID], None] = {}
    for kind, sop_class in objects:
        for syntax in preferred_syntaxes(kind, destination, sc_syntax):
            pairs[(sop_class, syntax)] = None
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
    if destination.storage_commitment:
        contexts.append(build_context(StorageCommitmentPushModel, list(UNCOMPRESSED)))
    if len(contexts) > MAX_CONTEXTS:  # cannot happen with the four result kinds
        raise ValueError(f"{len(contexts)} presentation contexts exceed {MAX_CONTEXTS}")
    return contexts


def negotiated(assoc: Any) -> bool:
    """True when the destination answered the proposal, even if it accepted none of it.

    pynetdicom aborts an association whose contexts were all rejected; that answer still
    says which objects the destination takes (none), unlike a rejected association.
    """
    return bool(assoc.is_established or (assoc.is_aborted and assoc.rejected_contexts
                                          and not assoc.accepted_contexts))


def decide(assoc: Any, sop_class: str, preferred: Sequence[UID], destination: str) -> Decision:
    """The first preferred syntax accepted for ``sop_class``, else why none is."""
    accepted = {UID(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                if cx.abstract_syntax == sop_class and cx.as_scu}
    for syntax in preferred:
        if syntax in accepted:
            return Decision(syntax)
    name = UID(sop_class).name
    rejected = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == sop_class]
    if rejected and all(cx.result == _TRANSFER_SYNTAXES_NOT_SUPPORTED for cx in rejected):
        offered = ", ".join(UID(s).name for s in preferred)
        return Decision(None, f"not accepted by {destination}: {name} in {offered}")
    return Decision(None, f"not accepted by {destination}: {name}")


def commitment_accepted(assoc: Any) -> bool:
    return any(cx.abstract_syntax == StorageCommitmentPushModel and cx.as_scu
               for cx in assoc.accepted_contexts)
