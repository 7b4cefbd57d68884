"""One TRL 1.16 ``GRPOTrainer`` run on the work of ``pgzoo train tiny/minirl`` as benchmarks/async_train.py sets it up,
timed per optimizer step; prints one JSON line.

    python benchmarks/trl_grpo_step.py --model PATH [--rollout generate|vllm] [--steps 10] [--prompts 16] [--group 8]

The work: the arithmetic task's training problems, ``--prompts`` prompts x ``--group`` completions per step of at most
8 tokens at temperature 1, the task's binary reward, one optimizer step per generation (TRL:
``per_device_train_batch_size`` = prompts x group, ``gradient_accumulation_steps`` = ``steps_per_generation`` = 1),
learning rate 5e-4 as the recipe, no KL term (TRL's default ``beta=0``), TRL's default loss. ``--rollout generate``:
TRL's default, sampling with ``generate`` from the training model; ``vllm``: pgzoo's vLLM engine as TRL's
``rollout_func`` (:class:`pgzoo.adapters.trl.EngineRollout`, weights synced every step, as ``pgzoo train`` does).
A step is timed from TRL's ``on_step_begin`` to its ``on_step_end`` (generation, reward, loss, backward and optimizer
step; TRL generates inside the step), the counterpart of ``pgzoo train``'s ``time/step``. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rollout", choices=["generate", "vllm"], default="generate")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--out", default="trl-out")
    args = ap.parse_args(argv)

    import datasets
    import torch
    import transformers
    import trl

    import pgzoo.tasks

    torch.set_num_threads(1)
    task = pgzoo.tasks.get("arithmetic")
    problems = task.sample(args.prompts * (args.steps + 1), split="train", seed=0)
    dataset = datasets.Dataset.from_dict({"prompt": [p.prompt for p in problems],
                                          "answer": [p.answer for p in problems]})

    def task_reward(completions, answer, **_):
        return [1.0 if task.verify(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]

    rows = args.prompts * args.group
    config = trl.GRPOConfig(
        output_dir=args.out, per_device_train_batch_size=rows, num_generations=args.group,
        gradient_accumulation_steps=1, steps_per_generation=1, max_completion_length=8, temperature=1.0,
        learning_rate=5e-4, max_steps=args.steps, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        bf16=False, seed=0, disable_tqdm=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rollout_func = None
    if args.rollout == "vllm":
        from pgzoo.adapters.trl import EngineRollout
        from pgzoo.rollout import VLLMEngine

        rollout_func = EngineRollout(VLLMEngine(args.model, dtype="float32"))

    seconds: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            seconds.append(time.perf_counter() - self.start)

    trainer = trl.GRPOTrainer(model=model, reward_funcs=task_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, rollout_func=rollout_func, callbacks=[StepTimer()])
    trainer.train()
    timed = seconds[2:] or seconds
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    print(json.dumps({"step_s": statistics.median(timed), "steps": len(seconds),
                      "length_mean": statistics.mean(lengths) if lengths else None}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
