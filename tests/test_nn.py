import io

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from conftest import DTYPES, random_sparse
from flashllm import FORMATS, FormatError, SparseLinear, sparsify_

FORMAT_NAMES = list(FORMATS)


def pruned_linear(k, m, sparsity, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(random_sparse(m, k, sparsity, dtype))
    return lin


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_linear(fmt, dtype, bias):
    lin = pruned_linear(97, 59, 0.7, bias, dtype)
    sparse = SparseLinear.from_linear(lin, fmt)
    x = torch.randn(2, 3, 97).to(dtype)
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), None if not bias else lin.bias.double())
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4}[dtype]
    assert torch.allclose(sparse(x).double(), ref, atol=tol)
    assert torch.equal(sparse.to_linear().weight, lin.weight)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_the_weight_object_follows_the_buffers(fmt):
    lin = pruned_linear(80, 48, 0.6)
    sparse = SparseLinear.from_linear(lin, fmt)
    first = sparse.weight_format
    assert sparse.weight_format is first  # built once, not on every forward
    x = torch.randn(3, 80)
    name = first.tensor_names[0]
    setattr(sparse, name, getattr(sparse, name).clone())  # a buffer replaced: a new object over it
    second = sparse.weight_format
    assert second is not first and getattr(second, name) is getattr(sparse, name)
    torch.testing.assert_close(sparse(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    sparse.to(torch.float16)  # a cast replaces every buffer (and drops the object holding the old ones)
    assert "_weight_object" not in sparse.__dict__
    assert sparse.weight_format.dtype == torch.float16
    ref = torch.nn.functional.linear(x, lin.weight.half().float(), lin.bias.half().float())
    torch.testing.assert_close(sparse(x.half()).float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_extra_repr_shows_shape_format_sparsity_bytes(fmt):
    sparse = SparseLinear.from_linear(pruned_linear(128, 64, 0.75), fmt)
    text = repr(sparse)
    assert "in_features=128" in text and "out_features=64" in text
    assert f"format={fmt}" in text
    assert f"sparsity={sparse.weight_format.sparsity:.1%}" in text
    assert f"nbytes={sparse.weight_format.nbytes}" in text


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_to_dtype_and_half(fmt):
    lin = pruned_linear(50, 40, 0.5)
    sparse = SparseLinear.from_linear(lin, fmt)
    sparse.to(torch.bfloat16)
    assert sparse.dtype == torch.bfloat16 and sparse.bias.dtype == torch.bfloat16
    assert torch.equal(sparse.weight_format.to_dense(), lin.weight.detach().bfloat16())
    sparse.half()
    assert sparse.dtype == torch.float16
    x = torch.randn(3, 50).half()
    assert torch.allclose(sparse(x).float(), lin(x.float()), atol=5e-2)
    sparse.float()
    assert torch.equal(sparse.weight_format.to_dense(), lin.weight.detach().bfloat16().half().float())


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("serializer", ["torch", "safetensors"])
def test_state_dict_round_trip_into_a_differently_sparse_module(fmt, serializer):
    lin = pruned_linear(130, 70, 0.8)
    sparse = SparseLinear.from_linear(lin, fmt)
    state = sparse.state_dict()
    assert set(state) == {"bias", "header", *FORMATS[fmt].tensor_names}
    if serializer == "torch":
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf)
    else:
        state = load(save(state))
    # The receiving module has another sparsity, so other buffer sizes: they are replaced.
    other = SparseLinear.from_linear(pruned_linear(130, 70, 0.1), fmt)
    other.load_state_dict(state)
    x = torch.randn(4, 130)
    assert torch.equal(other(x), sparse(x))


def test_load_into_meta_module_with_assign():
    lin = pruned_linear(64, 32, 0.5)
    state = SparseLinear.from_linear(lin, "bitmap").state_dict()
    meta = SparseLinear.from_linear(pruned_linear(64, 32, 0.0), "bitmap").to("meta")
    assert meta.device.type == "meta"
    meta.load_state_dict(state, assign=True)
    x = torch.randn(2, 64)
    assert torch.allclose(meta(x), lin(x), atol=1e-5)


def test_bad_state_dicts_are_refused():
    sparse = SparseLinear.from_linear(pruned_linear(64, 32, 0.5), "bitmap")
    state = sparse.state_dict()
    fresh = SparseLinear.from_linear(pruned_linear(64, 32, 0.5), "bitmap")
    with pytest.raises(RuntimeError, match="header"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "header"})
    with pytest.raises(FormatError, match="missing"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "values"})
    bad = state["header"].clone()
    bad[0] = 77
    with pytest.raises(FormatError, match="known sparse format"):
        fresh.load_state_dict({**state, "header": bad})
    with pytest.raises(FormatError):
        fresh.load_state_dict({**state, "values": state["values"][:-8]})


def test_from_linear_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_linear(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="unknown sparse format"):
        SparseLinear.from_linear(nn.Linear(4, 4), "coo")
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        SparseLinear.from_linear(lin)


def exactly_sparse(rows, cols, sparsity):
    w = torch.randn(rows, cols)
    w.view(-1)[torch.randperm(rows * cols)[: round(sparsity * rows * cols)]] = 0
    return w


def test_auto_format_follows_each_layers_sparsity():
    from flashllm.formats import TILED_CSL_FROM, format_for

    edge = round(TILED_CSL_FROM * 100)  # 100 weights: the threshold's own count of zeros
    assert format_for("auto", exactly_sparse(10, 10, edge / 100)).name == "tiled_csl"
    assert format_for("auto", exactly_sparse(10, 10, (edge - 1) / 100)).name == "bitmap"
    assert format_for("auto", torch.zeros(0, 4)).name == "tiled_csl"  # empty: nothing to choose by, no error
    assert format_for("bitmap", exactly_sparse(10, 10, 0.95)).name == "bitmap"  # a named format is kept
    layers = [nn.Linear(64, 64) for _ in range(3)]
    with torch.no_grad():
        for lin, sparsity in zip(layers, (0.5, 0.7, 0.9)):
            lin.weight.copy_(exactly_sparse(64, 64, sparsity))
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
    x = torch.randn(5, 64)
    ref = model(x)
    summary = sparsify_(model, "auto", progress=False)
    assert [model[i].weight_format.name for i in (0, 2, 4)] == ["bitmap", "bitmap", "tiled_csl"]
    assert summary.format == "auto (2 bitmap, 1 tiled_csl)" and "auto (2 bitmap, 1 tiled_csl)" in str(summary)
    assert torch.allclose(model(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"choose one of \['bitmap', 'tiled_csl', 'tiled_csl16', 'auto'\]"):
        format_for("csr", x)


def test_sparsify_summary_and_filter():
    model = nn.Sequential(pruned_linear(64, 64, 0.5), nn.ReLU(), pruned_linear(64, 32, 0.9))
    x = torch.randn(5, 64)
    ref = model(x)
    summary = sparsify_(model, "tiled_csl", filter_fn=lambda mod, name: name == "2", progress=False)
    assert summary.layers == 1 and isinstance(model[2], SparseLinear) and isinstance(model[0], nn.Linear)
    assert summary.dense_bytes == 64 * 32 * 4
    assert summary.compressed_bytes == model[2].weight_format.nbytes
    assert torch.allclose(model(x), ref, atol=1e-5)
    with pytest.raises(TypeError, match="not a linear layer"):
        sparsify_(model, filter_fn=lambda mod, name: name == "1", progress=False)
    with pytest.raises(ValueError, match="no linear layers"):
        sparsify_(nn.Sequential(nn.ReLU()), progress=False)
    with pytest.raises(ValueError, match="unknown sparse format"):
        sparsify_(model, "csr", progress=False)
