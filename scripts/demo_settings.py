"""Compare candidate settings for `make demo` beyond its two prompts.

Each setting prunes SmolLM2-135M on the demo's self-calibration (32 x 128 sampled tokens, seed 0)
and is scored on a dozen *other* chat prompts: the dense model's greedy 40-token answers are
teacher-forced through the pruned model, which gives top-1 agreement with the dense model's next
token and KL(dense || pruned) per token. The demo's own two answers are printed too, but a setting
is chosen on the other prompts, not on the two it shows. One JSON line per setting:

    python scripts/demo_settings.py '{"recon_epochs": 4}' '{"recon_epochs": 6}' '{"recon_lr": 5e-4}'

Each JSON object updates the demo's PruneConfig (SparseGPT, 50%, reconstruct=True).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ptp
from ptp.evaluate import chunked_agreement

from demo import PROMPTS, answer

OTHER_PROMPTS = [
    "Explain photosynthesis in one sentence.", "What is 12 times 7?", "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?", "How do I boil an egg?", "Name three primary colors.",
    "What is the largest planet in our solar system?", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?", "Suggest a name for a pet cat.", "What does a CPU do?", "How many days are in a leap year?",
]


def dense_answers(model, tokenizer, new_tokens: int) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Per other prompt: (prompt + dense greedy answer [1, T], prompt length P, dense logits
    [1, T - P + 1, V] from the last prompt position on)."""
    out = []
    for prompt in OTHER_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)
        out.append((full, ids.shape[1], answer_logits(model, full, ids.shape[1])))
    return out


@torch.no_grad()
def answer_logits(model, full: torch.Tensor, prompt_len: int) -> torch.Tensor:
    return model(full).logits[:, prompt_len - 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="JSON objects of PruneConfig fields")
    parser.add_argument("--new-tokens", type=int, default=40)
    args = parser.parse_args()
    model, tokenizer = ptp.load_model("smollm2-135m")
    calib = ptp.calibration_batches("self", tokenizer, 32, 128, seed=0, model=model)
    reference = dense_answers(model, tokenizer, args.new_tokens)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    for setting in args.settings:
        model.load_state_dict(dense_state)
        fields = {"method": "sparsegpt", "sparsity": "0.5", "reconstruct": True, **json.loads(setting)}
        start = time.perf_counter()
        ptp.prune(model, calib, ptp.PruneConfig(**fields))
        seconds = time.perf_counter() - start
        # sums of [KL, top-1, NLL dense, NLL pruned] over each answer's tokens
        sums = sum(chunked_agreement(dense, answer_logits(model, full, prompt_len), full[:, prompt_len - 1:])
                   for full, prompt_len, dense in reference)
        count = sum(full.shape[1] - prompt_len for full, prompt_len, _ in reference)
        print(json.dumps({"setting": fields, "prune_s": round(seconds, 1), "top1_other": round(float(sums[1]) / count, 4),
                          "kl_other": round(float(sums[0]) / count, 4),
                          "answers": [answer(model, tokenizer, p, args.new_tokens) for p in PROMPTS]}), flush=True)


if __name__ == "__main__":
    main()
