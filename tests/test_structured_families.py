"""Structured pruning across model families and on mixture-of-experts models.

Per family (tiny random models from their transformers configs): prune, save, reload with plain
``from_pretrained``, equal logits; or the one ConfigError that says why the config cannot express
the result. Fused layouts are checked against the unfused twin (Phi-3 against Llama), norms over
the projections (OLMo 2) by their kept rows, Conv1D (GPT-2) by the compensation paying off.
Experts: statistics against routing by hand, removal keeping the most-routed and largest
contributors, router rows and config to match.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import ptp
from ptp.config import ConfigError
from ptp.structured import ExpertStats, find_experts, prune_structured

from .families import FAMILIES, MOE_FAMILIES, family_model
from .lm_dirs import one_thread  # noqa: F401 - fixture
from .tiny import tokens

pytestmark = pytest.mark.usefixtures("one_thread")

REFUSED = {"bloom": "BloomConfig: nothing can be removed in a standard config at ratio 0.3: its MLP width 256 is "
                    "fixed in code (no config key sets mlp.dense_4h_to_h's input width); its heads cannot be removed"}
HEADS_FIXED = {"stablelm", "gpt_neox", "falcon", "opt", "gpt2", "gptj"}  # head_dim = hidden / heads
MLP_KEY = {"falcon": "ffn_hidden_size", "opt": "ffn_dim", "gpt2": "n_inner", "gptj": "n_inner",
           "qwen2_moe": "shared_expert_intermediate_size", "qwen3_moe": "moe_intermediate_size"}
EXPERT_WIDTH_KEY = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
                    "qwen3_moe": "moe_intermediate_size"}
EXPERT_COUNT_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_local_experts"}


def calibration(family: str) -> torch.Tensor:
    # MoE: enough tokens that every expert gets more than its width (no few-token fallback).
    return tokens(24, 32) if family in MOE_FAMILIES else tokens(8, 16)


def reloads_identically(model, tmp_path) -> AutoModelForCausalLM:
    ptp.save(model, None, tmp_path / "out")  # verify=True: the saved tensors reload bit for bit
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tokens(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    return reloaded


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_family_prunes_to_a_standard_config_that_reloads(family, tmp_path):
    model = family_model(family)
    report = prune_structured(model, calibration(family), 0.3, batch_size=8)
    assert report.removed == pytest.approx(0.3, abs=0.05), report.removed
    changed = set(report.config)
    if family in HEADS_FIXED:
        assert "num_key_value_heads" not in changed and "num_attention_heads" not in changed
    else:
        assert report.kv_heads == (2, 1) and {"num_attention_heads", "num_key_value_heads"} <= changed
    if family in EXPERT_WIDTH_KEY:  # default: every expert kept, each one narrower
        assert report.experts == (4, 4) and report.expert_intermediate[1] < report.expert_intermediate[0]
        assert model.config.to_dict()[EXPERT_WIDTH_KEY[family]] == report.expert_intermediate[1]
    if family not in ("mixtral", "qwen3_moe"):  # no dense MLP (Mixtral's intermediate_size is the experts' width)
        assert report.intermediate[1] < report.intermediate[0]
        assert model.config.to_dict()[MLP_KEY.get(family, "intermediate_size")] == report.intermediate[1]
    reloaded = reloads_identically(model, tmp_path)
    key = MLP_KEY.get(family, "intermediate_size")
    assert getattr(reloaded.config, key) == getattr(model.config, key)


@pytest.mark.parametrize("family,message", REFUSED.items())
def test_family_that_cannot_express_a_smaller_block_is_refused(family, message):
    with pytest.raises(ConfigError) as err:
        prune_structured(family_model(family), tokens(4, 16), 0.3)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("family", sorted(HEADS_FIXED))
def test_heads_of_families_with_derived_head_dim_are_refused(family):
    with pytest.raises(ConfigError, match="heads cannot be removed in a standard config; use attn_ratio=0"):
        prune_structured(family_model(family), tokens(4, 16), 0.3, attn_ratio=0.5)


def test_opt_at_ratio_0_3_shrinks_its_mlp():
    model = family_model("opt")
    report = prune_structured(model, tokens(8, 16), 0.3)
    assert report.config == {"ffn_dim": 48}


def test_olmo2_q_and_k_norms_keep_the_rows_of_the_kept_heads():
    """OLMo 2 normalises q and k over all heads x head_dim rows: the norms lose the removed heads'
    rows, and keep the others' weights (the kept q rows of block 0 are found from q_proj)."""
    model = family_model("olmo2")
    attn = model.model.layers[0].self_attn
    q_before, norm_before = attn.q_proj.weight.detach().clone(), attn.q_norm.weight.detach().clone()
    prune_structured(model, tokens(8, 16), 0.3)
    attn = model.model.layers[0].self_attn
    q_after = attn.q_proj.weight.detach()
    kept = [int((q_before == row).all(1).nonzero()) for row in q_after]  # q rows are sliced, not updated
    assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (16,)
    assert torch.equal(attn.q_norm.weight.detach(), norm_before[kept])


def _phi3_and_llama_twin():
    """A tiny Phi-3 and the Llama computing the same function, its fused qkv and gate_up split."""
    phi = family_model("phi3")
    c = phi.config
    llama = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    state = {}
    for name, tensor in phi.state_dict().items():
        if "qkv_proj" in name:
            for part, piece in zip("qkv", tensor.split([64, 32, 32])):
                state[name.replace("qkv_proj", f"{part}_proj")] = piece
        elif "gate_up_proj" in name:
            gate, up = tensor.chunk(2)
            state[name.replace("gate_up_proj", "gate_proj")], state[name.replace("gate_up_proj", "up_proj")] = gate, up
        else:
            state[name] = tensor
    llama.load_state_dict(state)
    return phi, llama


def test_phi3_fused_layers_prune_like_the_unfused_llama_twin():
    """Phi-3 stores q|k|v and gate|up in one layer each: pruning must remove the same heads and
    channels, with the same updates, as on the equivalent Llama with separate layers."""
    phi, llama = _phi3_and_llama_twin()
    ids = tokens(2, 16, seed=5)
    with torch.no_grad():
        assert torch.allclose(phi(ids).logits, llama(ids).logits, atol=1e-5)  # the twins agree dense
    for model in (phi, llama):
        prune_structured(model, tokens(16, 32), 0.3, damp=1e-4)
    with torch.no_grad():
        a, b = phi(ids).logits, llama(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-4
    qkv = phi.model.layers[1].self_attn.qkv_proj.weight
    attn = llama.model.layers[1].self_attn
    assert torch.allclose(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), atol=1e-5)


def _output_error(family: str, **kwargs) -> float:
    dense, model = family_model(family), family_model(family)
    prune_structured(model, tokens(48, 32), 0.3, batch_size=16, **kwargs)
    held_out = tokens(8, 32, seed=9)
    with torch.no_grad():
        a, b = dense(held_out).logits, model(held_out).logits
    return float((a - b).pow(2).sum() / a.pow(2).sum())


@pytest.mark.parametrize("family", ["gpt2", "phi3", "olmo2", "falcon", "mixtral"])
def test_least_squares_pays_on_new_layouts(family):
    """On held-out tokens the least-squares update beats plain deletion: it would not if a fused
    layout, a Conv1D transpose or an expert's channels were cut in the wrong place."""
    ls, none = _output_error(family, compensation="ls"), _output_error(family, compensation="none")
    assert ls < 0.8 * none, (ls, none)


# --------------------------------------------------------------------------- mixture of experts


def test_expert_order_is_by_output_energy_then_tokens():
    from ptp.solvers.structured import expert_energy_order

    energy = torch.tensor([0.5, 0.0, 2.0, 0.0, 0.1])
    routed = torch.tensor([3, 0, 9, 5, 40])  # expert 4: routed most, contributes little
    assert expert_energy_order(energy, routed).tolist() == [1, 3, 4, 0, 2]


def test_expert_statistics_equal_routing_by_hand():
    """Mixtral block 0: tokens, output energy and down-projection input moments per expert, from
    the hook, against the router's softmax top-2 and the expert maths written out."""
    from ptp.engine import capture_block_inputs, find_blocks

    model = family_model("mixtral")
    _, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks, tokens(4, 16), 4, torch.device("cpu"))
    block = blocks[0]
    experts = find_experts(block, hidden, kwargs, 64)
    found = (experts.path, experts.router, experts.count, experts.top_k, experts.width)
    assert found == ("mlp.experts", "mlp.gate", 4, 2, 96)
    module = block.mlp.experts
    stats = ExpertStats(module, experts, True, "cpu")
    seen = []
    hooks = [module.register_forward_pre_hook(stats, with_kwargs=True),
             block.mlp.gate.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))]
    with torch.no_grad():
        block(hidden, *kwargs[0][0], **kwargs[0][1])
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        _check_stats_by_hand(stats, seen[0].double(), block)


def _check_stats_by_hand(stats, x, block):
    module = block.mlp.experts
    probs = F.softmax(x @ block.mlp.gate.weight.double().T, -1)
    top, index = probs.topk(2, -1)
    top = top / top.sum(-1, keepdim=True)
    for e in range(4):
        rows, slot = (index == e).nonzero(as_tuple=True)
        w = top[rows, slot][:, None]
        gate, up = (x[rows] @ module.gate_up_proj[e].double().T).chunk(2, -1)
        z = F.silu(gate) * up * w
        out = z @ module.down_proj[e].double().T
        assert stats.tokens[e] == len(rows) > 0
        assert float(stats.energy[e]) == pytest.approx(float(out.pow(2).sum()), rel=1e-4)
        assert torch.allclose(stats.moments[e].second.double(), z.T @ z / len(rows), rtol=1e-3, atol=1e-7)
    assert int(stats.tokens.sum()) == 2 * x.shape[0]


def _skewed_mixtral(router_scale: list[float], same_experts: bool = True):
    """A tiny Mixtral whose every hidden state has a large component along one direction u (added
    to the embeddings), and whose routers score expert e by router_scale[e] * u: so each token
    goes to the experts with the largest scales. With ``same_experts`` all experts are copies of
    expert 0, so only the routing tells them apart."""
    model = family_model("mixtral")
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():
        model.model.embed_tokens.weight += 20 * u
        for block in model.model.layers:
            gate = block.mlp.gate.weight
            gate.copy_(0.05 * gate + torch.tensor(router_scale)[:, None] * u)
            if same_experts:
                experts = block.mlp.experts
                experts.gate_up_proj.copy_(experts.gate_up_proj[:1].expand_as(experts.gate_up_proj))
                experts.down_proj.copy_(experts.down_proj[:1].expand_as(experts.down_proj))
    return model


def test_expert_removal_keeps_the_most_routed_experts_and_their_router_rows(tmp_path):
    model = _skewed_mixtral([0.0, 3.0, 0.5, 2.0])  # experts 1 and 3 take nearly every token
    before = [(b.mlp.gate.weight.detach().clone(), b.mlp.experts.down_proj.detach().clone())
              for b in model.model.layers]
    report = prune_structured(model, tokens(8, 16), 0.0, experts_ratio=0.5)
    assert report.config == {"num_local_experts": 2} and report.experts == (4, 2)
    assert model.config.num_experts_per_tok == 2
    for block, (gate, down), rec in zip(model.model.layers, before, report.blocks):
        tokens_per_expert = rec.expert_tokens
        assert tokens_per_expert[1] > 100 and tokens_per_expert[3] > 100, tokens_per_expert
        assert rec.experts_kept == [1, 3]
        assert torch.equal(block.mlp.gate.weight, gate[[1, 3]])  # router rows of the kept experts, unchanged
        assert torch.equal(block.mlp.experts.down_proj, down[[1, 3]])
        assert block.mlp.experts.num_experts == block.mlp.gate.num_experts == 2
    reloads_identically(model, tmp_path)


def test_expert_removal_ranks_by_output_contribution_not_only_frequency():
    """Block 0's most-routed expert, its output scaled down 100x, contributes least: it is the one
    removed (the routing, computed before the experts run, is unchanged by the scaling); ranking
    by frequency alone would keep it."""
    from ptp.structured import _routing

    model, calib = family_model("mixtral"), tokens(8, 16)
    routed = []
    experts = model.model.layers[0].mlp.experts
    hook = experts.register_forward_pre_hook(lambda m, a, k: routed.append(_routing(m, a, k)[1]), with_kwargs=True)
    with torch.no_grad():
        model(calib)
    hook.remove()
    counts = torch.bincount(torch.cat(routed).flatten(), minlength=4)
    busiest = int(counts.argmax())
    with torch.no_grad():
        experts.down_proj[busiest] *= 0.01
    report = prune_structured(model, calib, 0.0, experts_ratio=0.25)
    assert report.blocks[0].expert_tokens == counts.tolist()
    assert report.blocks[0].experts_kept == [e for e in range(4) if e != busiest]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_and_expert_channels_together_reload(family, tmp_path):
    model = family_model(family)
    report = prune_structured(model, calibration(family), 0.5, experts_ratio=0.25, attn_ratio=0)
    config = model.config.to_dict()
    assert report.experts == (4, 3) and config[EXPERT_COUNT_KEY[family]] == 3
    assert config[EXPERT_WIDTH_KEY[family]] == report.expert_intermediate[1] < report.expert_intermediate[0]
    assert config["num_experts_per_tok"] == 2
    assert report.removed == pytest.approx(0.5, abs=0.06)
    reloads_identically(model, tmp_path)


@pytest.mark.parametrize("importance", ["flap", "wanda-sp", "obs"])
def test_expert_channels_with_every_importance(importance, tmp_path):
    model = family_model("mixtral")
    report = prune_structured(model, calibration("mixtral"), 0.3, attn_ratio=0, importance=importance)
    assert report.expert_intermediate == (96, 64)
    assert all(0 < b.expert_error < 1 for b in report.blocks)
    reloads_identically(model, tmp_path)


def test_bias_compensation_of_expert_channels_is_refused():
    with pytest.raises(ConfigError, match="the experts have no bias to compensate into"):
        prune_structured(family_model("mixtral"), tokens(4, 16), 0.3, attn_ratio=0, compensation="bias")


def test_too_few_experts_left_for_top_k_is_refused():
    with pytest.raises(ConfigError, match="cannot keep 1 of 4 experts: each token is routed to 2"):
        prune_structured(family_model("mixtral"), tokens(4, 16), 0.0, experts_ratio=0.75)


def test_experts_in_an_unrecognised_layout_lose_whole_experts_only():
    """Experts whose forward is not down(act(g) * u) (here: scaled by 2) fail the layout check:
    their channels are not touched (refused, by default), whole experts still go."""
    def doubled(module):
        forward = module.forward
        module.forward = lambda hidden, index, weights: 2 * forward(hidden, index, weights)

    model = family_model("mixtral")
    for block in model.model.layers:
        doubled(block.mlp.experts)
    with pytest.raises(ConfigError, match="not in the fused gate|up layout whose channels ptp can remove"):
        prune_structured(model, tokens(8, 16), 0.3)
    report = prune_structured(model, tokens(8, 16), 0.0, experts_ratio=0.5)
    assert report.config == {"num_local_experts": 2} and report.expert_intermediate == (0, 0)
    assert model.model.layers[0].mlp.experts.down_proj.shape == (2, 64, 96)


@pytest.mark.parametrize("family,overrides", [
    ("cohere", dict(use_qk_norm=True)),  # q_norm / k_norm weights [heads, head_dim]
    ("stablelm", dict(qk_layernorm=True)),  # one LayerNorm per head
    ("falcon", dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True)),  # Falcon-7B style
    ("llama", dict(attention_bias=True, mlp_bias=True)),  # biases solved for by least squares
    ("qwen2_moe", dict(norm_topk_prob=True)),
])
def test_family_variants_reload(family, overrides, tmp_path):
    model = family_model(family, **overrides)
    report = prune_structured(model, calibration(family), 0.3)
    assert report.removed == pytest.approx(0.3, abs=0.05)
    reloads_identically(model, tmp_path)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "phi3"])
def test_bfloat16_model_prunes_and_reloads_in_bfloat16(family, tmp_path):
    family_model(family).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()
    prune_structured(model, calibration(family), 0.3, experts_ratio=0.25 if family in MOE_FAMILIES else None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reloads_identically(model, tmp_path)


def test_experts_ratio_on_a_dense_model_is_refused():
    with pytest.raises(ConfigError, match="experts_ratio applies to mixture-of-experts models; LlamaConfig has no"):
        prune_structured(family_model("llama"), tokens(4, 16), 0.3, experts_ratio=0.5)


def test_expert_with_too_few_tokens_is_pruned_with_a_logged_fallback(caplog, tmp_path):
    model = family_model("mixtral")
    with caplog.at_level(logging.WARNING, logger="ptp"):
        prune_structured(model, tokens(1, 8), 0.3)  # 16 routed token slots for 4 experts of width 96
    assert "too few for a least-squares fit" in caplog.text and "sliced without an update" in caplog.text
    reloads_identically(model, tmp_path)


def test_cli_experts_ratio(tmp_path, capsys):
    import json

    from ptp.cli import main

    from .lm_dirs import tiny_tokenizer, write_text

    tokenizer = tiny_tokenizer()
    model = family_model("mixtral", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    code = main(["prune", str(tmp_path / "m"), "--method", "structured", "--ratio", "0", "--experts-ratio", "0.5",
                 "--calib", str(write_text(tmp_path / "calib.txt")), "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out), "--json", "-q"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["config"] == {"num_local_experts": 2} and summary["verified"]
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.gate.weight.shape == (2, 64)
    record = json.loads((out / "ptp.json").read_text())
    assert record["structured"]["experts"] == [4, 2] and record["structured"]["experts_ratio"] == 0.5
