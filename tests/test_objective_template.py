"""The objective template: shaping composes with every family where it is defined, is refused where it is not, and
leaves every objective's loss and gradient bit-identical while it is off.

The references below are naive: float64, token by token from each family's formula (its module docstring) and from
the shaping formulas of :mod:`pgzoo.objectives.shaping`, on batches with NaN garbage at masked positions, a fully
masked row, and per-sequence or per-token advantages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pgzoo
from pgzoo.testing import random_batch

NAN = float("nan")
BASELINE = json.loads((Path(__file__).parent / "data" / "objective_baseline.json").read_text())["cases"]


def make_batch(per_token: bool, seed: int = 5, entropies: bool = True) -> pgzoo.TokenBatch:
    """A float64 batch with NaN at every masked position, a fully masked last row and entropies with gradient."""
    b = random_batch(4, 6, seed=seed, per_token_advantages=per_token, fully_masked_row=True, pad_value=NAN, scale=0.4)
    if not entropies:
        return b
    g = torch.Generator().manual_seed(seed + 1)
    ent = torch.where(b.mask, torch.rand(4, 6, generator=g, dtype=torch.float64) * 2.0, NAN).requires_grad_(True)
    return pgzoo.TokenBatch(logprobs=b.logprobs, mask=b.mask, advantages=b.advantages, old_logprobs=b.old_logprobs,
                            rollout_logprobs=b.rollout_logprobs, ref_logprobs=b.ref_logprobs, entropies=ent)


# --------------------------------------------------------------------------------------------- naive references
class Tokens:
    """Scalar views of one batch: lp[i][t] keeps the graph to ``batch.logprobs`` (only unmasked tokens are read)."""

    def __init__(self, b: pgzoo.TokenBatch):
        self.b = b
        self.B, self.T = b.mask.shape
        self.rows = [[t for t in range(self.T) if b.mask[i, t]] for i in range(self.B)]
        self.lp = lambda i, t: b.logprobs[i, t]
        self.old = lambda i, t: float(b.old_logprobs[i, t])
        self.mu = lambda i, t: float(b.rollout_logprobs[i, t])
        self.ref = lambda i, t: float(b.ref_logprobs[i, t])
        self.ent = lambda i, t: b.entropies[i, t]

    def adv(self, i: int, t: int) -> float:
        a = self.b.advantages
        return float(a[i, t]) if a.dim() == 2 else float(a[i])

    def seq_adv(self, i: int) -> float:
        """The advantage of a sequence term: A_i, or the row mean of per-token advantages."""
        return sum(self.adv(i, t) for t in self.rows[i]) / len(self.rows[i])

    def n_seq(self) -> int:
        return sum(1 for r in self.rows if r)

    def n_tok(self) -> int:
        return sum(len(r) for r in self.rows)

    def tokens(self):
        return [(i, t) for i in range(self.B) for t in self.rows[i]]


def kl_naive(tk: Tokens, i: int, t: int, kind: str):
    d = torch.clamp(tk.ref(i, t) - tk.lp(i, t), -20.0, 20.0)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    k3 = torch.exp(d) - d - 1.0
    return torch.clamp(k3, -10.0, 10.0) if kind == "low-var-k3" else k3


def entropy_kept(tk: Tokens, rho: float) -> set:
    """E: tokens whose entropy is at least the (1 − ρ)-quantile of the unmasked entropies (linear interpolation)."""
    if rho >= 1.0:
        return set(tk.tokens())
    values = torch.tensor([float(tk.ent(i, t).detach()) for i, t in tk.tokens()], dtype=torch.float64)
    threshold = float(torch.quantile(values, 1.0 - rho))
    return {(i, t) for i, t in tk.tokens() if float(tk.ent(i, t).detach()) >= threshold}


def seq_kl_sampler(tk: Tokens, i: int) -> float:
    """The off-policy mask's statistic: the row mean of mu − lp (mu: rollout_logprobs)."""
    return sum(tk.mu(i, t) - float(tk.lp(i, t).detach()) for t in tk.rows[i]) / len(tk.rows[i])


def bonus_naive(tk: Tokens, c: dict, kept: set):
    """entropy_coef · the mean entropy over the kept tokens."""
    coef = c.get("entropy_coef", 0.0)
    if coef == 0:
        return 0.0
    return coef * sum(tk.ent(i, t) for i, t in kept) / len(kept)


def token_loss_naive(tk: Tokens, policy, mode: str, c: dict, ratio=None):
    """−aggregate(E·O·p − β·KL·(r)) − bonus for a per-token policy term ``policy(i, t)`` and ratio ``ratio(i, t)``."""
    kept = entropy_kept(tk, c.get("top_entropy_quantile", 1.0))
    delta = c.get("off_policy_mask_threshold")
    beta = c.get("beta", 0.0)
    row_sums = []
    for i in range(tk.B):
        total = 0.0
        for t in tk.rows[i]:
            keep = (i, t) in kept and not (delta is not None and tk.adv(i, t) < 0 and seq_kl_sampler(tk, i) > delta)
            term = policy(i, t) * float(keep)
            if beta:
                kl = kl_naive(tk, i, t, c.get("kl", "k3"))
                if c.get("bias_correction_kl"):
                    kl = kl * ratio(i, t)
                term = term - beta * kl
            total = total + term
        row_sums.append((total, len(tk.rows[i])))
    if mode == "seq-mean-token-sum":
        loss = -sum(s for s, _ in row_sums) / tk.n_seq()
    elif mode == "seq-mean-token-mean":
        loss = -sum(s / n for s, n in row_sums if n) / tk.n_seq()
    elif mode == "token-mean":
        loss = -sum(s for s, _ in row_sums) / tk.n_tok()
    else:
        raise AssertionError(mode)
    return loss - bonus_naive(tk, c, kept)


def sequence_loss_naive(tk: Tokens, policy, c: dict, ratio=None):
    """−Σ_i (O_i·p_i − β·mean_t KL_it·(r_i)) / N_seq − bonus for a per-sequence term ``policy(i)``."""
    delta = c.get("off_policy_mask_threshold")
    beta = c.get("beta", 0.0)
    total = 0.0
    for i in range(tk.B):
        if not tk.rows[i]:
            continue
        keep = not (delta is not None and tk.seq_adv(i) < 0 and seq_kl_sampler(tk, i) > delta)
        term = policy(i) * float(keep)
        if beta:
            kl = sum(kl_naive(tk, i, t, c.get("kl", "k3")) for t in tk.rows[i]) / len(tk.rows[i])
            if c.get("bias_correction_kl"):
                kl = kl * ratio(i)
            term = term - beta * kl
        total = total + term
    return -total / tk.n_seq() - bonus_naive(tk, c, set(tk.tokens()))


# the families' policy terms, from their docstrings
def minirl_term(tk: Tokens):
    def p(i, t):
        lp, old, a = tk.lp(i, t), tk.old(i, t), tk.adv(i, t)
        r = math.exp(float(lp.detach()) - old)
        clipped = (a > 0 and r > 1.27) or (a < 0 and r < 0.8)
        w = min(math.exp(float(lp.detach()) - tk.mu(i, t)), 5.0)
        return 0.0 * lp if clipped else w * a * lp
    return p


def minirl_no_is(tk: Tokens, i: int, t: int):
    """minirl-no-is: M·min(sg(r), C)·A·lp, the weight from the staleness ratio alone."""
    lp, old, a = tk.lp(i, t), tk.old(i, t), tk.adv(i, t)
    r = math.exp(float(lp.detach()) - old)
    clipped = (a > 0 and r > 1.27) or (a < 0 and r < 0.8)
    return 0.0 * lp if clipped else min(r, 5.0) * a * lp


def gpg_term(tk: Tokens):
    return lambda i, t: tk.adv(i, t) * tk.lp(i, t)


def dppo_tv_term(tk: Tokens):
    def p(i, t):
        lp, old, a = tk.lp(i, t), tk.old(i, t), tk.adv(i, t)
        diff = math.exp(min(float(lp.detach()), 0.0)) - math.exp(min(old, 0.0))
        masked = (a > 0 and diff > 0.2) or (a < 0 and diff < -0.2)
        return 0.0 * lp if masked else min(math.exp(float(lp.detach()) - old), 3.0) * a * lp
    return p


def ppo_clip_term(tk: Tokens, eps=0.2):
    """min(r·A, clip(r, 1 − ε, 1 + ε)·A): Clip-Cov with an empty covariance band (nothing selected)."""
    def p(i, t):
        r, a = torch.exp(tk.lp(i, t) - tk.old(i, t)), tk.adv(i, t)
        return torch.minimum(r * a, torch.clamp(r, 1 - eps, 1 + eps) * a)
    return p


def unclipped_term(tk: Tokens):
    """r·A: KL-Cov with kl_coef = 0 (the selected tokens carry no penalty)."""
    return lambda i, t: torch.exp(tk.lp(i, t) - tk.old(i, t)) * tk.adv(i, t)


def token_ratio(tk: Tokens):
    return lambda i, t: torch.exp(tk.lp(i, t) - tk.old(i, t))


def gspo_seq_ratio(tk: Tokens, i: int):
    return torch.exp(sum(tk.lp(i, t) - tk.old(i, t) for t in tk.rows[i]) / len(tk.rows[i]))


def gspo_term(tk: Tokens, eps_low=3e-4, eps_high=4e-4):
    def p(i):
        s, a = gspo_seq_ratio(tk, i), tk.seq_adv(i)
        return torch.minimum(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a)
    return p


def gspo_token_ratio(tk: Tokens):
    return lambda i, t: float(gspo_seq_ratio(tk, i).detach()) * torch.exp(tk.lp(i, t) - float(tk.lp(i, t).detach()))


def gspo_token_term(tk: Tokens, eps_low=3e-4, eps_high=4e-4):
    def p(i, t):
        s, a = gspo_token_ratio(tk)(i, t), tk.adv(i, t)
        return torch.minimum(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a)
    return p


def gmpo_term(tk: Tokens, eps=0.2):
    def p(i):
        total = 0.0
        for t in tk.rows[i]:
            lr, a = tk.lp(i, t) - tk.old(i, t), tk.adv(i, t)
            sign = (a > 0) - (a < 0)
            total = total + sign * torch.minimum(sign * lr, sign * torch.clamp(lr, -eps, eps))
        return tk.seq_adv(i) * torch.exp(total / len(tk.rows[i]))
    return p


SHAPINGS = {
    "kl-k3": dict(beta=0.1),
    "kl-k1-bias": dict(beta=0.2, kl="k1", bias_correction_kl=True),
    "kl-k2": dict(beta=0.3, kl="k2"),
    "kl-low-var-k3-bias": dict(beta=0.05, kl="low-var-k3", bias_correction_kl=True),
    "entropy-bonus": dict(entropy_coef=0.03),
    "entropy-mask": dict(top_entropy_quantile=0.5),
    "off-policy-mask": dict(off_policy_mask_threshold=0.02),
    "all": dict(beta=0.1, bias_correction_kl=True, entropy_coef=0.02, top_entropy_quantile=0.6,
                off_policy_mask_threshold=0.05),
}
SEQUENCE_SHAPINGS = {k: v for k, v in SHAPINGS.items() if "top_entropy_quantile" not in v}

TOKEN_FAMILIES = {  # name -> (naive term, aggregation, the family's own options)
    "minirl": (minirl_term, "seq-mean-token-sum", {}),
    "minirl-no-is": (lambda tk: lambda i, t: minirl_no_is(tk, i, t), "seq-mean-token-sum", {}),
    "gpg": (gpg_term, "token-mean", {}),
    "dppo-tv": (dppo_tv_term, "token-mean", {}),
    "gspo-token": (gspo_token_term, "seq-mean-token-mean", {}),
    "clip-cov": (ppo_clip_term, "token-mean", dict(cov_lb=1e9, cov_ub=2e9)),  # a band holding no token
    "kl-cov": (unclipped_term, "token-mean", dict(kl_coef=0.0)),
}


def assert_matches(obj, batch, naive_loss) -> None:
    out = obj(batch)
    fields = [batch.logprobs, batch.entropies]
    got = torch.autograd.grad(out.loss, fields, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(naive_loss, fields, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(out.loss, naive_loss.detach(), rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("per_token", [False, True], ids=["seq-adv", "token-adv"])
@pytest.mark.parametrize("shaping", list(SHAPINGS))
@pytest.mark.parametrize("name", list(TOKEN_FAMILIES))
def test_token_families_compose_with_shaping(name, shaping, per_token):
    term, mode, own = TOKEN_FAMILIES[name]
    c = SHAPINGS[shaping]
    batch = make_batch(per_token)
    tk = Tokens(batch)
    # gspo-token's own ratio s_it has the value of s_i and the gradient of lp
    ratio = gspo_token_ratio(tk) if name == "gspo-token" else token_ratio(tk)
    assert_matches(pgzoo.get(name, **own, **c), batch, token_loss_naive(tk, term(tk), mode, c, ratio))


@pytest.mark.parametrize("per_token", [False, True], ids=["seq-adv", "token-adv"])
@pytest.mark.parametrize("shaping", list(SEQUENCE_SHAPINGS))
@pytest.mark.parametrize("name", ["gspo", "gmpo"])
def test_sequence_families_compose_with_shaping(name, shaping, per_token):
    c = SEQUENCE_SHAPINGS[shaping]
    batch = make_batch(per_token)
    tk = Tokens(batch)
    term = gspo_term(tk) if name == "gspo" else gmpo_term(tk)
    # bias_correction_kl: gspo's own ratio s_i; gmpo's unclipped geometric mean of the token ratios (the same s_i)
    naive = sequence_loss_naive(tk, term, c, lambda i: gspo_seq_ratio(tk, i))
    assert_matches(pgzoo.get(name, **c), batch, naive)


@pytest.mark.parametrize("name", ["clip-cov", "kl-cov"])
def test_cov_families_add_the_kl_and_the_bonus(name):
    """With their selection on (a whole-batch ranking, tested against verl elsewhere), Clip-Cov's and KL-Cov's
    shaped loss is their own loss plus the naive KL term and entropy bonus."""
    c = dict(beta=0.1, kl="k2", entropy_coef=0.05)
    batch = make_batch(per_token=True)
    tk = Tokens(batch)
    plain = pgzoo.get(name)(batch).loss
    shaping = token_loss_naive(tk, lambda i, t: 0.0 * tk.lp(i, t), "token-mean", c)
    assert_matches(pgzoo.get(name, **c), batch, plain + shaping)


# -------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["gspo", "gmpo"])
def test_entropy_mask_on_a_sequence_term_is_refused(name):
    with pytest.raises(pgzoo.ConfigError, match="top_entropy_quantile=0.2.*one per sequence"):
        pgzoo.get(name, top_entropy_quantile=0.2)
    assert pgzoo.get(name, top_entropy_quantile=1.0).config.top_entropy_quantile == 1.0


def test_gspo_refusal_names_the_fix():
    with pytest.raises(pgzoo.ConfigError, match="gspo-token"):
        pgzoo.get("gspo", top_entropy_quantile=0.5)
    assert pgzoo.get("gspo-token", top_entropy_quantile=0.5).requires >= {"entropies"}


@pytest.mark.parametrize("name", ["minirl", "minirl-no-is", "minirl-no-clip", "minirl-length-norm"])
def test_correct_kl_without_a_correction_field_is_refused(name):
    with pytest.raises(pgzoo.ConfigError, match="correct_kl=True.*takes no correction"):
        pgzoo.get(name, beta=0.1, correct_kl=True)


def test_shaping_values_are_validated_on_every_family():
    for name in ("minirl", "gpg", "gspo", "gmpo", "dppo-tv", "clip-cov", "kl-cov"):
        with pytest.raises(pgzoo.ConfigError, match="beta"):
            pgzoo.get(name, beta=-1.0)
        with pytest.raises(pgzoo.ConfigError, match="kl="):
            pgzoo.get(name, beta=0.1, kl="k4")
        with pytest.raises(pgzoo.ConfigError, match="top_entropy_quantile"):
            pgzoo.get(name, top_entropy_quantile=1.5)


def test_shaping_adds_its_requirements():
    assert "ref_logprobs" in pgzoo.get("minirl", beta=0.01).requires
    assert "ref_logprobs" not in pgzoo.get("minirl").requires
    assert "entropies" in pgzoo.get("gspo", entropy_coef=0.01).requires
    assert "entropies" in pgzoo.get("gpg", top_entropy_quantile=0.5).requires


# ------------------------------------------------------------------------------------- shaping off: unchanged
@pytest.mark.parametrize("case", sorted(BASELINE))
def test_shaping_off_is_bit_identical_to_the_recorded_values(case):
    """Each objective with its defaults gives exactly the recorded float64 loss and gradient."""
    name, advantages = case.split("|")
    batch = random_batch(4, 6, seed=11, per_token_advantages=advantages == "token-advantages", fully_masked_row=True,
                         pad_value=NAN)
    loss = pgzoo.get(name)(batch).loss
    (grad,) = torch.autograd.grad(loss, batch.logprobs)
    want = BASELINE[case]
    assert float(loss.detach()).hex() == want["loss"]
    assert [[float(x).hex() for x in row] for row in grad.tolist()] == want["grad"]


@pytest.mark.parametrize("name", pgzoo.available())
def test_explicit_zero_shaping_is_the_default(name):
    """Options set to their off values take the same path as leaving them out (bit for bit)."""
    batch = make_batch(per_token=False, entropies=False)
    off = dict(beta=0.0, top_entropy_quantile=1.0, off_policy_mask_threshold=None, entropy_coef=0.0)
    a, b = pgzoo.get(name)(batch).loss, pgzoo.get(name, **off)(batch).loss
    assert torch.equal(a, b)


# ------------------------------------------------------------------------- metrics=False and torch.compile
COMBINATIONS = [
    ("minirl", dict(beta=0.1, bias_correction_kl=True, entropy_coef=0.02, top_entropy_quantile=0.6,
                    off_policy_mask_threshold=0.05)),
    ("gpg", dict(beta=0.1, kl="low-var-k3", off_policy_mask_threshold=0.05,
                 correction={"level": "token"}, correct_kl=True)),
    ("gspo", dict(beta=0.1, bias_correction_kl=True, entropy_coef=0.02, off_policy_mask_threshold=0.05,
                  correction={"level": "sequence"}, correct_kl=True)),
    ("gmpo", dict(beta=0.1, bias_correction_kl=True, off_policy_mask_threshold=0.05)),
    ("dppo-kl", dict(beta=0.1, top_entropy_quantile=0.5)),
    ("kl-cov", dict(beta=0.1, entropy_coef=0.02)),
]


@pytest.mark.parametrize("per_token", [False, True], ids=["seq-adv", "token-adv"])
@pytest.mark.parametrize("name,c", COMBINATIONS, ids=[n for n, _ in COMBINATIONS])
def test_metrics_off_is_bit_identical(name, c, per_token):
    batch = make_batch(per_token)
    on, off = pgzoo.get(name, **c), pgzoo.get(name, metrics=False, **c)
    out_on, out_off = on(batch), off(batch)
    assert out_off.metrics == {}
    assert "shaping/entropy_bonus" in out_on.metrics or "entropy_coef" not in c
    assert any(k.startswith("kl/ref_") for k in out_on.metrics)
    g_on = torch.autograd.grad(out_on.loss, [batch.logprobs, batch.entropies], allow_unused=True,
                               materialize_grads=True)
    g_off = torch.autograd.grad(out_off.loss, [batch.logprobs, batch.entropies], allow_unused=True,
                                materialize_grads=True)
    assert torch.equal(out_on.loss, out_off.loss)
    assert all(torch.equal(a, b) for a, b in zip(g_on, g_off))


@pytest.mark.parametrize("name,c", COMBINATIONS[:4], ids=[n for n, _ in COMBINATIONS[:4]])
def test_shaped_objectives_compile_to_one_graph(name, c):
    torch._dynamo.reset()
    ref = make_batch(per_token=False)
    fields = ("old_logprobs", "rollout_logprobs", "ref_logprobs")
    obj = pgzoo.get(name, **c)

    def step(lp, ent, mask, adv, *tensors):
        batch = pgzoo.TokenBatch(logprobs=lp, mask=mask, advantages=adv, entropies=ent, check_values=False,
                                 **dict(zip(fields, tensors)))
        out = obj(batch)
        return out.loss, out.metrics

    compiled = torch.compile(step, backend="eager", fullgraph=True)  # a graph break is an error
    args = (ref.mask, ref.advantages, *(getattr(ref, f) for f in fields))
    leaves = [(ref.logprobs.detach().clone().requires_grad_(True), ref.entropies.detach().clone().requires_grad_(True))
              for _ in range(2)]
    loss_c, metrics_c = compiled(*leaves[0], *args)
    loss_e, metrics_e = step(*leaves[1], *args)
    grads_c = torch.autograd.grad(loss_c, leaves[0], allow_unused=True, materialize_grads=True)
    grads_e = torch.autograd.grad(loss_e, leaves[1], allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
    assert metrics_c.keys() == metrics_e.keys()
