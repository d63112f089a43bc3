"""The Python examples run as a user runs them (a separate process, from the repository root):
examples/convert_model.py, and examples/train_digits.py (the demo) shortened to a few epochs.
(The LibTorch example and its checkpoint exchange with Python run under ctest,
installed_package_example.)"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_convert_model_example():
    out = run_example("examples/convert_model.py")
    assert "3 BatchNorm + ReLU pairs fused" in out
    assert out.rstrip().endswith("OK")


def test_demo_short_run(tmp_path):
    # Three epochs: the lockstep check of each pair and every output, not the final accuracy
    # (`make demo` trains to convergence and holds every run to 95 %).
    out = run_example("examples/train_digits.py", "--max-epochs", "3", "--min-accuracy", "0.5",
                      "--out", str(tmp_path))
    png = tmp_path / "train_digits.png"
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in out.splitlines()
            if line.startswith(("torch.nn ", "custom_bn "))]
    assert len(rows) == 6, out
    assert out.rstrip().endswith("each pair in lockstep in epoch 1")
