"""Measure each training–inference mismatch knob of the transformers engine on a policy checkpoint.

    python benchmarks/mismatch.py                         # the lab's cold start (recipes/lab/minirl.yaml)
    python benchmarks/mismatch.py --recipe tiny/minirl --prompts 64

For every knob (float32; bfloat16; float32 + router in bfloat16; float32 + FP8 weights; bfloat16 + FP8 weights;
FP8 weights + router in bfloat16, the lab's setting) the engine samples ``--prompts`` × ``--n`` completions of the recipe's task at T = 1 with
``rollout.max_new_tokens``, and the float32 training policy scores the same tokens. Reported over completion tokens:
mean |log μ − log π| (the sync check's measure), ``kl/train_inference_k1`` = mean(log μ − log π) as the trainer
logs it, mean |Σ_t (log μ − log π)| per sequence (what a sequence-level weight sees), and the fraction of tokens
whose expert set differs between the engine and the policy in at least one MoE layer (routing flips).
"""

from __future__ import annotations

import argparse
import time

import torch

KNOBS = {
    "float32": dict(),
    "bfloat16": dict(dtype="bfloat16"),
    "router bfloat16": dict(router_dtype="bfloat16"),
    "fp8 (float32 act.)": dict(fp8=True),
    "bfloat16 + fp8": dict(dtype="bfloat16", fp8=True),
    "fp8 + router bfloat16 (lab)": dict(fp8=True, router_dtype="bfloat16"),
}


def measure(policy, tokenizer, problems, knob: dict, n: int, max_new_tokens: int, seed: int = 0) -> dict:
    from pgzoo.models.logprobs import completion_logprobs
    from pgzoo.rollout import TransformersEngine
    from pgzoo.routing import record

    engine = TransformersEngine(policy, **knob)
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    ro = engine.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                         return_routes=True)
    seconds = time.perf_counter() - t0
    with torch.no_grad(), record(policy) as rec:
        pi = completion_logprobs(policy, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                                 with_entropy=False).logprobs
    mask = ro.completion_mask.bool()
    d = (ro.logprobs.double() - pi.double()) * mask
    p = ro.prompt_ids.shape[1]
    eng_routes = ro.routes[:, p - 1: p - 1 + mask.shape[1]]  # the token fed at each sampling step
    pol_routes = rec.routes[:, p - 1: p - 1 + mask.shape[1]]
    known = (eng_routes >= 0).all(-1).all(-1) & mask
    flips = (eng_routes.sort(-1).values != pol_routes.sort(-1).values).any(-1).any(-1)
    return {"mean_abs": float(d.abs().sum() / mask.sum()), "k1": float(d.sum() / mask.sum()),
            "seq_abs": float(d.sum(-1).abs().mean()), "flip": float(flips[known].float().mean()),
            "tokens_per_seq": float(mask.sum(-1).float().mean()), "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="lab/minirl")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--knobs", nargs="+", default=list(KNOBS), choices=list(KNOBS), metavar="KNOB",
                    help=f"a subset of: {', '.join(KNOBS)}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pgzoo.tasks
    from pgzoo.recipes import load_recipe
    from pgzoo.adapters.lightning.run import load_policy, resolve_model_path

    recipe = load_recipe(args.recipe)
    task = pgzoo.tasks.get(recipe.task.name, **recipe.task.options)
    path = resolve_model_path(recipe, task)
    policy, tok = load_policy(path, "float32")
    problems = task.sample(args.prompts, "test", seed=7)
    print(f"checkpoint {path}; {args.prompts} test prompts x {args.n} samples, <= {recipe.rollout.max_new_tokens} "
          f"tokens, T = 1, {args.threads} thread(s)\n")
    print("| rollout engine | mean abs(Δ log p) per token | KL k1 (mean Δ) | mean abs(Σ Δ) per sequence | "
          "routing flips (tokens) | tokens/seq | generate s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.knobs:
        knob = KNOBS[name]
        m = measure(policy, tok, problems, knob, args.n, recipe.rollout.max_new_tokens)
        print(f"| {name} | {m['mean_abs']:.2e} | {m['k1']:.2e} | {m['seq_abs']:.3f} | {m['flip']:.3f} | "
              f"{m['tokens_per_seq']:.1f} | {m['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
