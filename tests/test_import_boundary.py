"""``import probecore`` must stay numpy-only: no runtime, no framework, checked in a fresh interpreter."""

import subprocess
import sys


def test_importing_the_core_loads_no_runtime_or_framework():
    # numba, scipy, Pillow and matplotlib load when first used (host reductions, fitting, image folders, figures).
    code = (
        "import sys, probecore\n"
        "heavy = ('onnxruntime', 'onnx', 'torch', 'tensorflow', 'keras', 'numba', 'scipy', 'PIL', 'matplotlib')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_onnx_backend_loads_onnxruntime_only_when_a_session_is_made():
    code = (
        "import sys\n"
        "from probecore.backends.onnx_source import OnnxSource\n"
        "print('onnxruntime' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
