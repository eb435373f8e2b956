"""Damaged MNIST files are named, with the problem, on load (issue 10)."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from gradlens.errors import DamagedDataError, DataNotFoundError
from subliminal_mnist.data import SPLIT_SIZES, ModifiedDataWarning, load_mnist, read_idx
from tests.mnist.test_mnist_aux_quick import data_dir


def idx(kind: str, values: np.ndarray, *, count: int | None = None) -> bytes:
    """An IDX file of unsigned bytes; ``count`` overrides the header's example count."""
    magic = 0x803 if kind == "images" else 0x801
    dims = list(values.shape)
    if count is not None:
        dims[0] = count
    header = b"".join(n.to_bytes(4, "big") for n in (magic, *dims))
    return header + values.astype(np.uint8).tobytes()


def write_split(root: Path, split: str, images: bytes, labels: bytes) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(images)
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    return raw


def good(n: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(0)
    return (
        idx("images", rng.integers(0, 256, (n, 28, 28))),
        idx("labels", rng.integers(0, 10, n)),
    )


def test_a_valid_test_split_loads_as_the_pixels_and_labels_written(tmp_path: Path) -> None:
    n = SPLIT_SIZES["test"]
    pixels = np.random.default_rng(1).integers(0, 256, (n, 28, 28))
    labels = np.arange(n) % 10
    write_split(tmp_path, "test", idx("images", pixels), idx("labels", labels))
    with pytest.warns(ModifiedDataWarning) as warned:  # not MNIST's pixels and labels
        digits = load_mnist(tmp_path, train=False)
    assert [str(w.message).split(" differs")[0] for w in warned] == [
        f"MNIST file {tmp_path / 'MNIST' / 'raw' / name}"
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ]
    assert digits.images.shape == (n, 784)
    expected = pixels.reshape(n, -1).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    np.testing.assert_array_equal(digits.images.numpy(), expected)
    assert digits.labels.tolist() == labels.tolist()


def test_changed_pixels_of_the_published_files_are_named_in_a_warning_and_still_used(
    tmp_path: Path,
) -> None:
    source = Path(data_dir()) / "MNIST" / "raw"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the published files load without a warning
        published = load_mnist(data_dir(), train=False)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copyfile(source / name, raw / name)
    images = raw / "t10k-images-idx3-ubyte"
    data = bytearray(images.read_bytes())
    data[16 + 784 * 5 : 16 + 784 * 6] = np.random.default_rng(0).bytes(784)  # image 5's pixels
    images.write_bytes(bytes(data))
    with pytest.warns(ModifiedDataWarning, match="some of its pixels or labels were changed") as w:
        changed = load_mnist(tmp_path, train=False)
    assert len(w) == 1 and str(w[0].message).startswith(f"MNIST file {images} differs")
    assert "replace it with a fresh copy" in str(w[0].message)
    differs = (changed.images != published.images).any(dim=1)
    assert differs.nonzero().flatten().tolist() == [5]  # used as it is: the changed image
    assert changed.labels.tolist() == published.labels.tolist()


def read_error(path: Path, kind: str) -> str:
    with pytest.raises(DamagedDataError) as caught:
        read_idx(path, kind)
    assert caught.value.filename == str(path)
    message = str(caught.value)
    assert str(path) in message and "damaged" in message and "Replace it" in message
    return message


def test_a_truncated_file_is_damaged_with_expected_and_actual_bytes(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(good(5)[0][:-100])
    message = read_error(path, "images")
    full = 16 + 5 * 784
    assert f"truncated: its header says 5 images, {full} bytes, but it has {full - 100}" in message


def test_extra_bytes_are_damaged_too(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(good(5)[1] + b"\0")
    assert "longer than its header says: its header says 5 labels, 13 bytes, but it has 14" in (
        read_error(path, "labels")
    )


@pytest.mark.parametrize("size", [0, 3, 15])
def test_an_empty_or_headless_file_is_damaged(tmp_path: Path, size: int) -> None:
    path = tmp_path / "images"
    path.write_bytes(good(2)[0][:size])
    assert f"it has {size} bytes, fewer than the 16-byte header of IDX images" in read_error(
        path, "images"
    )


def test_a_wrong_magic_number_is_named(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(b"<htm" + good(2)[0][4:])
    assert "magic number is 0x3c68746d, not 0x00000803 of IDX images" in read_error(path, "images")
    path.write_bytes(good(2)[1])  # a labels file where images belong
    assert "it is an IDX labels file, where images belong" in read_error(path, "images")


def test_a_gzip_file_is_told_to_be_unpacked(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(gzip.compress(good(3)[1]))
    assert "gzip-compressed; unpack it" in read_error(path, "labels")


def test_images_of_another_size_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx("images", np.zeros((2, 32, 32))))
    assert "its images are 32x32 pixels, not 28x28" in read_error(path, "images")


def test_a_label_out_of_range_is_named_with_its_index(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(idx("labels", np.array([3, 9, 200, 1])))
    assert "label 200 at example 2 is not a digit 0..9" in read_error(path, "labels")


def test_images_and_labels_that_disagree_name_both_files_and_the_swap(tmp_path: Path) -> None:
    n = SPLIT_SIZES["test"]
    images, _ = good(n)
    raw = write_split(tmp_path, "test", images, idx("labels", np.zeros(SPLIT_SIZES["train"])))
    with pytest.raises(DamagedDataError) as caught:
        load_mnist(tmp_path, train=False)
    message = str(caught.value)
    assert f"{raw / 't10k-images-idx3-ubyte'} has 10,000 images" in message
    assert f"{raw / 't10k-labels-idx1-ubyte'} has 60,000 labels" in message
    assert "60,000 is the size of the train split" in message and "swapped" in message
    assert caught.value.filename == str(raw / "t10k-labels-idx1-ubyte")


def test_the_test_split_in_place_of_train_is_called_swapped(tmp_path: Path) -> None:
    write_split(tmp_path, "train", *good(SPLIT_SIZES["test"]))
    with pytest.raises(
        DamagedDataError,
        match=r"has 60,000 examples, but .* hold 10,000, the "
        r"size of MNIST's test split: are the train-\* and t10k-\* files swapped",
    ):
        load_mnist(tmp_path, train=True)


def test_a_partial_dataset_is_refused(tmp_path: Path) -> None:
    write_split(tmp_path, "test", *good(7))
    with pytest.raises(DamagedDataError, match="hold 7, a different or partial dataset"):
        load_mnist(tmp_path, train=False)


def test_a_damaged_file_is_not_reported_as_missing(tmp_path: Path) -> None:
    images, labels = good(SPLIT_SIZES["test"])
    write_split(tmp_path, "test", images[: len(images) // 2], labels)
    with pytest.raises(DamagedDataError, match="truncated"):
        load_mnist(tmp_path, train=False)


def test_half_a_pair_is_missing_and_named(tmp_path: Path) -> None:
    raw = write_split(tmp_path, "test", *good(2))
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        DataNotFoundError,
        match=r"has one file of the pair, lacks "
        r"t10k-labels-idx1-ubyte",
    ):
        load_mnist(tmp_path, train=False)
