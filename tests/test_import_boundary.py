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


def test_the_onnx_path_runs_with_torch_and_tensorflow_unimportable(tmp_path):
    # as on a machine without the extras: importing either framework fails, and nothing asks for them
    code = (
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'tensorflow', 'keras', 'tf2onnx'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        "from probecore.cli.app import app\n"
        f"sys.argv = ['probe', 'demo', '--quiet', '--out', {str(tmp_path / 'demo')!r}]\n"
        "app()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "report.json").exists()
