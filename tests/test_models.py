import copy
import io

import pytest
import torch

from flashllm import SparseLinear, prune_, sparsify_
from flashllm.layers import linear_layers
from models import MODELS, VOCAB, build

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def tokens(batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length))


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("fmt", ["bitmap", "tiled_csl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sparsified_model_matches_pruned_dense(arch, fmt, dtype):
    model = build(arch, dtype)
    prune_(model, 0.5, progress=False)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    summary = sparsify_(model, fmt, progress=False)
    expected_layers = {"llama": 14, "qwen2": 14, "opt": 12, "gpt2": 8}[arch]
    assert summary.layers == expected_layers
    assert summary.compressed_bytes < summary.dense_bytes * (0.62 if fmt == "bitmap" else 1.02)
    head = model.get_output_embeddings()
    assert not isinstance(head, SparseLinear)
    with torch.no_grad():
        out = model(ids).logits
    assert not torch.isnan(out).any()
    scale = ref.abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= TOL[dtype] * max(scale, 1.0)


@pytest.mark.parametrize("arch", list(MODELS))
def test_greedy_generation_is_identical(arch):
    model = build(arch)
    prune_(model, 0.6, progress=False)
    ids = tokens(1, 8)
    dense_out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    sparsify_(model, "bitmap", progress=False)
    sparse_out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(dense_out, sparse_out)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("fmt", ["bitmap", "tiled_csl"])
def test_sparsified_model_survives_save_and_load(arch, fmt):
    model = build(arch)
    prune_(model, 0.7, progress=False)
    sparsify_(model, fmt, progress=False)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)

    # A fresh model of the same architecture with other weights (and so other buffer sizes).
    fresh = build(arch)
    prune_(fresh, 0.2, progress=False)
    sparsify_(fresh, fmt, progress=False)
    fresh.load_state_dict(torch.load(buf))
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", list(MODELS))
def test_magnitude_prune_hits_the_sparsity_in_every_layer(arch):
    model = build(arch)
    pristine = copy.deepcopy(model)
    summary = prune_(model, 0.6, progress=False)
    layers = list(linear_layers(model))
    assert len(summary.layers) == len(layers)
    for name, module in layers:
        weight = module.weight
        assert int((weight == 0).sum()) == round(0.6 * weight.numel()), name
    # The LM head and embeddings are untouched.
    assert torch.equal(model.get_output_embeddings().weight, pristine.get_output_embeddings().weight)
