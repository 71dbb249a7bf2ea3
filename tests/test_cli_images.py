"""``probe run`` on an image folder: preprocessing fitted to the model input, read lazily, cached."""

import json

import numpy as np
import pytest
from onnx_models import save_convnet
from PIL import Image
from typer.testing import CliRunner

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.cli.app import app
from probecore.cli.run import image_preprocessing
from probecore.images import ImageFolder, ImagePreprocessing


def image_folder(root, rng, per_class=20, size=12):
    """Two classes that differ in brightness, as PNGs of varying size."""
    for label, level in (("dark", 60), ("light", 190)):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            side = size + index % 5
            pixels = np.clip(rng.normal(level, 25, size=(side, side + 2, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index:03d}.png")
    (root / "light" / "broken.png").write_bytes(b"not an image")
    return root


def test_run_probes_an_image_folder_and_records_the_preprocessing(tmp_path, rng):
    model = save_convnet(tmp_path / "c.onnx", rng, channels=4, size=8)
    folder = image_folder(tmp_path / "images", rng)
    args = ["run", str(model), "--data", str(folder), "--out", str(tmp_path / "r"), "--json",
            "--cache-dir", str(tmp_path / "cache"), "--layers", "relu,pool"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["classes"] == ["dark", "light"]
    assert sum(report["split_sizes"].values()) == 40
    assert report["settings"]["images"]["size"] == 8
    assert report["settings"]["images"]["unreadable_skipped"] == [str(folder / "light" / "broken.png")]
    assert min(layer["metrics"]["test"]["error"] for layer in report["layers"]) <= 0.25
    again = json.loads(CliRunner().invoke(app, args).stdout)
    assert again["settings"]["cache"]["splits_from_cache"] == 3


def test_preprocessing_follows_the_model_input(tmp_path, rng):
    source = OnnxSource(save_convnet(tmp_path / "c.onnx", rng, size=8))
    preprocessing = image_preprocessing(source, probecore.DataSpec(tmp_path))
    assert (preprocessing.size, preprocessing.channels_last, preprocessing.grayscale) == (8, False, False)
    with pytest.raises(probecore.DataError, match="--image-size 32 does not fit"):
        image_preprocessing(source, probecore.DataSpec(tmp_path, image_size=32))


def test_a_folder_read_a_batch_ahead_gives_the_features_of_its_images_in_memory(tmp_path, rng):
    model = save_convnet(tmp_path / "c.onnx", rng, channels=4, size=8)
    folder = ImageFolder(image_folder(tmp_path / "images", rng), ImagePreprocessing(size=8))
    source = OnnxSource(model, device="cpu")
    from_disk = list(source.activations(folder, ["relu", "pool"], 6))  # 7 batches, each loaded ahead
    in_memory = list(OnnxSource(model, device="cpu").activations(folder[:], ["relu", "pool"], 6))
    assert len(from_disk) == len(in_memory) == 7
    for on_disk, held in zip(from_disk, in_memory):
        for name in ("relu", "pool"):
            np.testing.assert_array_equal(on_disk[name], held[name])
    seconds = source.describe()["seconds"]
    assert seconds["running"] > 0 and seconds["waiting_for_inputs"] >= 0
