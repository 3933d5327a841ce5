import subprocess
import sys

from flashllm.cli import main


def test_info_lists_versions_and_kernel_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "flashllm 0." in out and "torch" in out
    assert "bitmap    on cpu : reference" in out
    assert "tiled_csl on cuda:" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "flashllm.cli", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernel paths" in out.stdout
