from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType

import pytest

import gradlens
from gradlens.provenance import config_from_attrs, git_commit, make_attrs


@dataclass(frozen=True)
class Schedule:
    warmup: int = 10
    milestones: tuple[int, ...] = (100, 200)


@dataclass(frozen=True)
class Config:
    out: Path = Path("runs/a")
    lr: float = 0.1
    debug: bool = False
    teacher: str | None = None
    schedule: Schedule = field(default_factory=Schedule)


def test_every_attr_is_a_string_and_names_the_versions() -> None:
    attrs = make_attrs()
    assert set(attrs) == {
        "gradlens_version",
        "torch_version",
        "xarray_version",
        "numpy_version",
        "python_version",
        "created_at",
        "git_commit",
    }
    assert all(type(value) is str for value in attrs.values())
    assert attrs["gradlens_version"] == gradlens.__version__
    created = datetime.fromisoformat(attrs["created_at"])
    assert created.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60


def test_a_dataclass_config_round_trips_as_json() -> None:
    attrs = make_attrs(Config())
    assert json.loads(attrs["config"]) == config_from_attrs(attrs)
    assert config_from_attrs(attrs) == {
        "out": "runs/a",
        "lr": 0.1,
        "debug": False,
        "teacher": None,
        "schedule": {"warmup": 10, "milestones": [100, 200]},
    }


def test_a_mapping_config_round_trips_as_json() -> None:
    config = MappingProxyType({"data": Path("/data"), "seeds": (0, 1), "inner": {"k": 1}})
    assert config_from_attrs(make_attrs(config)) == {
        "data": "/data",
        "seeds": [0, 1],
        "inner": {"k": 1},
    }


def test_bad_configs_fail_clearly() -> None:
    with pytest.raises(TypeError, match="dataclass instance or a Mapping, got list"):
        make_attrs([1, 2])
    with pytest.raises(TypeError, match="config holds a object"):
        make_attrs({"model": object()})
    with pytest.raises(KeyError, match="recorded without a config"):
        config_from_attrs(make_attrs())


def test_git_commit_is_the_checkout_head_or_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package_dir = Path(gradlens.__file__).parent
    commit = git_commit(package_dir)
    assert commit == "unknown" or len(commit) == 40
    assert git_commit(tmp_path) == "unknown"
    assert git_commit(tmp_path / "missing") == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert git_commit(package_dir) == "unknown"
    assert make_attrs()["git_commit"] == "unknown"


def test_git_commit_falls_back_to_the_package_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert make_attrs()["git_commit"] == git_commit(Path(gradlens.__file__).parent)
