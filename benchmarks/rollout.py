"""Rollout engines on the embedded tiny MoE: throughput, weight-sync time and training–inference discrepancy.

    .venv/bin/python benchmarks/rollout.py                       # cold-start checkpoint (cached), 32 prompts x 8
    .venv/bin/python benchmarks/rollout.py --model random --prompts 16 --out rollout.json

Every engine samples the same prompts (test-split problems of the arithmetic task) at temperature 1. For each engine
it reports

* tokens/s: counted completion tokens / wall seconds of a ``generate`` call (median of ``--repeats`` calls; vLLM at
  least 3, after a warm-up call of the same shape, since vLLM on CPU builds kernels per batch shape on first use),
  and tokens per CPU-second of this process (less sensitive to other jobs on a shared machine);
* sync ms: median wall time of ``load_weights(policy)`` over a few syncs;
* the discrepancy of its μ against float32 transformers logprobs of the same tokens (one full forward):
  mean and max |Δ log p| over completion tokens, and k1 = mean(log μ − log π_fp32) (the paper's KL estimate).

One run, on whatever machine this is: on a shared machine absolute numbers move with the load, the ratios measured
in one run are what to compare. ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from pgzoo.rollout import TransformersEngine, VLLMEngine


def load_policy(kind: str, seed: int):
    """(model, tokenizer, checkpoint path) of the cold-start checkpoint or a random tiny MoE."""
    from pgzoo.models.tiny import build_tiny_moe, build_tokenizer, save_pretrained

    if kind == "cold-start":
        from pgzoo.models import load_pretrained
        from pgzoo.models.cold_start import ensure_cold_start

        path = ensure_cold_start("arithmetic", {}, seed=seed)
        model, tok = load_pretrained(path)
        return model.float().eval(), tok, path
    tok = build_tokenizer()
    model = build_tiny_moe(len(tok), seed=seed)
    model.generation_config.do_sample = True
    path = tempfile.mkdtemp(prefix="pgzoo-bench-")
    save_pretrained(model, tok, path)
    return model, tok, path


@torch.no_grad()
def reference_logprobs(model, ro, chunk: int = 64) -> torch.Tensor:
    """float32 log π(y_t) of each completion token from one full forward (0 at padding)."""
    out = []
    p = ro.prompt_ids.shape[1]
    for s in range(0, len(ro), chunk):
        ids, am = ro.input_ids[s: s + chunk], ro.attention_mask[s: s + chunk]
        logits = model(ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.float()
        lp = torch.log_softmax(logits[:, p - 1: -1], -1).gather(-1, ro.completion_ids[s: s + chunk, :, None])
        out.append(lp.squeeze(-1))
    lp = torch.cat(out)
    return torch.where(ro.completion_mask, lp, torch.zeros_like(lp))


def measure(name, engine, policy, prompts, args, full_warmup: bool = False, repeats: int = 1) -> dict:
    # warm-up: vLLM on CPU builds kernels per batch shape on first use (seconds), so it warms up on the full call
    if full_warmup:
        engine.generate(prompts, n=args.n, max_new_tokens=args.max_new_tokens, seed=123)
    else:
        engine.generate(prompts[:4], n=2, max_new_tokens=8, seed=123)
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        ro = engine.generate(prompts, n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    seconds, cpu_seconds = statistics.median(times), statistics.median(cpu)
    delta = (ro.logprobs - reference_logprobs(policy, ro))[ro.completion_mask]
    syncs = []
    for _ in range(args.syncs):
        t = time.perf_counter()
        engine.load_weights(policy)
        syncs.append(time.perf_counter() - t)
    row = dict(
        engine=name,
        rows=len(ro),
        tokens=ro.num_tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(ro.num_tokens / seconds, 1),
        tokens_per_cpu_s=round(ro.num_tokens / max(cpu_seconds, 1e-9), 1),
        sync_ms=round(1e3 * statistics.median(syncs), 2),
        mean_abs_dlogp=float(delta.abs().mean()),
        max_abs_dlogp=float(delta.abs().max()),
        k1=float(delta.mean()),
        truncated=float(ro.truncated.float().mean()),
    )
    print(f"{name:22s} {row['tokens_per_s']:>10.0f} {row['tokens_per_cpu_s']:>10.0f} {row['sync_ms']:>9.2f} "
          f"{row['mean_abs_dlogp']:>11.2e} "
          f"{row['max_abs_dlogp']:>10.2e} {row['k1']:>10.2e}", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("cold-start", "random"), default="cold-start")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="timed generate calls per transformers engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-vllm", action="store_true", help="transformers engines only")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    policy, tok, path = load_policy(args.model, args.seed)
    import pgzoo.tasks

    problems = pgzoo.tasks.get("arithmetic").sample(args.prompts, split="test", seed=args.seed)
    prompts = [tok(p.prompt, add_special_tokens=False).input_ids for p in problems]
    print(f"model={args.model} prompts={len(prompts)} n={args.n} max_new_tokens={args.max_new_tokens} "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'engine':22s} {'tokens/s':>10s} {'tok/cpu-s':>10s} {'sync ms':>9s} {'mean|Δ|':>11s} {'max|Δ|':>10s} "
          f"{'k1':>10s}")
    rows = []
    for name, kwargs in [
        ("transformers-fp32", dict()),
        ("transformers-bf16", dict(dtype="bfloat16")),
        ("transformers-fp16", dict(dtype="float16")),
        ("transformers-fp8", dict(fp8=True)),
        ("transformers-bf16-fp8", dict(dtype="bfloat16", fp8=True)),
    ]:
        engine = TransformersEngine(policy, **kwargs)
        rows.append(measure(name, engine, policy, prompts, args, repeats=args.repeats))
        engine.close()
    if not args.no_vllm:
        for dtype in ("float32", "bfloat16"):
            start = time.perf_counter()
            engine = VLLMEngine(path, dtype=dtype, gpu_memory_utilization=0.1, seed=args.seed)
            started = time.perf_counter() - start
            row = measure(f"vllm-{'fp32' if dtype == 'float32' else 'bf16'}", engine, policy, prompts, args,
                          full_warmup=True, repeats=max(3, args.repeats))
            row["start_s"] = round(started, 1)
            rows.append(row)
            engine.close()
    base = rows[0]["tokens_per_s"]
    print("\nthroughput relative to transformers-fp32: " +
          ", ".join(f"{r['engine']} {r['tokens_per_s'] / base:.1f}x" for r in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), results=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
