"""Reproduce the README's sparse-runtime tables: per-linear kernels, end-to-end decode, memory.

    python scripts/bench_sparse.py kernels              # ptp bench --kernels, the full grid
    python scripts/bench_sparse.py llama                # synthetic ~1.1B Llama, 50% magnitude, bf16
    python scripts/bench_sparse.py llama --prefill 512  # ... and a 512-token prompt
    python scripts/bench_sparse.py smollm2              # SmolLM2-135M, 2:4 magnitude, fp32
    python scripts/bench_sparse.py moe                  # synthetic ~1.2B Mixtral, 50% magnitude, bf16

End to end: greedy decode with a KV cache at batch 1 (``ptp.bench.throughput``: prompt prefilled
untimed, then ``--new-tokens`` single-token steps timed, models interleaved, medians), the
pruned model stored dense in bf16 and in fp32 against the same model on the sparse runtime.
Resident memory: bytes of the decoder blocks' linear weights (and expert stacks), dense vs packed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time

import torch
from torch import nn

import ptp
from ptp.bench import throughput
from ptp.solvers import magnitude
from ptp.sparse import SparseLinear, sparsify
from ptp.sparse.module import SparseExperts
from ptp.units import routes_tokens
from ptp.sparse import bench as kbench

log = logging.getLogger("bench_sparse")


def prune_linears(model: nn.Module, spec: str) -> None:
    """Magnitude-prune every linear layer and every expert of a fused stack ([E, out, in]) of the
    decoder blocks in place (data-free); routers stay dense."""
    sparsity = ptp.parse_sparsity(spec)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                module.weight.copy_(magnitude(module.weight, sparsity)[0])
            if is_experts(module):
                for stack in module.parameters(recurse=False):
                    for expert in stack if stack.dim() == 3 else ():
                        expert.copy_(magnitude(expert, sparsity)[0])


def linear_bytes(model: nn.Module) -> int:
    total = 0
    for name, m in model.named_modules():
        if ".layers." not in name:
            continue
        if isinstance(m, (SparseLinear, SparseExperts)):
            total += sum(b.nbytes for b in m.buffers(recurse=False))
        elif isinstance(m, nn.Linear):
            total += m.weight.nbytes
        elif is_experts(m):
            total += sum(p.nbytes for p in m.parameters(recurse=False) if p.dim() == 3)
    return total


def is_experts(module: nn.Module) -> bool:
    """A fused experts module, dense (3-D parameters) or on the runtime (SparseExperts children)."""
    return routes_tokens(module) and (any(p.dim() == 3 for p in module.parameters(recurse=False))
                                      or any(isinstance(c, SparseExperts) for c in module.children()))


def step_shares(model: nn.Module, new_tokens: int) -> str:
    """Where one decode step of ``model`` goes: the LM head, the packed linears, the rest."""
    spent = {"head": 0.0, "linears": 0.0}

    def timer(key):
        def pre(module, args):
            module._t0 = time.perf_counter()

        def post(module, args, out):
            spent[key] += time.perf_counter() - module._t0

        return pre, post

    handles = []
    for name, m in model.named_modules():
        linear = isinstance(m, (SparseLinear, nn.Linear)) or is_experts(m)
        key = "head" if name == "lm_head" else "linears" if linear else None
        if key:
            pre, post = timer(key)
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    from ptp.bench import decode_steps

    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        run = decode_steps(model, ids, new_tokens)
        spent.update(head=0.0, linears=0.0)
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    for h in handles:
        h.remove()
    rest = total - spent["head"] - spent["linears"]
    return (f"step {total / new_tokens * 1e3:.1f} ms: LM head {spent['head'] / total:.0%}, decoder linears "
            f"{spent['linears'] / total:.0%}, everything else (attention, norms, embedding, Python) {rest / total:.0%}")


def end_to_end(base: nn.Module, new_tokens: int, repeats: int, prefill: int = 0) -> None:
    """fp32-stored, bf16-stored and sparse-runtime copies of one pruned model (``base``, in the
    dtype of the packed values), decode (and, with ``prefill`` tokens, a prompt) interleaved."""
    values = next(base.parameters()).dtype
    dense32 = base if values == torch.float32 else copy.deepcopy(base).float()
    dense16 = base if values == torch.bfloat16 else copy.deepcopy(base).bfloat16()
    sparse = copy.deepcopy(base)
    sparsify(sparse)
    models = {"dense fp32": dense32, "dense bf16": dense16, f"sparse ({str(values)[6:]} values)": sparse}
    report = throughput(models, prefill_shapes=((1, prefill),) if prefill else (), decode_batches=(1,),
                        new_tokens=new_tokens, repeats=repeats, semi_structured=False)
    print(report.markdown())
    print()
    for kind in ("prefill", "decode") if prefill else ("decode",):
        tps = {m.model: m.tokens_per_s for m in report.measurements if m.kind == kind}
        best = max(tps["dense fp32"], tps["dense bf16"])
        name = next(n for n in tps if n.startswith("sparse"))
        print(f"{kind}: sparse vs the faster dense: {tps[name] / best:.2f}x")
    print(f"decoder linear weights resident: dense {str(values)[6:]} {linear_bytes(base) / 2**20:.0f} MiB, "
          f"packed {linear_bytes(sparse) / 2**20:.0f} MiB ({linear_bytes(sparse) / linear_bytes(base):.3f}x)")
    for n in ("dense fp32", "dense bf16", name):
        print(f"{n}: {step_shares(models[n], 8)}")


def llama(args) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    # TinyLlama-1.1B's shape: 22 blocks of 2048 wide, MLP 5632, 32 heads, 4 KV heads.
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    log.info("synthetic Llama: %.2fB parameters", sum(p.numel() for p in model.parameters()) / 1e9)
    prune_linears(model, "0.5")
    end_to_end(model, args.new_tokens, args.repeats, args.prefill)


def smollm2(args) -> None:
    model, _ = ptp.load_model("smollm2-135m")  # float32 from the GGUF
    prune_linears(model, "2:4")
    end_to_end(model, args.new_tokens, args.repeats, args.prefill)


def moe(args) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig

    # Mixtral's layout at a size this machine holds three copies of: 16 blocks 1024 wide,
    # 8 experts of width 2816, top-2 routing (a quarter of the expert weights read per token).
    config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                           num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    log.info("synthetic Mixtral: %.2fB parameters (dense experts: transformers' default %s)",
             sum(p.numel() for p in model.parameters()) / 1e9, model.config._experts_implementation)
    prune_linears(model, "0.5")
    end_to_end(model, args.new_tokens, args.repeats, args.prefill)


def kernels(args) -> None:
    rows = kbench.kernel_bench(repeats=args.repeats)
    print(kbench.markdown(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("kernels", "llama", "smollm2", "moe"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=0, metavar="TOKENS",
                        help="also time a prompt of this many tokens (batch 1); default: decode only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"load average before: {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    globals()[args.what](args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
