import math

import pytest
import torch

import flashllm
from flashllm.evaluate import perplexity
from test_prune import VOCAB, tiny_model


class ByteTokenizer:
    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [b % VOCAB for b in text.encode()]}


def random_text(chars: int) -> str:
    return "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (chars,)))


def hf_strided_perplexity(model, ids, max_length, stride):
    """Hugging Face's recipe (docs: "Perplexity of fixed-length models"), using the model's own loss.

    The docs subtract one label per window for the shift, which miscounts windows whose first label
    is masked; this counts the targets the loss actually averaged over.
    """
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        nll += float(loss) * scored
        count += scored
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("max_length, stride", [(64, 64), (64, 16), (50, 37), (128, 128)])
def test_matches_the_hugging_face_recipe(arch, max_length, stride):
    model, text = tiny_model(arch), random_text(300)
    ids = torch.tensor(ByteTokenizer()(text)["input_ids"])
    expected = hf_strided_perplexity(model, ids, max_length, stride)
    got = perplexity(model, ByteTokenizer(), text, max_length=max_length, stride=stride, progress=False)
    assert math.isclose(got, expected, rel_tol=1e-4)


@pytest.mark.parametrize("chars, max_length, stride", [(300, 64, 16), (300, 50, 37), (64, 64, 32), (65, 64, 64), (20, 64, 32)])
def test_progress_total_is_the_windows_run(chars, max_length, stride, monkeypatch):
    # The bar must end full: its length is the number of windows until one reaches the last token.
    import flashllm.evaluate as evaluate

    seen = {}

    def fake_tqdm(iterable, **kwargs):
        seen["total"] = len(iterable)
        seen["run"] = 0
        for item in iterable:
            seen["run"] += 1
            yield item

    monkeypatch.setattr(evaluate, "tqdm", fake_tqdm)
    perplexity(tiny_model(), ByteTokenizer(), random_text(chars), max_length=max_length, stride=stride)
    assert seen["run"] == seen["total"] == 1 + max(0, math.ceil((chars - max_length) / stride))


class _WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward knows no `logits_to_keep` (older or hand-written models)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, use_cache=False):
        return self.model(input_ids, use_cache=use_cache)


@pytest.mark.parametrize("max_length, stride", [(64, 16), (50, 37)])
def test_lm_head_runs_only_on_scored_positions(max_length, stride):
    model, text = tiny_model(), random_text(300)
    rows = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[-2]))
    got = perplexity(model, ByteTokenizer(), text, max_length=max_length, stride=stride, progress=False)
    handle.remove()
    # Every token after the first is scored once; each window also keeps its last position.
    assert sum(rows) == len(text) - 1 + len(rows)
    full = perplexity(_WithoutLogitsToKeep(model), ByteTokenizer(), text, max_length=max_length,
                      stride=stride, progress=False)
    assert math.isclose(got, full, rel_tol=1e-5)


def test_one_window_is_the_model_loss():
    model, text = tiny_model(), random_text(90)
    ids = torch.tensor([ByteTokenizer()(text)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(float(model(ids, labels=ids).loss))
    assert math.isclose(perplexity(model, ByteTokenizer(), text, progress=False), expected, rel_tol=1e-5)


def test_default_window_follows_the_model_context():
    model, text = tiny_model(), random_text(400)
    got = perplexity(model, ByteTokenizer(), text, progress=False)
    assert got == perplexity(model, ByteTokenizer(), text, max_length=128, stride=64, progress=False)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_packed_model_has_the_pruned_model_perplexity(method):
    model, text = tiny_model(), random_text(300)
    calibration = torch.randint(0, VOCAB, (4, 32))
    flashllm.prune_(model, 0.5, method, calibration=calibration, progress=False)
    pruned = perplexity(model, ByteTokenizer(), text, max_length=64, stride=32, progress=False)
    flashllm.sparsify_(model, "bitmap", progress=False)
    packed = perplexity(model, ByteTokenizer(), text, max_length=64, stride=32, progress=False)
    assert math.isfinite(pruned) and math.isclose(packed, pruned, rel_tol=1e-5)


def test_restores_training_mode():
    model = tiny_model().train()
    perplexity(model, ByteTokenizer(), random_text(50), progress=False)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_length": 256}, "exceeds the model's context of 128"),
        ({"max_length": 1}, "max_length"),
        ({"max_length": 64, "stride": 0}, "stride"),
        ({"max_length": 64, "stride": 65}, "stride"),
    ],
)
def test_bad_windows(kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_model(), ByteTokenizer(), random_text(50), progress=False, **kwargs)


def test_text_too_short():
    with pytest.raises(ValueError, match="1 token"):
        perplexity(tiny_model(), ByteTokenizer(), "a", progress=False)
