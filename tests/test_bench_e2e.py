import csv
import warnings

import pytest
import torch

from flashllm.bench import e2e
from flashllm.cli import main
from flashllm.nn import SparseLinear


def test_build_model_packs_every_linear_layer_at_the_sparsity():
    config = e2e.make_config("tiny")
    model = e2e.build_model(config, 0.7, "bitmap", torch.float32, torch.device("cpu"))
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 7 * config.num_hidden_layers
    for module in sparse:  # pruned at the Gaussian's quantile: binomial noise, 6 sigma
        n = module.in_features * module.out_features
        assert module.weight_format.sparsity == pytest.approx(0.7, abs=6 * (0.21 / n) ** 0.5)
    assert not any(p.is_meta for p in model.parameters())
    dense = e2e.build_model(config, None, "bitmap", torch.float32, torch.device("cpu"))
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    assert e2e.linear_weight_bytes(model) < 0.4 * e2e.linear_weight_bytes(dense)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_random_pruned_weight_hits_the_sparsity_by_magnitude(dtype, sparsity):
    torch.manual_seed(0)
    weight = e2e.random_pruned_weight(1536, 2304, sparsity, torch.device("cpu"), dtype)
    assert weight.shape == (1536, 2304) and weight.dtype == dtype
    zero = weight == 0
    assert zero.float().mean().item() == pytest.approx(sparsity, abs=1e-3)
    if sparsity > 0:  # by magnitude: every kept weight is at least the Gaussian's quantile
        cut = 0.02 * torch.special.ndtri(torch.tensor((1 + sparsity) / 2, dtype=torch.float64)).item()
        smallest = weight[~zero].float().abs().min().item()
        assert cut * (1 - torch.finfo(dtype).eps) <= smallest < cut * 1.01


@pytest.mark.parametrize("sparsity, expected", [(0.7, "bitmap"), (0.8, "tiled_csl")])
def test_build_model_with_the_auto_format(sparsity, expected):
    model = e2e.build_model(e2e.make_config("tiny"), sparsity, "auto", torch.float32, torch.device("cpu"))
    assert {m.weight_format.name for m in model.modules() if isinstance(m, SparseLinear)} == {expected}


def test_build_model_refuses_an_nm_pattern():
    with pytest.raises(ValueError, match="fraction of zeros"):
        e2e.build_model(e2e.make_config("tiny"), "2:4", "bitmap", torch.float32, torch.device("cpu"))


def test_compile_flag_reaches_every_decoder(tmp_path, monkeypatch):
    # --compile builds every decoder, dense and sparse, with compiled=True (what it then does is
    # tests/test_decode.py's; here the step is not compiled, to keep the test quick).
    import flashllm.decode

    asked = []

    class Recorder(flashllm.decode.StaticDecoder):
        def __init__(self, *args, compiled=False, **kwargs):
            asked.append(compiled)
            super().__init__(*args, **kwargs)
            self.compiled = compiled

    monkeypatch.setattr(flashllm.decode, "StaticDecoder", Recorder)
    csv_path = tmp_path / "e2e.csv"
    assert main(["bench", "e2e", "--tiny", "--batch", "1", "--sparsities", "0.5", "--new-tokens", "3",
                 "--dtype", "float32", "--compile", "--csv", str(csv_path), "--plot", str(tmp_path / "e2e.png")]) == 0
    assert asked == [True, True]
    assert [r["compiled"] for r in csv.DictReader(csv_path.open())] == ["True", "True"]
    # `--compile both`: each model and batch without, then with; the sparse row's speedup is over the
    # dense row of its own mode.
    asked.clear()
    both = tmp_path / "both.csv"
    assert main(["bench", "e2e", "--tiny", "--batch", "1", "--sparsities", "0.5", "--new-tokens", "3",
                 "--dtype", "float32", "--compile", "both", "--csv", str(both), "--plot", str(tmp_path / "b.png")]) == 0
    assert asked == [False, True, False, True]
    rows = list(csv.DictReader(both.open()))
    assert [(r["variant"], r["compiled"]) for r in rows] == [("dense", "False"), ("dense", "True"),
                                                             ("flashllm", "False"), ("flashllm", "True")]
    for sparse, dense in zip(rows[2:], rows[:2]):
        assert float(sparse["measured_speedup"]) == pytest.approx(float(dense["step_ms"]) / float(sparse["step_ms"]))


def test_tiny_e2e_run_writes_rows_and_plot(tmp_path, capsys):
    csv_path, png = tmp_path / "e2e.csv", tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--tiny", "--batch", "1", "--sparsities", "0.5", "--new-tokens", "4",
                 "--dtype", "float32", "--predict", "--csv", str(csv_path), "--plot", str(png)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["variant"] for r in rows] == ["dense", "flashllm"]
    assert all(float(r["decode_tokens_per_s"]) > 0 for r in rows)
    assert float(rows[1]["linear_weight_gib"]) < float(rows[0]["linear_weight_gib"])
    assert png.stat().st_size > 1000
    assert "| tiny | flashllm | 50% | 1 |" in capsys.readouterr().out


def test_prefill_profile_names_where_the_time_goes(tmp_path, capsys):
    # --profile-prefill: one profiled prefill per model at the first batch size, written per model
    # with a summary line (on a GPU it splits the device time into the sparse kernels and the rest).
    out = tmp_path / "prefill"
    assert main(["bench", "e2e", "--tiny", "--batch", "2,1", "--sparsities", "0.5", "--new-tokens", "2",
                 "--profile-prefill", str(out), "--csv", str(tmp_path / "e2e.csv"), "--plot", str(tmp_path / "e2e.png")]) == 0
    files = sorted(f.name for f in out.iterdir())
    assert files == ["tiny_dense_b2.txt", "tiny_s0.5_bitmap_b2.txt"]
    text = (out / "tiny_s0.5_bitmap_b2.txt").read_text()
    assert text.startswith("prefill tiny_s0.5_bitmap_b2: ") and "ms wall" in text
    assert "aten::" in text  # the profiler's table of ops
    assert "prefill tiny_dense_b2: " in capsys.readouterr().out


def test_forced_kernel_options_are_checked_first_and_recorded(tmp_path, monkeypatch, capsys):
    from flashllm.kernels import configs

    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "")  # restored after the test: main sets it
    monkeypatch.setattr(configs, "_forced", {})
    csv_path = tmp_path / "e2e.csv"
    common = ["bench", "e2e", "--tiny", "--batch", "1", "--sparsities", "0.5", "--new-tokens", "2",
              "--dtype", "float32", "--csv", str(csv_path), "--plot", str(tmp_path / "e2e.png")]
    assert main([*common, "--kernel-options", "fixpu"]) != 0  # before any model is built
    assert "unknown entry 'fixpu'" in capsys.readouterr().err and not csv_path.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a forced option warns while it is not yet validated on a GPU
        assert main([*common, "--kernel-options", "fixup"]) == 0
    assert [r["format"] for r in csv.DictReader(csv_path.open())] == ["dense", "bitmap [fixup]"]


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        e2e.make_config("gpt-5")


def test_device_check_e2e_preset_names_known_models():
    # A misspelt model would cost the preset's whole device call.
    import re
    from pathlib import Path

    script = (Path(__file__).parents[1] / "scripts" / "device_check.sh").read_text()
    (models,) = re.findall(r'"\$\{E2E_MODELS:=([^}]*)\}"', script)
    assert models.split(",") and all(m in e2e.CONFIGS for m in models.split(","))
    (sparsities,) = re.findall(r'"\$\{E2E_SPARSITIES:=([^}]*)\}"', script)
    assert all(0 < float(s) < 1 for s in sparsities.split(","))


def test_an_unknown_format_fails_before_any_model_is_built(capsys):
    assert main(["bench", "e2e", "--models", "tiny", "--format", "csr", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "unknown sparse format 'csr'" in captured.err and "'auto'" in captured.err
    assert "building" not in captured.err + captured.out
