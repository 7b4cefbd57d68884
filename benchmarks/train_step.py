"""Benchmark the main job: (1) step time split into rollout / old-logprob pass / updates / weight sync for the tiny
recipe, (2) peak memory of the chunked per-token logprobs against the naive full-logits computation.

    python benchmarks/train_step.py steps [--engine vllm] [--steps 6] [--model PATH] [key=value ...]
    python benchmarks/train_step.py memory [--vocab 151936] [--tokens 8192 1024] [--hidden 256] [--chunk 1024]

``steps`` runs ``recipes/tiny/minirl.yaml`` (and its off-policy N=2 + R2 variant, where the old-logprob pass runs)
for a few steps without evaluation and prints the mean seconds of each phase over the steps after the first
(warm-up). ``memory`` measures, in a fresh subprocess per case, the peak resident memory added by one
forward + backward of per-token logprobs and entropy from hidden states ``[T, H]`` and an LM head ``[V, H]``:
``naive`` materialises float32 logits ``[T, V]`` and their log-softmax; ``chunked`` is
:func:`pgzoo.models.logprobs.token_logprobs_and_entropy`. Naive cases whose float32 logits alone would exceed
``--naive-limit-gb`` are not run (their size is reported analytically: 2 float32 ``[T, V]`` tensors at least).
On a shared machine timings are inflated by other load; memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- memory
def _memory_case(method: str, T: int, V: int, H: int, chunk: int) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    hidden = (torch.randn(1, T, H) * 0.5).requires_grad_()
    head = (torch.randn(V, H) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (1, T))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, after inputs exist
    t0 = time.perf_counter()
    if method == "naive":
        logits = hidden @ head.T  # [1, T, V] float32
        logp = torch.log_softmax(logits.float(), -1)
        lp = logp.gather(-1, targets[..., None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1).detach()
    else:
        from pgzoo.models.logprobs import token_logprobs_and_entropy

        out = token_logprobs_and_entropy(hidden, targets, lm_head=head, chunk_size=chunk or None)
        from pgzoo.models.logprobs import auto_chunk_size

        chunk = chunk or auto_chunk_size(V)
        lp, ent = out.logprobs, out.entropy
    lp.sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "T": T, "V": V, "H": H, "chunk": chunk if method == "chunked" else None,
            "peak_extra_gb": (peak - base) / 2**20, "seconds": seconds, "entropy_mean": float(ent.mean())}


def memory(args) -> list[dict]:
    rows = []
    for T in args.tokens:
        for method in ("chunked", "naive"):
            logits_gb = T * args.vocab * 4 / 2**30
            if method == "naive" and logits_gb > args.naive_limit_gb:
                rows.append({"method": "naive", "T": T, "V": args.vocab, "H": args.hidden, "skipped": True,
                             "float32_logits_gb": logits_gb, "lower_bound_gb": 2 * logits_gb})
                continue
            cmd = [sys.executable, __file__, "_memcase", method, str(T), str(args.vocab), str(args.hidden),
                   str(args.chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        if r.get("skipped"):
            print(f"naive    T={r['T']:6d} V={r['V']}: not run; float32 logits alone {r['float32_logits_gb']:.2f} GB, "
                  f"logits + log-softmax >= {r['lower_bound_gb']:.2f} GB")
        else:
            print(f"{r['method']:8s} T={r['T']:6d} V={r['V']} H={r['H']} chunk={r['chunk']}: "
                  f"peak +{r['peak_extra_gb']:.2f} GB (fwd+bwd {r['seconds']:.1f} s)")
    return rows


# ---------------------------------------------------------------------- step time
def steps(args) -> list[dict]:
    import tempfile

    from pgzoo.recipes import load_recipe
    from pgzoo.adapters.lightning.run import train

    results = []
    variants = {"on-policy N=1": [], "off-policy N=2 + R2": ["train.num_minibatches=2", "train.routing_replay=R2"]}
    for name, extra in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            over = [f"rollout.engine={args.engine}", f"train.steps={args.steps}", "eval.before=false",
                    "eval.after=false", "output.plots=false", "output.progress_bar=false",
                    "output.checkpoint_every=0", f"output.dir={tmp}/run", *extra, *args.overrides]
            if args.model:
                over.append(f"model.path={args.model}")
            recipe = load_recipe(ROOT / "recipes" / "tiny" / "minirl.yaml", over)
            res = train(recipe, quiet=True)
        rows = res.history[1:] or res.history
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.startswith(("time/", "throughput/"))}
        results.append({"variant": name, "engine": args.engine, "responses_per_step": recipe.responses_per_step,
                        **{k: round(v, 4) for k, v in mean.items()}})
        print(f"{name:22s} {args.engine}: step {mean['time/step']:.2f} s = rollout {mean['time/rollout']:.2f} + "
              f"old-logprob {mean['time/old_logprobs']:.2f} + updates {mean['time/update']:.2f} + sync "
              f"{mean['time/sync']:.2f} (+ rewards/logging); {mean['throughput/tokens_per_s']:.0f} tokens/s")
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_memcase":
        m, T, V, H, c = argv[1], *map(int, argv[2:6])
        print(json.dumps(_memory_case(m, T, V, H, c)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    s.add_argument("--steps", type=int, default=6)
    s.add_argument("--model", default=None, help="checkpoint (default: the cached cold start)")
    s.add_argument("overrides", nargs="*")
    m = sub.add_parser("memory")
    m.add_argument("--vocab", type=int, default=151_936)
    m.add_argument("--tokens", type=int, nargs="+", default=[8192, 1024])
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--chunk", type=int, default=0, help="tokens per chunk; 0 = automatic (pgzoo default)")
    m.add_argument("--naive-limit-gb", type=float, default=3.0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    out = steps(args) if args.what == "steps" else memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.exit(main())
