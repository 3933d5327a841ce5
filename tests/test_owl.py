"""OWL, outlier-weighted sparsity per decoder block (prune/owl.py), against a direct computation."""

from __future__ import annotations

import copy

import pytest
import torch

from flashllm.layers import dense_weight, linear_layers
from flashllm.prune import OWL, prune_
from flashllm.prune import owl as owl_module
from flashllm.prune.owl import OutlierCount, block_sparsities
from flashllm.prune.patterns import parse_sparsity
from flashllm.prune.sequential import decoder_blocks
from test_prune import calibration, tiny_model


@pytest.mark.parametrize("ratios", [[0.01, 0.03, 0.02, 0.05], [0.2, 0.1], [0.004, 0.0041, 0.5, 0.3, 0.3]])
@pytest.mark.parametrize("target,spread", [(0.5, 0.08), (0.7, 0.2), (0.9, 0.04)])
def test_block_sparsities_keep_the_mean_and_favour_outliers(ratios, target, spread):
    out = block_sparsities(ratios, target, spread)
    assert sum(out) / len(out) == pytest.approx(target, abs=1e-12)
    densities = [1 - s for s in out]
    assert max(densities) - min(densities) == pytest.approx(2 * spread)  # the band's full width
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert [densities[i] for i in order] == sorted(densities)  # more outliers, more weights kept
    for r, d in zip(ratios, densities):  # linear in the ratio
        expected = min(densities) + (r - min(ratios)) / (max(ratios) - min(ratios)) * 2 * spread
        assert d == pytest.approx(expected)


def test_block_sparsities_edge_cases():
    assert block_sparsities([0.3, 0.3, 0.3], 0.6, 0.1) == [0.6] * 3
    assert block_sparsities([0.1], 0.6, 0.1) == [0.6]
    with pytest.raises(ValueError, match="outside \\[0, 1\\); use a smaller spread"):
        block_sparsities([0.0, 1.0, 1.0, 1.0], 0.9, 0.08)  # the lone low block would reach 1.02


def test_outlier_ratio_matches_the_score_matrix(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    count = OutlierCount()
    layers = []
    for shape in [(40, 24), (33, 24), (24, 48)]:
        weight = torch.randn(shape, generator=gen)
        norms = torch.rand(shape[1], generator=gen)
        norms[3] = 40.0  # an outlier feature
        layers.append((weight, norms))
        count.add(weight, norms)
    monkeypatch.setattr(owl_module, "ROWS_PER_STEP", 7)  # rows in several slices
    scores = torch.cat([(w.abs() * n).flatten() for w, n in layers]).double()
    for threshold in (1.0, 3.0, 5.0):
        expected = int((scores > threshold * scores.mean()).sum()) / scores.numel()
        assert count.ratio(threshold) == expected
    assert OutlierCount().ratio(5.0) == 0.0


def _reference_block_sparsities(model, ids, target, owl):
    """OWL by hand: input-feature norms from hooks on one dense forward of all calibration tokens,
    every block's scores formed in full."""
    norms = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            norms[name] = norms.get(name, 0) + x.square().sum(0)
        return record

    layers = dict(linear_layers(model))
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items() if "lm_head" not in n]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    _, blocks = decoder_blocks(model)
    ratios = []
    for block in blocks:
        members = {id(m) for m in block.modules()}
        scores = torch.cat([(dense_weight(m).double().abs() * norms[n].sqrt()).flatten()
                            for n, m in layers.items() if id(m) in members])
        ratios.append(float((scores > owl.threshold * scores.mean()).double().mean()))
    return block_sparsities(ratios, target, owl.spread), ratios


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_each_block_gets_its_owl_sparsity(arch, method):
    model = tiny_model(arch, layers=4)
    ids = calibration()
    owl = OWL(threshold=2.0, spread=0.1)
    expected, ratios = _reference_block_sparsities(copy.deepcopy(model), ids, 0.6, owl)
    # The blocks do differ (two of them may tie: each ratio is a count over the same number of
    # weights, and fresh random data made two equal once in a CI run).
    assert len(set(ratios)) >= len(ratios) - 1
    summary = prune_(model, 0.6, method, calibration=ids, owl=owl, progress=False)
    # float32 batches against one float64 pass: a score within rounding of the cut may fall the
    # other way, moving a block by ~1e-3; the blocks span 0.2.
    assert summary.block_sparsity == pytest.approx(expected, abs=2e-3)
    assert "OWL:" in str(summary)
    _, blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        for name, module in linear_layers(block):
            w = dense_weight(module)
            assert int((w == 0).sum()) == parse_sparsity(summary.block_sparsity[i]).zeros_in(w.numel()), name
    assert summary.achieved == pytest.approx(0.6, abs=2e-3)  # equal blocks: the mean is the target


def test_owl_true_takes_the_papers_defaults():
    a, b = tiny_model(layers=3), tiny_model(layers=3)
    b.load_state_dict(a.state_dict())
    ids = calibration()
    one = prune_(a, 0.7, "wanda", calibration=ids, owl=True, progress=False)
    two = prune_(b, 0.7, "wanda", calibration=ids, owl=OWL(threshold=5.0, spread=0.08), progress=False)
    assert one.block_sparsity == two.block_sparsity and len(one.block_sparsity) == 3
    assert all(torch.equal(dense_weight(m), dense_weight(n)) for (_, m), (_, n) in zip(linear_layers(a), linear_layers(b)))


def test_owl_refuses_what_it_cannot_do():
    model = tiny_model()
    with pytest.raises(ValueError, match="use method 'wanda' or 'sparsegpt'"):
        prune_(model, 0.5, "magnitude", owl=True, progress=False)
    with pytest.raises(ValueError, match="N:M pattern"):
        prune_(model, "2:4", "wanda", calibration=calibration(), owl=True, progress=False)
    with pytest.raises(ValueError, match="threshold must be positive"):
        prune_(model, 0.5, "wanda", calibration=calibration(), owl=OWL(threshold=0), progress=False)
    with pytest.raises(ValueError, match="spread must lie"):
        prune_(model, 0.5, "wanda", calibration=calibration(), owl=OWL(spread=0.6), progress=False)
    with pytest.raises(TypeError, match="owl must be"):
        prune_(model, 0.5, "wanda", calibration=calibration(), owl="yes", progress=False)
    assert all(bool((dense_weight(m) != 0).all()) for _, m in linear_layers(model))  # nothing pruned


def test_the_cli_and_the_streaming_conversion_take_owl(tmp_path, tiny_model_dir, capsys):
    from flashllm.checkpoint import convert_checkpoint, read_manifest
    from flashllm.cli import main

    with pytest.raises(ValueError, match="use method 'wanda' or 'sparsegpt'"):
        convert_checkpoint(tiny_model_dir, tmp_path / "x", 0.5, method="magnitude", device="cpu", progress=False,
                           owl=True)
    assert main(["prune", str(tiny_model_dir), "--sparsity", "0.6", "--method", "magnitude", "--owl", "--out",
                 str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert "use method 'wanda' or 'sparsegpt'" in capsys.readouterr().err
    assert main(["prune", str(tiny_model_dir), "--sparsity", "0.6", "--method", "wanda", "--owl", "--out",
                 str(tmp_path / "z"), "--device", "cpu", "--calib-samples", "4", "--calib-seqlen", "16"]) == 0
    assert "OWL:" in read_manifest(tmp_path / "z")["info"]["pruned"]
