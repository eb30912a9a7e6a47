"""``dicom.receiver_processes`` and ``dicom.reuse_port``: validated once, at load time."""

from __future__ import annotations

import pytest

from dicom_node.config import ConfigError, load_settings


def _dicom(**values: object):  # type: ignore[no-untyped-def]
    return load_settings(None, overrides={f"dicom.{k}": v for k, v in values.items()},
                         environ={}).dicom


def test_one_receiver_by_default_and_no_port_sharing() -> None:
    dicom = _dicom()
    assert dicom.receiver_processes == 1 and dicom.reuse_port is None
    assert not dicom.reuses_port


def test_several_receiver_processes_share_the_port() -> None:
    assert _dicom(receiver_processes=4).reuses_port
    assert _dicom(receiver_processes=4, reuse_port=True).reuses_port
    # one process that lets others (started apart) bind its port too
    assert _dicom(reuse_port=True).reuses_port


def test_several_receiver_processes_without_port_sharing_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"dicom.receiver_processes 2 needs dicom.reuse_port"):
        _dicom(receiver_processes=2, reuse_port=False)


@pytest.mark.parametrize("count", [0, 65])
def test_receiver_processes_out_of_range_is_refused(count: int) -> None:
    with pytest.raises(ConfigError, match=r"dicom.receiver_processes"):
        _dicom(receiver_processes=count)


def test_environment_override_reaches_the_setting() -> None:
    settings = load_settings(None, environ={"CXR_NODE__DICOM__RECEIVER_PROCESSES": "3"})
    assert settings.dicom.receiver_processes == 3 and settings.dicom.reuses_port
