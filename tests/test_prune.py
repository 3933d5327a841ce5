import copy

import pytest
import torch
from torch import nn

import flashllm
from flashllm.layers import dense_weight, linear_layers
from flashllm.prune import METHODS, prune_
from flashllm.prune.magnitude import magnitude_prune_
from flashllm.prune.patterns import lowest_k_mask, lowest_score_mask, parse_sparsity
from flashllm.prune.sequential import decoder_blocks, prune_sequentially
from flashllm.prune.sparsegpt import Hessian, sparsegpt_prune_
from flashllm.prune.wanda import FeatureNorms, wanda_prune_

VOCAB = 96
ARCHS = ["llama", "qwen2", "opt", "gpt2"]


def tiny_model(arch: str = "llama", layers: int = 2) -> nn.Module:
    """A randomly initialised decoder, small enough to prune in a fraction of a second."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=128, **common)
        model = tf.GPT2LMHeadModel(config)
    elif arch == "opt":
        config = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=64, **common)
        model = tf.OPTForCausalLM(config)
    else:
        extra = {"qwen3": dict(head_dim=16), "phi3": {}, "gpt_neox": {},
                 "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                                   num_experts_per_tok=2)}.get(arch, {})
        config = tf.AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         **extra, **common)
        model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for _, module in linear_layers(model):
            # torch's normal_ draws an exact 0 now and then; zero counts must come from pruning alone.
            weight = dense_weight(module)
            weight.masked_fill_(weight == 0, 1e-3)
    return model.eval()


def calibration(nsamples: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (nsamples, seqlen))


def prune_kwargs(method: str) -> dict:
    return {} if method == "magnitude" else {"calibration": calibration()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, "2:4", "4:8"])
def test_exact_sparsity_in_every_layer(arch, method, sparsity):
    model = tiny_model(arch)
    summary = prune_(model, sparsity, method, progress=False, **prune_kwargs(method))
    target = parse_sparsity(sparsity)
    layers = list(linear_layers(model))
    assert sorted(summary.layers) == sorted(name for name, _ in layers)
    for name, module in layers:
        w = dense_weight(module)
        assert torch.isfinite(w).all(), name
        zeros = w == 0
        assert int(zeros.sum()) == target.zeros_in(w.numel()), name
        if target.is_nm:
            per_group = zeros.reshape(w.shape[0], -1, target.m).sum(-1)
            assert (per_group == target.m - target.n).all(), name
        elif method == "wanda":  # compared per row: rows lose the same count, give or take one
            per_row = target.zeros_in(w.numel()) // w.shape[0]
            assert ((zeros.sum(1) == per_row) | (zeros.sum(1) == per_row + 1)).all(), name
    assert summary.zeros == sum(target.zeros_in(dense_weight(m).numel()) for _, m in layers)


def test_summary_records_method_sparsity_calibration_and_time():
    model = tiny_model()
    summary = prune_(model, "60%", "sparsegpt", calibration=calibration(6, 20), progress=False)
    assert (summary.method, summary.sparsity) == ("sparsegpt", "60%")
    assert (summary.calibration_samples, summary.calibration_seqlen, summary.calibration_tokens) == (6, 20, 120)
    assert summary.seconds > 0 and abs(summary.achieved - 0.6) < 1e-3
    assert "6 x 20 tokens" in str(summary)


def test_magnitude_needs_no_calibration():
    summary = prune_(tiny_model(), 0.5, progress=False)
    assert summary.method == "magnitude" and summary.calibration_tokens == 0


def _uneven_layer(out_features=48, in_features=96, tokens=1024):
    """A weight and calibration inputs like an LLM's: correlated features of uneven scales."""
    w = torch.randn(out_features, in_features)
    scales = torch.exp(0.5 * torch.randn(in_features))
    scales[torch.randperm(in_features)[:4]] *= 20  # a few outlier features
    shared = torch.randn(tokens, 8) @ torch.randn(8, in_features)  # a few directions all features follow
    x = (shared + torch.randn(tokens, in_features)) * scales
    return w, x


@pytest.mark.parametrize("damping", ["relative", "mean"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, "2:4"])
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(sparsity, damping):
    w, x = _uneven_layer()
    target = parse_sparsity(sparsity)
    norms, hessian = FeatureNorms(w.shape[1], w.device), Hessian(w.shape[1], w.device)
    for chunk in x.split(300):  # statistics accumulate over batches
        norms.add(chunk)
        hessian.add(chunk)
    pruned = {name: w.clone() for name in METHODS}
    magnitude_prune_(pruned["magnitude"], target)
    wanda_prune_(pruned["wanda"], target, norms.norms())
    sparsegpt_prune_(pruned["sparsegpt"], target, hessian.matrix(), damping=damping)
    error = {name: float(torch.linalg.norm(x @ w.t() - x @ p.t())) for name, p in pruned.items()}
    assert error["sparsegpt"] < error["wanda"] < error["magnitude"], error


@pytest.mark.parametrize("features", [16, 300, 577])  # one block; blocks of 128 and a ragged one; of 145
def test_statistics_match_their_definitions(features):
    x = torch.randn(3, 50, features) * torch.rand(features)
    norms, hessian = FeatureNorms(features, x.device), Hessian(features, x.device)
    norms.add(x[:1])
    norms.add(x[1:])
    hessian.add(x[:2])
    hessian.add(x[2:])
    flat = x.reshape(-1, features).double()
    torch.testing.assert_close(norms.norms().double(), flat.norm(dim=0), rtol=1e-5, atol=1e-6)
    matrix = hessian.matrix()
    torch.testing.assert_close(matrix.double(), 2 * flat.t() @ flat / 150, rtol=1e-5, atol=1e-5)
    assert torch.equal(matrix, matrix.t())
    assert norms.tokens == hessian.tokens == 150


def test_sparsegpt_prunes_dead_inputs_first():
    w, x = _uneven_layer(16, 32, 256)
    x[:, :8] = 0  # inputs that never fire: their weights are free to drop
    hessian = Hessian(32, x.device)
    hessian.add(x)
    mask = sparsegpt_prune_(w, parse_sparsity(0.25), hessian.matrix(), blocksize=32)
    assert mask[:, :8].all() and int(mask.sum()) == 128


def _sorted_lowest(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Reference selection: the first k of a stable sort."""
    order = score.argsort(dim=dim, stable=True).narrow(dim, 0, k)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(dim, order, True)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (64, 200)])
@pytest.mark.parametrize("values", ["random", "few", "zeros"])
def test_selections_match_a_stable_sort(shape, values):
    # A linear-time selection replaces sorting; with ties it must pick what a stable sort picks.
    score = {"random": torch.rand(shape), "few": torch.randint(0, 3, shape).float(),
             "zeros": torch.zeros(shape).index_fill_(1, torch.tensor([0]), -0.0)}[values]
    numel, rows = score.numel(), shape[0]
    for k in sorted({0, 1, numel // 3, numel - 1, numel}):
        expected = _sorted_lowest(score.flatten(), k, 0).view(shape)
        assert torch.equal(lowest_k_mask(score, k), expected), k
        assert torch.equal(lowest_k_mask(score.t(), k), _sorted_lowest(score.t().flatten(), k, 0).view(shape[::-1]))
    for fraction in [0.0, 0.3, 0.5, 0.95]:
        mask = lowest_score_mask(score, parse_sparsity(fraction), per_row=True)
        total = int(round(fraction * numel))
        k, extra = divmod(total, rows)
        expected = _sorted_lowest(score, k, 1)
        if extra:  # the rows whose next-lowest score is lowest (stable by row) lose one more
            nxt = score.argsort(dim=1, stable=True)[:, k]
            chosen = score.gather(1, nxt[:, None]).squeeze(1).argsort(stable=True)[:extra]
            expected[chosen, nxt[chosen]] = True
        assert torch.equal(mask, expected), fraction
        assert int(mask.sum()) == total


def test_a_selection_by_sort_picks_the_same_weights(monkeypatch):
    # On CUDA a whole layer (one long row) is selected by a device-wide sort instead of kthvalue:
    # the same k-th score and the same mask, with ties and signed zeros.
    from flashllm.prune import patterns

    kth = patterns._kth_smallest
    monkeypatch.setattr(patterns, "_kth_smallest", lambda score, k: kth(score, k, by_sort=True))
    for score in (torch.rand(7, 13), torch.randint(0, 3, (7, 13)).float(),
                  torch.zeros(7, 13).index_fill_(1, torch.tensor([0, 4]), -0.0)):
        for k in (1, 30, 90, 91):
            row = score.reshape(1, -1)
            assert torch.equal(kth(row, k, by_sort=True), kth(row, k, by_sort=False)), k
            assert torch.equal(lowest_k_mask(score, k), _sorted_lowest(score.flatten(), k, 0).view(score.shape)), k


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_weights_are_rejected(method):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj' holds NaN or inf weights"):
        prune_(model, 0.5, method, progress=False, **prune_kwargs(method))
    with pytest.raises(ValueError, match="NaN"):
        lowest_score_mask(torch.tensor([[1.0, float("nan")]]), parse_sparsity(0.5), per_row=True)


def _textbook_sparsegpt(w: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, sparsity, blocksize: int):
    """SparseGPT without lazy updates, in float64, on the mask `sparsegpt_prune_` chose: every
    column's error updates all later columns at once. Checks on the way that each block's (or N:M
    group's) mask holds the right count and the lowest scores of the weights as updated so far, up
    to a relative 1e-4 (float32 rounding may order near-ties either way); returns the weights."""
    w, h = w.double().clone(), hessian.double().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    h.diagonal().mul_(1.01)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    def lowest(score, chosen, count):
        assert bool((chosen.sum(dim=-1) == count).all())
        worst_pruned = torch.where(chosen, score, -torch.inf).amax(dim=-1)
        best_kept = torch.where(chosen, torch.inf, score).amin(dim=-1)
        assert bool((worst_pruned <= best_kept * (1 + 1e-4) + 1e-12).all())

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if not sparsity.is_nm:
            score = w[:, i1:i2].square() / hinv.diagonal()[i1:i2].square() * (~dead[i1:i2])
            lowest(score.flatten(), mask[:, i1:i2].flatten(), sparsity.zeros_in(rows * i2) - sparsity.zeros_in(rows * i1))
        for i in range(i1, i2):
            if sparsity.is_nm and (i - i1) % sparsity.m == 0:
                g = slice(i, i + sparsity.m)
                lowest(w[:, g].square() / hinv.diagonal()[g].square() * (~dead[g]), mask[:, g], sparsity.m - sparsity.n)
            err = torch.where(mask[:, i], w[:, i], 0) / hinv[i, i]
            w[:, i:] -= err[:, None] * hinv[i, i:]
            w[:, i] = torch.where(mask[:, i], 0, w[:, i])
    return w


@pytest.mark.parametrize("shape, sparsity, blocksize", [((48, 80), 0.5, 32), ((33, 70), 0.7, 16), ((40, 64), "2:4", 16)])
def test_sparsegpt_matches_the_textbook_algorithm(shape, sparsity, blocksize):
    w, x = _uneven_layer(*shape, 400)
    x[:, 7] = 0  # a dead input
    hessian = Hessian(shape[1], x.device)
    hessian.add(x)
    target = parse_sparsity(sparsity)
    original = w.clone()
    mask = sparsegpt_prune_(w, target, hessian.matrix(), blocksize=blocksize)
    expected = _textbook_sparsegpt(original, hessian.matrix(), mask, target, blocksize)
    assert bool((w[mask] == 0).all()) and bool(mask[:, 7].all())  # the dead input goes first
    torch.testing.assert_close(w.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_deterministic_for_the_same_calibration(method):
    model = tiny_model("llama")
    twin = copy.deepcopy(model)
    calib = calibration()
    prune_(model, 0.5, method, calibration=calib, progress=False)
    prune_(twin, 0.5, method, calibration=calib.clone(), progress=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_q_k_v_and_gate_up_share_one_statistic(arch):
    model = tiny_model(arch)
    made, seen = [], []

    def make_statistic(in_features, device):
        made.append(FeatureNorms(in_features, device))
        return made[-1]

    def prune_layer(name, module, statistic):
        seen.append((name.split(".")[-2:], made.index(statistic)))

    prune_sequentially(model, list(linear_layers(model)), calibration(), make_statistic, prune_layer,
                       batch_size=3, progress=False, desc="")
    stages = {}
    for name, stage in seen:
        stages.setdefault(stage, []).append(".".join(name))
    if arch == "llama":
        expected = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    else:
        expected = [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]
    assert list(stages.values()) == expected * 2
    assert all(statistic.tokens == 8 * 32 for statistic in made)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_each_layer_is_calibrated_on_its_inputs_in_the_pruned_model(arch):
    # Layers are pruned in forward order, each from inputs that already pass through every pruned
    # layer before it, so the statistics each layer saw are those of the final pruned model.
    model = tiny_model(arch, layers=3)
    calib = calibration()
    used = {}

    def prune_layer(name, module, statistic):
        used[name] = statistic.norms().clone()
        wanda_prune_(dense_weight(module).data, parse_sparsity(0.5), statistic.norms())

    prune_sequentially(model, list(linear_layers(model)), calib, FeatureNorms, prune_layer,
                       batch_size=4, progress=False, desc="")
    after = {name: FeatureNorms(dense_weight(m).shape[1], calib.device) for name, m in linear_layers(model)}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: after[n].add(args[0]))
               for name, m in linear_layers(model)]
    with torch.no_grad():
        model(calib, use_cache=False)
    for handle in handles:
        handle.remove()
    assert used.keys() == after.keys()
    for name, statistic in after.items():
        torch.testing.assert_close(used[name], statistic.norms(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_pruned_model_packs_without_loss(method):
    model = tiny_model("llama")
    prune_(model, 0.5, method, progress=False, **prune_kwargs(method))
    ids = calibration(2, 24)
    with torch.no_grad():
        expected = model(ids).logits
        flashllm.sparsify_(model, "bitmap", progress=False)
        got = model(ids).logits
    assert all(not isinstance(m, nn.Linear) for _, m in linear_layers(model))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sparsegpt_best_reconstructs_the_model_outputs():
    # A random-init model's activations have no outlier features, so Wanda and magnitude tie here;
    # SparseGPT's weight updates still pay off through the whole model, block after block.
    dense = tiny_model("llama")
    ids = calibration(16, 32)
    with torch.no_grad():
        reference = dense(ids).logits
    error = {}
    for method in METHODS:
        model = copy.deepcopy(dense)
        prune_(model, 0.6, method, progress=False, **({} if method == "magnitude" else {"calibration": ids}))
        with torch.no_grad():
            error[method] = float(torch.linalg.norm(model(ids).logits - reference))
    assert error["sparsegpt"] < min(error["wanda"], error["magnitude"]), error


# Errors


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1, "100%", float("nan"), "3:2", "0:4"])
def test_sparsity_outside_range_is_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity|N:M"):
        prune_(tiny_model(), sparsity, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_nm_pattern_the_layer_cannot_hold(method):
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="in_features=12.*4:8"):
        prune_(model, "4:8", method, calibration=calibration(), progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_model_without_linear_layers(method):
    with pytest.raises(ValueError, match="no linear layers"):
        prune_(nn.Sequential(nn.Embedding(4, 4), nn.ReLU()), 0.5, method, calibration=calibration(), progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_need_calibration(method):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration_data"):
        prune_(model, 0.5, method, progress=False)
    with pytest.raises(TypeError, match="float32"):
        prune_(model, 0.5, method, calibration=torch.rand(4, 8), progress=False)
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        prune_(model, 0.5, method, calibration=torch.randint(0, VOCAB, (32,)), progress=False)
    with pytest.raises(ValueError, match="context of 128"):
        prune_(model, 0.5, method, calibration=calibration(2, 200), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibrated_methods_need_decoder_blocks():
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="no stack of decoder blocks"):
        prune_(model, 0.5, "wanda", calibration=calibration(), progress=False)


def test_layers_outside_the_blocks_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="lm_head.*outside the decoder blocks"):
        prune_(model, 0.5, "sparsegpt", calibration=calibration(), filter_fn=lambda m, n: isinstance(m, nn.Linear),
               progress=False)


def test_bad_options_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown pruning method 'obs'"):
        prune_(model, 0.5, "obs", progress=False)
    with pytest.raises(ValueError, match="blocksize=6 must be a multiple of M=4"):
        prune_(model, "2:4", "sparsegpt", calibration=calibration(), blocksize=6, progress=False)
    with pytest.raises(ValueError, match="percdamp"):
        prune_(model, 0.5, "sparsegpt", calibration=calibration(), percdamp=0, progress=False)
    with pytest.raises(ValueError, match="damping.*'max'"):
        prune_(model, 0.5, "sparsegpt", calibration=calibration(), damping="max", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        prune_(model, 0.5, "wanda", calibration=calibration(), batch_size=0, progress=False)


def test_decoder_blocks_are_found_generically():
    for arch, expected in [("llama", "model.layers"), ("opt", "model.decoder.layers"), ("gpt2", "transformer.h")]:
        name, blocks = decoder_blocks(tiny_model(arch, layers=3))
        assert name == expected and len(blocks) == 3


def _prune_counting(model, method, calib, monkeypatch, reuse: bool) -> int:
    """Prune `model`; how many rows (tokens) its pruned layers multiplied, all passes together."""
    from transformers.pytorch_utils import Conv1D

    from flashllm.prune import sequential

    pruned = {m for _, m in linear_layers(model)}
    rows = 0

    def counting(forward):
        def count(self, x):
            nonlocal rows
            if self in pruned:
                rows += x.numel() // x.shape[-1]
            return forward(self, x)
        return count

    with monkeypatch.context() as patch:
        for cls in (nn.Linear, Conv1D):  # GPT-2's linear layers are Conv1D
            patch.setattr(cls, "forward", counting(cls.forward))
        if not reuse:
            patch.setattr(sequential, "output_cache_budget", lambda device: 0)
            patch.setattr(sequential, "STAND_IN_STAGE_OUTPUTS", False)
        prune_(model, 0.5, method, calibration=calib, progress=False, batch_size=3)
    return rows


# Beyond ARCHS: fused q/k/v and gate/up (Phi-3), q/k norms (Qwen3), parallel attention and MLP
# (GPT-NeoX), a routed MoE with a shared expert (Qwen2-MoE).
@pytest.mark.parametrize("arch", [*ARCHS, "phi3", "qwen3", "gpt_neox", "qwen2_moe"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_reusing_pruned_outputs_changes_nothing_but_the_work(arch, method, monkeypatch):
    # Later passes through a block reuse what its pruned parts computed in earlier ones, and a
    # stage's layers skip their product in their own pass: the same weights to the bit, with each
    # layer multiplying every calibration token about once, as one forward of the model would.
    model = tiny_model(arch, layers=3)
    twin = copy.deepcopy(model)
    calib = calibration()
    reused = _prune_counting(model, method, calib, monkeypatch, reuse=True)
    recomputed = _prune_counting(twin, method, calib, monkeypatch, reuse=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
    layers, batches = len(list(linear_layers(model))), -(-calib.shape[0] // 3)
    one_forward = layers * calib.numel()
    stand_ins = layers * batches  # one row per layer and batch, for the shape of its stand-in output
    assert reused <= one_forward + stand_ins < 0.6 * recomputed, (reused, one_forward, recomputed)
    assert not any("forward" in m.__dict__ for m in model.modules())  # every forward given back


class _InPlaceBlock(nn.Module):
    """A block that scales its first layer's output in place, and calls its second layer twice."""

    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        h = self.up(x)
        h.mul_(0.5)  # modifies the output `up` returned
        return x + self.down(torch.relu(h)) - 0.1 * self.down(torch.tanh(h))


class _CalledAgainBlock(_InPlaceBlock):
    """A block that calls its first layer again on what its last layer computed."""

    def forward(self, x):
        y = self.down(torch.relu(self.up(x)))
        return x + y + 0.1 * self.up(y)[..., : x.shape[-1]]


class _ToyModel(nn.Module):
    def __init__(self, block: type, width: int = 32, blocks: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(block(width) for _ in range(blocks))

    def forward(self, ids, use_cache=False):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("block", [_InPlaceBlock, _CalledAgainBlock])
def test_reused_outputs_survive_in_place_changes_and_repeated_calls(block, monkeypatch):
    # The second block kind checks that what a pass computes after a stage's stand-in (zero)
    # outputs is never kept: `up`'s second call there sees zeros, not the real `down` output.
    model = _ToyModel(block).eval()
    twin = copy.deepcopy(model)
    calib = calibration()
    _prune_counting(model, "wanda", calib, monkeypatch, reuse=True)
    _prune_counting(twin, "wanda", calib, monkeypatch, reuse=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
