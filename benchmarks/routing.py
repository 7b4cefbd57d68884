"""Routing record/replay overhead: plain forward+backward vs the same under record and under replay.

    .venv/bin/python benchmarks/routing.py                 # both configs, defaults below
    .venv/bin/python benchmarks/routing.py --reps 30 --batch 8 --seq 256

Configs: the embedded tiny Qwen3-MoE (4 layers, 8 experts, top-2, hidden 128) and a wider Qwen3-MoE (8 layers, 64
experts, top-8, hidden 128). Each repetition runs plain, record and replay back to back (round-robin, so machine
load hits all three alike); the table reports medians of wall time and of the process's CPU time (with one torch
thread, CPU time is the work done and is far less sensitive to other processes on a shared machine than wall
time) and the minimum CPU time (the least disturbed run), each with its overhead against plain. Replay uses
routes recorded on the same weights, so every variant runs the same expert loads. Entering the replay context
(route validation, one host sync) is included in the replay time.

Then, what R3 buys: a bf16 and an FP8 rollout engine (pgzoo.rollout.TransformersEngine) sample from the tiny policy
(or ``--policy CHECKPOINT``) with routes; the float32 training engine recomputes the sampled tokens' logprobs with and without replaying those
routes. Reported: routing drift (share of (token, layer) slots whose expert set differs) and the mean absolute
train–inference logprob gap |log π_θold − log μ_θold| over completion tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pgzoo.routing as routing
from pgzoo.models import build_tiny_moe

CONFIGS = {
    "tiny (4L, 8E, top-2)": dict(),
    "wide (8L, 64E, top-8)": dict(num_hidden_layers=8, num_experts=64, num_experts_per_tok=8,
                                  moe_intermediate_size=32),
}


def step(model, ids, ctx=None):
    model.zero_grad(set_to_none=True)
    if ctx is None:
        model(ids).logits.float().square().mean().backward()
    else:
        with ctx:
            model(ids).logits.float().square().mean().backward()


def bench(name, overrides, batch, seq, reps, warmup):
    model = build_tiny_moe(seed=0, **overrides).train()
    ids = torch.randint(4, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    routes = rec.routes
    variants = {
        "plain": lambda: step(model, ids),
        "record": lambda: step(model, ids, routing.record(model)),
        "replay": lambda: step(model, ids, routing.replay(model, routes)),
    }
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for i in range(warmup + reps):
        for key, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if i >= warmup:
                wall[key].append((time.perf_counter() - t0) * 1e3)
                cpu[key].append((time.process_time() - c0) * 1e3)
    med_w = {k: statistics.median(v) for k, v in wall.items()}
    med_c = {k: statistics.median(v) for k, v in cpu.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {params / 1e6:.2f} M params, batch {batch} x {seq} tokens, {reps} reps, fwd+bwd (median ms)")
    min_c = {k: min(v) for k, v in cpu.items()}
    head = "".join(f"{h:>9s} {'overhead':>9s}   " for h in ("wall med", "cpu med", "cpu min"))
    print(f"  {'':7s} {head}")
    for key in variants:
        ow = (med_w[key] / med_w["plain"] - 1) * 100
        oc = (med_c[key] / med_c["plain"] - 1) * 100
        om = (min_c[key] / min_c["plain"] - 1) * 100
        row = f"{med_w[key]:9.1f} {ow:+8.1f}%   {med_c[key]:9.1f} {oc:+8.1f}%   {min_c[key]:9.1f} {om:+8.1f}%"
        print(f"  {key:7s} {row}")
    return med_w, med_c, min_c


def drift_report(policy_path=None, precisions=("bfloat16", "fp8"), prompts=8, n=4, new_tokens=24):
    """R3's effect: routing drift and train–inference logprob gap, rollout engine (bf16 / FP8) vs float32 training."""
    from pgzoo.rollout import TransformersEngine

    gen = torch.Generator().manual_seed(0)
    if policy_path is None:
        policy, what = build_tiny_moe(seed=0), "tiny policy, random init, random prompts"
        prompt_ids = [torch.randint(4, 100, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen).tolist()
                      for _ in range(prompts)]
    else:
        import transformers

        import pgzoo.tasks

        policy = transformers.AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(policy_path)
        problems = pgzoo.tasks.get("arithmetic").sample(prompts, split="test", seed=0)
        prompt_ids = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
        what = f"{policy_path}, arithmetic test prompts"
    print(f"\nR3 ({what}): {prompts} prompts x {n} samples x {new_tokens} new tokens")
    print(f"  {'rollout engine':16s} {'drift_rollout':>13s} {'any layer':>9s} "
          f"{'|old-mu| plain':>15s} {'|old-mu| R3':>12s}")
    for precision in precisions:
        engine = TransformersEngine(policy, dtype="float32" if precision == "fp8" else precision,
                                    fp8=precision == "fp8")
        ro = engine.generate(prompt_ids, n=n, max_new_tokens=new_tokens, temperature=1.0, seed=0, return_routes=True)
        engine.close()
        ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
        am = torch.cat([ro.prompt_mask, ro.completion_mask], 1).long()
        p_len, mask = ro.prompt_ids.shape[1], ro.completion_mask.bool()

        def old_logprobs():
            logits = policy(ids, attention_mask=am).logits[:, p_len - 1:-1].float()
            return torch.log_softmax(logits, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)

        with torch.no_grad():
            plain = old_logprobs()
            rr = routing.RoutingReplay("R3")
            rr.start_batch(ro.routes)
            with rr.old_pass(policy, mask=am.bool()):
                replayed = old_logprobs()
        m = rr.metrics()
        gap_plain = (plain - ro.logprobs).abs()[mask].mean()
        gap_r3 = (replayed - ro.logprobs).abs()[mask].mean()
        print(f"  {precision:16s} {float(m['routing/drift_rollout']):13.4f} "
              f"{float(m['routing/drift_rollout_any_layer']):9.4f} {float(gap_plain):15.5f} {float(gap_r3):12.5f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", nargs="*", choices=["tiny", "wide"], default=["tiny", "wide"])
    parser.add_argument("--no-drift", action="store_true", help="skip the R3 drift report")
    parser.add_argument("--policy", default=None, help="checkpoint for the R3 drift report (e.g. a cold start)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: see above)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    for name, overrides in CONFIGS.items():
        if name.split()[0] not in args.configs:
            continue
        bench(name, overrides, args.batch, args.seq, args.reps, args.warmup)
    if not args.no_drift:
        drift_report(args.policy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
