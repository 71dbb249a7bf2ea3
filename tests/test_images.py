"""ImageFolder and ImagePreprocessing: discovery, lazy batches against a plain reference, subset views,
fingerprints, unreadable files, and every refusal. Images are made fresh with Pillow in tmp_path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probecore.errors import DataError
from probecore.images import ImageFolder, ImagePreprocessing

Image = pytest.importorskip("PIL.Image")

SMALL = ImagePreprocessing(size=12, resize=16)
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

# (relative path, pillow mode, (width, height)); the order is the one discovery must give.
IMAGES = [
    ("bird/a.png", "RGB", (40, 30)),
    ("bird/b.JPG", "RGB", (33, 57)),
    ("bird/nested/c.png", "L", (50, 50)),
    ("bird/z.jpeg", "RGB", (16, 16)),
    ("cat/A.PNG", "RGBA", (61, 45)),
    ("cat/b.jpg", "L", (20, 70)),
    ("cat/c.png", "P", (27, 19)),
    ("dog/a.png", "RGB", (100, 17)),
    ("dog/b.Jpeg", "RGB", (18, 33)),
    ("dog/\u00fcber \u732b.png", "RGB", (22, 22)),  # a non-ASCII name with a space
]
IGNORED = ["dog/.hidden.png", ".hiddenclass/x.png", "dog/.cache/y.png", "top.png"]  # valid images, never found


def _write_image(path: Path, mode: str, size, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    # Smooth gradients plus noise: like photos for JPEG, and every pixel value still differs.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 7 + yy * 3 + 40 * c) % 256 for c in range(channels)], axis=-1)
    pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    if mode in ("L", "P"):
        image = Image.fromarray(pixels[..., 0], "L")
        if mode == "P":
            image = image.convert("RGB").quantize(colors=64)
    else:
        image = Image.fromarray(pixels, mode)
    image.save(path, quality=92) if path.suffix.lower() in (".jpg", ".jpeg") else image.save(path)


@pytest.fixture
def root(tmp_path, rng):
    folder = tmp_path / "images"
    for relative, mode, size in IMAGES:
        _write_image(folder / relative, mode, size, rng)
    for relative in IGNORED:
        _write_image(folder / relative, "RGB", (20, 20), rng)
    (folder / "dog" / "notes.txt").write_text("not an image")
    (folder / "cat" / "labels.csv").write_text("a,b\n")
    return folder


def _reference(path, size, resize, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1 / 255, gray=False):
    """The preprocessing written plainly: PIL resize of the short side, numpy crop and normalize, HWC."""
    image = Image.open(path).convert("L" if gray else "RGB")
    width, height = image.size
    if width <= height:
        new_width, new_height = resize, int(resize * height / width)
    else:
        new_width, new_height = int(resize * width / height), resize
    pixels = np.asarray(image.resize((new_width, new_height), Image.BILINEAR))
    if gray:
        pixels = pixels[:, :, None]
    top, left = int(round((new_height - size) / 2)), int(round((new_width - size) / 2))
    pixels = pixels[top : top + size, left : left + size].astype(np.float32)
    c = pixels.shape[2]
    return (pixels * np.float32(scale) - np.float32(mean[:c])) / np.float32(std[:c])


def _relative(folder, root):
    return [p.relative_to(root).as_posix() for p in folder.paths]


# --- discovery -----------------------------------------------------------------------------------------


def test_discovery_order_labels_and_ignored_files(root):
    folder = ImageFolder(root, SMALL)
    assert _relative(folder, root) == [relative for relative, _, _ in IMAGES]
    assert folder.labels.dtype.kind == "U"
    assert folder.labels.tolist() == [relative.split("/")[0] for relative, _, _ in IMAGES]
    assert folder.classes.tolist() == ["bird", "cat", "dog"]
    assert folder.skipped == []
    assert all(isinstance(p, Path) for p in folder.paths)


@pytest.mark.parametrize(
    "preprocessing, sample_shape",
    [
        (SMALL, (3, 12, 12)),
        (ImagePreprocessing(size=12, resize=16, channels_last=True), (12, 12, 3)),
        (ImagePreprocessing(size=12, resize=16, grayscale=True), (1, 12, 12)),
        (ImagePreprocessing(size=12, resize=16, grayscale=True, channels_last=True, dtype="float16"), (12, 12, 1)),
    ],
)
def test_shape_dtype_len_and_loaded_batches_agree(root, preprocessing, sample_shape):
    folder = ImageFolder(root, preprocessing)
    assert len(folder) == len(IMAGES) and folder.ndim == 4
    assert folder.shape == (len(IMAGES), *sample_shape)
    assert folder.dtype == np.dtype(preprocessing.dtype)
    batch = folder[2:5]
    assert batch.shape == (3, *sample_shape) and batch.dtype == folder.dtype
    assert folder[0].shape == sample_shape
    assert folder[5:5].shape == (0, *sample_shape)


# --- preprocessing against the plain reference ----------------------------------------------------------


@pytest.mark.parametrize("settings", [dict(size=12, resize=16), dict(size=12, resize=12, **IMAGENET), dict(size=14)])
def test_a_slice_equals_the_plain_reference(root, settings):
    preprocessing = ImagePreprocessing(**settings)
    folder = ImageFolder(root, preprocessing)
    batch = folder[1:8]
    assert batch.flags.c_contiguous
    for row, path in zip(batch, folder.paths[1:8]):
        expected = _reference(path, preprocessing.size, preprocessing.resize_to, preprocessing.mean, preprocessing.std)
        got = row.transpose(1, 2, 0)
        if path.suffix.lower() == ".png":
            np.testing.assert_array_equal(got, expected, err_msg=str(path))
        else:  # the same libjpeg decodes both; allow for nothing more than float rounding
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=str(path))


def test_default_resize_is_the_imagenet_ratio_and_grayscale_uses_the_first_mean(root):
    assert ImagePreprocessing().resize_to == 256 and ImagePreprocessing(size=112).resize_to == 128
    gray = ImagePreprocessing(size=12, resize=15, grayscale=True, **IMAGENET)
    folder = ImageFolder(root, gray)
    expected = _reference(folder.paths[0], 12, 15, IMAGENET["mean"], IMAGENET["std"], gray=True)
    np.testing.assert_array_equal(folder[0].transpose(1, 2, 0), expected)


def test_channels_first_and_last_hold_the_same_values(root):
    chw = ImageFolder(root, ImagePreprocessing(size=12, resize=16, **IMAGENET))[:]
    hwc = ImageFolder(root, ImagePreprocessing(size=12, resize=16, channels_last=True, **IMAGENET))[:]
    np.testing.assert_array_equal(chw, hwc.transpose(0, 3, 1, 2))
    assert hwc.flags.c_contiguous and chw.flags.c_contiguous


def test_uint8_feeds_raw_pixels_and_float64_matches_float32(root):
    raw = ImageFolder(root, ImagePreprocessing(size=12, resize=16, scale=1, dtype="uint8"))[:3]
    assert raw.dtype == np.uint8
    scaled = ImageFolder(root, ImagePreprocessing(size=12, resize=16, scale=1))[:3]
    np.testing.assert_array_equal(raw, scaled)
    f64 = ImageFolder(root, ImagePreprocessing(size=12, resize=16, dtype="float64", **IMAGENET))[:3]
    f32 = ImageFolder(root, ImagePreprocessing(size=12, resize=16, **IMAGENET))[:3]
    assert f64.dtype == np.float64
    np.testing.assert_allclose(f64, f32, rtol=1e-6, atol=1e-6)
    f16 = ImageFolder(root, ImagePreprocessing(size=12, resize=16, dtype="float16", channels_last=True, **IMAGENET))[:3]
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, f32.transpose(0, 2, 3, 1).astype(np.float16))


@pytest.mark.parametrize("channels_last", [False, True])
def test_apply_alone_and_into_a_strided_output(root, channels_last):
    preprocessing = ImagePreprocessing(size=12, resize=16, channels_last=channels_last, **IMAGENET)
    folder = ImageFolder(root, preprocessing)
    with Image.open(folder.paths[4]) as image:
        alone = preprocessing.apply(image)
        strided = np.zeros((2, *preprocessing.sample_shape()), np.float32)[1, ..., ::-1]  # not contiguous
        assert preprocessing.apply(image, strided) is strided
    np.testing.assert_array_equal(alone, folder[4])
    np.testing.assert_array_equal(strided, folder[4])


def test_threads_change_nothing(root):
    one = ImageFolder(root, SMALL, workers=1)[:]
    three = ImageFolder(root, SMALL, workers=3)[:]
    np.testing.assert_array_equal(one, three)


# --- lazy subset views ----------------------------------------------------------------------------------


class _CountOpens:
    def __init__(self, monkeypatch):
        self.paths = []
        original = Image.open

        def counting_open(fp, *args, **kwargs):
            self.paths.append(Path(fp))
            return original(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", counting_open)


def test_subset_views_load_nothing_until_sliced_and_then_the_right_rows(root, monkeypatch):
    folder = ImageFolder(root, SMALL)
    everything = folder[:]
    opens = _CountOpens(monkeypatch)
    rows = np.array([7, 0, 3, 3, -1])
    view = folder[rows]
    nested = view[[4, 1]]
    masked = folder.subset(np.arange(len(folder)) % 2 == 0)
    by_list = folder[[2, 5]]
    assert opens.paths == []  # making views reads no image
    assert isinstance(view, ImageFolder) and len(view) == 5 and view.shape == (5, 3, 12, 12)
    np.testing.assert_array_equal(view.labels, folder.labels[rows])
    assert view.classes.tolist() == folder.classes.tolist()

    np.testing.assert_array_equal(view[1:4], everything[rows[1:4]])
    assert opens.paths == [folder.paths[i] for i in rows[1:4]]  # only the sliced rows were opened
    np.testing.assert_array_equal(nested[:], everything[rows[[4, 1]]])
    np.testing.assert_array_equal(masked[:], everything[::2])
    np.testing.assert_array_equal(by_list[:], everything[[2, 5]])
    np.testing.assert_array_equal(view[3], everything[3])
    assert len(folder[np.array([], dtype=np.int64)]) == 0 and len(folder[[]]) == 0


def test_a_view_pickles_small_and_loads_the_same(root):
    import pickle

    view = ImageFolder(root, SMALL)[[4, 2]]
    again = pickle.loads(pickle.dumps(view))
    np.testing.assert_array_equal(again[:], view[:])
    assert again.paths == view.paths and again.fingerprint() == view.fingerprint()


def test_constructing_a_folder_decodes_nothing(root, monkeypatch):
    loads = []
    original = Image.Image.load

    def counting_load(self, *args, **kwargs):
        loads.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    folder = ImageFolder(root, SMALL)  # header checks only
    assert loads == []
    folder[:2]
    assert loads


@pytest.mark.parametrize("key", [np.array([0, 99]), np.array([-99]), np.zeros((2, 2), dtype=int), np.array([0.5])])
def test_bad_row_indices_are_refused_without_loading(root, key):
    folder = ImageFolder(root, SMALL)
    with pytest.raises(IndexError):
        folder[key]
    with pytest.raises(IndexError):
        folder[len(folder)]
    with pytest.raises(TypeError):
        folder["0"]


def test_the_folder_is_never_turned_into_one_array_implicitly(root):
    folder = ImageFolder(root, SMALL)
    with pytest.raises(TypeError, match="batch by batch"):
        np.asarray(folder)
    assert np.shape(folder) == folder.shape and np.ndim(folder) == 4


# --- fingerprint ----------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_tracks_files_rows_and_preprocessing(root, rng):
    base = ImageFolder(root, SMALL).fingerprint()
    assert ImageFolder(root, SMALL).fingerprint() == base
    assert ImageFolder(root, ImagePreprocessing(size=12, resize=16)).fingerprint() == base
    assert ImageFolder(root, SMALL)[np.arange(len(IMAGES))].fingerprint() == base
    # The default resize and the same value written out are the same preprocessing.
    implicit, explicit = ImagePreprocessing(), ImagePreprocessing(resize=256)
    assert ImageFolder(root, implicit).fingerprint() == ImageFolder(root, explicit).fingerprint()

    different = {
        "preprocessing": ImageFolder(root, ImagePreprocessing(size=12, resize=17)).fingerprint(),
        "layout": ImageFolder(root, ImagePreprocessing(size=12, resize=16, channels_last=True)).fingerprint(),
        "subset": ImageFolder(root, SMALL)[[0, 1, 2]].fingerprint(),
        "order": ImageFolder(root, SMALL)[np.arange(len(IMAGES))[::-1]].fingerprint(),
    }
    target = root / "cat" / "c.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched
    different["touched"] = ImageFolder(root, SMALL).fingerprint()
    _write_image(target, "RGB", (31, 19), rng)  # rewritten
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 9_000_000_000))
    different["rewritten"] = ImageFolder(root, SMALL).fingerprint()
    _write_image(root / "dog" / "new.png", "RGB", (20, 20), rng)  # added
    different["added"] = ImageFolder(root, SMALL).fingerprint()
    assert base not in different.values()
    assert len(set(different.values())) == len(different)


def test_fingerprint_of_a_vanished_file_is_a_data_error(root):
    folder = ImageFolder(root, SMALL)
    folder.paths[0].unlink()
    with pytest.raises(DataError, match="a.png"):
        folder.fingerprint()


def test_describe_is_json_able():
    described = ImagePreprocessing(**IMAGENET).describe()
    assert json.loads(json.dumps(described)) == described
    assert described["resize"] == 256 and described["layout"] == "NCHW"


# --- unreadable images ----------------------------------------------------------------------------------


@pytest.fixture
def broken_root(root):
    (root / "bird" / "garbage.png").write_bytes(os.urandom(300))
    (root / "cat" / "text.jpg").write_text("this is not a jpeg")
    png = (root / "bird" / "a.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(png[: len(png) // 2])  # truncated: its chunks fail their checks
    return root


def test_skip_mode_drops_unreadable_images_before_any_row_exists(broken_root):
    folder = ImageFolder(broken_root, SMALL)
    assert _relative(folder, broken_root) == [relative for relative, _, _ in IMAGES]
    assert folder.labels.tolist() == [relative.split("/")[0] for relative, _, _ in IMAGES]
    skipped = {path.relative_to(broken_root).as_posix(): reason for path, reason in folder.skipped}
    assert sorted(skipped) == ["bird/garbage.png", "cat/text.jpg", "dog/cut.png"]
    assert all(reason and "\n" not in reason for reason in skipped.values())
    assert folder[:].shape == (len(IMAGES), 3, 12, 12)
    assert len(folder[[0, 1]].skipped) == 3  # views carry the record


def test_fail_mode_names_the_unreadable_file_when_its_batch_loads(broken_root):
    folder = ImageFolder(broken_root, SMALL, on_error="fail")
    assert len(folder) == len(IMAGES) + 3
    row = _relative(folder, broken_root).index("bird/garbage.png")
    folder[:row]  # the rows before it load
    with pytest.raises(DataError, match="garbage.png") as caught:
        folder[row : row + 2]
    assert "\n" not in str(caught.value) and "delete or replace" in str(caught.value)
    with pytest.raises(DataError, match="garbage.png"):
        folder.verify()


def test_a_truncated_jpeg_passes_the_header_check_but_fails_loudly_or_is_caught_by_decoding(root):
    jpeg = (root / "bird" / "b.JPG").read_bytes()
    (root / "cat" / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    folder = ImageFolder(root, SMALL)
    row = _relative(folder, root).index("cat/half.jpg")
    with pytest.raises(DataError, match="half.jpg"):
        folder[row : row + 1]
    dropped = folder.verify(decode=True)
    assert [p.name for p, _ in dropped] == ["half.jpg"] and folder.skipped == dropped
    assert len(folder) == len(IMAGES) and len(folder[:]) == len(IMAGES)


def test_a_class_whose_every_image_is_unreadable_is_a_data_error(root):
    (root / "fish").mkdir()
    (root / "fish" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="fish.*unreadable"):
        ImageFolder(root, SMALL)


def test_sixteen_bit_grayscale_keeps_its_high_byte_and_float_pixels_are_unreadable(root, rng):
    deep = rng.integers(0, 65536, (20, 24)).astype(np.uint16)
    Image.fromarray(deep).save(root / "cat" / "deep.png")
    Image.fromarray(rng.random((20, 24)).astype(np.float32)).save(root / "dog" / "float.tif")
    identity = ImagePreprocessing(size=20, resize=20, scale=1, dtype="uint8", grayscale=True)
    folder = ImageFolder(root, identity)
    assert [p.name for p, _ in folder.skipped] == ["float.tif"] and "float" in folder.skipped[0][1]
    row = _relative(folder, root).index("cat/deep.png")
    np.testing.assert_array_equal(folder[row][0], (deep >> 8)[:, 2:22])  # not clipped to 255
    failing = ImageFolder(root, identity, on_error="fail")
    with pytest.raises(DataError, match="float.tif.*8-bit"):
        failing[_relative(failing, root).index("dog/float.tif") :]


# --- refusals -------------------------------------------------------------------------------------------


def test_folder_errors_name_the_problem_in_one_line(tmp_path, rng):
    def error(path):
        with pytest.raises(DataError) as caught:
            ImageFolder(path, SMALL)
        message = str(caught.value)
        assert "\n" not in message
        return message

    assert "not found" in error(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    assert "not a folder" in error(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    assert "is empty" in error(tmp_path / "empty")
    _write_image(tmp_path / "flat" / "a.png", "RGB", (8, 8), rng)
    assert "no class subfolders" in error(tmp_path / "flat")
    _write_image(tmp_path / "one" / "only" / "a.png", "RGB", (8, 8), rng)
    assert "single class" in error(tmp_path / "one") and "'only'" in error(tmp_path / "one")
    _write_image(tmp_path / "hollow" / "a" / "a.png", "RGB", (8, 8), rng)
    (tmp_path / "hollow" / "b").mkdir()
    (tmp_path / "hollow" / "b" / "readme.txt").write_text("no images here")
    assert "holds no images" in error(tmp_path / "hollow")


def test_explicit_paths_and_labels(root):
    folder = ImageFolder(root, SMALL, paths=["dog/a.png", root / "bird" / "a.png"], labels=["dog", "bird"])
    assert folder.paths == [root / "dog" / "a.png", root / "bird" / "a.png"]
    np.testing.assert_array_equal(folder[:], ImageFolder(root, SMALL)[[7, 0]][:])
    with pytest.raises(DataError, match="one label per image"):
        ImageFolder(root, SMALL, paths=["dog/a.png"], labels=["dog", "bird"])
    with pytest.raises(DataError, match="both paths and labels"):
        ImageFolder(root, SMALL, paths=["dog/a.png"])
    with pytest.raises(DataError, match="on_error"):
        ImageFolder(root, SMALL, on_error="ignore")


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(size=0), "positive"),
        (dict(size=224, resize=200), "at least size"),
        (dict(mean=(0.5, 0.5)), "3 finite numbers"),
        (dict(std=(1.0, 0.0, 1.0)), "must not contain 0"),
        (dict(dtype="int7"), "dtype must be one of"),
        (dict(dtype="uint8"), "raw pixels"),
        (dict(scale=float("nan")), "scale"),
    ],
)
def test_preprocessing_refuses_bad_settings(settings, match):
    with pytest.raises(DataError, match=match):
        ImagePreprocessing(**settings)


def test_preprocessing_normalizes_its_fields():
    p = ImagePreprocessing(mean=[0.5], std=np.array([0.25, 0.5, 1.0]), dtype=np.float32)
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.25, 0.5, 1.0) and p.dtype == "float32"
    assert hash(p) == hash(ImagePreprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))


def test_importing_the_module_does_not_import_pillow():
    code = "import sys, probecore, probecore.images\nprint('PIL' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
