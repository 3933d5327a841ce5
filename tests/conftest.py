import pytest
import torch

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SPARSITIES = [0.0, 0.5, 0.9, 0.999, 1.0]


def random_sparse(rows: int, cols: int, sparsity: float, dtype=torch.float32, device="cpu", generator=None):
    """Fresh random weight with about `sparsity` zeros; never all-zero by accident below 1."""
    w = torch.randn(rows, cols, generator=generator, device=device).to(dtype)
    # A tiny negative draw rounds to -0.0 in fp16, which the formats store as a zero (+0.0):
    # canonical zeros keep the bit-exact round-trip checks about stored values.
    w = torch.where(w == 0, torch.zeros_like(w), w)
    if sparsity > 0:
        drop = torch.rand(rows, cols, generator=generator, device=device) < sparsity
        w = w.masked_fill(drop, 0)
    return w


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(int_type), b.contiguous().view(int_type))


def tiled_csl_version_1(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(words, offsets) of `dense` (fp16/bf16) in Tiled-CSL layout version 1, as flashllm wrote it
    before version 2: each tile's non-zeros in increasing location order, sentinels at 8192."""
    from flashllm.formats import tiled_csl

    tm, tk = -(-dense.shape[0] // tiled_csl.TILE_M), -(-dense.shape[1] // tiled_csl.TILE_K)
    padded = torch.nn.functional.pad(dense, (0, tk * tiled_csl.TILE_K - dense.shape[1], 0, tm * tiled_csl.TILE_M - dense.shape[0]))
    tiles = tiled_csl.to_storage_order(padded)
    keep = tiles != 0
    locations = torch.arange(tiled_csl.TILE_ELEMS).expand_as(keep)[keep]
    sentinel = tiled_csl.make_words(torch.zeros(1, dtype=dense.dtype), torch.tensor([tiled_csl.SENTINEL]))
    return tiled_csl.pack_aligned(keep.sum(dim=1), tiled_csl.make_words(tiles[keep], locations), 4, int(sentinel))


def pytest_configure(config):
    # One marker per kernel option or format a GPU run validates on its own (configs.PENDING_NAMES):
    # scripts/device_check.sh deselects `unvalidated_<name>` for one that failed its smoke test.
    from flashllm.kernels.configs import PENDING_NAMES

    for name in PENDING_NAMES:
        config.addinivalue_line("markers", f"unvalidated_{name}: covers the pending kernel option or format {name}")


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh data every run (no fixed seed), but print it so a failure can be reproduced.
    seed = torch.seed()
    yield seed


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A dense Hugging Face folder: a tiny Llama with random weights and a trained BPE tokenizer."""
    from models import build, train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    build("llama").save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def cuda_kernels(request):
    """The CUDA kernels registered for the test (or, with an indirect param False, taken out);
    whatever the import had registered is restored afterwards."""
    from flashllm.kernels import FAST_KERNELS, register_cuda_kernels, unregister_cuda_kernels

    wanted = getattr(request, "param", True)
    saved = dict(FAST_KERNELS)
    (register_cuda_kernels if wanted else unregister_cuda_kernels)()
    yield wanted
    FAST_KERNELS.clear()
    FAST_KERNELS.update(saved)
