import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPES, random_sparse
from flashllm import FORMATS, spmm

FORMAT_CLASSES = list(FORMATS.values())
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def check_against_float64(y, x, w, bias):
    """err(ours) <= 2 * err(torch in the same dtype) + atol, both against float64."""
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    same_dtype = F.linear(x, w, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any()
    err = (y.double() - ref).abs().max().item()
    torch_err = (same_dtype.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + ATOL[x.dtype], (err, torch_err)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("m,k,lead", [(1, 1, (1,)), (59, 97, (3,)), (129, 65, (2, 5)), (200, 300, ()), (64, 128, (1, 1, 7))])
def test_spmm_matches_float64(cls, dtype, sparsity, m, k, lead):
    w = random_sparse(m, k, sparsity, dtype)
    x = torch.randn(*lead, k).to(dtype)
    bias = torch.randn(m).to(dtype) if m % 2 else None
    check_against_float64(spmm(x, cls.from_dense(w), bias), x, w, bias)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_spmm_gradient_flows_to_activations(cls):
    w = random_sparse(33, 47, 0.7)
    x = torch.randn(4, 47, dtype=torch.float64).float().requires_grad_()
    bias = torch.randn(33).requires_grad_()
    y = spmm(x, cls.from_dense(w), bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(x.grad, grad @ w, atol=1e-5)
    assert torch.allclose(bias.grad, grad.sum(0), atol=1e-5)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_spmm_under_torch_compile(cls):
    w = random_sparse(70, 50, 0.6)
    packed = cls.from_dense(w)
    compiled = torch.compile(lambda x: spmm(x, packed), fullgraph=True, backend="eager")
    x = torch.randn(3, 50)
    assert torch.allclose(compiled(x), x @ w.T, atol=1e-5)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_spmm_bad_input(cls):
    packed = cls.from_dense(random_sparse(8, 16, 0.5))
    with pytest.raises(ValueError, match="last dimension to be 16"):
        spmm(torch.randn(4, 15), packed)
    with pytest.raises(ValueError, match="last dimension"):
        spmm(torch.tensor(1.0), packed)
    with pytest.raises(TypeError, match="float16"):
        spmm(torch.randn(4, 16).half(), packed)
    with pytest.raises(TypeError, match="sparse weight"):
        spmm(torch.randn(4, 16), torch.randn(8, 16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        spmm([[1.0] * 16], packed)
    with pytest.raises(ValueError, match="bias has shape"):
        spmm(torch.randn(4, 16), packed, torch.randn(7))
    with pytest.raises(TypeError, match="bias is"):
        spmm(torch.randn(4, 16), packed, torch.randn(8).half())
    with pytest.raises(ValueError, match="meta"):
        spmm(torch.randn(4, 16, device="meta"), packed)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_eager_inference_skips_the_dispatcher_and_nothing_else(cls, monkeypatch):
    # Plain tensors with nothing to differentiate run the op's implementation directly (the
    # dispatcher cost ~40 us per layer and call on a CPU); gradients, fake tensors and compiled
    # graphs still go through the custom op, whose autograd and fake implementations they need.
    import importlib

    spmm_module = importlib.import_module("flashllm.kernels.spmm")  # (the package exports the function)
    w = random_sparse(40, 72, 0.6)
    packed, x, bias = cls.from_dense(w), torch.randn(3, 72), torch.randn(40)
    through_op = spmm_module.sparse_linear(x, list(packed.tensors().values()), packed.format_code, 40, 72, bias)
    calls = []
    real_op = spmm_module.sparse_linear
    monkeypatch.setattr(spmm_module, "sparse_linear", lambda *a: calls.append(a) or real_op(*a))
    with torch.no_grad():
        assert torch.equal(spmm(x, packed, bias), through_op)
    assert torch.equal(spmm(x, packed, bias), through_op)  # grad mode on, but nothing requires it
    assert not calls
    x.requires_grad_(True)
    spmm(x, packed, bias).sum().backward()
    assert len(calls) == 1 and x.grad is not None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = spmm(mode.from_tensor(torch.randn(5, 72)), packed)
        also_fake = spmm(torch.randn(5, 72), packed)  # a real input, but the mode is watching
    assert len(calls) == 3 and fake.shape == also_fake.shape == (5, 40)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):  # a torch-function mode sees the custom op
        spmm(torch.randn(5, 72), packed)
    assert len(calls) == 4
