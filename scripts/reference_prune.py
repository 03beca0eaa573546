"""The papers' pruning loops, re-implemented as the baseline that ``bench_prune.py`` times ptp against.

This follows the structure of the published code (SparseGPT's ``llama.py``/``sparsegpt.py`` and
Wanda's ``lib/prune.py``), so that "the reference" is measured on this machine, in the same run,
on the same model, calibration windows and thread settings as ptp:

- the first block's inputs are caught once, then each block runs over the calibration samples
  *one at a time* (batch 1), twice: once with forward hooks that accumulate statistics per
  sample, once more with the pruned weights to produce the next block's inputs (``inps``/``outs``
  swapped between blocks);
- SparseGPT: H accumulated per sample as a running mean of 2 x x^T; ``fasterprune`` with
  blocksize 128 and a Python loop over the columns of each block; N:M groups chosen as the loop
  reaches them; unstructured masks by sorting each block's saliency;
- Wanda: squared input norms accumulated per sample; unstructured masks by a stable sort of each
  row's scores; N:M by a Python loop over groups of M columns.

The only change to the published loops: the block is called with the keyword arguments the model
itself passed to its first block (rotary embeddings, masks), as current transformers requires.

    python scripts/reference_prune.py --method sparsegpt --sparsity 2:4 --data ../shared/data/wikitext2

prints one JSON line: prune wall time (model load excluded), peak RSS (load + prune), and the
SHA-256 of the pruned weights' zero masks, so ptp's masks can be compared with these.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch
from torch import nn


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


class SparseGPTLayer:
    def __init__(self, layer: nn.Linear):
        self.layer = layer
        cols = layer.weight.shape[1]
        self.H = torch.zeros(cols, cols)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, inp.shape[-1]).t()
        tmp = 1  # one sample per call, as in the published code
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def prune(self, sparsity: float, prunen: int, prunem: int, blocksize: int = 128, percdamp: float = 0.01) -> None:
        W = self.layer.weight.data.clone().float()
        rows, cols = W.shape
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        H[torch.arange(cols), torch.arange(cols)] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.to(self.layer.weight.dtype)
        self.H = None


class WandaLayer:
    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, inp.shape[-1]).t()
        tmp = 1
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.float()
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples

    def prune(self, sparsity: float, prunen: int, prunem: int) -> None:
        W = self.layer.weight.data
        W_metric = torch.abs(W) * torch.sqrt(self.scaler_row.reshape((1, -1)))
        W_mask = torch.zeros_like(W_metric) == 1
        if prunen != 0:
            for ii in range(W_metric.shape[1]):
                if ii % prunem == 0:
                    tmp = W_metric[:, ii : (ii + prunem)].float()
                    W_mask.scatter_(1, ii + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
        else:
            sort_res = torch.sort(W_metric, dim=-1, stable=True)
            indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity)]
            W_mask.scatter_(1, indices, True)
        W[W_mask] = 0


@torch.no_grad()
def prune_reference(model, calib: torch.Tensor, method: str, sparsity: str) -> None:
    """Prune ``model`` in place the way the published scripts do. calib: LongTensor [n, L]."""
    prunen, prunem = (int(x) for x in sparsity.split(":")) if ":" in sparsity else (0, 0)
    ratio = 0.0 if prunen else float(sparsity)
    layers = model.model.layers
    n, seqlen = calib.shape
    inps = torch.zeros((n, seqlen, model.config.hidden_size))
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(n):
        try:
            model(calib[j : j + 1], use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].module
    outs = torch.zeros_like(inps)
    kwargs = cache["kwargs"]

    wrapper = SparseGPTLayer if method == "sparsegpt" else WandaLayer
    for i in range(len(layers)):
        layer = layers[i]
        subset = linear_layers(layer)
        wrapped = {name: wrapper(subset[name]) for name in subset}

        def add_batch(name):
            def hook(_, inp, out):
                wrapped[name].add_batch(inp[0].data)

            return hook

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in subset]
        for j in range(n):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        for h in handles:
            h.remove()
        for name in subset:
            wrapped[name].prune(ratio, prunen, prunem)
        for j in range(n):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    parser.add_argument("--sparsity", required=True, help="0.5 or N:M")
    parser.add_argument("--data", type=Path, required=True, help="folder with valid.tokens.txt")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from reproduce_core import load_smollm2, mask_digest, stream

    from ptp.data import random_windows

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    calib = random_windows(stream(tokenizer, args.data / "valid.tokens.txt"), args.nsamples, args.seqlen, args.seed)
    start = time.perf_counter()
    prune_reference(model, calib, args.method, args.sparsity)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"impl": "reference", "method": args.method, "sparsity": args.sparsity, "prune_s": seconds,
                      "peak_rss_gb": peak, "masks": mask_digest(model)}), flush=True)


if __name__ == "__main__":
    main()
