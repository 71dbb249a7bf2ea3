"""The small model and data set that ship inside the package, so the demo needs no download."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "data"
DEMO_MODEL = BUNDLED_DIR / "mnist_convnet.onnx"
DEMO_DATA = BUNDLED_DIR / "mnist5k.npz"
