"""DAPO's trainer-side techniques (arXiv 2503.14476, "DAPO: An Open-Source LLM Reinforcement Learning System at
Scale"), the rollout, reward and loss-mask part of a step (:mod:`pgzoo.adapters.lightning.module`):

- dynamic sampling (``rollout.dynamic_sampling``, :func:`sample_groups`): a group whose G task rewards all agree has
  zero group-relative advantage and only dilutes the batch; such groups are dropped and further draws of B prompts
  are sampled until B groups whose rewards differ are kept (the first B in draw order, as verl's
  ``algorithm.filter_groups`` keeps ``batch[:train_batch_size]``). After ``max_draws`` draws with fewer, the run
  stops with an error, as verl does after ``max_num_gen_batches``: training on fewer groups would change the step's
  batch size, its mini-batch split and the ranks' shares, and a resume with a larger bound continues exactly.
- overlong reward shaping (``rollout.overlong_buffer``, :func:`overlong_penalty`): the soft overlong punishment
  (paper eq. 13, verl's ``overlong_buffer``) added to the task rewards before advantages.
- truncated completions out of the loss (``train.mask_truncated_completions``, :func:`loss_mask`): DAPO's overlong
  filtering, TRL's ``mask_truncated_completions``.

Determinism. Draw 0 of step s is today's step: problems ``task.sample(B, seed=step_seed)``, prompt i sampled with
``mix_seed(step_seed, i)``. Draw d > 0 samples ``task.sample(B, seed=mix_seed(step_seed, d, -1))`` and prompt i with
``mix_seed(step_seed, d, i)``: functions of (recipe seed, step, draw, prompt) only, so a resumed run draws what the
uninterrupted one drew, and a run with dynamic sampling off is unchanged.

Ranks. Every draw's B prompts are dealt round-robin as in a plain step (rank r holds prompts r, r + W, ...). The
draw's rewards are gathered from every rank and put in prompt order, so every rank decides the same groups; the
kept groups are then dealt round-robin again by their position among the kept (kept group k to rank k mod W), their
rows gathered from the rank that sampled them. So W ranks train on the rows, in the order, one process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pgzoo.adapters.lightning.distributed import all_reduce_sum, gather_rows, world
from pgzoo.errors import ConfigError
from pgzoo.rollout.base import UNROUTED, Rollouts, mix_seed


def problem_seed(step_seed: int, draw: int) -> int:
    """The seed of draw ``draw``'s problems: draw 0 is the step's own seed (a plain step's problems)."""
    return step_seed if draw == 0 else mix_seed(step_seed, draw, -1)


def prompt_seed(step_seed: int, draw: int, index: int) -> int:
    """The sampling seed of prompt ``index`` of draw ``draw`` (completion j: + j), the same on whichever rank holds it;
    draw 0 keeps a plain step's ``mix_seed(step_seed, index)``."""
    return mix_seed(step_seed, index) if draw == 0 else mix_seed(step_seed, draw, index)


def has_signal(rewards: torch.Tensor) -> torch.Tensor:
    """``[prompts]`` bool of ``[prompts, G]`` rewards: whether a group's rewards differ (exactly: a group of equal
    rewards has zero advantage under every group-relative estimator, whatever its value; verl keeps std > 0)."""
    return rewards.amax(-1) != rewards.amin(-1)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13; verl's DAPO reward manager): 0 up to ``max_new_tokens - buffer``
    tokens, then falling linearly to ``-factor`` at ``max_new_tokens`` (an engine never returns more, so the
    paper's -1 beyond L_max is that end point)."""
    expected = max_new_tokens - buffer
    return (expected - lengths.float()).clamp_max(0.0) / buffer * factor  # +0.0 (not -0.0) inside the budget


def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """The completion mask with every truncated row zeroed (TRL's ``mask_truncated_completions``): such rows carry
    no loss and leave the normalisers, which count sequences with a token and unmasked tokens."""
    return completion_mask & ~truncated.bool()[:, None]


@dataclass
class Sampled:
    """This rank's share of a step: B prompts x G rows (prompt-major), their problems and task rewards, and the
    dynamic-sampling metrics (empty when it is off)."""

    rollouts: Rollouts
    problems: list
    rewards: torch.Tensor
    metrics: dict[str, float]


Draw = Callable[[list, list[int]], tuple[Rollouts, torch.Tensor]]


def sample_groups(task, draw: Draw, *, step: int, step_seed: int, prompts: int, group_size: int,
                  max_draws: int | None, strategy=None, device=None, pad_id: int = 0) -> Sampled:
    """Steps 1-2 of a global step: ``draw(problems, seeds)`` samples this rank's problems (G completions each, prompt
    i with seeds[i]) and returns its :class:`Rollouts` and ``[n * G]`` task rewards.

    ``max_draws`` None: one draw, the plain step. Otherwise draws of ``prompts`` problems until ``prompts`` groups
    whose rewards differ are kept (:func:`has_signal`, on the task rewards, before any shaping: DAPO filters on
    accuracy); a ConfigError after ``max_draws`` draws with fewer. ``device``: where the collectives run (NCCL needs
    CUDA tensors); results stay on the engine's device."""
    size, rank = world()
    mine = range(rank, prompts, size)
    local_of = lambda problems: [problems[i] for i in mine]  # noqa: E731
    draws: list[tuple[Rollouts, torch.Tensor, list]] = []
    kept: list[tuple[int, int]] = []  # (draw, prompt index) of the groups with signal, in draw order
    drawn_reward = 0.0
    for d in range(max_draws or 1):
        problems = task.sample(prompts, split="train", seed=problem_seed(step_seed, d))
        local = local_of(problems)
        ro, rewards = draw(local, [prompt_seed(step_seed, d, i) for i in mine])
        if max_draws is None:
            return Sampled(ro, local, rewards, {})
        draws.append((ro, rewards, problems))
        every = _in_prompt_order(rewards, prompts, group_size, strategy, device)  # [B, G], the same on every rank
        kept += [(d, i) for i in torch.nonzero(has_signal(every)).flatten().tolist()]
        drawn_reward += float(every.sum())
        if len(kept) >= prompts:
            break
    n_draws = len(draws)
    if len(kept) < prompts:
        raise ConfigError(
            f"rollout.dynamic_sampling: step {step} kept {len(kept)} of the {prompts} groups it needs after "
            f"max_draws={max_draws} draws of {prompts} prompts (every other group's {group_size} rewards were equal, "
            "so it has no advantage): the task is too easy or too hard for the policy now; raise "
            "rollout.dynamic_sampling.max_draws (a resume may: --allow-change rollout.dynamic_sampling.max_draws), "
            "raise rollout.group_size, or set rollout.dynamic_sampling=null")
    with_signal = len(kept)
    kept = kept[:prompts]
    metrics = {"sampling/draws": float(n_draws), "sampling/prompts_drawn": float(n_draws * prompts),
               "sampling/groups_with_signal": float(with_signal),
               "sampling/signal_frac": with_signal / (n_draws * prompts),
               "sampling/reward_mean_drawn": drawn_reward / (n_draws * prompts * group_size)}
    if kept == [(0, i) for i in range(prompts)]:  # the first draw alone, whole: the plain step's rows as they are
        ro, rewards, _ = draws[0]
        return Sampled(ro, local_of(draws[0][2]), rewards, metrics)
    ro, rewards = _deal(draws, kept, group_size, strategy, device, pad_id)
    problems = [draws[d][2][i] for d, i in kept[rank::size]]  # every rank knows every draw's problems
    return Sampled(ro, problems, rewards, metrics)


def _in_prompt_order(rewards: torch.Tensor, prompts: int, group_size: int, strategy, device) -> torch.Tensor:
    """``[prompts, G]``: every rank's rewards of one draw (rank r holds prompts r, r + W, ...) in prompt order."""
    size = world()[0]
    gathered = gather_rows(rewards.to(device or rewards.device, torch.float32), strategy).cpu()  # [W, n * G]
    return gathered.view(size, prompts // size, group_size).permute(1, 0, 2).reshape(prompts, group_size)


def _deal(draws, kept, group_size, strategy, device, pad_id) -> tuple[Rollouts, torch.Tensor]:
    """This rank's rows of the kept groups: kept group k goes to rank k mod W, from rank i mod W that sampled it
    (prompt i of its draw). Every rank sends its own kept rows, padded to common widths, in one gather per dtype."""
    size, rank = world()
    G = group_size
    routed = draws[0][0].routes is not None  # the same on every rank: one engine setting
    widths = torch.tensor([max(ro.prompt_ids.shape[1] for ro, _, _ in draws),
                           max(ro.completion_ids.shape[1] for ro, _, _ in draws)])
    P, T = (all_reduce_max(widths, strategy, device) if size > 1 else widths).tolist()
    held = {r: [(d, i) for d, i in kept if i % size == r] for r in range(size)}  # what each rank sends, in kept order
    rows = [_padded(draws[d][0], draws[d][1], slice(i // size * G, (i // size + 1) * G), P, T, pad_id)
            for d, i in held[rank]]
    parts = [_rows_of(rows, j, draws[0][0], P, T) for j in range(3 if routed else 2)]
    if size > 1:  # every rank's rows at equal row counts (padded), so each rank can take the groups dealt to it
        most = max(len(h) for h in held.values()) * G
        gathered = [gather_rows(_pad_to(x, most, j).to(device or x.device), strategy).cpu()
                    for j, x in enumerate(parts)]
        picks = [(i % size, held[i % size].index((d, i))) for d, i in kept[rank::size]]
        parts = [torch.cat([x[r, j * G:(j + 1) * G] for r, j in picks]) for x in gathered]
    longs, floats = parts[0], parts[1]
    n = longs.shape[0]
    ro = Rollouts(prompt_ids=longs[:, :P], prompt_mask=longs[:, P:2 * P].bool(),
                  completion_ids=longs[:, 2 * P:2 * P + T], completion_mask=longs[:, 2 * P + T:2 * P + 2 * T].bool(),
                  logprobs=floats[:, :T], truncated=longs[:, -1].bool(),
                  group=torch.arange(n) // G, routes=parts[2] if routed else None)
    return ro, floats[:, T].contiguous()


def _padded(ro: Rollouts, rewards: torch.Tensor, rows: slice, P: int, T: int, pad_id: int):
    """Rows ``rows`` of one draw at widths P (prompts, padded on the left) and T (completions, on the right), as
    (long columns: prompt ids, prompt mask, completion ids, completion mask, truncated; float columns: logprobs,
    reward; routes or None)."""
    p, t = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    left, right = P - p, T - t
    pad = torch.nn.functional.pad
    longs = torch.cat([pad(ro.prompt_ids[rows].long(), (left, 0), value=pad_id),
                       pad(ro.prompt_mask[rows].long(), (left, 0)),
                       pad(ro.completion_ids[rows].long(), (0, right), value=pad_id),
                       pad(ro.completion_mask[rows].long(), (0, right)),
                       ro.truncated[rows].long()[:, None]], 1)
    floats = torch.cat([pad(ro.logprobs[rows].float(), (0, right)), rewards[rows].float()[:, None]], 1)
    routes = None
    if ro.routes is not None:  # [n, p + t, L, k] along the padded prompt + completion positions
        routes = pad(ro.routes[rows].long(), (0, 0, 0, 0, left, right), value=UNROUTED)
    return longs, floats, routes


def _rows_of(rows: list, kind: int, ro: Rollouts, P: int, T: int) -> torch.Tensor:
    """Column block ``kind`` (0 longs, 1 floats, 2 routes) of this rank's kept rows; empty with the right columns when
    the rank holds none of the kept groups."""
    if rows:
        return torch.cat([r[kind] for r in rows])
    shape = [(2 * P + 2 * T + 1,), (T + 1,), (P + T, *ro.routes.shape[2:]) if ro.routes is not None else ()][kind]
    return torch.zeros((0, *shape), dtype=torch.float32 if kind == 1 else torch.long)


def _pad_to(x: torch.Tensor, rows: int, kind: int) -> torch.Tensor:
    """``x`` with rows appended up to ``rows``: a rank may hold fewer kept groups than another (never read)."""
    return torch.cat([x, x.new_full((rows - x.shape[0], *x.shape[1:]), UNROUTED if kind == 2 else 0)])


def all_reduce_max(x: torch.Tensor, strategy=None, device=None) -> torch.Tensor:
    """The element-wise max over ranks of a small integer tensor (gathered, then reduced here)."""
    return gather_rows(x.to(device or x.device), strategy).amax(0).cpu()


def shaping_metrics(penalty: torch.Tensor | None, masked: torch.Tensor | None, strategy=None) -> dict[str, float]:
    """The step's overlong-shaping and truncation-masking metrics over every rank's rows (one all-reduce):
    ``reward/overlong_penalty_mean`` (mean penalty over the rows), ``reward/overlong_frac`` (share of rows
    penalised), ``response/masked_truncated_frac`` (share of rows out of the loss)."""
    if penalty is None and masked is None:
        return {}
    ref = penalty if penalty is not None else masked
    zero = torch.zeros((), device=ref.device)
    stats = torch.stack([penalty.sum() if penalty is not None else zero,
                         (penalty < 0).float().sum() if penalty is not None else zero,
                         masked.float().sum() if masked is not None else zero,
                         torch.tensor(float(ref.shape[0]), device=ref.device)])
    s = all_reduce_sum(stats.clone(), strategy).tolist()
    n = max(s[3], 1.0)
    out = {}
    if penalty is not None:
        out.update({"reward/overlong_penalty_mean": s[0] / n, "reward/overlong_frac": s[1] / n})
    if masked is not None:
        out["response/masked_truncated_frac"] = s[2] / n
    return out


__all__ = ["Sampled", "sample_groups", "problem_seed", "prompt_seed", "has_signal", "overlong_penalty", "loss_mask",
           "shaping_metrics", "all_reduce_max"]
