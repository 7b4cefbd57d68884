#!/bin/bash
# The paper's MiniRL recipe (recipes/paper/minirl-r3.yaml: Qwen3-30B-A3B, B=64 prompts x G=16, R3) on verl 0.9.1
# with pgzoo's plugin, Megatron training and verl's own rollout router replay. Needs GPUs, Ray and verl's full
# training stack (pip install verl==0.9.1 with its dependencies, Megatron-LM, vLLM) and pgzoo installed in the same
# environment; not run in pgzoo's CI (docs/verl.md).
#
#   MODEL=/ckpt/qwen3-30b-a3b-cold-start TRAIN=/data/train.parquet VAL=/data/aime24.parquet \
#     NNODES=2 bash benchmarks/verl_minirl.sh [extra verl overrides ...]
set -euo pipefail
: "${MODEL:?set MODEL to the cold-started Qwen3-30B-A3B checkpoint}"
: "${TRAIN:?set TRAIN to verl's training parquet}"
: "${VAL:?set VAL to verl's validation parquet}"
NNODES=${NNODES:-2}
GPUS=${GPUS:-8}

# the objective, advantage, rollout and routing-replay settings, as pgzoo maps them (comments name the rest)
mapfile -t PGZOO < <(pgzoo recipe export --to verl paper/minirl-r3 | grep -v '^#')

python -m verl.trainer.main_ppo --config-name=ppo_megatron_trainer \
  "${PGZOO[@]}" \
  actor_rollout_ref.model.path="$MODEL" \
  data.train_files="$TRAIN" data.val_files="$VAL" \
  data.max_prompt_length=2048 \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.optim.clip_grad=1.0 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1 \
  actor_rollout_ref.actor.megatron.expert_model_parallel_size=8 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=4 \
  trainer.nnodes="$NNODES" trainer.n_gpus_per_node="$GPUS" \
  trainer.total_training_steps=1000 trainer.save_freq=20 trainer.test_freq=50 \
  trainer.project_name=pgzoo trainer.experiment_name=paper-minirl-r3 \
  "$@"
