import subprocess
import sys

import pytest
import torch

from flashllm.checkpoint import read_manifest
from flashllm.cli import main


def test_info_lists_versions_and_kernel_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "flashllm 0." in out and "torch" in out
    assert "bitmap      on cpu : reference" in out
    assert "tiled_csl   on cuda:" in out
    assert "tiled_csl16 on cuda:" in out and "experimental: not yet run on a GPU" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "flashllm.cli", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernel paths" in out.stdout


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from flashllm.data import default_text

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(default_text("calibration")[:4_000])
    return path


def test_prune_generate_eval_round_trip(tiny_model_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "magnitude"
    assert main(["prune", str(tiny_model_dir), "--sparsity", "0.6", "--method", "magnitude",
                 "--format", "tiled_csl", "--out", str(out), "--device", "cpu"]) == 0
    manifest = read_manifest(out)
    assert set(manifest["sparse_layers"].values()) == {"tiled_csl"}
    assert manifest["info"]["method"] == "magnitude"
    # The streaming conversion reports what the in-memory path does: zeros, then bytes.
    printed = capsys.readouterr().out.splitlines()
    layers = len(manifest["sparse_layers"])
    assert printed[0].startswith(f"magnitude 60%: {layers} layers, 60.00% of ")
    assert printed[1].startswith(f"{layers} linear layers -> tiled_csl: ")
    assert printed[2] == f"wrote {out}"

    wanda = tmp_path / "wanda"
    assert main(["prune", str(tiny_model_dir), "--sparsity", "2:4", "--method", "wanda", "--out", str(wanda),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--calib-text", str(calib_file),
                 "--device", "cpu"]) == 0
    assert read_manifest(wanda)["info"]["calibration"].startswith("4 x 32 tokens")
    capsys.readouterr()

    assert main(["generate", str(wanda), "--prompt", "def f(x):", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "sparse layers" in captured.err
    assert captured.out.strip() != ""
    assert main(["generate", str(wanda), "--prompt", "def f(x):", "--max-new-tokens", "5", "--device", "cpu",
                 "--eager"]) == 0
    assert capsys.readouterr().out == captured.out  # greedy: the same text whichever decoder runs

    assert main(["eval", "ppl", str(wanda), "--text", str(calib_file), "--max-length", "128", "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("perplexity ") and float(line.split()[1]) > 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not found" in err and "Traceback" not in err
    assert main(["eval", "ppl", str(tmp_path), "--text", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for bad in (["--sparsity", "1.5"], ["--sparsity", "3:2"], ["--format", "coo"], ["--method", "random"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["prune", str(tmp_path), "--out", str(tmp_path / "o"), "--sparsity", "0.5", *bad])
        assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "[0, 1)" in message and "0 < N < M" in message and "unknown sparse format 'coo'" in message
    assert "'auto'" in message  # the choices named include it


def test_prune_with_the_auto_format_reports_the_formats_chosen(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["prune", str(tiny_model_dir), "--sparsity", "0.85", "--method", "magnitude", "--format", "auto",
                 "--out", str(out), "--device", "cpu"]) == 0
    layers = read_manifest(out)["sparse_layers"]
    assert set(layers.values()) == {"tiled_csl"}
    assert f"{len(layers)} linear layers -> auto ({len(layers)} tiled_csl): " in capsys.readouterr().out


def test_malformed_checkpoint_folder(tmp_path, capsys):
    (tmp_path / "flashllm.json").write_text("{}")
    assert main(["generate", str(tmp_path), "--prompt", "x", "--device", "cpu"]) == 2
    assert "malformed" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end_on_smollm2(capsys):
    """The README's main command, shortened: the real SmolLM2-135M pruned, packed, reloaded and run."""
    from flashllm.demo import run_demo
    from flashllm.cli import build_parser

    args = build_parser().parse_args(["demo", "--eval-tokens", "1024", "--max-new-tokens", "8",
                                      "--calib-samples", "8", "--calib-seqlen", "128", "--device", "cpu"])
    result = run_demo(args)
    out = capsys.readouterr().out
    assert "perplexity (held-out)" in out and "Sparse answer:" in out
    assert result["compressed_linear_bytes"] < 0.56 * result["dense_linear_bytes"]
    assert 1 < result["dense_ppl"] < result["sparse_ppl"] < 20 * result["dense_ppl"]
    assert torch.isfinite(torch.tensor(result["sparse_ppl"]))
