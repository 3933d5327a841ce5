"""Next-token choice without a host sync: the Gumbel-max draw against the softmax it samples, the
nucleus against Hugging Face's top-p warper, and the decoder's sampled runs."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from flashllm import prune_, sparsify_
from flashllm.decode import StaticDecoder
from flashllm.sampling import Sampling, next_tokens, filtered_logits
from models import VOCAB, build


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=vocab).double() / tokens.numel()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = next_tokens(logits.expand(200_000, -1), Sampling(temperature))
    expected = (logits.double() / temperature).softmax(-1)
    # 200k draws: a frequency's standard deviation is at most ~0.0011.
    torch.testing.assert_close(frequencies(draws, 6), expected, rtol=0, atol=6e-3)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("top_k", [None, 1, 40, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_filtering_is_hugging_faces(top_p, top_k, dtype):
    torch.manual_seed(1)
    logits = (torch.randn(64, 500) * 3).to(dtype)
    ours = filtered_logits(logits, Sampling(0.8, top_p, top_k))
    theirs = TemperatureLogitsWarper(0.8)(None, logits.float())
    if top_k is not None:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    # Half-precision logits tie; which of the tokens tied at the nucleus's edge stay is the sort's
    # choice in both: they may differ there and nowhere else.
    edge = theirs.masked_fill(theirs.isinf(), float("inf")).amin(dim=-1, keepdim=True)
    differ = ours.isinf() != theirs.isinf()
    assert torch.equal(differ, differ & (logits.float() / 0.8 == edge))
    if dtype == torch.float32:
        assert not differ.any()
    both = ~ours.isinf() & ~theirs.isinf()
    torch.testing.assert_close(ours[both], theirs[both])
    assert (~ours.isinf()).any(dim=-1).all()  # the most likely token always stays


def test_draws_stay_in_the_nucleus_with_its_renormalized_probabilities():
    torch.manual_seed(2)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = next_tokens(probs.log().expand(100_000, -1), Sampling(1.0, top_p=0.7))  # nucleus: 0.5 + 0.3
    torch.testing.assert_close(frequencies(draws, 4), torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64),
                               rtol=0, atol=8e-3)
    assert set(draws.flatten().tolist()) == {0, 1}


def test_greedy_is_the_argmax_and_bad_settings_are_refused():
    logits = torch.randn(5, 30)
    assert torch.equal(next_tokens(logits), logits.argmax(-1, keepdim=True))
    assert torch.equal(next_tokens(logits, Sampling(1e-6)), logits.argmax(-1, keepdim=True))
    for bad, match in (({"temperature": 0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                       ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k")):
        with pytest.raises(ValueError, match=match):
            Sampling(**bad)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_sampled_decode_repeats_with_its_seed_and_never_waits_for_the_device(sparse):
    model = build("llama")
    prune_(model, 0.5, progress=False)
    if sparse:
        sparsify_(model, progress=False)
    ids = torch.randint(0, VOCAB, (3, 6))
    decoder = StaticDecoder(model, 3, 24, sampling=Sampling(1.5, top_p=0.95))
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(decoder.generate(ids, 12).tokens)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.equal(runs[0][:, :6], ids) and runs[0].max() < VOCAB
    greedy = StaticDecoder(model, 3, 24).generate(ids, 12).tokens
    assert not torch.equal(runs[0], greedy)  # at temperature 1.5 over 36 draws, some differ
    assert decoder.host_syncs() == []
