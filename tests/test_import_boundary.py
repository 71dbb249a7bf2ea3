"""``import probecore`` must stay numpy-only: no runtime, no framework, checked in a fresh interpreter."""

import subprocess
import sys


def test_importing_the_core_loads_no_runtime_or_framework():
    # numba, scipy, Pillow and matplotlib load when first used (host reductions, fitting, image folders, figures).
    code = (
        "import sys, probecore\n"
        "heavy = ('onnxruntime', 'onnx', 'torch', 'tensorflow', 'keras', 'numba', 'scipy', 'PIL', 'matplotlib', 'ray')\n"
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


def test_the_onnx_path_runs_with_torch_tensorflow_and_ray_unimportable(tmp_path):
    # as on a machine without the extras: importing any of them fails, and a local run asks for none
    code = (
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'tensorflow', 'keras', 'tf2onnx', 'ray'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        "from probecore.cli.app import app\n"
        f"sys.argv = ['probe', 'demo', '--quiet', '--out', {str(tmp_path / 'demo')!r}]\n"
        "app()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "report.json").exists()


def test_the_ray_engine_loads_ray_only_when_it_runs_and_names_the_extra_when_missing(tmp_path):
    code = (
        "import sys\n"
        "from probecore.backends.ray_engine import RayEngine\n"
        "print('ray' in sys.modules)\n"
        "sys.modules['ray'] = None\n"  # as without probecore[ray]
        "from probecore.cli.app import app\n"
        "from probecore.bundled import DEMO_DATA, DEMO_MODEL\n"
        f"sys.argv = ['probe', 'run', str(DEMO_MODEL), '--data', str(DEMO_DATA), '--ray', 'auto', '--out', {str(tmp_path / 'r')!r}]\n"
        "app()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False" and result.returncode == 1
    assert result.stderr == "error: Ray is not installed; install it with: pip install 'probecore[ray]'\n"
    assert not (tmp_path / "r").exists()
