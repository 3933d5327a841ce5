import json

import pytest
import torch

from flashllm import prune_, sparsify_
from flashllm.checkpoint import (
    INDEX,
    MANIFEST,
    SINGLE,
    convert_checkpoint,
    from_pretrained,
    read_manifest,
    save_pretrained,
)
from flashllm.nn import SparseLinear
from models import VOCAB, build


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen2"])
@pytest.mark.parametrize("fmt", ["bitmap", "tiled_csl"])
def test_save_and_load_compressed_checkpoint(tmp_path, arch, fmt):
    model = build(arch)
    prune_(model, 0.7, progress=False)
    sparsify_(model, fmt, progress=False)
    ids = torch.randint(0, VOCAB, (2, 9))
    save_pretrained(model, tmp_path, info={"method": "magnitude"})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["format_versions"] == {fmt: {"bitmap": 1, "tiled_csl": 2}[fmt]}
    assert manifest["info"] == {"method": "magnitude"}
    assert (tmp_path / SINGLE).is_file()
    loaded = from_pretrained(tmp_path, device="cpu", progress=False)
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == len(manifest["sparse_layers"])
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_checkpoint_is_about_the_compressed_size(tmp_path):
    model = build("llama")
    prune_(model, 0.8, progress=False)
    summary = sparsify_(model, "bitmap", progress=False)
    save_pretrained(model, tmp_path)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    on_disk = (tmp_path / SINGLE).stat().st_size
    expected = summary.compressed_bytes + other
    assert expected <= on_disk <= expected * 1.05 + 20_000  # + the safetensors JSON header


def test_sharded_checkpoint_with_tied_embeddings_and_dtype(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prune_(model, 0.5, progress=False)
    sparsify_(model, progress=False)
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / INDEX).is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ids = torch.randint(0, VOCAB, (1, 7))
    loaded = from_pretrained(tmp_path, device="cpu", progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    half = from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16, progress=False)
    assert half.model.layers[0].mlp.up_proj.dtype == torch.bfloat16
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    # Not bit-equal: a loaded model keeps its rotary frequencies in fp32, model.to() casts them.
    assert torch.allclose(logits(half, ids).float(), logits(model, ids), atol=3e-2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("sparsity", [0.6, "2:4"])
def test_convert_dense_checkpoint_streaming(tmp_path, arch, sparsity):
    dense = build(arch)
    dense.save_pretrained(tmp_path / "dense")
    out = convert_checkpoint(tmp_path / "dense", tmp_path / "sparse", sparsity, "bitmap", device="cpu",
                             max_shard_bytes=50_000, progress=False)
    loaded = from_pretrained(out, device="cpu", progress=False)
    prune_(dense, sparsity, progress=False)
    ids = torch.randint(0, VOCAB, (2, 8))
    assert torch.allclose(logits(loaded, ids), logits(dense, ids), atol=1e-5)
    manifest = read_manifest(out)
    assert manifest["compressed_linear_bytes"] < 0.62 * manifest["dense_linear_bytes"]


def test_convert_with_the_auto_format_packs_each_layer_by_its_sparsity(tmp_path):
    dense = build("llama")
    dense.save_pretrained(tmp_path / "dense")
    for sparsity, expected in ((0.5, {"bitmap"}), (0.85, {"tiled_csl"})):
        out = convert_checkpoint(tmp_path / "dense", tmp_path / f"sparse{sparsity}", sparsity, "auto", device="cpu",
                                 progress=False)
        assert set(read_manifest(out)["sparse_layers"].values()) == expected
        loaded = from_pretrained(out, device="cpu", progress=False)
        pruned = build("llama")
        pruned.load_state_dict(dense.state_dict())
        prune_(pruned, sparsity, progress=False)
        ids = torch.randint(0, VOCAB, (2, 8))
        assert torch.allclose(logits(loaded, ids), logits(pruned, ids), atol=1e-5)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a flashllm checkpoint"):
        from_pretrained(tmp_path)
    model = build("llama")
    with pytest.raises(ValueError, match="no SparseLinear"):
        save_pretrained(model, tmp_path / "x")
    prune_(model, 0.5, progress=False)
    sparsify_(model, progress=False)
    save_pretrained(model, tmp_path / "ok")
    manifest = json.loads((tmp_path / "ok" / MANIFEST).read_text())

    (tmp_path / "ok" / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / MANIFEST).write_text(json.dumps({**manifest, "format_versions": {"bitmap": 7}}))
    with pytest.raises(ValueError, match="layout version 7"):
        from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / MANIFEST).write_text(json.dumps({**manifest, "format_versions": {"coo": 1}}))
    with pytest.raises(ValueError, match="unknown sparse format"):
        from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / MANIFEST).write_text(json.dumps(manifest))
    weights = tmp_path / "ok" / SINGLE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        from_pretrained(tmp_path / "ok")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_checkpoint(tmp_path / "ok2", tmp_path / "out", 0.5)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("owl", [False, True])
def test_blockwise_calibrated_conversion_matches_in_memory_pruning(tmp_path, arch, method, owl):
    """Converting one block at a time gives the same weights as pruning the loaded model (with OWL,
    each block is read, scored, released and read again)."""
    import copy

    from flashllm.prune import OWL

    dense = build(arch)
    dense.save_pretrained(tmp_path / "dense")
    calibration = torch.randint(0, VOCAB, (6, 24))
    options = {"owl": OWL(threshold=2.0, spread=0.1)} if owl else {}
    out = convert_checkpoint(tmp_path / "dense", tmp_path / "sparse", 0.5, "bitmap", method, calibration,
                             device="cpu", max_shard_bytes=40_000, progress=False, **options)
    loaded = from_pretrained(out, device="cpu", progress=False)
    reference = copy.deepcopy(dense)
    summary = prune_(reference, 0.5, method, calibration=calibration, progress=False, **options)
    assert ("OWL:" in read_manifest(out)["info"]["pruned"]) == owl == bool(summary.block_sparsity)
    ids = torch.randint(0, VOCAB, (2, 8))
    assert torch.allclose(logits(loaded, ids), logits(reference, ids), atol=1e-4)
    manifest = read_manifest(out)
    assert manifest["info"]["calibration"] == "6 x 24 tokens"
    assert len(manifest["sparse_layers"]) == sum(1 for m in loaded.modules() if isinstance(m, SparseLinear))


def test_blockwise_conversion_errors(tmp_path):
    build("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="needs calibration"):
        convert_checkpoint(tmp_path / "dense", tmp_path / "out", 0.5, method="wanda", device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown pruning method"):
        convert_checkpoint(tmp_path / "dense", tmp_path / "out", 0.5, method="obc", device="cpu", progress=False)


def test_a_tiled_csl_version_1_checkpoint_is_converted_when_loaded(tmp_path):
    # Checkpoints written before Tiled-CSL layout version 2 load: their words are reordered and
    # their locations turned into slots as they are read.
    from safetensors.torch import load_file, save_file

    from conftest import tiled_csl_version_1

    model = build("llama")
    prune_(model, 0.7, progress=False)
    sparsify_(model, "tiled_csl", progress=False)
    ids = torch.randint(0, VOCAB, (2, 9))
    save_pretrained(model, tmp_path)
    tensors = load_file(str(tmp_path / SINGLE))
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            words, offsets = tiled_csl_version_1(module.weight_format.to_dense())
            tensors[f"{name}.words"], tensors[f"{name}.offsets"] = words, offsets
            tensors[f"{name}.header"] = tensors[f"{name}.header"].clone()
            tensors[f"{name}.header"][1] = 1
    save_file(tensors, str(tmp_path / SINGLE), metadata={"format": "pt"})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["format_versions"] = {"tiled_csl": 1}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    loaded = from_pretrained(tmp_path, device="cpu", progress=False)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
