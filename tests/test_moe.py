"""Mixture-of-experts models: every expert of a fused stack is pruned from the tokens routed to it,
routers stay dense, nothing weight-shaped is passed over silently, and the accounting is true."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

import ptp
from ptp import scale
from ptp.config import ConfigError
from ptp.solvers import Hessian, magnitude, sparsegpt
from ptp.units import ExpertUnit, block_units, observe_inputs
from tests.lm_dirs import one_thread  # noqa: F401 (fixture)
from tests.test_scale import free_port
from tests.tiny import VOCAB, tokens

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = {
    "mixtral": lambda: MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64),
    "qwen2_moe": lambda: Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                        moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64),
    "qwen3_moe": lambda: Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                        moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                        max_position_embeddings=64),
}


def moe_model(family: str = "mixtral", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(MOE[family]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def expert_slices(model):
    """(name, [out, in] weight) of every expert of every stack."""
    for name, p in model.named_parameters():
        if p.dim() == 3:
            for e in range(p.shape[0]):
                yield f"{name}.{e}", p.data[e]


def route_by_hand(mlp, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Expert index -> the rows of x [T, H] the router sends to it (Mixtral-style top-k)."""
    logits = x @ mlp.gate.weight.T
    top = logits.softmax(-1).topk(mlp.top_k if hasattr(mlp, "top_k") else 2, dim=-1).indices
    return {e: x[(top == e).any(-1)] for e in range(mlp.gate.weight.shape[0])}


def test_expert_statistics_are_those_of_the_routed_tokens():
    model = moe_model("mixtral")
    mlp = model.model.layers[0].mlp
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    units, _ = block_units(model.model.layers[0], "b", ())
    experts = {n: u for n, u in units.items() if isinstance(u, ExpertUnit)}
    assert len(experts) == 8  # gate_up and down of 4 experts
    acc = {n: Hessian(u.in_features) for n, u in experts.items()}
    with torch.no_grad(), observe_inputs(experts, lambda name, inp: acc[name].add(inp)):
        mlp(x[None])
    for e, rows in route_by_hand(mlp, x).items():
        w_gate, w_up = mlp.experts.gate_up_proj.data[e].chunk(2, dim=0)
        inner = nn.functional.silu(rows @ w_gate.T) * (rows @ w_up.T)
        for name, inputs in ((f"b.mlp.experts.gate_up_proj.{e}", rows), (f"b.mlp.experts.down_proj.{e}", inner)):
            assert acc[name].tokens == rows.shape[0]
            torch.testing.assert_close(acc[name].hessian, 2 * inputs.T @ inputs / rows.shape[0], rtol=1e-5, atol=1e-6)


def test_engine_prunes_each_expert_from_its_own_tokens():
    """Block 0's experts equal SparseGPT run by hand on the tokens routed to each."""
    model, calib = moe_model("mixtral"), tokens(4, 16)
    captured = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        model(calib)
    hook.remove()
    mlp = model.model.layers[0].mlp
    x = torch.cat(captured)
    expected = {}
    with torch.no_grad():
        for e, rows in route_by_hand(mlp, x).items():
            w = mlp.experts.gate_up_proj.data[e].clone()
            expected[f"gate_up_proj.{e}"] = sparsegpt(w, 2 * rows.T @ rows / rows.shape[0], ptp.config.parse_sparsity("2:4"))[0]
    report = ptp.prune(model, calib, ptp.PruneConfig(method="sparsegpt", sparsity="2:4", batch_size=4))
    for key, weight in expected.items():
        e = int(key.rpartition(".")[2])
        torch.testing.assert_close(mlp.experts.gate_up_proj.data[e], weight, rtol=1e-4, atol=1e-5)
    tokens_seen = {l.name: l.tokens for l in report.layers if "gate_up_proj" in l.name and ".layers.0." in l.name}
    assert sum(tokens_seen.values()) == calib.numel() * 2  # every token reaches its top-2 experts


@pytest.mark.parametrize("family", sorted(MOE))
@pytest.mark.parametrize("method,sparsity", [("sparsegpt", "0.5"), ("wanda", "2:4"), ("admm", "4:8")])
def test_every_expert_ends_at_the_requested_sparsity(family, method, sparsity):
    model = moe_model(family)
    report = ptp.prune(model, tokens(4, 16), ptp.PruneConfig(method=method, sparsity=sparsity))
    spec = ptp.config.parse_sparsity(sparsity)
    slices = list(expert_slices(model))
    assert len(slices) == 2 * 2 * 4  # 2 blocks x (gate_up, down) x 4 experts
    for name, w in slices:
        if spec.is_nm:
            groups = (w == 0).reshape(w.shape[0], -1, spec.m).sum(-1)
            assert bool((groups >= spec.m - spec.n).all()), name
        else:
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1 / w.shape[1]), name
    assert {l.name for l in report.layers} >= {n for n, _ in slices}
    acc = report.accounting
    routers = [d for d in acc["dense"] if d["reason"] == "router"]
    assert routers and all(".gate." in d["name"] or "shared_expert_gate" in d["name"] for d in routers)
    # Everything in the blocks but routers and vectors is pruned, so the blocks are nearly 50% zeros.
    dense_in_blocks = sum(d["params"] for d in acc["dense"] if d["reason"] != "outside blocks")
    assert acc["blocks"]["zeros"] == acc["pruned"]["zeros"]
    assert acc["blocks"]["params"] == acc["pruned"]["params"] + dense_in_blocks
    assert acc["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_accounting_counted_by_hand():
    from tests.tiny import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, :5] = 0  # zeros outside the blocks count in the whole model
    report = ptp.prune(model, tokens(4, 16), ptp.PruneConfig(method="magnitude", sparsity="0.5",
                                                             skip=("layers.2.mlp.down_proj",)))
    linears = [m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    pruned = [m.weight for m in linears if m is not model.model.layers[2].mlp.down_proj]
    acc = report.accounting
    assert acc["pruned"]["params"] == sum(w.numel() for w in pruned)
    assert acc["pruned"]["zeros"] == sum(int((w == 0).sum()) for w in pruned)
    block_params = sum(p.numel() for p in model.model.layers.parameters())
    assert acc["blocks"]["params"] == block_params
    assert acc["blocks"]["zeros"] == sum(int((p == 0).sum()) for p in model.model.layers.parameters())
    assert acc["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert acc["model"]["zeros"] == acc["blocks"]["zeros"] + 5
    skipped = [d for d in acc["dense"] if d["reason"] == "skipped"]
    assert [d["name"] for d in skipped] == ["model.layers.2.mlp.down_proj.weight"]
    outside = {d["name"] for d in acc["dense"] if d["reason"] == "outside blocks"}
    assert outside == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_an_unrecognised_weight_is_refused_by_name_unless_skipped():
    model = moe_model("mixtral")
    model.model.layers[1].self_attn.register_parameter("mixer", nn.Parameter(torch.randn(8, 8)))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.mixer \[8, 8\]"):
        ptp.prune(model, tokens(2, 8), ptp.PruneConfig(method="magnitude"))
    report = ptp.prune(model, tokens(2, 8), ptp.PruneConfig(method="magnitude", skip=("self_attn.mixer",)))
    assert any(d["name"] == "model.layers.1.self_attn.mixer" and d["reason"] == "skipped"
               for d in report.accounting["dense"])
    # A 3-D stack in a module that receives no routing is not taken for experts either.
    model.model.layers[0].self_attn.register_parameter("stack", nn.Parameter(torch.randn(2, 4, 4)))
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.stack"):
        ptp.prune(model, tokens(2, 8), ptp.PruneConfig(method="magnitude", skip=("self_attn.mixer",)))


def test_an_expert_no_token_reaches_is_pruned_by_magnitude_with_a_warning(caplog):
    model = moe_model("mixtral")
    dense = model.model.layers[0].mlp.experts.down_proj.data[3].clone()
    for layer in model.model.layers:  # the routers never choose expert 3
        layer.mlp.gate.weight.data[3] = 0
        original = layer.mlp.gate.forward

        def no_three(x, original=original):
            logits, _, _ = original(x)
            logits = logits.clone()
            logits[:, 3] = -torch.inf
            scores, index = logits.softmax(-1).topk(2, dim=-1)
            return logits, scores / scores.sum(-1, keepdim=True), index

        layer.mlp.gate.forward = no_three
    with caplog.at_level(logging.WARNING, logger="ptp"):
        report = ptp.prune(model, tokens(4, 16), ptp.PruneConfig(method="sparsegpt", sparsity="0.5"))
    assert "model.layers.0.mlp.experts.down_proj.3 received no calibration tokens" in caplog.text
    layer = next(l for l in report.layers if l.name == "model.layers.0.mlp.experts.down_proj.3")
    assert layer.tokens == 0 and "magnitude" in layer.note
    expected, _ = magnitude(dense, ptp.config.parse_sparsity("0.5"))
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj.data[3], expected)


def test_true_sequential_is_refused_on_experts():
    with pytest.raises(ConfigError, match="true_sequential"):
        ptp.prune(moe_model("qwen3_moe"), tokens(2, 8), ptp.PruneConfig(true_sequential=True))


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_save_reload_verify_a_pruned_moe_model(fmt, tmp_path):
    model = moe_model("qwen2_moe")
    report = ptp.prune(model, tokens(4, 16), ptp.PruneConfig(method="wanda", sparsity="2:4"))
    record = ptp.save(model, None, tmp_path / "out", report=report, sparsity="2:4", format=fmt)
    reloaded = ptp.load(tmp_path / "out")
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    saved = json.loads((tmp_path / "out" / "ptp.json").read_text())
    assert saved["report"]["accounting"]["pruned"]["sparsity"] == pytest.approx(0.5)
    if fmt == "compressed":
        assert record["compression"]["pruned_weights_ratio"] < 0.6  # the expert stacks were compressed too


def fused_checkpoint(model, folder: Path) -> Path:
    """The model saved under its in-memory names (experts fused), as recent MoE checkpoints are."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_stream_equals_in_memory_on_moe(tmp_path):
    model = moe_model("mixtral")
    source = fused_checkpoint(model, tmp_path / "src")
    config, calib = ptp.PruneConfig(method="sparsegpt", sparsity="0.5", batch_size=2), tokens(4, 16)
    report = scale.prune_streaming(source, calib, config, tmp_path / "stream")
    in_memory = moe_model("mixtral")
    expected = ptp.prune(in_memory, calib, config)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    for key, tensor in in_memory.state_dict().items():
        assert torch.equal(streamed.state_dict()[key], tensor), key
    assert report.accounting["pruned"] == expected.accounting["pruned"]
    assert report.accounting["model"] == expected.accounting["model"]


def test_stream_refuses_a_per_expert_checkpoint_in_one_line(tmp_path):
    moe_model("mixtral").save_pretrained(tmp_path / "legacy")  # transformers writes experts.N.w1 ...
    with pytest.raises(ConfigError, match="--stream reads checkpoints whose tensor names are the model's own"):
        scale.Stream(tmp_path / "legacy", tmp_path / "out", ptp.PruneConfig())


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = moe_model("qwen2_moe")
        scale.prune_distributed(model, tokens(6, 16), ptp.PruneConfig(method="sparsegpt", sparsity="2:4",
                                                                       batch_size=3))
        torch.save(model.state_dict(), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_weights_of_one_process_on_moe(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model = moe_model("qwen2_moe")
    ptp.prune(model, tokens(6, 16), ptp.PruneConfig(method="sparsegpt", sparsity="2:4", batch_size=3))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, weight in model.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], weight), f"{key} differs from one process's"
