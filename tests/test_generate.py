import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flashllm import prune_, sparsify_
from flashllm.generate import build_prompt, generate_text, weight_bytes


def test_generate_text_reports_speed_and_memory(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prune_(model, 0.5, progress=False)
    dense = generate_text(model, tokenizer, "def f(x):", max_new_tokens=6)
    dense_bytes = weight_bytes(model)
    sparsify_(model, progress=False)
    sparse = generate_text(model, tokenizer, "def f(x):", max_new_tokens=6)
    assert sparse.text == dense.text and sparse.new_tokens == 6
    assert sparse.weight_bytes < dense_bytes
    assert sparse.tokens_per_second > 0 and 0 < sparse.first_token_seconds <= sparse.seconds
    assert sparse.peak_memory_bytes > 0 and sparse.memory_kind == "process RSS"
    sampled = [generate_text(model, tokenizer, "x", 5, do_sample=True, seed=s).text for s in (1, 1)]
    assert sampled[0] == sampled[1]


def test_weight_bytes_counts_tied_weights_once():
    from models import VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    unique = {p.data_ptr(): p.numel() * 4 for p in model.parameters()}
    assert weight_bytes(model) == sum(unique.values())


def test_build_prompt_without_template(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert build_prompt(tokenizer, "hello") == ("hello", False)
    try:
        build_prompt(tokenizer, "hello", chat=True)
    except ValueError as err:
        assert "chat template" in str(err)
    else:
        raise AssertionError("chat=True without a template was accepted")


@pytest.mark.parametrize("sparse", [False, True])
def test_static_decoder_path_gives_generates_text_and_stops_at_eos(tiny_model_dir, sparse):
    # Greedy decoding on a GPU runs the static-cache decoder (CUDA graphs); here on the CPU it runs
    # eagerly, and must give Hugging Face generate's text, stopping where generate stops.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prune_(model, 0.5, progress=False)
    if sparse:
        sparsify_(model, progress=False)
    model.generation_config.eos_token_id = None  # no stop: both run all 12 tokens
    hf = generate_text(model, tokenizer, "def f(x):", max_new_tokens=12, static=False)
    static = generate_text(model, tokenizer, "def f(x):", max_new_tokens=12, static=True)
    assert static.text == hf.text and static.new_tokens == hf.new_tokens == 12
    assert static.tokens_per_second > 0 and 0 < static.first_token_seconds <= static.seconds
    # A stop token: the 5th token generated above, whose first occurrence ends both.
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          pad_token_id=0)[0, ids.shape[1]:]
    stop = int(full[4])
    model.generation_config.eos_token_id = stop
    hf = generate_text(model, tokenizer, "def f(x):", max_new_tokens=12, static=False)
    static = generate_text(model, tokenizer, "def f(x):", max_new_tokens=12, static=True)
    first_stop = int((full == stop).nonzero()[0]) + 1
    assert static.text == hf.text and static.new_tokens == hf.new_tokens == first_stop
    # Sampled, the static path draws from the same filtered softmax (tests/test_sampling.py):
    # repeatable with its seed.
    model.generation_config.eos_token_id = None
    greedy = generate_text(model, tokenizer, "def f(x):", 12, static=True).text
    sampled = [generate_text(model, tokenizer, "def f(x):", 12, do_sample=True, temperature=1.5, seed=s,
                             static=True).text for s in (3, 3)]
    assert sampled[0] == sampled[1] and sampled[0] != greedy
    # The model's own top_k applies, as `generate` applies it: top_k 1 samples the argmax.
    model.generation_config.top_k = 1
    for path in (True, False):
        assert generate_text(model, tokenizer, "def f(x):", 12, do_sample=True, temperature=1.5, static=path).text \
            == greedy
    with pytest.raises(ValueError, match="top_p"):
        generate_text(model, tokenizer, "x", 3, do_sample=True, top_p=0.0, static=False)
