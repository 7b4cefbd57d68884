"""The loop's data: one step's rollout rows on a rank, their advantages over the whole step, host copies of their
lengths, the metrics accumulator, and the dataset of global step indices (see :mod:`pgzoo.adapters.lightning.module`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from pgzoo import advantages as advantage_estimators
from pgzoo.adapters.lightning.distributed import all_reduce_sum, gather_rows, world


def prefix_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[N, width]`` float: 1 at the first ``lengths[i]`` columns of row i (a right-padded completion's mask)."""
    return (torch.arange(width, device=lengths.device)[None] < lengths[:, None]).float()


def step_advantages(name: str, rewards: torch.Tensor, lengths: torch.Tensor, group_size: int, *, width: int,
                    options: dict | None = None, strategy=None, device=None) -> torch.Tensor:
    """This rank's advantages, computed by estimator ``name`` (with ``options``) over the WHOLE step's rows, as one
    process holding every prompt would: every rank's rewards and lengths are gathered (prompts are dealt round-robin:
    rank r holds prompts r, r + W, r + 2W, ..., each with its G rows), put back in prompt order, the estimator runs
    once, and this rank's rows are taken back. Group-relative estimators would give the same on each rank's share;
    those that normalise over the batch (``reinforce++``'s whitening, ``gpg``'s scale) would not, and neither would
    any estimator registered later that looks across groups, so every estimator goes this way. ``device``: where the
    gather runs (the module's device: NCCL gathers CUDA tensors); the result is on the rewards' device.

    ``[n]`` for an estimator of one advantage per completion; ``[n, width]`` (``width``: this rank's completion
    columns) for a per-token one. A per-token estimator reads the response mask, which the trainer's right-padded
    completions make a function of the lengths: it is rebuilt from the gathered lengths at the step's longest
    completion, the same on every rank and in one process, so W ranks and one process run the same arithmetic."""
    size, rank = world()
    options = options or {}
    per_token = "response_mask" in advantage_estimators.token_inputs(name)
    if size == 1:
        whole_rewards, whole_lengths = rewards, lengths
    else:
        prompts = rewards.shape[0] // group_size
        device = device or rewards.device
        both = torch.stack([rewards.to(device, torch.float32), lengths.to(device, torch.float32)])  # one collective
        gathered = gather_rows(both, strategy).to(rewards.device)  # [W, 2, prompts * G]
        ordered = gathered.view(size, 2, prompts, group_size).permute(1, 2, 0, 3).reshape(2, -1)  # prompt-major
        whole_rewards, whole_lengths = ordered[0], ordered[1].round().long()
    mask = prefix_mask(whole_lengths, int(whole_lengths.max())) if per_token else None
    adv = advantage_estimators.compute(name, whole_rewards, group_size=group_size, lengths=whole_lengths,
                                       response_mask=mask, **options)
    if adv.dim() == 2:  # this rank's completion columns: the step's longest completion cut or zero-padded to width
        adv = torch.nn.functional.pad(adv, (0, max(width - adv.shape[1], 0)))[:, :width]
    if size == 1:
        return adv
    return adv.view(prompts, size, group_size, *adv.shape[1:])[:, rank].reshape(-1, *adv.shape[1:])


@dataclass
class RolloutBatch:
    """One step's data on this rank, rows prompt-major (the G rows of a prompt contiguous)."""

    prompt_ids: torch.Tensor        # [n, P] left-padded
    prompt_mask: torch.Tensor       # [n, P]
    completion_ids: torch.Tensor    # [n, T] right-padded
    completion_mask: torch.Tensor   # [n, T] bool
    rollout_logprobs: torch.Tensor  # [n, T] μ (0 at padding)
    advantages: torch.Tensor        # [n], or [n, T] from a per-token estimator
    rewards: torch.Tensor           # [n]
    truncated: torch.Tensor         # [n] bool
    routes: torch.Tensor | None = None      # [n, P+T, L, k] routes to replay (R3: rollout's; R2: θold's)
    old_logprobs: torch.Tensor | None = None  # [n, T] π_θold (training engine)
    loss_mask: torch.Tensor | None = None   # [n, T] the objective's mask when it differs from completion_mask
    #                                         (train.mask_truncated_completions); attention keeps completion_mask
    versions: torch.Tensor | None = None    # [n] long: the policy version that sampled each row (asynchronous
    #                                         runs, rollout.max_staleness >= 1; pgzoo.adapters.lightning.pipeline)

    @classmethod
    def of(cls, rollouts, advantages: torch.Tensor, rewards: torch.Tensor, **extra) -> "RolloutBatch":
        """The rows of an engine's :class:`~pgzoo.rollout.base.Rollouts` with their advantages and rewards, masks as
        bool and μ as float32; ``extra``: the optional fields (routes, old_logprobs, ...)."""
        ro = rollouts
        return cls(ro.prompt_ids, ro.prompt_mask.bool(), ro.completion_ids, ro.completion_mask.bool(),
                   ro.logprobs.float(), advantages, rewards, ro.truncated.bool(), **extra)

    def rows(self, idx: slice) -> "RolloutBatch":
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return RolloutBatch(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    def to(self, device) -> "RolloutBatch":
        """All tensors on ``device`` (one transfer each, non-blocking from pinned memory when possible)."""
        move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return RolloutBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


@dataclass
class Lengths:
    """Host copies (one transfer per step) of what slicing needs: first real prompt column and completion length."""

    first: list[int]
    length: list[int]

    def trim(self, rows: slice, P: int) -> tuple[slice, slice]:
        first = min(self.first[rows], default=P)
        last = max(max(self.length[rows], default=1), 1)
        return slice(first if first < P else 0, P), slice(0, last)

    def tokens(self, rows: slice) -> int:
        return sum(self.length[rows])


def lengths_of(data: RolloutBatch) -> Lengths:
    P = data.prompt_mask.shape[1]
    first = torch.where(data.prompt_mask.any(-1), data.prompt_mask.float().argmax(-1), torch.full_like(
        data.prompt_mask[:, 0], P, dtype=torch.long))
    both = torch.stack([first.long(), data.completion_mask.long().sum(-1)]).cpu()  # host sync: one per step
    return Lengths(both[0].tolist(), both[1].tolist())


def _all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


def unsharded(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly-DTensor value (FSDP2 gradient norms are DTensors)."""
    full = getattr(x, "full_tensor", None)
    return full() if full is not None else x


class Accumulator:
    """Token-weighted means over micro-batches, kept on the device (max/min kept as max/min; non-finite values
    skipped); one host transfer in :meth:`result`."""

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.kind: dict[str, str] = {}
        self.seen: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict, w: float) -> None:
        for k, v in metrics.items():
            v = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, device=self.device).float().mean()
            ok = torch.isfinite(v)
            self.seen[k] = self.seen.get(k, 0.0) + ok.float()
            kind = self.kind.setdefault(k, "max" if (k.endswith("max") or "_max" in k) else
                                        "min" if (k.endswith("min") or "_min" in k) else "mean")
            if kind == "mean":
                self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok, v * w, 0.0)
                self.weights[k] = self.weights.get(k, 0.0) + torch.where(ok, w, 0.0)
            else:
                fill = -math.inf if kind == "max" else math.inf
                pick = torch.maximum if kind == "max" else torch.minimum
                self.sums[k] = pick(self.sums.get(k, torch.tensor(fill, device=self.device)),
                                    torch.where(ok, v, fill))
                self.weights[k] = self.weights.get(k, 0.0) + ok.float()  # unused for max/min

    def result(self, strategy=None) -> dict[str, float]:
        """The metrics over every micro-batch of every rank (sums and weights summed over ranks, max/min
        reduced as max/min), so a row is the one a single process would log."""
        keys = list(self.sums)
        if not keys:
            return {}
        col = lambda d: torch.stack([torch.as_tensor(d[k], device=self.device).float() for k in keys])  # noqa: E731
        both = torch.stack([col(self.sums), col(self.weights), col(self.seen)])
        if world()[0] > 1:
            sign = torch.tensor([1.0 if self.kind[k] == "max" else -1.0 if self.kind[k] == "min" else 0.0
                                 for k in keys], device=self.device)
            extreme = torch.where(sign != 0, both[0] * sign, -math.inf)  # min = -max(-x)
            both = all_reduce_sum(both.clone(), strategy)
            extreme = _all_reduce_max(extreme)
            both[0] = torch.where(sign != 0, extreme * sign, both[0])
        both = both.cpu().tolist()
        out = {}
        for k, s, w, seen in zip(keys, *both):
            if seen <= 0:
                continue  # never finite: left out
            out[k] = s / max(w, 1e-12) if self.kind[k] == "mean" else s
        return out


def attention_of(mb: RolloutBatch) -> torch.Tensor:
    return torch.cat([mb.prompt_mask, mb.completion_mask], 1)


def strip_padding(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(ids, mask.bool())]


# ---------------------------------------------------------------------- data
class StepDataset(torch.utils.data.Dataset):
    """The global step indices ``start .. steps-1``: each item is one training_step (prompts are drawn from the
    task inside the step with a per-step seed, so resuming at any step reproduces the same prompts)."""

    def __init__(self, start: int, steps: int):
        self.start, self.steps = start, steps

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __getitem__(self, i: int) -> int:
        return self.start + i


def step_loader(start: int, steps: int):
    return torch.utils.data.DataLoader(StepDataset(start, steps), batch_size=None, shuffle=False,
                                       collate_fn=lambda x: x)
