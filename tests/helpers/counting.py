"""Counting calls: the regression guards of the hot paths COUNT work (parses, decodes, file
reads), they do not time it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
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


def record_begins(engine: Any) -> tuple[list[tuple[str, bool]], Callable[[], None]]:
    """Every transaction begun on ``engine`` from now on, as (thread name, read-only: begun
    through ``db.reading``); returns the list and a function that stops recording."""
    import threading

    from sqlalchemy import event

    from dicom_node.store import db

    begins: list[tuple[str, bool]] = []

    def on_begin(conn: Any) -> None:
        begins.append((threading.current_thread().name,
                       bool(conn.get_execution_options().get(db.READ_ONLY))))

    event.listen(engine, "begin", on_begin)
    return begins, lambda: event.remove(engine, "begin", on_begin)
