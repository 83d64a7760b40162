"""DICOM: pydicom's real CT and MR test files (shipped in its wheel), and files built here for the cases those
lack (MONOCHROME1, several frames); windows and presets; DICOM in a raw dataset, found by its magic."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medvlp.data.dicom import PRESETS, dicom_to_image, is_dicom
from medvlp.data.images import ImageError, load_image, open_image
from medvlp.data.loader import FamilyDataset
from medvlp.data.registry import prepare
from medvlp.data.transforms import EvalTransform
from medvlp.errors import ConfigError

CT, MR = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")


def windowed(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The expected 8-bit image: the window's range mapped linearly onto 0..255."""
    return np.clip(np.round((values - (center - width / 2)) / width * 255), 0, 255).astype(np.uint8)


def build(pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> bytes:
    """A Part-10 DICOM file (preamble, DICM, meta) holding 16-bit grey ``pixels`` ([frames,] rows, cols)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def test_real_ct_rescaled_to_hounsfield_units_then_windowed():
    ds = pydicom.dcmread(CT)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) == -1024 and "WindowCenter" not in ds
    stretched = np.asarray(open_image(CT))  # no stored window: min-max
    assert stretched.shape == (128, 128) and stretched.min() == 0 and stretched.max() == 255
    for preset in ("brain", "lung", "bone", "abdomen", "mediastinum"):
        image = open_image(CT, window=preset)
        assert image.mode == "L" and np.array_equal(np.asarray(image), windowed(hu, *PRESETS[preset]))
    assert np.array_equal(np.asarray(open_image(CT, window=(40, 400))), windowed(hu, 40, 400))
    assert np.array_equal(np.asarray(open_image(CT, window="-600,1500")), windowed(hu, *PRESETS["lung"]))
    assert not np.array_equal(np.asarray(open_image(CT, window="lung")), np.asarray(open_image(CT, window="bone")))


def test_real_mr_uses_its_stored_window():
    ds = pydicom.dcmread(MR)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600, 1600)
    image = np.asarray(open_image(MR))
    assert image.shape == (64, 64) and np.array_equal(image, windowed(ds.pixel_array.astype(float), 600, 1600))
    assert not np.array_equal(image, np.asarray(open_image(MR, window="minmax")))


@pytest.mark.parametrize("path", [CT, MR])
def test_real_files_reach_model_input(path):
    """As ``predict`` will read them: path in, model-ready uint8 pixels out."""
    pixels = EvalTransform(32)(open_image(path))
    assert tuple(pixels.shape) == (1, 32, 32) and int(pixels.max()) > int(pixels.min())


def test_monochrome1_is_inverted_and_multi_valued_window_takes_the_first():
    ramp = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 10
    data = build(ramp, "MONOCHROME1", WindowCenter=[1275, 500], WindowWidth=[2550, 100])
    image = np.asarray(dicom_to_image(data))
    assert np.array_equal(image, 255 - windowed(ramp.astype(float), 1275, 2550))
    assert image[0, 0] == 255 and image[-1, -1] < 5  # the lowest value is white in MONOCHROME1


def test_multi_frame_takes_the_middle_frame_or_a_chosen_one():
    frames = np.stack([np.full((8, 8), 100 * (i + 1), np.uint16) for i in range(5)])
    frames[:, 0, 0] = 0  # a dark corner, so min-max keeps each frame's level visible
    data = build(frames, WindowCenter=250, WindowWidth=500)
    assert np.asarray(dicom_to_image(data))[4, 4] == windowed(np.array(300.0), 250, 500)  # frame 2 of 0..4
    assert np.asarray(dicom_to_image(data, frame=0))[4, 4] == windowed(np.array(100.0), 250, 500)
    assert np.asarray(dicom_to_image(data, frame=-1))[4, 4] == 255
    with pytest.raises(ImageError, match="frame 7 out of range: the file has 5 frames"):
        dicom_to_image(data, frame=7)


def test_colour_passes_through_as_rgb():
    image = open_image(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    assert image.mode == "RGB" and image.size == (100, 100)


def test_refusals_are_one_line():
    with pytest.raises(ImageError, match=r"^DICOM file without pixel data"):
        open_image(get_testdata_file("rtplan.dcm"))
    with pytest.raises(ConfigError, match=r"window='liverish': known presets are brain, .*, or minmax"):
        open_image(CT, window="liverish")
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(b"\0" * 128 + b"NOPE" + b"\0" * 64)


def test_found_by_magic_and_stored_as_png(tmp_path, raw_vqa_rad):
    data = open(CT, "rb").read()
    assert is_dicom(data) and not is_dicom(open(get_testdata_file("CT_small.dcm"), "rb").read()[4:])
    stored, note = load_image(data)
    assert stored.format == "png" and (stored.width, stored.height) == (128, 128) and note == "converted DICOM to L"
    raw = raw_vqa_rad()
    (raw_vqa_rad.images / "synpic0.jpg").write_bytes(data)  # a DICOM under a JPEG name
    (raw_vqa_rad.images / "synpic1.jpg").write_bytes(open(MR, "rb").read())
    manifest = prepare("vqa_rad", raw, tmp_path / "out")
    assert manifest["skipped"]["count"] == 0 and manifest["converted_images"] == {"converted DICOM to L": 2}
    dataset = FamilyDataset(tmp_path / "out", "train", 32, train=False)
    record = dataset.records[0]
    assert record["image_bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert tuple(dataset[0]["pixels"].shape) == (1, 32, 32)
