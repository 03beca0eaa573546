"""Throughput measurement on tiny models: the workloads are real, interleaved and counted right."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ptp import bench
from tests.lm_dirs import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin

SMALL = dict(prefill_shapes=((1, 8), (2, 16)), decode_batches=(1, 2), prompt_len=4, new_tokens=3, warmup=1, repeats=3)


def tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def count_calls(model, name, log):
    """Record (name, tokens per sequence) for every forward of ``model``."""
    model.register_forward_pre_hook(lambda m, args, kw: log.append((name, kw["input_ids"].shape[1])), with_kwargs=True)


def test_decode_steps_is_greedy_generation_with_kv_cache():
    model = tiny(0)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    log = []
    run = bench.decode_steps(model, prompt, new_tokens=6)
    count_calls(model, "m", log)
    with torch.no_grad():
        got = run()
    steps = list(log)
    ref = model.generate(prompt, max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(got, ref)
    assert steps == [("m", 1)] * 6  # one token per step: the cache is used, the prompt is not re-run


def test_measurements_interleave_models_and_count_tokens(monkeypatch):
    dense, pruned = tiny(0), tiny(1)
    log = []
    count_calls(dense, "dense", log), count_calls(pruned, "pruned", log)
    seconds = iter(range(1, 100))  # fake clock: each timed call "takes" 1, 2, 3, ... seconds
    monkeypatch.setattr(bench, "timed", lambda run, dev, mem: (run(), (float(next(seconds)), 0))[1])
    ms = bench.measure({"dense": dense, "pruned": pruned}, "prefill", 2, 16, bench.prefill_step, 16,
                       warmup=1, repeats=3)
    # warm-up each once, then dense, pruned, dense, pruned, dense, pruned
    assert [n for n, _ in log] == ["dense", "pruned"] + ["dense", "pruned"] * 3
    d, p = ms
    assert d.seconds == [1, 3, 5] and p.seconds == [2, 4, 6]
    assert d.tokens_per_s == pytest.approx(2 * 16 / 3) and p.tokens_per_s == pytest.approx(2 * 16 / 4)


def test_throughput_report_covers_every_shape_and_says_cpu_gains_nothing():
    dense, pruned = tiny(0), tiny(0)
    with torch.no_grad():
        for layer in pruned.model.layers:
            layer.mlp.up_proj.weight[:, ::2] = 0
    report = bench.throughput({"dense": dense, "pruned": pruned}, **SMALL)
    cells = {(m.model, m.kind, m.batch, m.length) for m in report.measurements}
    expected = {(n, "prefill", 1, 8) for n in ("dense", "pruned")} | {(n, "prefill", 2, 16) for n in ("dense", "pruned")}
    expected |= {(n, "decode", b, 3) for n in ("dense", "pruned") for b in (1, 2)}
    assert cells == expected
    assert all(m.tokens_per_s > 0 and len(m.seconds) == 3 for m in report.measurements)
    tensors = list(dense.parameters()) + list(dense.buffers())
    assert report.weights_bytes["dense"] == sum(t.numel() * t.element_size() for t in tensors)
    text = report.markdown()
    assert "pruned / dense" in text and "| decode | 2 | 3 |" in text
    assert "does not make this model faster on CPU" in text
    assert bench.semi_structured_copy(pruned) == (None, "2:4 kernels need CUDA")
    assert report.to_dict()["measurements"][0]["kind"] == "prefill"


def test_smaller_model_gets_the_shapes_note_not_the_zeros_note():
    dense = tiny(0)
    cfg = dense.config.to_dict() | {"intermediate_size": 32}
    smaller = LlamaForCausalLM(type(dense.config).from_dict(cfg)).eval()
    text = bench.throughput({"dense": dense, "pruned": smaller}, **SMALL).markdown()
    assert "models differ in size" in text and "does not make this model faster" not in text


def test_is_two_four():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 0, 0, 0, 5, 0, 0, 6]])
    assert bench.is_two_four(w)
    w[0, 1] = 7  # three nonzeros in the first group
    assert not bench.is_two_four(w)
    assert not bench.is_two_four(torch.ones(2, 6))  # width not a multiple of 4


def test_cpu_peak_memory_sees_an_allocation():
    memory = bench.PeakMemory(torch.device("cpu"))
    memory.start()
    if memory.base is None:
        pytest.skip("peak RSS cannot be reset here (/proc/self/clear_refs)")
    x = torch.ones(16 * 2**20)  # 64 MiB, touched
    peak = memory.peak()
    del x
    assert peak >= 60 * 2**20


def test_cpu_peak_memory_is_the_process_peak_not_zero_after_warm_up():
    """Issue 16: after warm-up the allocator reuses its memory, and a peak *above* the start read
    0 MiB for every model; the column now holds the process's peak RSS during each run."""
    memory = bench.PeakMemory(torch.device("cpu"))
    x = torch.ones(16 * 2**20)  # 64 MiB held by the process throughout
    memory.start()
    if memory.base is None:
        pytest.skip("peak RSS cannot be reset here (/proc/self/clear_refs)")
    y = x * 2  # a run whose working memory the process already had room for, or not: either way
    peak = memory.peak()
    del x, y
    assert peak >= 60 * 2**20
