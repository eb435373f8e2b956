from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
import xarray as xr

import gradlens
from gradlens import Recorder, Variable, open_run
from gradlens.records.provenance import (
    MAX_CHANGES,
    RunProvenance,
    config_from_attrs,
    git_commit,
    make_attrs,
    run_provenance,
)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture(autouse=True)
def _no_git_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let git and gradlens read the checkout itself, whatever the shell exported."""
    for name in ("GRADLENS_GIT_COMMIT", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit of ``a.txt`` and ``b.txt``, clean."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "a.txt").write_text("a\n")
    (root / "b.txt").write_text("b\n")
    git(root, "add", "a.txt", "b.txt")
    git(root, "commit", "-q", "-m", "first")
    return root


def commit_change(repo: Path) -> str:
    (repo / "a.txt").write_text("a changed\n")
    git(repo, "commit", "-q", "-am", "second")
    return git(repo, "rev-parse", "HEAD")


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


def test_every_attr_is_netcdf_safe_and_names_the_versions() -> None:
    attrs = make_attrs()
    assert set(attrs) == {
        "gradlens_version",
        "torch_version",
        "xarray_version",
        "numpy_version",
        "python_version",
        "started_at",
        "created_at",
        "git_commit",
        "git_dirty",
        "git_changes",
    }
    assert all(type(value) is str for key, value in attrs.items() if key != "git_dirty")
    assert attrs["git_dirty"] in (-1, 0, 1) and type(attrs["git_dirty"]) is int
    assert attrs["gradlens_version"] == gradlens.__version__ == "0.2.0"
    assert attrs["torch_version"] == str(torch.__version__)
    assert attrs["numpy_version"] == np.__version__
    assert attrs["xarray_version"] == xr.__version__
    for key in ("started_at", "created_at"):
        moment = datetime.fromisoformat(str(attrs[key]))
        assert moment.utcoffset() == timezone.utc.utcoffset(None)
        assert abs((datetime.now(timezone.utc) - moment).total_seconds()) < 60


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


FAKE = RunProvenance(
    started_at="2000-01-01T00:00:00+00:00",
    git_commit="0123456789abcdef0123456789abcdef01234567",
    git_dirty=1,
    git_changes="gradlens/x.py\nnotes.txt",
    gradlens_version="9.9",
    torch_version="t",
    xarray_version="x",
    numpy_version="n",
    python_version="p",
)


def test_make_attrs_stamps_the_given_snapshot_not_a_new_one() -> None:
    attrs = make_attrs({"lr": 0.1}, provenance=FAKE)
    assert {key: attrs[key] for key in FAKE.attrs()} == dataclasses.asdict(FAKE)
    created = datetime.fromisoformat(str(attrs["created_at"]))
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAKE.git_commit = "other"  # type: ignore[misc]


@needs_git
def test_a_commit_after_the_snapshot_does_not_change_the_recorded_commit(repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    start = run_provenance(repo)
    second = commit_change(repo)
    assert first != second
    assert start.git_commit == first and start.git_dirty == 0 and start.git_changes == ""
    assert make_attrs(provenance=start)["git_commit"] == first
    assert run_provenance(repo).git_commit == second  # a fresh snapshot sees the new commit


@needs_git
def test_a_recorder_stamps_the_commit_at_its_construction(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo)
    first = git(repo, "rev-parse", "HEAD")
    rec = Recorder(tmp_path / "run.nc", {"loss": Variable(("step",), "loss")}, flush_every=1)
    second = commit_change(repo)
    rec.log(0, loss=1.0)  # the file is created by this flush, after the commit
    rec.log(1, loss=0.5)
    rec.close()
    attrs = open_run(tmp_path / "run.nc").attrs
    assert second != first
    assert attrs["git_commit"] == first
    assert int(attrs["git_dirty"]) == 0


@needs_git
def test_a_dirty_tree_is_flagged_and_its_changed_paths_listed(repo: Path) -> None:
    (repo / "a.txt").write_text("edited\n")  # modified, unstaged
    (repo / "new file.py").write_text("x = 1\n")  # untracked, with a space
    git(repo, "mv", "b.txt", "c.txt")  # renamed, staged: only the new name is listed
    start = run_provenance(repo)
    assert start.git_commit == git(repo, "rev-parse", "HEAD")
    assert start.git_dirty == 1
    assert sorted(start.git_changes.split("\n")) == ["a.txt", "c.txt", "new file.py"]


@needs_git
def test_ignored_files_do_not_make_a_tree_dirty(repo: Path) -> None:
    (repo / ".gitignore").write_text("*.nc\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore records")
    (repo / "run.nc").write_text("data")
    start = run_provenance(repo)
    assert (start.git_dirty, start.git_changes) == (0, "")


@needs_git
def test_a_long_list_of_changes_is_cut_and_counted(repo: Path) -> None:
    for k in range(MAX_CHANGES + 5):
        (repo / f"new{k:03d}.txt").write_text("x")
    lines = run_provenance(repo).git_changes.split("\n")
    assert len(lines) == MAX_CHANGES + 1
    assert lines[-1] == "... and 5 more"
    assert all(line.startswith("new") for line in lines[:-1])


def test_outside_git_everything_git_reads_unknown(tmp_path: Path) -> None:
    start = run_provenance(tmp_path)
    assert (start.git_commit, start.git_dirty, start.git_changes) == ("unknown", -1, "")


@needs_git
def test_the_environment_names_the_commit_of_a_copy_without_git(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADLENS_GIT_COMMIT", "feedface")
    start = run_provenance(repo)
    assert (start.git_commit, start.git_dirty, start.git_changes) == ("feedface", -1, "")
    assert git_commit(repo) == "feedface"


@needs_git
def test_attrs_round_trip_through_a_netcdf_file(repo: Path, tmp_path: Path) -> None:
    (repo / "a.txt").write_text("edited\n")
    (repo / "b.txt").unlink()
    attrs = make_attrs({"lr": 0.1, "widths": (8, 8)}, provenance=run_provenance(repo))
    assert attrs["git_dirty"] == 1 and attrs["git_changes"] == "a.txt\nb.txt"
    assert all(type(value) in (str, int) for value in attrs.values())
    path = tmp_path / "attrs.nc"
    xr.Dataset({"x": ("step", [1.0])}, attrs=attrs).to_netcdf(path, engine="netcdf4")
    read = open_run(path).attrs
    assert read.keys() == attrs.keys()
    for key, value in attrs.items():
        assert type(read[key]) is not bool
        assert (int(read[key]) if isinstance(value, int) else read[key]) == value, key
    assert config_from_attrs(read) == {"lr": 0.1, "widths": [8, 8]}


def test_gradlens_and_its_provenance_read_one_version() -> None:
    from gradlens import _version

    assert gradlens.__version__ == _version.__version__
    assert make_attrs()["gradlens_version"] == _version.__version__
    # provenance reads the version from gradlens._version, never through the package
    tree = ast.parse(Path(gradlens.records.provenance.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "gradlens._version" in imported
    assert not {"gradlens", None} & imported
