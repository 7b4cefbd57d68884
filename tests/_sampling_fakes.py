"""A fake task and rollout engine for the dynamic-sampling tests (tests/test_dapo_sampling.py and its gloo worker):
no model, every row a function of (problem, seed), so a test can say which rows a step must hold.

Problem k of a draw is ``Problem(prompt=str(n), ...)`` with n drawn from the sample seed; its group's rewards all
equal 1.0 when n is even (no signal) and alternate 0/1 when n is odd. Prompts have 1 + n % 3 tokens and
completions 1 + (seed + j) % 4 tokens, so draws differ in widths and the padding is exercised.
"""

from __future__ import annotations

import random

import torch

from pgzoo.rollout.base import Rollouts
from pgzoo.tasks.base import Problem


class FakeTask:
    name = "fake"

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        rng = random.Random(seed)
        return [Problem(prompt=str(rng.randrange(1000)), answer="") for _ in range(n)]


def fake_draw(group_size: int, *, max_new_tokens: int = 4, routes: bool = True):
    """``draw(problems, seeds) -> (Rollouts, rewards)`` as RLModule._draw returns them, and the call log."""
    calls: list[tuple[list[str], list[int]]] = []

    def draw(problems, seeds):
        calls.append(([p.prompt for p in problems], list(seeds)))
        G = group_size
        prompts = [[int(p.prompt) + 10 + t for t in range(1 + int(p.prompt) % 3)] for p in problems]
        comps = [[s % 97 + 5 + t for t in range(1 + (s + j) % max_new_tokens)] for s in seeds for j in range(G)]
        P = max(map(len, prompts))
        T = max(map(len, comps))
        n = len(problems) * G
        pid, pm = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, P, dtype=torch.bool)
        cid, cm = torch.zeros(n, T, dtype=torch.long), torch.zeros(n, T, dtype=torch.bool)
        for r in range(n):
            p, c = prompts[r // G], comps[r]
            pid[r, P - len(p):], pm[r, P - len(p):] = torch.tensor(p), True
            cid[r, :len(c)], cm[r, :len(c)] = torch.tensor(c), True
        lp = torch.where(cm, -cid.float() / 100, 0.0)
        truncated = cm.sum(-1) == max_new_tokens
        rt = None
        if routes:  # [n, P + T, L=2, k=1]: the token id at real positions, UNROUTED elsewhere
            ids = torch.cat([torch.where(pm, pid, -1), torch.where(cm, cid, -1)], 1)
            rt = ids[:, :, None, None].expand(n, P + T, 2, 1).clone()
        rewards = torch.tensor([1.0 if int(problems[r // G].prompt) % 2 == 0 else float(r % 2) for r in range(n)])
        return Rollouts(pid, pm, cid, cm, lp, truncated, torch.arange(n) // G, rt), rewards

    return draw, calls


def rows_by_group(ro: Rollouts, rewards: torch.Tensor, group_size: int) -> list[tuple]:
    """Each group's content without padding: (prompt tokens, completions, logprobs, rewards, truncated, routes)."""
    out = []
    for g in range(ro.prompt_ids.shape[0] // group_size):
        rows = range(g * group_size, (g + 1) * group_size)
        out.append((
            ro.prompt_ids[rows[0]][ro.prompt_mask[rows[0]]].tolist(),
            [ro.completion_ids[r][ro.completion_mask[r]].tolist() for r in rows],
            [ro.logprobs[r][ro.completion_mask[r]].tolist() for r in rows],
            [float(rewards[r]) for r in rows],
            [bool(ro.truncated[r]) for r in rows],
            None if ro.routes is None else [ro.routes[r][ro.routes[r][:, 0, 0] >= 0].flatten().tolist() for r in rows],
        ))
    return out
