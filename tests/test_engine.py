"""The engine end to end on tiny random models of four families, against a brute-force driver."""

import time

import pytest
import torch

import ptp
from ptp.config import ConfigError
from ptp.engine import find_blocks, input_groups, is_linear, weight_matrix
from ptp.solvers import Hessian, InputNorms, magnitude, sparsegpt, wanda

from .tiny import tiny_model, tokens

FAMILIES = ["llama", "qwen2", "opt", "gpt2"]


def block_linears(model):
    name, blocks = find_blocks(model)
    return {
        f"{name}.{i}.{n}": m for i, block in enumerate(blocks) for n, m in block.named_modules() if is_linear(m)
    }


def reference_prune(model, calib, method, spec, groups_of=None):
    """The obvious, slow driver: for each block (and each group of layers in it, if given), run the
    *whole* model on all calibration tokens with hooks on that block's layers, then prune them.

    Blocks before it are already pruned and blocks after it are still dense, so this gives exactly
    the statistics a block-by-block engine must see, with no block-input capture or replay at all.
    """
    spec = ptp.parse_sparsity(spec)
    _, blocks = find_blocks(model)
    for block in blocks:
        layers = {n: m for n, m in block.named_modules() if is_linear(m)}
        for group in groups_of(layers) if groups_of else [list(layers)]:
            inputs = {n: [] for n in group}
            hooks = [layers[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n in group]
            with torch.no_grad():
                model(input_ids=calib, use_cache=False)
            for h in hooks:
                h.remove()
            for n in group:
                x = torch.cat(inputs[n]).reshape(-1, inputs[n][0].shape[-1]).float()
                w = weight_matrix(layers[n])
                if method == "magnitude":
                    pruned = magnitude(w.data, spec)[0]
                elif method == "wanda":
                    pruned = wanda(w.data, x.norm(dim=0), spec)[0]
                else:
                    hessian = Hessian(x.shape[1])
                    hessian.add(x)
                    pruned = sparsegpt(w.data, hessian.hessian, spec)[0]
                with torch.no_grad():
                    w.copy_(pruned)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_engine_matches_brute_force_driver(family, method):
    calib = tokens(8, 48)  # more tokens than the widest layer input: a well-conditioned Hessian
    model, reference = tiny_model(family), tiny_model(family)
    report = ptp.prune(model, calib, ptp.PruneConfig(method=method, sparsity="0.5", batch_size=4))
    reference_prune(reference, calib, method, "0.5")
    ours, theirs = block_linears(model), block_linears(reference)
    assert sorted(ours) == sorted(layer.name for layer in report.layers)
    for name in ours:
        assert_same_prune(weight_matrix(ours[name]).detach(), weight_matrix(theirs[name]).detach(), name)


def assert_same_prune(a, b, name):
    """Same masks and weights, up to float noise: the engine replays blocks in batches while the
    reference runs the whole model, so a near-tie may flip (seen: 2 of 16384 entries)."""
    flips = int(((a == 0) != (b == 0)).sum())
    assert flips <= a.numel() // 1000, f"{name}: {flips} mask entries differ"
    assert float((a - b).norm() / b.norm()) < 1e-2, name


def test_true_sequential_matches_brute_force_driver():
    calib = tokens(8, 48)
    model, reference = tiny_model("llama"), tiny_model("llama")
    config = ptp.PruneConfig(method="sparsegpt", sparsity="2:4", true_sequential=True, batch_size=3)
    ptp.prune(model, calib, config)
    order = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
             ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    reference_prune(reference, calib, "sparsegpt", "2:4", groups_of=lambda layers: order)
    ours, theirs = block_linears(model), block_linears(reference)
    for name in ours:
        assert_same_prune(weight_matrix(ours[name]).detach(), weight_matrix(theirs[name]).detach(), name)
    # And it is not the same as the non-sequential prune (o_proj sees pruned q, k, v).
    other = tiny_model("llama")
    ptp.prune(other, calib, ptp.PruneConfig(method="sparsegpt", sparsity="2:4"))
    name = "model.layers.1.self_attn.o_proj"
    assert not torch.allclose(block_linears(other)[name].weight, ours[name].weight, atol=1e-4)


def test_input_groups_follow_shared_inputs():
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    from ptp.engine import capture_block_inputs, linear_layers

    hidden, kwargs = capture_block_inputs(model, blocks, tokens(2, 16), 2, torch.device("cpu"))
    groups = input_groups(blocks[0], linear_layers(blocks[0], "b", ()), hidden, kwargs)
    assert groups == [["b.self_attn.q_proj", "b.self_attn.k_proj", "b.self_attn.v_proj"], ["b.self_attn.o_proj"],
                      ["b.mlp.gate_proj", "b.mlp.up_proj"], ["b.mlp.down_proj"]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,spec", [("magnitude", "0.5"), ("wanda", "2:4"), ("sparsegpt", "4:8"),
                                         ("sparsegpt", "0.7")])
def test_every_family_and_dtype(family, dtype, method, spec):
    model = tiny_model(family, dtype)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = ptp.prune(model, tokens(4, 16), ptp.PruneConfig(method=method, sparsity=spec, batch_size=3))
    sparsity = ptp.parse_sparsity(spec)
    linears = block_linears(model)
    assert len(report.layers) == len(linears) > 0
    for name, layer in linears.items():
        w = weight_matrix(layer)
        assert w.dtype == dtype
        if sparsity.is_nm:
            kept = (w != 0).reshape(w.shape[0], -1, sparsity.m).sum(-1)
            assert (kept <= sparsity.n).all(), name
        zeros = float((w == 0).float().mean())
        assert zeros == pytest.approx(sparsity.ratio, abs=0.02), name
    pruned_names = {f"{n}.weight" for n in linears}
    for name, p in model.named_parameters():  # embeddings, norms, head and biases untouched
        if name not in pruned_names:
            assert torch.equal(p, before[name]), name
    assert torch.isfinite(model(tokens(1, 8)).logits).all()
    assert report.mean_sparsity == pytest.approx(sparsity.ratio, abs=0.02)
    assert all(0 <= layer.error < 1.5 for layer in report.layers)


def test_report_errors_order_and_dict():
    calib = tokens(8, 24)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        report = ptp.prune(tiny_model("llama"), calib, ptp.PruneConfig(method=method, sparsity="0.5"))
        errors[method] = sum(layer.error for layer in report.layers)
        d = report.to_dict()
        assert d["method"] == method and d["sparsity"] == "0.5" and len(d["layers"]) == 21
        assert d["wall_time_s"] > 0
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_batches_as_list_and_batch_size_do_not_change_result():
    calib = tokens(6, 48)
    a, b = tiny_model(), tiny_model()
    ptp.prune(a, calib, ptp.PruneConfig(method="sparsegpt", sparsity="2:4", batch_size=6))
    ptp.prune(b, [row[None] for row in calib], ptp.PruneConfig(method="sparsegpt", sparsity="2:4", batch_size=1))
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert_same_prune(x.detach(), y.detach(), name)


def test_deterministic():
    calib = tokens(4, 16)
    a, b = tiny_model(), tiny_model()
    for m in (a, b):
        ptp.prune(m, calib, ptp.PruneConfig(method="sparsegpt", sparsity="0.5"))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_skip_layers_and_blocks():
    model = tiny_model()
    dense = {n: p.clone() for n, p in model.named_parameters()}
    report = ptp.prune(model, tokens(4, 16), ptp.PruneConfig(method="wanda", skip=("down_proj", "layers.1")))
    names = [layer.name for layer in report.layers]
    assert not any("down_proj" in n or ".layers.1." in n for n in names)
    assert "model.layers.0.mlp.up_proj" in names and "model.layers.2.self_attn.q_proj" in names
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, dense["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, dense["model.layers.1.self_attn.q_proj.weight"])
    # "layers.1" must not match "layers.10"-style names by prefix: segments are matched whole.
    assert ptp.engine.skipped("model.layers.10.mlp", ("layers.1",)) is False


def test_bad_inputs_raise_config_error():
    model = tiny_model()
    with pytest.raises(ConfigError, match="no prunable layer has a number of inputs that is a multiple of M=3"):
        ptp.prune(model, tokens(2, 8), ptp.PruneConfig(method="wanda", sparsity="2:3"))
    with pytest.raises(ConfigError, match="no decoder blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="no module"):
        find_blocks(model, "model.blocks")
    with pytest.raises(ConfigError, match="unknown method"):
        ptp.PruneConfig(method="random")
    # Nothing was pruned by the refused call.
    assert all((layer.weight != 0).all() for layer in block_linears(model).values())


def test_explicit_blocks_path():
    model = tiny_model("opt")
    assert find_blocks(model)[0] == "model.decoder.layers"
    assert find_blocks(model, "model.decoder.layers")[1] is model.model.decoder.layers


def count_block_calls(model, config, calib):
    _, blocks = find_blocks(model)
    calls = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    ptp.prune(model, calib, config)
    for h in hooks:
        h.remove()
    return [calls.count(i) for i in range(len(blocks))]


def test_passes_over_the_data():
    calib = tokens(6, 16)  # 3 batches of 2
    # Block 0 is also entered once per batch while its inputs are captured; +1 is the probe
    # that finds which layers share an input.
    seq = count_block_calls(tiny_model(), ptp.PruneConfig(true_sequential=True, batch_size=2), calib)
    assert seq == [3 + 1 + 3, 1 + 3, 1 + 3]
    default = count_block_calls(tiny_model(), ptp.PruneConfig(batch_size=2), calib)
    assert default == [3 + 1 + 6, 1 + 6, 1 + 6]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_statistics_pass_stops_at_the_last_layers_input(family):
    """The last layer of each block (down_proj / fc2) runs only in the output pass, not in the
    statistics pass, and the result is still the brute-force driver's (which runs blocks in full)."""
    calib = tokens(8, 48)
    model, reference = tiny_model(family), tiny_model(family)
    _, blocks = find_blocks(model)
    calls = []
    for block in blocks:
        last = [m for m in block.modules() if is_linear(m)][-1]
        last.register_forward_hook(lambda m, a, o: calls.append(1))
    ptp.prune(model, calib, ptp.PruneConfig(method="sparsegpt", sparsity="0.5", batch_size=4))
    assert len(calls) == len(blocks) * (1 + 2)  # the probe, then 2 batches of outputs; none for statistics
    reference_prune(reference, calib, "sparsegpt", "0.5")
    theirs = block_linears(reference)
    for name, layer in block_linears(model).items():
        assert_same_prune(weight_matrix(layer).detach(), weight_matrix(theirs[name]).detach(), name)


def test_lockstep_propagates_errors_and_stops_threads():
    import threading

    from ptp.engine import Lockstep

    before = threading.active_count()
    lockstep = Lockstep(3)
    seen = []

    def work(b):
        seen.append((b, "a"))
        lockstep.pause("a")
        seen.append((b, "b"))
        if b == 1:
            raise ValueError("boom")
        lockstep.pause("b")

    barriers = []
    with pytest.raises(ValueError, match="boom"):
        lockstep.run(work, barriers.append)
    assert barriers == ["a"]
    assert seen[:4] == [(0, "a"), (1, "a"), (2, "a"), (0, "b")]
    time.sleep(0.1)
    assert threading.active_count() == before


def test_solver_failure_mid_block_leaves_no_threads_running(monkeypatch):
    import threading

    import ptp.engine

    def failing_solve(weight, stats, config, sparsity):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(ptp.engine, "solve", failing_solve)
    with pytest.raises(torch.linalg.LinAlgError, match="simulated"):
        ptp.prune(tiny_model(), tokens(4, 8), ptp.PruneConfig(true_sequential=True, batch_size=1))
    time.sleep(0.1)
    # Only the batches' threads count: tqdm may start a monitor thread of its own.
    assert not [t for t in threading.enumerate() if t.name.startswith("ptp-lockstep")]
