"""Prune a model larger than one would like to hold in memory, with ``ptp prune --stream``, and
measure its peak resident memory against the model's float32 size.

Writes a random Llama (default: 32 blocks of hidden 2048, MLP 5632, 32 query / 4 key-value heads,
vocabulary 32000: 1.54B parameters, 6.2 GB in float32) straight to sharded safetensors, one block
at a time, never building the model in memory; a byte-level BPE tokenizer trained on generated
text; and a generated calibration text. Then it runs, in a fresh process under
``/usr/bin/time -v`` (``resource`` when that is missing),

    ptp prune DIR --stream --method sparsegpt --sparsity 0.5 --calib TEXT --nsamples 8 --seqlen 128 --out OUT

and prints the model's size, the run's peak RSS (and its ratio to the float32 size) and wall time.
The files (twice the model size) go under --workdir and are deleted afterwards unless --keep.

    OMP_NUM_THREADS=1 python scripts/stream_big.py --workdir /tmp/ptp-big
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_model(folder: Path, args) -> int:
    """Config, tokenizer and random weights in ``folder``, one shard per block; returns the parameter count."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = make_tokenizer(args.vocab_train)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with init_empty_weights():  # names and shapes only
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        block = re.match(r"model\.layers\.(\d+)\.", key)
        groups.setdefault(f"block{int(block.group(1)):05d}" if block else "outside", []).append(key)
    files = sorted(groups)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for j, group in enumerate(files):
        name = f"model-{j + 1:05d}-of-{len(files):05d}.safetensors"
        tensors = {}
        for key in groups[group]:
            if key.endswith("norm.weight"):  # RMSNorm scales near 1, not all equal
                tensors[key] = 1 + 0.02 * torch.randn(shapes[key], generator=generator)
            else:
                tensors[key] = 0.02 * torch.randn(shapes[key], generator=generator)
            weight_map[key] = name
            total += tensors[key].numel()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        print(f"\rwrote {name}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 4}, "weight_map": weight_map}, indent=2))
    config.dtype = torch.float32
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total


def words(count: int, seed: int = 0) -> str:
    """Pseudo-English text: words made of common syllables, sentences of 5-15 words."""
    rng = random.Random(seed)
    syllables = ["the", "an", "re", "in", "er", "on", "at", "en", "ed", "or", "ing", "ti", "es", "al", "de", "co",
                 "pro", "ma", "li", "ra", "so", "ne", "ve", "ta", "mi", "sto", "pa", "lu", "ger", "ben"]
    out, sentence = [], []
    for _ in range(count):
        sentence.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
        if len(sentence) >= rng.randint(5, 15):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    return " ".join(out)


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([words(20000, seed=1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def run_measured(command: list[str], env: dict) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes, stdout) of ``command`` in a fresh process."""
    start = time.perf_counter()
    if Path("/usr/bin/time").is_file():
        done = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
        sys.stderr.write(done.stderr[-3000:])
        return done.returncode, wall, rss, done.stdout
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    sys.stderr.write(done.stderr[-3000:])
    return done.returncode, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, done.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ptp-stream-big", help="where the model and the output go")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vocab-train", type=int, default=2000, help="tokenizer size (ids below --vocab)")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `ptp prune` arguments")
    p.add_argument("--keep", action="store_true", help="keep the model and the output")
    args = p.parse_args()

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    model_dir, out = work / "model", work / "out"
    model_dir.mkdir(parents=True)
    try:
        start = time.perf_counter()
        params = make_model(model_dir, args)
        generate_s = time.perf_counter() - start
        calib = work / "calib.txt"
        calib.write_text(words(args.nsamples * args.seqlen * 4 + 5000, seed=2))
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        print(f"model: {params / 1e9:.3f}B parameters, {params * 4 / 1e9:.2f} GB in float32 "
              f"({size / 1e9:.2f} GB of shards), generated in {generate_s:.0f} s", flush=True)

        command = [sys.executable, "-m", "ptp", "prune", str(model_dir), "--stream", "--method", args.method,
                   "--sparsity", args.sparsity, "--calib", str(calib), "--nsamples", str(args.nsamples),
                   "--seqlen", str(args.seqlen), "--out", str(out), "--json", "-q", *args.extra]
        print("running:", " ".join(command), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        code, wall, rss, stdout = run_measured(command, env)
        if code != 0:
            print(f"ptp prune failed with exit code {code}")
            return code
        summary = json.loads(stdout.strip().splitlines()[-1])
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(index) == len(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"])
        result = {
            "parameters": params, "fp32_bytes": params * 4, "peak_rss_bytes": rss,
            "peak_rss_over_fp32": rss / (params * 4), "wall_time_s": wall,
            "prune_time_s": summary["prune_time_s"], "mean_sparsity": summary["mean_sparsity"],
            "layers": summary["layers"], "method": args.method, "sparsity": args.sparsity,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "shards_out": len(set(index.values())),
            "threads": os.environ.get("OMP_NUM_THREADS"),
        }
        print(json.dumps(result))
        print(f"peak RSS {rss / 1e9:.2f} GB = {100 * rss / (params * 4):.1f}% of the float32 model "
              f"({params * 4 / 1e9:.2f} GB); wall time {wall:.0f} s (prune {summary['prune_time_s']:.0f} s); "
              f"achieved sparsity {summary['mean_sparsity']:.4f} over {summary['layers']} layers")
        return 0 if rss <= 0.4 * params * 4 else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
