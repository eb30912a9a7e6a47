"""Deterministic DICOM UIDs.

The node derives every UID it creates from its inputs (sorted input SOP Instance UIDs plus
the model identities), so a re-run after a crash re-creates the *same* objects and a PACS
replaces them instead of storing duplicates. ``2.25.<decimal>`` is the UUID-derived root of
PS3.5 B.2; the 128 bits come from SHA-256 of the parts, with the RFC 9562 version (8,
"custom") and variant bits set so the value is also a well-formed UUID.
"""

from __future__ import annotations

import hashlib
import logging

logger = logging.getLogger(__name__)

_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a UID or a model name we emit
_MAX_UID_LENGTH = 64


def derive_uid(*parts: str) -> str:
    """Return ``2.25.<n>`` where ``n`` is 128 bits of SHA-256 over ``parts``.

    The same parts always give the same UID; a different part, or the same text split
    differently (``("ab", "c")`` vs ``("a", "bc")``), gives a different one.
    """
    if not parts:
        raise ValueError("derive_uid() needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"derive_uid() parts must be str, got {type(part).__name__}")
    digest = hashlib.sha256(_SEPARATOR.join(parts).encode("utf-8")).digest()
    value = int.from_bytes(digest[:16], "big")
    value &= ~(0xF << 76)  # version nibble (bits 76-79) ...
    value |= 0x8 << 76  # ... = 8, "custom" UUID (RFC 9562)
    value &= ~(0x3 << 62)  # variant bits (62-63) ...
    value |= 0x2 << 62  # ... = 0b10, RFC variant
    uid = f"2.25.{value}"
    assert len(uid) <= _MAX_UID_LENGTH  # 2**128 has 39 digits: at most 44 characters
    return uid

