"""pgzoo rollout engines behind TRL's ``rollout_func``: vLLM on CPU or GPU, or transformers generation in a chosen dtype.

    from pgzoo.adapters.trl import GRPOTrainer, EngineRollout
    from pgzoo.rollout import VLLMEngine

    engine = VLLMEngine(checkpoint, gpu_memory_utilization=0.1)
    trainer = GRPOTrainer(loss=pgzoo.get("minirl"), rollout_func=EngineRollout(engine), model=checkpoint, ...)

TRL calls ``rollout_func(prompts, trainer)`` with the process's generation batch, every prompt already repeated
``num_generations`` times (contiguously). :class:`EngineRollout` tokenizes them the way TRL does
(``trainer._tokenize_prompts``: chat template included), samples one group of ``num_generations`` completions per
prompt with the engine, and returns TRL's ``prompt_ids`` / ``completion_ids`` / ``logprobs`` (the engine's μ, after
temperature) as unpadded lists. Before sampling it copies the policy's weights into the engine
(``engine.load_weights``) whenever the optimizer has stepped since the last copy.

For R3 it also asks the engine for its routes and leaves the :class:`~pgzoo.rollout.Rollouts` on the trainer; the
trainer re-pads them to its own layout with :func:`align_routes`.
"""

from __future__ import annotations

from typing import Any

import torch

from pgzoo.errors import ConfigError, EngineError
from pgzoo.rollout.base import mix_seed

UNROUTED = -1  # pgzoo.routing.UNROUTED: replay lets the router choose at such a position


class EngineRollout:
    """A TRL ``rollout_func`` backed by a pgzoo :class:`~pgzoo.rollout.RolloutEngine`.

    Args:
        engine: a pgzoo rollout engine (``VLLMEngine``, ``TransformersEngine`` or anything with its protocol).
        sync_weights: copy the policy into the engine before sampling whenever ``trainer.state.global_step`` moved
            since the last copy (and before the first rollout). Turn off only when the engine shares the policy's
            parameters (a ``TransformersEngine`` built on the trainer's own model object).
        seed: base seed; rollout ``c`` on process ``p`` samples with seed ``seed + 7919·c + p`` (``None``: the
            trainer's ``args.seed``).
        verify_sync: after each weight sync, check parity on a probe (the batch's first 4 prompts, 8 tokens) with
            :func:`pgzoo.rollout.check_sync` and raise ``EngineError`` when the engine's mean |log μ − log π|
            exceeds this (e.g. 1e-4 for a float32 engine); logged as ``pgzoo/sync/logprob_abs_diff_mean|max``.
            None (default): no check.

    Sampling settings come from the trainer: ``temperature``, ``top_p`` and ``max_completion_length``. Settings the
    engines do not implement (``top_k``, ``min_p``, ``repetition_penalty``, ``generation_kwargs``) raise.
    """

    def __init__(self, engine: Any, *, sync_weights: bool = True, seed: int | None = None,
                 verify_sync: float | None = None):
        for attr in ("generate", "load_weights"):
            if not callable(getattr(engine, attr, None)):
                raise ConfigError(
                    f"EngineRollout(engine=...) needs a pgzoo rollout engine with .{attr}(); got "
                    f"{type(engine).__name__}. Use pgzoo.rollout.VLLMEngine or pgzoo.rollout.TransformersEngine"
                )
        if verify_sync is not None and (isinstance(verify_sync, bool) or not isinstance(verify_sync, (int, float))
                                        or not verify_sync > 0):
            raise ConfigError(f"EngineRollout(verify_sync={verify_sync!r}): give a positive tolerance of the mean "
                              f"|log mu - log pi| (e.g. 1e-4 for a float32 engine), or None for no check")
        self.engine = engine
        self.sync_weights = sync_weights
        self.verify_sync = verify_sync
        self.last_sync_check = None
        self.seed = seed
        self.calls = 0
        self.syncs = 0
        self._synced_step: int | None = None
        self.last_rollouts = None

    @property
    def supports_routes(self) -> bool:
        return bool(getattr(self.engine, "supports_routes", False))

    def check_trainer(self, trainer) -> None:
        """Raise for sampling settings of ``trainer`` that the engine would silently ignore."""
        unsupported = {
            "top_k": (trainer.top_k, (None, 0, -1)),
            "min_p": (trainer.min_p, (None, 0, 0.0)),
            "repetition_penalty": (trainer.repetition_penalty, (None, 1, 1.0)),
            "generation_kwargs": (trainer.args.generation_kwargs, (None, {})),
        }
        for name, (value, neutral) in unsupported.items():
            if value not in neutral:
                raise ConfigError(
                    f"GRPOConfig.{name}={value!r} is not supported by pgzoo's rollout engines (EngineRollout samples "
                    f"with temperature and top_p only); leave {name} at its default"
                )

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        mode = "train" if trainer.model.training else "eval"
        group = trainer.num_generations if mode == "train" else trainer.num_generations_eval
        prompt_ids, images, _ = trainer._tokenize_prompts(prompts)
        if images is not None and any(images):
            raise EngineError("EngineRollout serves text prompts only; this batch carries images")
        # TRL repeats each prompt `group` times contiguously: sample once per group with n=group.
        blocks = len(prompt_ids) // group if group and len(prompt_ids) % group == 0 else 0
        grouped = blocks > 0 and all(
            prompt_ids[b * group + j] == prompt_ids[b * group] for b in range(blocks) for j in range(group)
        )
        unique, n = (prompt_ids[::group], group) if grouped else (prompt_ids, 1)

        if self.sync_weights and self._synced_step != trainer.state.global_step:
            from trl.models import unwrap_model_for_generation

            # TRL's own unwrapping (gathers DeepSpeed ZeRO-3 shards as TRL's generation does); in place, no restart
            with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                             gather_deepspeed3_params=trainer.args.ds3_gather_for_generation) as full:
                self.engine.load_weights(full)
                if self.verify_sync is not None:
                    self._check_sync(full, unique, trainer, mode)
            self._synced_step = trainer.state.global_step
            self.syncs += 1

        # one seed per prompt, distinct across calls and processes (a process's prompt i must not share the stream of
        # another's prompt i + 1, as one int seed + process index would make it)
        base = (trainer.args.seed if self.seed is None else self.seed) + 7919 * self.calls
        seed = [mix_seed(base, trainer.accelerator.process_index, i) for i in range(len(unique))]
        self.calls += 1
        rollouts = self.engine.generate(
            unique,
            n=n,
            max_new_tokens=trainer.max_completion_length,
            temperature=trainer.temperature,
            top_p=trainer.top_p,
            seed=seed,
            return_routes=getattr(trainer, "routing_replay", None) == "R3",
        )
        if len(rollouts) != len(prompt_ids):
            raise EngineError(f"the engine returned {len(rollouts)} completions for {len(prompt_ids)} prompts")
        self.last_rollouts = rollouts
        trainer._pgzoo_pending_rollouts = rollouts  # side channel: R3 routes for the trainer to align

        p_mask, c_mask = rollouts.prompt_mask.bool().cpu(), rollouts.completion_mask.bool().cpu()
        p_ids, c_ids, lps = rollouts.prompt_ids.cpu(), rollouts.completion_ids.cpu(), rollouts.logprobs.float().cpu()
        return {
            "prompt_ids": [ids[m].tolist() for ids, m in zip(p_ids, p_mask)],
            "completion_ids": [ids[m].tolist() for ids, m in zip(c_ids, c_mask)],
            "logprobs": [lp[m].tolist() for lp, m in zip(lps, c_mask)],
        }

    def _check_sync(self, model, prompts: list, trainer, mode: str) -> None:
        from pgzoo.rollout.sync_check import check_sync

        result = check_sync(self.engine, model, prompts[:4], max_new_tokens=min(8, trainer.max_completion_length),
                            seed=trainer.args.seed + 7919 * self.calls + 1, tolerance=self.verify_sync)
        self.last_sync_check = result
        logged = getattr(trainer, "_metrics", None)  # TRL's per-mode metric lists, averaged at each log
        if logged is not None:
            logged[mode]["pgzoo/sync/logprob_abs_diff_mean"].append(result.mean_abs_diff)
            logged[mode]["pgzoo/sync/logprob_abs_diff_max"].append(result.max_abs_diff)


def align_routes(rollouts, prompt_len: int, completion_len: int) -> torch.Tensor:
    """Re-pad an engine's routes ``[N, P+T, L, k]`` to TRL's layout ``[N, prompt_len + completion_len, L, k]``.

    Both layouts left-pad prompts and right-pad completions, but TRL pads to the longest prompt and completion *of
    the rows it kept* (and to ``pad_to_multiple_of``), so the real tokens move. Every real token keeps the engine's
    route; padding holds ``UNROUTED`` (-1: the router chooses there; those positions feed no counted logprob).
    """
    routes = rollouts.routes
    if routes is None:
        raise EngineError("the rollout engine returned no routes; R3 needs engine.generate(..., return_routes=True)")
    n, P = rollouts.prompt_ids.shape
    p_len = rollouts.prompt_mask.bool().sum(1).tolist()
    c_len = rollouts.completion_mask.bool().sum(1).tolist()
    if max(p_len) > prompt_len or max(c_len) > completion_len:
        raise EngineError(
            f"rollout routes cover prompts up to {max(p_len)} and completions up to {max(c_len)} tokens but the "
            f"trainer's batch holds {prompt_len} + {completion_len} positions"
        )
    out = routes.new_full((n, prompt_len + completion_len, *routes.shape[2:]), UNROUTED)
    for i in range(n):
        lp, lc = p_len[i], c_len[i]
        out[i, prompt_len - lp : prompt_len] = routes[i, P - lp : P]
        out[i, prompt_len : prompt_len + lc] = routes[i, P : P + lc]
    return out
