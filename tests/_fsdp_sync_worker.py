"""Two CPU processes (gloo) with an FSDP2-sharded policy stream its weights into a rollout engine on each rank.

    python tests/_fsdp_sync_worker.py --engine transformers --model tiny --checkpoint DIR --out result.json

Each rank: build the model (same seed), ``fully_shard`` every decoder layer and the root on a 2-rank CPU mesh, shift
its local shards by seeded noise (so the sharded policy differs from the checkpoint the engine started from), run
``check_sync`` (expected to fail: the engine has the old weights), ``sync_weights`` in buckets of ``--bucket-mb``
while a thread samples this process's resident memory, then ``check_sync`` again. Rank results go to ``--out`` as
JSON ({rank: {...}}). Launched by tests/test_rollout_sync.py; a script (not a test) because vLLM on CPU needs the
``if __name__ == "__main__"`` guard in spawned processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from peak_rss import PeakRSS  # tests/peak_rss.py, beside this script

PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51, 52]]


def build(kind: str, vocab: int):
    from pgzoo.models import build_paper_moe, build_tiny_moe

    return (build_paper_moe if kind == "paper" else build_tiny_moe)(vocab, seed=0)


def worker(rank: int, args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pgzoo.models import build_tokenizer
    from pgzoo.rollout import TransformersEngine, VLLMEngine, check_sync
    from pgzoo.rollout.sync import sync_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    result: dict = {}
    try:
        vocab = len(build_tokenizer())
        model = build(args.model, vocab)
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if args.lora:  # LoRA on attention, fused experts and router; FSDP2 over the PEFT model (frozen base)
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]))
        mesh = init_device_mesh("cpu", (args.world,))
        decoder = model.base_model.model.model if args.lora else model.model
        for layer in decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gen = torch.Generator().manual_seed(100 + rank)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if args.lora and "lora_B" not in name:
                    continue  # only the adapter moves
                local = p.to_local()
                local.add_(torch.randn(local.shape, generator=gen) * (0.3 if args.lora else 0.05))
        if args.engine == "transformers":
            engine = TransformersEngine(build(args.model, vocab))
        else:
            engine = VLLMEngine(args.checkpoint, dtype="float32", gpu_memory_utilization=0.05, max_model_len=64,
                                distributed_executor_backend="external_launcher", seed=rank // args.tp,
                                tensor_parallel_size=args.tp)
        before = check_sync(engine, model, PROMPTS, max_new_tokens=8, seed=rank)
        dist.barrier()
        with PeakRSS() as mem:
            stats = sync_weights(model, engine, bucket_mb=args.bucket_mb)
        after = check_sync(engine, model, PROMPTS, max_new_tokens=8, seed=rank)
        again = sync_weights(model, engine, bucket_mb=args.bucket_mb)  # a second sync is the same
        after2 = check_sync(engine, model, PROMPTS, max_new_tokens=8, seed=rank + 10)
        local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())  # all sharded again
        result = dict(before=before.mean_abs_diff, after=after.mean_abs_diff, after_max=after.max_abs_diff,
                      after2=after2.mean_abs_diff, tokens=after.num_tokens, full_bytes=full_bytes,
                      local_bytes=local_bytes, rss_extra=mem.extra, stats=stats.__dict__, stats2=again.__dict__)
        if hasattr(engine, "close"):
            engine.close()
        result["pg_alive"] = dist.is_initialized()
    except BaseException as exc:  # report, then let the other rank time out rather than hang the test
        import traceback

        result = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    Path(f"{args.out}.{rank}").write_text(json.dumps(result))
    if "error" in result:
        os._exit(1)
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--model", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="a PEFT LoRA policy (the engine gets W + s*B*A)")
    parser.add_argument("--tp", type=int, default=1, help="vLLM tensor-parallel size (ranks per engine)")
    parser.add_argument("--port", type=int, default=29512)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    # Fixed mmap threshold: freed large tensors go back to the OS at once, so resident memory tracks live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")

    mp.start_processes(worker, args=(args,), nprocs=args.world, start_method="spawn", join=True)
    out = {r: json.loads(Path(f"{args.out}.{r}").read_text()) for r in range(args.world)}
    Path(args.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
