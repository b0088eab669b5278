"""read_image over every supported format, and its failure modes."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medseg_core.data.io import read_image, write_nifti
from medseg_core.errors import DataIntegrityError


def test_nifti_2d_roundtrip_keeps_values_and_spacing(tmp_path: Path) -> None:
    # Arrange
    array = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    path = tmp_path / "a.nii.gz"
    write_nifti(array, path, spacing=(0.5, 2.0))

    # Act
    image, meta = read_image(path)

    # Assert
    assert image.dtype == np.float32 and image.shape == (6, 4)
    np.testing.assert_array_equal(image, array)
    assert meta.shape == (6, 4)
    assert meta.spacing == pytest.approx((0.5, 2.0))
    assert meta.affine.shape == (4, 4) and meta.affine.dtype == np.float64


def test_nifti_3d_and_integer_dtype(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 3, size=(5, 6, 3)).astype(np.uint8)
    path = tmp_path / "m.nii"
    write_nifti(array, path, spacing=(1.0, 1.0, 2.5))

    image, meta = read_image(path)

    assert image.dtype == np.float32 and image.shape == (5, 6, 3)
    np.testing.assert_array_equal(image, array.astype(np.float32))
    assert meta.spacing == pytest.approx((1.0, 1.0, 2.5))


def test_nrrd_volume(tmp_path: Path) -> None:
    array = np.random.default_rng(1).random((6, 5, 3)).astype(np.float32)
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), array, {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.5, 2.0, 3.0]),
        "space origin": np.array([1.0, 2.0, 3.0]),
    })

    image, meta = read_image(path)

    np.testing.assert_allclose(image, array)
    assert meta.spacing == pytest.approx((0.5, 2.0, 3.0))


def test_png_grey_uses_numpy_axis_order(tmp_path: Path) -> None:
    array = (np.arange(6 * 4).reshape(6, 4) * 10).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "g.png")

    image, meta = read_image(tmp_path / "g.png")

    np.testing.assert_array_equal(image, array.astype(np.float32))
    assert meta.shape == (6, 4) and meta.spacing == (1.0, 1.0)


def test_rgb_png_becomes_grey(tmp_path: Path) -> None:
    rgb = np.zeros((6, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[0, 0] = (0, 100, 0)
    Image.fromarray(rgb).save(tmp_path / "c.png")

    image, _ = read_image(tmp_path / "c.png")

    assert image.shape == (6, 4)
    assert image[1, 1] == pytest.approx(0.299 * 200)
    assert image[0, 0] == pytest.approx(0.587 * 100)


def test_dicom_file_applies_rescale() -> None:
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    image, meta = read_image(path)

    assert image.shape == (128, 128)
    # MONAI's PydicomReader returns (columns, rows), ITK-style
    np.testing.assert_allclose(image, expected.T)
    assert meta.spacing == pytest.approx(tuple(float(s) for s in ds.PixelSpacing))


def _write_series(folder: Path, n: int, step_mm: float) -> list[np.ndarray]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir()
    slices = []
    for k in range(n):
        s = copy.deepcopy(ds)
        pos = [float(v) for v in ds.ImagePositionPatient]
        s.ImagePositionPatient = [pos[0], pos[1], pos[2] + step_mm * k]
        s.InstanceNumber = k + 1
        s.SOPInstanceUID = pydicom.uid.generate_uid()
        pixels = (ds.pixel_array + 10 * k).astype(ds.pixel_array.dtype)
        s.PixelData = pixels.tobytes()
        # file names in reverse order: the reader must sort by position
        s.save_as(folder / f"im{n - k:02d}.dcm")
        slices.append(pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return slices


def test_dicom_series_folder_stacks_slices_by_position(tmp_path: Path) -> None:
    slices = _write_series(tmp_path / "series", n=3, step_mm=2.5)

    image, meta = read_image(tmp_path / "series")

    assert image.shape == (128, 128, 3)
    for k in range(3):
        np.testing.assert_allclose(image[..., k], slices[k].T)
    assert meta.spacing == pytest.approx((0.661468, 0.661468, 2.5), rel=1e-5)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataIntegrityError, match=r"cannot read image .*nope\.nii\.gz: the file "
                       r"does not exist; check the path"):
        read_image(tmp_path / "nope.nii.gz")


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "scan.mha").write_bytes(b"x")

    with pytest.raises(DataIntegrityError, match=r"unsupported extension '\.mha'; supported: "
                       r"\.nii\.gz, \.nii, \.nrrd.*DICOM series"):
        read_image(tmp_path / "scan.mha")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad.nii.gz", b"not a nifti" * 20, r"nibabel reader failed \(ImageFileError"),
        ("bad.png", b"garbage", r"pil reader failed \(UnidentifiedImageError"),
        ("bad.dcm", b"garbage" * 50, r"pydicom reader failed \(InvalidDicomError"),
        ("bad.nrrd", b"garbage" * 50, r"nrrd reader failed \(NRRDError"),
    ],
)
def test_corrupt_files_raise_with_reason(tmp_path: Path, name: str, content: bytes,
                                         reason: str) -> None:
    (tmp_path / name).write_bytes(content)

    pattern = rf"cannot read image .*{name}: {reason}.*re-export"
    with pytest.raises(DataIntegrityError, match=pattern):
        read_image(tmp_path / name)


def test_truncated_nifti_raises(tmp_path: Path) -> None:
    path = tmp_path / "t.nii.gz"
    write_nifti(np.random.default_rng(0).random((32, 32, 8)), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])

    with pytest.raises(DataIntegrityError, match=r"cannot read image .*t\.nii\.gz: nibabel reader"):
        read_image(path)


def test_multichannel_volume_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mc.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), str(path))

    with pytest.raises(DataIntegrityError, match=r"it has 2 channels .*expected one channel"):
        read_image(path)


@pytest.mark.parametrize(
    ("array", "spacing", "match"),
    [
        (np.zeros(4), None, r"2D or 3D array, got shape \(4,\)"),
        (np.zeros((4, 4)), (1.0,), r"spacing \(1\.0,\) must hold 2 positive"),
        (np.zeros((4, 4)), (1.0, 0.0), r"must hold 2 positive finite values"),
    ],
)
def test_write_nifti_validates(tmp_path: Path, array: np.ndarray, spacing, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_nifti(array, tmp_path / "x.nii.gz", spacing)
