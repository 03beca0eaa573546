"""The sparse runtime: packed format, every kernel variant against x @ W.T, SparseLinear, the
converter, loading a compressed checkpoint straight into the packed form, and the fallbacks."""

from __future__ import annotations

import ast
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ptp
from ptp.config import ConfigError
from ptp.sparse import SparseLinear, format as F, kernels as K, sparsify
from ptp.sparse.module import DenseLinear, SparseExperts
from tests.lm_dirs import REPO, run_python, tiny_model, tiny_tokenizer

PATTERNS = ["0.3", "0.5", "0.7", "2:4", "4:8"]
ISAS = ["scalar", "avx2", "avx512", "amx"]
# Odd shapes: rows not a multiple of the 16-row tile, inputs not of the 2-column pair nor of a
# 16-word group, and one shape with several groups and tiles; and one whose inputs fill whole
# groups (64), which the kernels read in place instead of from a zero-padded copy.
SHAPES = [(1, 3), (17, 33), (40, 70), (100, 257), (48, 64)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

needs_kernels = pytest.mark.skipif(K.library() is None, reason="no C++ compiler: the sparse kernels cannot be built")


def pruned_weight(shape, pattern: str, dtype=torch.float32, seed=0) -> torch.Tensor:
    """A random weight with the pattern's smallest-|w| entries zeroed (N:M along the inputs;
    the N:M shapes get inputs padded to a multiple of M)."""
    g = torch.Generator().manual_seed(seed)
    out, inp = shape
    sparsity = ptp.parse_sparsity(pattern)
    if sparsity.is_nm:
        inp = -(-inp // sparsity.m) * sparsity.m
    w = torch.randn(out, inp, generator=g)
    if sparsity.is_nm:
        groups = w.reshape(out, -1, sparsity.m)
        drop = groups.abs().argsort(-1)[..., : sparsity.m - sparsity.n]
        w = groups.scatter(-1, drop, 0.0).reshape(out, inp)
    else:
        k = int(sparsity.ratio * w.numel())
        w.reshape(-1)[w.abs().reshape(-1).argsort()[:k]] = 0.0
    return w.to(dtype)


def isa_env(monkeypatch, isa: str) -> None:
    """Force a kernel variant through the environment variable, skipping what cannot run here."""
    if isa != "torch" and not K.supported(isa):
        pytest.skip(f"this CPU or build cannot run the {isa} kernels")
    monkeypatch.setenv("PTP_SPARSE_ISA", isa)


def reference(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y + bias.double() if bias is not None else y


# --------------------------------------------------------------------------- format


def test_layout_of_a_hand_packed_weight():
    # rows 0-1 of tile 0; word 0 = columns 0-1, word 1 = column 2. Bit 2*row + col.
    w = torch.tensor([[1.0, 0.0, 3.0], [0.0, 5.0, 6.0]])
    p = F.pack(w)
    assert p.masks.shape == (1, 16) and p.offsets.tolist() == [0, 4]
    assert p.masks[0, :3].tolist() == [0b1001, 0b0101, 0]  # (r0,c0),(r1,c1) | (r0,c0),(r1,c0)
    assert p.values[:4].tolist() == [1.0, 5.0, 3.0, 6.0]
    assert p.values.numel() == 4 + F.PAD and not p.values[4:].any()


def test_offsets_index_every_group():
    w = pruned_weight((33, 100), "0.5")  # 2 tiles x 64 words = 4 groups per tile
    p = F.pack(w)
    keep = F.keep_mask(p)
    assert torch.equal(keep, w != 0)
    per_group = [int(keep[16 * t:16 * t + 16, 32 * g:32 * g + 32].sum()) for t in range(3) for g in range(4)]
    assert p.offsets.tolist() == [0] + torch.tensor(per_group).cumsum(0).tolist()


@pytest.mark.parametrize("dtype", F.DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_pack_round_trip_is_bit_exact(dtype, pattern):
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    for shape in SHAPES:
        w = pruned_weight(shape, pattern, dtype)
        w.reshape(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1e-40 if dtype == torch.float32 else 1e-7])
        p = F.pack(w)
        F.validate(p, tuple(w.shape))
        assert p.nnz == int((w != 0).sum())
        assert torch.equal(F.unpack(p).view(ints), w.view(ints))
    # An explicit mask keeps what it says, signed zeros included.
    w = pruned_weight((20, 30), pattern, dtype)
    w[0, 0] = -0.0
    keep = w != 0
    keep[0, 0] = True
    p = F.pack(w, keep)
    assert torch.equal(F.unpack(p).view(ints), w.view(ints)) and torch.equal(F.keep_mask(p), keep)


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_pack_compressed_equals_pack(pattern):
    from ptp import io

    w = pruned_weight((300, 64), pattern, torch.bfloat16)  # > CHUNK_ROWS rows
    nm = (2, 4) if pattern == "2:4" else None
    values, bits = io.compress_weight(w, nm)
    a, b = F.pack_compressed(values, bits, tuple(w.shape)), F.pack(w, torch.from_numpy(
        __import__("numpy").unpackbits(bits.numpy(), count=w.numel()).astype(bool)).reshape(w.shape))
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))
    assert torch.equal(F.unpack(a), w)


def test_corrupt_or_mismatched_packed_weights_are_refused():
    p = F.pack(pruned_weight((20, 30), "0.5"))

    def bad(**change):
        t = {**p.tensors(), **change}
        return F.PackedWeight(change.pop("shape", p.shape), t["masks"], t["offsets"], t["values"])

    outside = p.masks.clone()
    outside[1, 0] |= 1 << 31  # row 31 of a 20-row weight
    flipped = p.masks.clone()
    flipped[0, 0] ^= 1  # one bit more or less: the offsets no longer agree
    cases = {
        "outside": bad(masks=outside),
        "offsets disagree": bad(masks=flipped),
        "values stored": bad(values=p.values[:-1]),
        "masks must be int32": bad(masks=p.masks[:, :-1]),
        "offsets must be int64": bad(offsets=p.offsets.int()),
        "values must be": bad(values=p.values.double()),
    }
    for message, packed in cases.items():
        with pytest.raises(ConfigError, match=message):
            SparseLinear(packed)
    with pytest.raises(ConfigError, match="does not match the layer"):
        F.validate(p, (30, 20))
    values, bits = ptp.io.compress_weight(pruned_weight((20, 30), "0.5"))
    with pytest.raises(ConfigError, match="values but its mask keeps"):
        F.pack_compressed(values[:-1], bits, (20, 30))
    with pytest.raises(ConfigError, match="compressed mask holds"):
        F.pack_compressed(values, bits, (20, 31))


# --------------------------------------------------------------------------- kernels


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", F.DTYPES)
def test_every_kernel_matches_x_at_w_t(monkeypatch, isa, dtype):
    """Every pattern, odd shape, bias or not, 1-16 tokens (small-batch path) and 40 (prefill),
    through the env var: within float32 rounding of the fp64 product of the same numbers."""
    isa_env(monkeypatch, isa)
    g = torch.Generator().manual_seed(1)
    for pattern in PATTERNS:
        for shape in SHAPES:
            w = pruned_weight(shape, pattern, dtype)
            p = F.pack(w)
            bias = torch.randn(shape[0], generator=g)
            for i, tokens in enumerate((1, 2, 3, 16, 40)):  # 16: the largest small batch; 40: prefill
                x = torch.randn(tokens, w.shape[1], generator=g)
                for b in (None, bias):
                    y = K.matmul(p, x, b, threads=1 + i % 2)
                    bound = 1e-5 * (x.abs().double() @ w.abs().double().T + 1)
                    assert y.dtype == torch.float32 and y.shape == (tokens, shape[0])
                    assert ((y.double() - reference(x, w, b)).abs() <= bound).all(), (pattern, shape, tokens)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_bf16_activations_with_bf16_values(monkeypatch, isa):
    """bf16 in, bf16 out (vdpbf16ps on AVX512_BF16 CPUs, widened to fp32 elsewhere; prefill:
    torch's bf16 GEMM on the unpacked block): within bf16 rounding of the fp64 product."""
    isa_env(monkeypatch, isa)
    g = torch.Generator().manual_seed(2)
    for pattern in PATTERNS:
        for shape in SHAPES:
            w = pruned_weight(shape, pattern, torch.bfloat16)
            p = F.pack(w)
            bias = torch.randn(shape[0], generator=g)
            for tokens in (1, 3, 16, 17, 40):
                x = torch.randn(tokens, w.shape[1], generator=g).bfloat16()
                for b in (None, bias):
                    y = K.matmul(p, x, b)
                    want = reference(x, w, b)
                    bound = 2 ** -7 * want.abs() + 1e-2 * (x.abs().double() @ w.abs().double().T + 1) / w.shape[1] ** 0.5
                    assert y.dtype == torch.bfloat16 and y.shape == (tokens, shape[0])
                    assert ((y.double() - want).abs() <= bound).all(), (pattern, shape, tokens)


@needs_kernels
def test_the_decode_fast_path_follows_replaced_buffers():
    """The bound call is used only while the buffers are the ones it was bound to: new packed
    tensors (another weight), or a dtype change, take effect at the next call."""
    a, b = pruned_weight((40, 64), "0.5", seed=1), pruned_weight((40, 64), "2:4", seed=2)
    layer = SparseLinear(F.pack(a))
    x = torch.randn(1, 3, 64)
    assert torch.allclose(layer(x), x @ a.T, atol=1e-5)
    other = F.pack(b)
    layer.masks, layer.offsets, layer.values = other.masks, other.offsets, other.values
    assert torch.allclose(layer(x), x @ b.T, atol=1e-5)
    layer.to(torch.bfloat16)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x.bfloat16().float() @ b.bfloat16().float().T, rtol=2e-2, atol=2e-2)


@needs_kernels
def test_a_copy_of_a_used_layer_binds_its_own_call():
    """The decode fast path binds raw data pointers: a deepcopy or a pickled copy of a layer
    that has run must not carry them (the original freed, its memory reused)."""
    import gc
    import io

    lin = torch.nn.Linear(64, 40)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    layer = SparseLinear.from_linear(lin)
    x = torch.randn(1, 64)
    want = layer(x)
    copied = copy.deepcopy(layer)
    buf = io.BytesIO()
    torch.save(layer, buf)
    del layer
    gc.collect()
    noise = [torch.randn(256, 256) for _ in range(8)]  # reuse the freed memory
    buf.seek(0)
    for other in (copied, torch.load(buf, weights_only=False)):
        assert torch.equal(other(x), want)
    assert noise


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512", "amx"])
def test_bf16_prefill_over_several_input_chunks(monkeypatch, isa):
    """Inputs past the AMX prefill's 4096-input chunk (partial sums held between chunks), rows
    that end mid-pair of tiles, token counts around the 32-token blocks: against fp64, and the
    dense-weight loop against the same weights."""
    isa_env(monkeypatch, isa)
    g = torch.Generator().manual_seed(5)
    for pattern, shape in (("0.5", (40, 4200)), ("2:4", (50, 8200))):
        w = pruned_weight(shape, pattern, torch.bfloat16)
        p = F.pack(w)
        bias = torch.randn(shape[0], generator=g)
        for tokens in (31, 33, 64):
            x = torch.randn(tokens, w.shape[1], generator=g).bfloat16()
            want = reference(x, w, bias)
            y = K.matmul(p, x, bias)
            assert y.dtype == torch.bfloat16
            assert ((y.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-3 * (x.abs().double() @ w.abs().double().T) / 64).all()
        dense = K.dense_bf16_matmul(F.pack_dense(w), tuple(w.shape), x)
        assert ((dense.double() - reference(x, w)).abs() <= 1e-5 * (x.abs().double() @ w.abs().double().T)).all()


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_simd_variants_agree_with_the_scalar_reference(monkeypatch, isa):
    isa_env(monkeypatch, isa)
    for dtype in F.DTYPES:
        w = pruned_weight((70, 130), "0.6", dtype, seed=3)
        p = F.pack(w)
        x = torch.randn(5, 130)
        assert torch.allclose(K.matmul(p, x), K.matmul(p, x, isa="scalar"), rtol=1e-5, atol=1e-5)
        if dtype == torch.bfloat16:  # bf16 activations: vdpbf16ps, or AMX tiles for 2 tokens and more
            for xb in (x[:1].bfloat16(), x.bfloat16(), torch.randn(40, 130).bfloat16()):
                got, want = K.matmul(p, xb).double(), K.matmul(p, xb, isa="scalar").double()
                assert ((got - want).abs() <= 2 ** -7 * want.abs() + 1e-4).all()
        # The prefill path unpacks tiles into dense fp32 rows: exact copies of the values.
        assert torch.equal(K.unpack_block(p, 1, 5)[:54], w[16:70].float())
        assert not K.unpack_block(p, 4, 5)[6:].any()
        if dtype == torch.bfloat16 and isa != "avx2":  # the bf16 rows for torch's bf16 GEMM
            assert torch.equal(K.unpack_block(p, 1, 5, dtype=torch.bfloat16)[:54], w[16:70])
        elif dtype == torch.bfloat16:
            with pytest.raises(RuntimeError, match="bf16 block"):
                K.unpack_block(p, 1, 5, dtype=torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_dense_bf16_kernel_is_the_same_loop_without_the_mask(monkeypatch, isa):
    isa_env(monkeypatch, isa)
    w = torch.randn(50, 77).bfloat16()
    for tokens in (1, 2, 5, 16):
        for x in (torch.randn(tokens, 77), torch.randn(tokens, 77).bfloat16()):  # bf16 x: the vdpbf16ps loop
            y = K.dense_bf16_matmul(F.pack_dense(w), tuple(w.shape), x)
            assert ((y.double() - reference(x, w)).abs() <= 1e-5 * (x.abs().double() @ w.abs().double().T)).all()


def test_unknown_or_unsupported_isa_is_refused(monkeypatch):
    monkeypatch.setenv("PTP_SPARSE_ISA", "sse9")
    with pytest.raises(ConfigError, match="PTP_SPARSE_ISA"):
        K.selected_isa()


# --------------------------------------------------------------------------- SparseLinear


@pytest.mark.parametrize("isa", ISAS + ["torch"])
@pytest.mark.parametrize("dtype", F.DTYPES)
def test_sparse_linear_is_a_drop_in_linear(monkeypatch, isa, dtype):
    if isa != "torch" and K.library() is None:
        pytest.skip("no C++ compiler")
    isa_env(monkeypatch, isa)
    linear = torch.nn.Linear(68, 33).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(pruned_weight((33, 68), "2:4", dtype))
    sparse = SparseLinear.from_linear(linear)
    for lead in ((), (3,), (2, 5), (2, 20)):
        x = torch.randn(*lead, 68).to(dtype)
        y = sparse(x)
        want = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        assert y.dtype == dtype and y.shape == (*lead, 33)
        assert torch.allclose(y.float(), want, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(sparse.dense_weight(), linear.weight.detach())
    assert "sparsity=0.500" in repr(sparse)


@needs_kernels
@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_converted_tiny_llama_generates_the_same_greedy_tokens(pattern):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, intermediate=96)
    calib = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    ptp.prune(model, calib, ptp.PruneConfig(method="magnitude", sparsity=pattern))
    ids = calib[:1, :8]
    dense_tokens = model.generate(ids, max_new_tokens=16, do_sample=False)
    dense_logits = model(calib).logits
    names = sparsify(model)
    assert len(names) == 14 and isinstance(model.model.layers[1].mlp.down_proj, SparseLinear)
    # Tied to the embeddings, the head stays dense — on ptp's GEMV, holding the very same tensor.
    assert isinstance(model.lm_head, DenseLinear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False), dense_tokens)
    assert torch.allclose(model(calib).logits, dense_logits, atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_dense_gemv_agrees_with_the_reference_and_torch(monkeypatch, isa):
    isa_env(monkeypatch, isa)
    torch.manual_seed(0)
    for out, inp in [*SHAPES, (6, 16), (9, 576)]:  # rows not a multiple of the 4-row block, odd tails
        w, b = torch.randn(out, inp), torch.randn(out)
        for tokens in (1, 2, 5, 16):
            x = torch.randn(tokens, inp)
            for bias in (None, b):
                y = K.dense_linear(w, x, bias)
                want = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
                assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5 * inp ** 0.5), (isa, out, inp, tokens)
                assert torch.allclose(y, K.dense_linear(w, x, bias, isa="scalar"), rtol=1e-5, atol=1e-5 * inp ** 0.5)


@needs_kernels
def test_dense_head_uses_torch_above_the_small_batch_and_under_autograd():
    layer = torch.nn.Linear(40, 24)
    head = DenseLinear(layer)
    x = torch.randn(K.SMALL_BATCH + 1, 40)
    assert torch.equal(head(x), layer(x))  # prefill: torch's own call, bit for bit
    y = head(x[:1])
    y.sum().backward()  # gradients on: F.linear, so they reach the shared weight
    assert layer.weight.grad is not None
    with torch.no_grad():
        assert torch.allclose(head(x[:3]), layer(x[:3]), atol=1e-5)
    with pytest.raises(ValueError, match="contiguous fp32"):
        K.dense_linear(layer.weight.detach().bfloat16(), x[:1])


# --------------------------------------------------------------------------- loading


def save_pruned(tmp_path, fmt="compressed", hidden=64, intermediate=128, layers=2, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    calib = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    report = ptp.prune(model, calib, ptp.PruneConfig(method="magnitude", sparsity="2:4"))
    out = tmp_path / fmt
    ptp.save(model, tokenizer, out, report=report, sparsity="2:4", format=fmt)
    return model, out


@needs_kernels
@pytest.mark.parametrize("fmt", ["compressed", "dense"])
def test_load_with_the_sparse_runtime(tmp_path, fmt):
    model, folder = save_pruned(tmp_path, fmt)
    sparse = ptp.load(folder, runtime="sparse")
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 14
    assert sparse.lm_head.weight.data_ptr() == sparse.get_input_embeddings().weight.data_ptr()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sparse(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    dense, _ = ptp.load_model(str(folder), runtime="sparse")
    assert isinstance(dense.model.layers[0].self_attn.q_proj, SparseLinear)
    with pytest.raises(ConfigError, match="unknown runtime"):
        ptp.load(folder, runtime="fast")


@needs_kernels
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_a_pruned_moe_model_runs_its_expert_stacks_packed(family, tmp_path):
    """Every fused expert stack goes onto the runtime (in memory, and straight from a compressed
    checkpoint), holds the pruned stack bit for bit, and the model generates the dense-zero
    model's greedy tokens."""
    from tests.test_moe import moe_model
    from tests.tiny import tokens

    model = moe_model(family)
    report = ptp.prune(model, tokens(4, 16), ptp.PruneConfig(method="wanda", sparsity="2:4"))
    ptp.save(model, None, tmp_path / "out", report=report, sparsity="2:4", format="compressed")
    in_memory = copy.deepcopy(model)
    names = sparsify(in_memory)
    stacks = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert stacks and set(stacks) <= set(names)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    for runtime in (in_memory, ptp.load(tmp_path / "out", runtime="sparse")):
        assert not [n for n, p in runtime.named_parameters() if p.dim() == 3]  # no dense stack left behind
        for name, stack in stacks.items():
            packed = runtime.get_submodule(name)
            assert isinstance(packed, SparseExperts) and torch.equal(packed.dense_weight(), stack.detach()), name
        assert torch.equal(runtime.generate(ids, max_new_tokens=8, do_sample=False), expected)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_experts_multiply_like_their_slices_in_either_layout(dtype):
    """[E, out, in] stacks through F.linear, [E, in, out] ones (gpt-oss) through x @ w, any
    leading shape; any other use of a packed expert is refused by name."""
    stack = torch.stack([pruned_weight((24, 40), "0.5", seed=e) for e in range(3)]).to(dtype)
    x = torch.randn(2, 5, 40).to(dtype)
    upright = SparseExperts.from_stack(stack)
    lying = SparseExperts.from_stack(stack.transpose(1, 2).contiguous(), transposed=True)
    assert torch.equal(lying.dense_weight(), stack.transpose(1, 2))
    for e in range(3):
        want = reference(x.reshape(-1, 40).float(), stack[e].float()).float().reshape(2, 5, 24)
        for got in (torch.nn.functional.linear(x, upright[torch.tensor(e)]), x @ lying[e], torch.matmul(x, lying[e])):
            assert got.dtype == dtype and got.shape == (2, 5, 24)
            assert torch.allclose(got.float(), want, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    with pytest.raises(TypeError, match="supports F.linear"):
        torch.mm(x[0], upright[0])
    with pytest.raises(IndexError):
        upright[3]


def test_a_compressed_expert_stack_that_does_not_add_up_is_refused():
    """Experts of 15 x 23 weights: every expert but the first starts mid-byte in the bitmask."""
    stack = torch.stack([pruned_weight((15, 23), "0.5", seed=e) for e in range(3)])
    bits, values = torch.from_numpy(np.packbits((stack != 0).reshape(-1).numpy())), stack[stack != 0]
    packed = F.pack_compressed_experts(values, bits, (3, 15, 23))
    assert all(torch.equal(F.unpack(p), stack[e]) for e, p in enumerate(packed))
    with pytest.raises(ConfigError, match="values but its mask keeps"):
        F.pack_compressed_experts(values[:-1], bits, (3, 15, 23))
    with pytest.raises(ConfigError, match="stack needs"):
        F.pack_compressed_experts(values, bits[:-1], (3, 15, 23))


PEAK = """
import gc, json, sys, torch, ptp
import safetensors
from transformers import AutoConfig, AutoModelForCausalLM
from ptp.sparse import SparseLinear, convert, kernels
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
kernels.library()
with convert._parameters_on_meta():  # import and run every piece of model code once, weightless
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
# One untimed load first: what ptp imports lazily on its first load (and other one-time state) is
# not weight memory. Blocks above the 64 KiB mmap threshold go back to the OS when freed, so this
# cannot hide a dense weight built during the measured loads.
ptp.load(sys.argv[1], runtime="sparse")
runs = {}
for runtime in ("sparse", "dense"):
    gc.collect()
    open('/proc/self/clear_refs', 'w').write('5')   # reset the peak (VmHWM) to the current RSS
    before = status('VmRSS')
    model = ptp.load(sys.argv[1], runtime=runtime)
    packed = sum(m.masks.nbytes + m.offsets.nbytes + m.values.nbytes for m in model.modules() if isinstance(m, SparseLinear))
    runs[runtime] = {"peak": status('VmHWM') - before, "packed": packed}
    del model
print(json.dumps(runs))
"""


@needs_kernels
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_compressed_checkpoint_loads_without_building_dense_weights(tmp_path):
    """fp32 2:4, 21 MB of linear weights (11 MB packed). Building them dense on top of the packed
    ones would lift the sparse load's peak above packed + dense = 32 MB; it must stay below
    packed + 0.85 x dense, and below 0.6x the peak of an ordinary (dense) load of the same
    directory. glibc is told to give large freed blocks back at once (mmap threshold 64 KiB), so
    the resident size follows what is alive rather than the allocator's cache."""
    model, folder = save_pruned(tmp_path, hidden=512, intermediate=1024, layers=2)
    dense_bytes = sum(m.weight.nbytes for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    proc = run_python(f"import sys; sys.argv = ['', {str(folder)!r}]\n" + PEAK,
                      {"MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["sparse"]["packed"] < 0.55 * dense_bytes
    assert runs["dense"]["peak"] > dense_bytes
    # Measured 27.3 MB here with the state-dict-ordered compressed file (embeddings and norms read
    # beside the packed layers); building the dense weights would need packed + dense = 32 MB.
    assert runs["sparse"]["peak"] < runs["sparse"]["packed"] + 0.85 * dense_bytes, (runs, dense_bytes)
    assert runs["sparse"]["peak"] < 0.6 * runs["dense"]["peak"], runs


# --------------------------------------------------------------------------- fallbacks and hygiene


def test_no_compiler_falls_back_to_torch_with_one_message(tmp_path):
    code = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from ptp.sparse import SparseLinear, kernels
layer = torch.nn.Linear(40, 24)
with torch.no_grad():
    layer.weight[:, ::2] = 0
sparse = SparseLinear.from_linear(layer)
x = torch.randn(3, 40)
assert kernels.selected_isa() == 'torch'
assert torch.allclose(sparse(x), layer(x), atol=1e-5)
sparse(x)
print('fallback ok')
"""
    env = {"PATH": str(tmp_path), "CXX": "", "PTP_SPARSE_CACHE": str(tmp_path / "cache")}
    proc = run_python(code, env)
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-2000:]
    assert proc.stderr.count("C kernels unavailable (no C++ compiler found") == 1
    assert proc.stderr.count("sparse runtime: torch kernels") == 1


@needs_kernels
def test_a_variant_that_does_not_compile_leaves_the_others_working(tmp_path):
    """A compiler that rejects the AVX-512 flags (an old one): that unit is left out with a
    warning, and the library still loads and runs the AVX2 (or scalar) kernels."""
    code = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from ptp.sparse import build
build.UNITS = [(src, flags + ['-mno-such-flag'] if src == 'avx512.cpp' else flags, macro)
               for src, flags, macro in build.UNITS]
from ptp.sparse import SparseLinear, kernels
assert kernels.library() is not None and not kernels.supported('avx512')
layer = torch.nn.Linear(40, 24)
with torch.no_grad():
    layer.weight[:, ::2] = 0
sparse = SparseLinear.from_linear(layer)
x = torch.randn(3, 40)
assert torch.allclose(sparse(x), layer(x), atol=1e-5)
print('isa', kernels.selected_isa())
"""
    proc = run_python(code, {"PTP_SPARSE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("avx512.cpp left out") == 1
    assert f"isa {'avx2' if K.supported('avx2') else 'scalar'}" in proc.stdout


@needs_kernels
def test_a_compiler_without_openmp_builds_a_serial_library(tmp_path):
    """A compiler that rejects -fopenmp: one warning, and the kernels still give the right
    answer on shapes that would be split across threads."""
    real = shutil.which("g++") or shutil.which("c++")
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    code = """
import logging, torch
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(2)
from ptp.sparse import SparseLinear, kernels
assert kernels.library() is not None
layer = torch.nn.Linear(512, 520)
with torch.no_grad():
    layer.weight[:, ::2] = 0
x = torch.randn(3, 512)
assert torch.allclose(SparseLinear.from_linear(layer)(x), layer(x), atol=1e-4)
print('serial ok')
"""
    proc = run_python(code, {"CXX": str(wrapper), "PTP_SPARSE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0 and "serial ok" in proc.stdout, proc.stderr[-2000:]
    assert proc.stderr.count("cannot build with OpenMP") == 1


@needs_kernels
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_the_kernels_run_on_torchs_own_openmp_runtime():
    """One libgomp in the process after the library loads — torch's — so the kernels' threads
    are torch's threads (two pools on the same cores took turns between every op)."""
    K.library()
    gomp = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len(gomp) <= 1, gomp


def test_the_runtime_never_imports_the_pruning_engine():
    for file in (REPO / "ptp" / "sparse").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert not module.lstrip(".").startswith(("engine", "solvers", "io")), (file.name, module)
                assert "ptp.engine" not in module and "ptp.solvers" not in module
