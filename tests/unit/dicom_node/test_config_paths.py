"""Every path setting is made absolute once, at load time, against the working directory:
the shipped ``storage.data_dir: var`` must never reach Flask's ``send_file`` (which would
take it relative to the package folder) or any other code as a relative path."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from dicom_node.config import Settings, load_settings, resolve_paths

SHIPPED = Path(__file__).resolve().parents[3] / "config" / "node.yaml"

# Every path setting set to a relative value; the test below fails when Settings gains a
# path field this tree does not cover, so a new one cannot escape the check.
EVERY_PATH: dict[str, Any] = {
    "storage": {"data_dir": "var"},
    "models": {"bundles": ["models/a", "./models/b"], "demo_dir": "demo"},
    "dicom": {"tls": {"cert_file": "tls/node.pem", "key_file": "tls/node.key",
                      "ca_file": "tls/ca.pem"}},
    "destinations": [{"type": "stow-rs", "url": "https://pacs/dicom-web",
                      "ca_file": "tls/pacs-ca.pem"}],  # checked at load: created below
    "evaluation": {
        "confirmed_watch_dir": "drop",
        "jobs": [{"name": "ref", "kind": "reference", "bundles": ["models/c"],
                  "reference": {"dicom_dir": "ref", "labels_csv": "ref/labels.csv",
                                "boxes_json": "ref/boxes.json",
                                "classes_txt": "ref/classes.txt"}}],
    },
}


def _path_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Where a Path can sit in ``model``, read from its field annotations ("a.b[].c")."""
    out: set[str] = set()

    def walk(tp: Any, where: str) -> None:
        origin = typing.get_origin(tp)
        if tp is Path:
            out.add(where)
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            out.update(_path_fields(tp, f"{where}."))
        elif origin in (list, tuple, set, frozenset):
            for arg in typing.get_args(tp):
                walk(arg, f"{where}[]")
        elif origin is dict:
            walk(typing.get_args(tp)[1], f"{where}{{}}")
        elif origin in (typing.Union, types.UnionType, typing.Annotated):
            for arg in typing.get_args(tp):
                walk(arg, where)

    hints = typing.get_type_hints(model)
    for name in model.model_fields:
        walk(hints[name], f"{prefix}{name}")
    return out


def _path_values(value: Any, where: str = "") -> list[tuple[str, Path]]:
    """Every Path in a loaded settings object, generically, with its location."""
    if isinstance(value, Path):
        return [(where, value)]
    if isinstance(value, BaseModel):
        return [hit for name in type(value).model_fields
                for hit in _path_values(getattr(value, name),
                                        f"{where}.{name}" if where else name)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [hit for item in value for hit in _path_values(item, f"{where}[]")]
    if isinstance(value, dict):
        return [hit for item in value.values() for hit in _path_values(item, f"{where}{{}}")]
    return []


def test_every_path_setting_is_absolute_after_loading(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(EVERY_PATH), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "pacs-ca.pem").write_text("", encoding="utf-8")
    settings = load_settings(config, environ={})
    found = _path_values(settings)
    declared = _path_fields(Settings)
    assert {where for where, _ in found} == declared, "a path setting is not covered"
    relative = [f"{where}={p}" for where, p in found if not p.is_absolute()]
    assert not relative, f"relative after loading: {relative}"
    assert settings.storage.data_dir == tmp_path / "var"
    assert settings.models.bundles == [tmp_path / "models" / "a", tmp_path / "models" / "b"]
    assert settings.evaluation.jobs[0].reference.classes_path == tmp_path / "ref" / "classes.txt"  # type: ignore[union-attr]


def test_shipped_config_gives_absolute_paths_against_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(SHIPPED, environ={})
    assert str(settings.storage.data_dir) == str(tmp_path / "var")
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'node.db'}"
    assert settings.demo_bundle_dir == tmp_path / "var" / "models" / "demo"
    assert all(p.is_absolute() for _, p in _path_values(settings))


def test_overrides_home_and_absolute_paths(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # the CLI's --data-dir arrives as this override
    cli = load_settings(None, overrides={"storage.data_dir": "../spool/./x"}, environ={})
    assert cli.storage.data_dir == tmp_path.parent / "spool" / "x"
    env = load_settings(None, environ={"CXR_NODE__MODELS__DEMO_DIR": "~/demo"})
    assert env.models.demo_dir == tmp_path / "home" / "demo"
    absolute = load_settings(None, overrides={"storage.data_dir": "/srv/cxr"}, environ={})
    assert absolute.storage.data_dir == Path("/srv/cxr")


def test_resolve_paths_keeps_everything_else(tmp_path: Path) -> None:
    settings = load_settings(None, overrides={"dicom.port": 4242, "storage.data_dir": "rel",
                                              "web.token": "x" * 20}, environ={})
    again = resolve_paths(settings, tmp_path)  # already absolute: nothing changes
    assert again == settings
    raw = Settings.model_validate({"storage": {"data_dir": "rel"}, "dicom": {"port": 4242}})
    resolved = resolve_paths(raw, tmp_path)
    assert resolved.storage.data_dir == tmp_path / "rel" and resolved.dicom.port == 4242
    assert resolved.model_dump(exclude={"storage"}) == raw.model_dump(exclude={"storage"})
    assert raw.storage.data_dir == Path("rel")  # frozen settings: a copy, not a mutation
