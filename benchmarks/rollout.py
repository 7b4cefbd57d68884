"""Rollout engines on the embedded tiny MoE: throughput, weight-sync time and training–inference discrepancy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout.py --rounds 4   # cold-start checkpoint (cached), 32 x 8
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout.py --model random --prompts 16 --rounds 2 --out r.json

Every engine samples the same prompts (test-split problems of the arithmetic task) at temperature 1. The engines are
measured in ``--rounds`` interleaved rounds: each round builds every engine in turn (the order rotates from round to
round), warms it up, times ``--repeats`` ``generate`` calls, times ``--syncs`` weight syncs and closes it, so a load
that drifts over minutes hits every engine alike. Per engine and round it reports

* tokens/s: counted completion tokens / wall seconds of a ``generate`` call (median of the round's repeats; vLLM
  warms up on a full call of the same shape first, since vLLM on CPU builds kernels per batch shape on first use);
* tokens per CPU-second: the same tokens / CPU seconds of this process (all its threads) during the call, which
  counts only the time the engine ran, not the time it waited for a core held by another job;
* the ratios of both to transformers float32 measured in the same round;
* sync ms: median wall time of ``load_weights(policy)`` over the round's syncs;
* the discrepancy of its μ against float32 transformers logprobs of the same tokens (one full forward):
  mean and max |Δ log p| over completion tokens, and k1 = mean(log μ − log π_fp32) (the paper's KL estimate).

The summary gives, per engine, the min and median over rounds of each rate and of the in-round ratios. Thread
settings are those pgzoo uses by default and are printed in the header: the process's torch threads (set them
with ``OMP_NUM_THREADS``; ``pgzoo train`` uses ``train.threads``, default 1), the vLLM engine's
``generate_threads`` (default 1) and ``cpu_threads`` (default: the process's count), and
``VLLM_CPU_OMP_THREADS_BIND`` (``nobind`` unless set). vLLM's engine is started with the context length
``pgzoo train`` gives it (128 + ``--max-new-tokens``). ``--out`` writes every round's numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from pgzoo.rollout import TransformersEngine, VLLMEngine

ENGINES = [
    ("transformers-fp32", dict()),
    ("transformers-bf16", dict(dtype="bfloat16")),
    ("transformers-fp16", dict(dtype="float16")),
    ("transformers-fp8", dict(fp8=True)),
    ("transformers-bf16-fp8", dict(dtype="bfloat16", fp8=True)),
]
VLLM_ENGINES = [("vllm-fp32", "float32"), ("vllm-bf16", "bfloat16")]
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "VLLM_CPU_OMP_THREADS_BIND",
              "VLLM_CPU_NUM_OF_RESERVED_CPU")


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


def measure(name, engine, policy, prompts, args, full_warmup: bool = False) -> dict:
    """One round of one engine: warm-up, ``args.repeats`` timed calls, discrepancy, ``args.syncs`` timed syncs."""
    # warm-up: vLLM on CPU builds kernels per batch shape on first use (seconds), so it warms up on the full call
    if full_warmup:
        engine.generate(prompts, n=args.n, max_new_tokens=args.max_new_tokens, seed=123)
    else:
        engine.generate(prompts[:4], n=2, max_new_tokens=8, seed=123)
    times, cpu = [], []
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
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
    return dict(
        engine=name,
        rows=len(ro),
        tokens=ro.num_tokens,
        seconds=round(seconds, 3),
        cpu_seconds=round(cpu_seconds, 3),
        tokens_per_s=round(ro.num_tokens / seconds, 1),
        tokens_per_cpu_s=round(ro.num_tokens / max(cpu_seconds, 1e-9), 1),
        sync_ms=round(1e3 * statistics.median(syncs), 2),
        mean_abs_dlogp=float(delta.abs().mean()),
        max_abs_dlogp=float(delta.abs().max()),
        k1=float(delta.mean()),
        truncated=float(ro.truncated.float().mean()),
        load_avg_1min=round(load, 2),
        torch_threads_after=torch.get_num_threads(),
    )


def build(name, policy, path, args):
    """(engine, start seconds, vLLM?) for one engine name."""
    start = time.perf_counter()
    kwargs = dict(ENGINES).get(name)
    if kwargs is not None:
        return TransformersEngine(policy, **kwargs), time.perf_counter() - start, False
    dtype = dict(VLLM_ENGINES)[name]
    engine = VLLMEngine(path, dtype=dtype, gpu_memory_utilization=0.1, seed=args.seed,
                        max_model_len=128 + args.max_new_tokens)
    return engine, time.perf_counter() - start, True


def header(args, n_prompts: int) -> dict:
    settings = dict(
        model=args.model, prompts=n_prompts, n=args.n, max_new_tokens=args.max_new_tokens, rounds=args.rounds,
        repeats=args.repeats, syncs=args.syncs, cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        env={k: os.environ.get(k) for k in THREAD_ENV},
        load_avg=[round(x, 2) for x in os.getloadavg()],
    )
    print(" ".join(f"{k}={v}" for k, v in settings.items() if k != "env"))
    print("env: " + " ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in settings["env"].items()))
    return settings


def print_row(r: dict) -> None:
    print(f"  {r['engine']:22s} {r['tokens']:>6d} {r['tokens_per_s']:>9.0f} {r['tokens_per_cpu_s']:>9.0f} "
          f"{r['vs_fp32_wall']:>6.2f}x "
          f"{r['vs_fp32_cpu']:>6.2f}x {r['sync_ms']:>8.1f} {r['mean_abs_dlogp']:>9.1e} {r['max_abs_dlogp']:>9.1e} "
          f"{r['k1']:>9.1e} {r['load_avg_1min']:>5.1f}", flush=True)


def summarise(rows: list[dict], names: list[str]) -> list[dict]:
    """Per engine: min and median over rounds of each rate and in-round ratio; median sync; discrepancy."""
    out = []
    for name in names:
        rs = [r for r in rows if r["engine"] == name]
        if not rs:
            continue
        s = dict(engine=name, rounds=len(rs))
        for key in ("tokens_per_s", "tokens_per_cpu_s", "vs_fp32_wall", "vs_fp32_cpu", "sync_ms", "start_s"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            s[key] = dict(min=min(vals), median=statistics.median(vals), max=max(vals))
        for key in ("mean_abs_dlogp", "max_abs_dlogp", "k1"):
            s[key] = rs[0][key]
        s["discrepancy_same_every_round"] = all(r["mean_abs_dlogp"] == rs[0]["mean_abs_dlogp"] for r in rs)
        out.append(s)
    print("\nsummary over rounds (min / median; ratios are to transformers-fp32 in the same round):")
    print(f"  {'engine':22s} {'tokens/s':>13s} {'tok/cpu-s':>13s} {'x fp32 wall':>13s} {'x fp32 cpu':>13s} "
          f"{'sync ms':>7s} {'start s':>9s}")
    for s in out:
        print(f"  {s['engine']:22s} " + " ".join(
            f"{s[k]['min']:>6.0f}/{s[k]['median']:<6.0f}" for k in ("tokens_per_s", "tokens_per_cpu_s")) +
            " " + " ".join(f"{s[k]['min']:>6.2f}/{s[k]['median']:<6.2f}" for k in ("vs_fp32_wall", "vs_fp32_cpu")) +
            f" {s['sync_ms']['median']:>7.1f} {s['start_s']['min']:>4.1f}/{s['start_s']['max']:<4.1f}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("cold-start", "random"), default="cold-start")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; every engine runs in each")
    parser.add_argument("--repeats", type=int, default=1, help="timed generate calls per engine and round")
    parser.add_argument("--syncs", type=int, default=5, help="timed weight syncs per engine and round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-vllm", action="store_true", help="transformers engines only")
    parser.add_argument("--engines", nargs="+", default=None, help="only these engines (transformers-fp32 always)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.syncs < 1:
        parser.error("--rounds, --repeats and --syncs must be >= 1")

    policy, tok, path = load_policy(args.model, args.seed)
    import pgzoo.tasks

    problems = pgzoo.tasks.get("arithmetic").sample(args.prompts, split="test", seed=args.seed)
    prompts = [tok(p.prompt, add_special_tokens=False).input_ids for p in problems]
    names = [n for n, _ in ENGINES] + ([] if args.no_vllm else [n for n, _ in VLLM_ENGINES])
    if args.engines:
        unknown = set(args.engines) - set(names)
        if unknown:
            parser.error(f"unknown engines {sorted(unknown)}: choose from {names}")
        names = [n for n in names if n == "transformers-fp32" or n in args.engines]
    settings = header(args, len(prompts))
    rows = []
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate: no engine always first or last
        print(f"\nround {rnd + 1}/{args.rounds}\n  {'engine':22s} {'tokens':>6s} {'tokens/s':>9s} {'tok/cpu-s':>9s} "
              f"{'x fp32':>7s} {'x cpu':>7s} {'sync ms':>8s} {'mean|Δ|':>9s} {'max|Δ|':>9s} {'k1':>9s} {'load':>5s}")
        this = []
        for name in order:
            engine, started, is_vllm = build(name, policy, path, args)
            try:
                row = measure(name, engine, policy, prompts, args, full_warmup=is_vllm)
                if is_vllm:
                    row["generate_threads"] = engine.generate_threads
                    row["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
            finally:
                engine.close()
            row.update(round=rnd, start_s=round(started, 2))
            this.append(row)
        base = next(r for r in this if r["engine"] == "transformers-fp32")
        for row in sorted(this, key=lambda r: names.index(r["engine"])):
            row["vs_fp32_wall"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            row["vs_fp32_cpu"] = round(row["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 3)
            print_row(row)
        rows.extend(this)
    vllm_rows = [r for r in rows if "generate_threads" in r]
    if vllm_rows:
        print(f"\nvLLM engines: generate_threads={vllm_rows[0]['generate_threads']} "
              f"VLLM_CPU_OMP_THREADS_BIND={vllm_rows[0]['VLLM_CPU_OMP_THREADS_BIND']}")
    summary = summarise(rows, names)
    settings["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the end: {settings['load_avg_end']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), settings=settings, summary=summary, rounds=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
