"""Per-rank memory and step time of the loop's update under ``train.strategy=fsdp`` vs ``ddp`` (2 ranks, gloo, CPU).

    python benchmarks/scale.py                                   # a Qwen3-30B-A3B-shaped MoE scaled to hidden 256
    python benchmarks/scale.py --model num_hidden_layers=2 --steps 2
    python benchmarks/scale.py --model-builder pgzoo.models:build_paper_moe   # another builder, same overrides

Each strategy runs as 2 processes (torchrun-style environment, Lightning's strategy, ``RLModule.update`` on a fixed
synthetic batch of 16 responses x 32 tokens, N = 1, AdamW). Per rank it reports the bytes held by parameters,
gradients and optimizer state (the local shard under FSDP: ``DTensor.to_local()``), their ratio fsdp / ddp (the goal
is <= 0.55 with 2 ranks: half of everything plus unsharded buffers), and the median wall time of an update.

The default model is ``build_tiny_moe`` with Qwen3-30B-A3B's structure (128 experts, top-8, hidden : intermediate :
expert intermediate = 2048 : 6144 : 768, 32 query / 4 key-value heads scaled to 4 / 1) at hidden 256, 4 layers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PAPER_SHAPE = {"hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 96, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "num_experts": 128,
               "num_experts_per_tok": 8, "norm_topk_prob": True}
WORLD = 2


def _parse(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = json.loads(value) if value not in ("True", "False") else value == "True"
    return out


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(strategy: str, builder: str, overrides: dict, steps: int, out: str) -> None:
    import lightning as L

    import pgzoo
    from pgzoo.adapters.lightning.loop_data import RolloutBatch, step_loader
    from pgzoo.adapters.lightning.module import RLModule
    from pgzoo.adapters.lightning.distributed import trainer_parallelism
    from pgzoo.recipes import recipe_from_dict

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    module_name, _, fn = builder.partition(":")
    model = getattr(importlib.import_module(module_name), fn)(vocab_size=128, seed=0, **overrides)
    recipe = recipe_from_dict({"rollout": {"prompts_per_step": 8, "group_size": 4, "max_new_tokens": 32},
                               "train": {"strategy": strategy, "devices": WORLD, "steps": steps}})
    n, P, T = 8, 16, 32  # this rank's rows (16 responses over 2 ranks)
    g = torch.Generator().manual_seed(int(os.environ["RANK"]))
    data = RolloutBatch(torch.randint(4, 120, (n, P), generator=g), torch.ones(n, P, dtype=torch.bool),
                        torch.randint(4, 120, (n, T), generator=g), torch.ones(n, T, dtype=torch.bool),
                        -torch.rand(n, T, generator=g) - 4, torch.randn(n, generator=g), torch.zeros(n),
                        torch.zeros(n, dtype=torch.bool))
    times: list[float] = []

    class Bench(RLModule):
        def training_step(self, step, batch_idx):
            t0 = time.perf_counter()
            self.update(data.to(self.device))
            times.append(time.perf_counter() - t0)

    module = Bench(model, None, pgzoo.get("minirl"), None, None, recipe)
    trainer = L.Trainer(**trainer_parallelism(recipe), max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=step_loader(0, steps))
    opt = module.optimizers()
    opt = getattr(opt, "optimizer", opt)
    params = sum(_local_bytes(p) for p in module.policy.parameters())
    grads = sum(_local_bytes(p.grad) for p in module.policy.parameters() if p.grad is not None)
    state = sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps({"params": params, "grads": grads, "optimizer": state,
                                         "step_s": statistics.median(times[1:] or times),
                                         "num_params": sum(p.numel() for p in model.parameters())}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(strategy: str, args) -> dict:
    port, out = _free_port(), Path(f"/tmp/pgzoo-scale-{os.getpid()}-{strategy}.json")
    cmd = [sys.executable, __file__, "--worker", strategy, "--steps", str(args.steps), "--model-builder",
           args.model_builder, "--out", str(out), "--model", *args.model]
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "TORCHELASTIC_RUN_ID": f"scale-{port}", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "GROUP_RANK": "0", "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{strategy}: ranks exited with {codes}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="*", default=[], help="config overrides key=value (JSON values)")
    parser.add_argument("--model-builder", default="pgzoo.models:build_tiny_moe")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {**(PAPER_SHAPE if args.model_builder.endswith(":build_tiny_moe") else {}), **_parse(args.model)}
    if args.worker:
        worker(args.worker, args.model_builder, overrides, args.steps, args.out)
        return
    res = {s: run(s, args) for s in ("ddp", "fsdp")}
    print(f"model: {args.model_builder} {overrides}, {res['ddp']['num_params'] / 1e6:.1f} M parameters; "
          f"{WORLD} ranks (gloo, CPU); torch {torch.__version__}")
    print("| per rank | ddp | fsdp | fsdp / ddp |\n|---|---|---|---|")
    for key in ("params", "grads", "optimizer"):
        a, b = res["ddp"][key], res["fsdp"][key]
        print(f"| {key} MB | {a / 2**20:.1f} | {b / 2**20:.1f} | {b / a:.3f} |")
    a = sum(res["ddp"][k] for k in ("params", "grads", "optimizer"))
    b = sum(res["fsdp"][k] for k in ("params", "grads", "optimizer"))
    print(f"| total MB | {a / 2**20:.1f} | {b / 2**20:.1f} | {b / a:.3f} |")
    print(f"| update s (median) | {res['ddp']['step_s']:.3f} | {res['fsdp']['step_s']:.3f} | "
          f"{res['fsdp']['step_s'] / res['ddp']['step_s']:.2f} |")


if __name__ == "__main__":
    main()
