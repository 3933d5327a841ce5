import gc
import weakref

import pytest
import torch

from flashllm import prune_, sparsify_
from flashllm.decode import HostSyncs, StaticDecoder
from models import MODELS, VOCAB, build


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("sparse", [False, True])
def test_static_decoder_matches_generate_and_never_waits_for_the_device(arch, sparse):
    model = build(arch)
    prune_(model, 0.5, progress=False)
    if sparse:
        sparsify_(model, progress=False)
    ids = torch.randint(0, VOCAB, (3, 7))
    # The decoder produces max_new_tokens for every sequence (what a throughput benchmark needs),
    # so the reference must not stop a sequence at the end-of-sequence token either.
    model.generation_config.eos_token_id = None
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False, pad_token_id=0)
    decoder = StaticDecoder(model, batch_size=3, max_length=24)
    first = decoder.generate(ids, 9)
    again = decoder.generate(ids, 9)  # the cache is reset between calls
    assert torch.equal(first.tokens, ref) and torch.equal(again.tokens, ref)
    assert first.new_tokens == 9 and not first.cuda_graph
    assert first.prefill_seconds > 0 and first.decode_tokens_per_second > 0
    # What a CUDA graph capture needs, checked on the CPU: OPT's decode step read the static
    # cache's length back to the host every step until the decoder passed its own attention mask,
    # and its capture failed on an H200 (thirteenth session).
    assert decoder.host_syncs() == []


class _ReadsBackALength(torch.nn.Module):
    """A model whose forward turns a device tensor into a Python number, as OPT's did."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, ids, *, attention_mask, **kwargs):
        length = int(attention_mask.sum())
        return self.inner(ids, attention_mask=attention_mask[:, :length], **kwargs)


def test_host_syncs_sees_each_kind_of_read_back():
    x = torch.randn(4, 5)
    with HostSyncs() as mode:
        x.sum().item()
        bool(x.sum() > 0)
        x[x > 0]  # a size known only to the device
        x[torch.tensor([0, 2])] = 0  # integer indices: no read back
        torch.unique(x)
        torch.equal(x, x)
        x.repeat_interleave(torch.tensor([1, 2, 1, 1]), dim=0)
        x.exp().sum(dim=0)  # none of these
    ops = [found.split(" at ")[0] for found in mode.found]
    assert ops == ["aten._local_scalar_dense.default"] * 2 + [
        "aten.index.Tensor", "aten._unique2.default", "aten.equal.default", "aten.repeat_interleave.Tensor"], ops


def test_host_syncs_names_the_op_and_its_caller():
    decoder = StaticDecoder(_ReadsBackALength(build("llama")), batch_size=1, max_length=12)
    found = decoder.host_syncs()
    assert len(found) == 1 and "_local_scalar_dense" in found[0] and "test_decode.py" in found[0], found


def test_static_decoder_bad_input():
    model = build("llama")
    decoder = StaticDecoder(model, batch_size=2, max_length=16)
    with pytest.raises(ValueError, match="batch 2"):
        decoder.generate(torch.zeros(3, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_length 16"):
        decoder.generate(torch.zeros(2, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(torch.zeros(2, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="check_every"):
        decoder.generate(torch.zeros(2, 4, dtype=torch.long), 2, stop_token_ids=[1], check_every=0)


def test_a_finished_decoder_frees_its_model_without_the_cycle_collector():
    # `flashllm bench e2e` deletes each model before building the next: a decoder that kept its
    # model alive through a reference cycle held the previous model's GPU memory into the next
    # model's peak (eleventh session). With the collector off, plain reference counting must free it.
    model = build("llama")
    decoder = StaticDecoder(model, batch_size=1, max_length=12)
    decoder.generate(torch.randint(0, VOCAB, (1, 4)), 3)
    alive = weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        del decoder, model
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh runs it)")
@pytest.mark.parametrize("cuda_kernels", [True, False], ids=["kernels", "reference"], indirect=True)
@pytest.mark.parametrize("fmt", ["bitmap", "tiled_csl"])
def test_cuda_graph_decode_matches_eager(fmt, cuda_kernels):
    from flashllm.kernels import kernel_path

    model = build("llama", torch.float16).cuda()
    prune_(model, 0.5, progress=False)
    ids = torch.randint(0, VOCAB, (2, 7), device="cuda")
    with torch.no_grad():
        dense_logits = model(ids).logits.double()
    sparsify_(model, format=fmt, progress=False)
    assert kernel_path(fmt, "cuda").startswith("fast") == cuda_kernels
    with torch.no_grad():
        sparse_logits = model(ids).logits.double()
    # Same pruned weights, different fp16 summation order: agree within half precision.
    assert (sparse_logits - dense_logits).abs().max().item() <= 2e-2 * dense_logits.abs().max().item() + 1e-3
    eager = StaticDecoder(model, 2, 32, cuda_graph=False).generate(ids, 12)
    graphed = StaticDecoder(model, 2, 32, cuda_graph=True)
    result = graphed.generate(ids, 12)
    assert result.cuda_graph, result.notes
    assert torch.equal(result.tokens, eager.tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh runs it)")
@pytest.mark.parametrize("arch", list(MODELS))
def test_cuda_graph_decode_of_every_architecture_matches_eager(arch):
    model = build(arch, torch.float16).cuda()
    prune_(model, 0.5, progress=False)
    sparsify_(model, progress=False)
    ids = torch.randint(0, VOCAB, (2, 7), device="cuda")
    eager = StaticDecoder(model, 2, 32, cuda_graph=False).generate(ids, 12)
    result = StaticDecoder(model, 2, 32, cuda_graph=True).generate(ids, 12)
    assert result.cuda_graph, result.notes
    assert torch.equal(result.tokens, eager.tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh runs it)")
def test_a_step_that_waits_for_the_device_is_not_captured_and_decodes_eagerly():
    # A failed capture left torch's CUDA generator in capture state: the next `torch.randint` on
    # the GPU raised. The decoder must see the sync first and not try.
    model = _ReadsBackALength(build("llama", torch.float16).cuda())
    with pytest.warns(UserWarning, match="not captured"):
        decoder = StaticDecoder(model, 1, 32, cuda_graph=True)
    ids = torch.randint(0, VOCAB, (1, 5), device="cuda")
    result = decoder.generate(ids, 6)
    assert not result.cuda_graph and "_local_scalar_dense" in result.notes[0]
    assert torch.equal(result.tokens, StaticDecoder(model, 1, 32, cuda_graph=False).generate(ids, 6).tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh runs it)")
def test_a_graphed_sampled_decode_draws_what_the_eager_one_draws():
    # Each replay advances torch's generator as the eager step does, so with one seed the graphed
    # and the eager decoder draw the same numbers, hence the same tokens.
    from flashllm.sampling import Sampling

    model = build("llama", torch.float16).cuda()
    prune_(model, 0.5, progress=False)
    sparsify_(model, progress=False)
    ids = torch.randint(0, VOCAB, (2, 7), device="cuda")
    runs = []
    for graphs in (False, True, True):
        decoder = StaticDecoder(model, 2, 32, cuda_graph=graphs, sampling=Sampling(1.2, top_p=0.9))
        torch.manual_seed(11)
        runs.append(decoder.generate(ids, 16))
    assert runs[1].cuda_graph and runs[2].cuda_graph, runs[1].notes
    assert torch.equal(runs[1].tokens, runs[2].tokens)
    assert torch.equal(runs[0].tokens, runs[1].tokens)


@pytest.mark.slow  # the first compile of a decode step: ~40 s on a 2-core CPU
def test_compiled_decode_step_matches_eager():
    model = build("llama")
    prune_(model, 0.5, progress=False)
    sparsify_(model, progress=False)  # the sparse layers' custom op inside the compiled step
    ids = torch.randint(0, VOCAB, (2, 5))
    eager = StaticDecoder(model, batch_size=2, max_length=16).generate(ids, 8)
    decoder = StaticDecoder(model, batch_size=2, max_length=16, compiled=True)
    first, again = decoder.generate(ids, 8), decoder.generate(ids, 8)
    assert first.compiled and not eager.compiled
    assert torch.equal(first.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh runs it)")
def test_compiled_cuda_graph_decode_matches_eager():
    # torch.compile's fused step, captured as a CUDA graph around the fast kernels: the e2e
    # benchmark's --compile path (bitmap kernels, fp16).
    model = build("llama", torch.float16).cuda()
    prune_(model, 0.5, progress=False)
    sparsify_(model, format="bitmap", progress=False)
    ids = torch.randint(0, VOCAB, (2, 7), device="cuda")
    eager = StaticDecoder(model, 2, 32, cuda_graph=False).generate(ids, 12)
    result = StaticDecoder(model, 2, 32, cuda_graph=True, compiled=True).generate(ids, 12)
    assert result.cuda_graph and result.compiled, result.notes
    assert torch.equal(result.tokens, eager.tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh runs it)")
def test_generate_text_on_a_gpu_uses_the_graphed_decoder_and_matches_generate(tiny_model_dir):
    # `flashllm generate` and the demo decode greedily through StaticDecoder on a GPU (CUDA graphs);
    # in float32 (the reference path, no fp16 rounding differences) its text is generate's.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flashllm.generate import generate_text

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prune_(model, 0.5, progress=False)
    sparsify_(model, progress=False)
    model.generation_config.eos_token_id = None
    graphed = generate_text(model, tokenizer, "def f(x):", max_new_tokens=10)
    hf = generate_text(model, tokenizer, "def f(x):", max_new_tokens=10, static=False)
    assert graphed.text == hf.text and graphed.new_tokens == 10
    assert graphed.memory_kind == "GPU allocated" and graphed.tokens_per_second > 0
