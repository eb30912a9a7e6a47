"""Counting calls: the regression guards of the hot paths COUNT work (parses, decodes, file
reads), they do not time it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest


def count_calls(monkeypatch: pytest.MonkeyPatch, calls: Counter[str], owner: Any, name: str,
                key: str | None = None) -> None:
    """Replace ``owner.name`` by a wrapper adding 1 to ``calls[key or name]`` per call."""
    real = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[key or name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
