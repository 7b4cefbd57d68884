"""Forward + backward cost of every registered objective (metrics included) against a bare hand-written loss.

    python benchmarks/objectives.py                       # [256, 4096] float32, eager
    python benchmarks/objectives.py --loss-only           # only the bare loss and pgzoo with metrics=False
    python benchmarks/objectives.py --compile             # also torch.compile both sides
    python benchmarks/objectives.py --batch 64 --length 1024 --repeats 5 --names minirl grpo

The objectives are the registry's (``pgzoo.available()``, plugins included); ``BARE`` holds a bare loss for every
registered one (a name without one is listed at the top of the output and timed without a ratio). The bare loss is
the same formula written directly on tensors: no TokenBatch, no validation, no masking-by-replacement, no metrics;
its gradient is checked against pgzoo's before timing. The two are timed interleaved in the same run (process CPU
time, one thread by default), so load from other processes hits both alike; the ratio pgzoo / bare is what to read,
as the ratio of the minima and as the median of the per-repeat ratios. pgzoo's side builds the TokenBatch inside
the timed region with ``check_values=False`` (trainers that validate upstream do this; the value check is one host
sync); ``loss only`` times ``pgzoo.get(name, metrics=False)``: the same loss and gradient without the diagnostics;
without ``--loss-only`` the columns ``pgzoo`` (metrics on) and ``checked`` (the value check on) follow.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import pgzoo

# ---------------------------------------------------------------------------------------------- bare losses
# An optional baseline per objective, written from docs/design.md §4 with the fewest ops; masked positions are assumed clean (zeros), as a hand-rolled trainer
# would assume. No metrics.


def _ppo(lp, old, adv, lo, hi):
    r = torch.exp(lp - old)
    return torch.minimum(r * adv, torch.clamp(r, lo, hi) * adv)


def bare_minirl(lp, m, adv, old, mu, ref, *, no_clip=False, length_norm=False, no_is=False):
    log_r = lp.detach() - old
    w = torch.exp((log_r if no_is else lp.detach() - mu)).clamp(max=5.0)
    coef = w * adv
    if not no_clip:
        keep = ~(((adv > 0) & (log_r > math.log(1.27))) | ((adv < 0) & (log_r < math.log(0.8))))
        coef = coef * keep
    per_tok = coef * lp * m
    n_seq = m.any(-1).sum()
    if length_norm:
        return -(per_tok.sum(-1) / m.sum(-1).clamp_min(1)).sum() / n_seq
    return -per_tok.sum() / n_seq


def bare_grpo(lp, m, adv, old, mu, ref):
    t = _ppo(lp, old, adv, 0.8, 1.2) * m
    return -(t.sum(-1) / m.sum(-1).clamp_min(1)).sum() / m.any(-1).sum()


def bare_dr_grpo(lp, m, adv, old, mu, ref):
    return -(_ppo(lp, old, adv, 0.8, 1.2) * m).sum() / (m.any(-1).sum() * m.shape[1])


def bare_dapo(lp, m, adv, old, mu, ref):
    return -(_ppo(lp, old, adv, 0.8, 1.28) * m).sum() / m.sum()


def bare_cispo(lp, m, adv, old, mu, ref):
    w = torch.exp(lp.detach() - old).clamp(max=5.0)
    return -(w * adv * lp * m).sum() / m.sum()


def bare_gspo(lp, m, adv, old, mu, ref):
    n = m.sum(-1).clamp_min(1)
    s = torch.exp(((lp - old) * m).sum(-1) / n)
    a = adv[:, 0]
    t = torch.minimum(s * a, torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * a)
    return -t.sum() / m.any(-1).sum()


def bare_gspo_token(lp, m, adv, old, mu, ref):
    n = m.sum(-1, keepdim=True).clamp_min(1)
    log_s = (((lp.detach() - old) * m).sum(-1, keepdim=True) / n)
    s = torch.exp(log_s + lp - lp.detach())
    t = torch.minimum(s * adv, torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * adv) * m
    return -(t.sum(-1) / n[:, 0]).sum() / m.any(-1).sum()


def bare_dual_clip_ppo(lp, m, adv, old, mu, ref):
    t = _ppo(lp, old, adv, 0.8, 1.2)
    t = torch.where(adv < 0, torch.maximum(t, 3.0 * adv), t)
    return -(t * m).sum() / m.sum()


def bare_gpg(lp, m, adv, old, mu, ref):
    return -(adv * lp * m).sum() / m.sum()


def _cov_top(lp, m, adv, candidates, ratio):
    """Flat indices of the k = max(⌊ρ·N⌋, 1) candidates of largest covariance (a bare loss may sync: k is an int)."""
    n = m.sum()
    cov = (adv - (adv * m).sum() / n) * (lp.detach() - (lp.detach() * m).sum() / n)
    key = torch.where(candidates, cov, -torch.inf).reshape(-1)
    top = torch.topk(key, max(int(ratio * int(n)), 1))
    return top.indices[top.values > -torch.inf]


def bare_clip_cov(lp, m, adv, old, mu, ref):
    r = torch.exp(lp - old)
    clipped = ((adv > 0) & (r.detach() > 1.2)) | ((adv < 0) & (r.detach() < 0.8))
    n = m.sum()
    cov = (adv - (adv * m).sum() / n) * (lp.detach() - (lp.detach() * m).sum() / n)
    cand = (m > 0) & ~clipped & (cov > 1.0) & (cov < 5.0)
    keep = torch.ones_like(lp).reshape(-1)
    keep[_cov_top(lp, m, adv, cand, 2e-4)] = 0.0
    t = torch.minimum(r * adv, torch.clamp(r, 0.8, 1.2) * adv) * keep.reshape(lp.shape)
    return -(t * m).sum() / n


def bare_kl_cov(lp, m, adv, old, mu, ref):
    log_r = lp - old
    sel = torch.zeros_like(lp).reshape(-1)
    sel[_cov_top(lp, m, adv, m > 0, 2e-4)] = 0.1
    t = torch.exp(log_r) * adv - sel.reshape(lp.shape) * log_r.abs()
    return -(t * m).sum() / m.sum()


def bare_gmpo(lp, m, adv, old, mu, ref):
    sgn = torch.sign(adv)
    x = lp - old
    x = sgn * torch.minimum(sgn * x, sgn * torch.clamp(x, -0.2, 0.2))
    n = m.sum(-1).clamp_min(1)
    s = torch.exp((x * m).sum(-1) / n)
    return -((adv * m).sum(-1) / n * s).sum() / m.any(-1).sum()


def bare_dppo(lp, m, adv, old, mu, ref, *, kl=False):
    w = torch.exp(lp.detach() - old).clamp(max=3.0)
    x, old = lp.detach().clamp(max=0.0), old.clamp(max=0.0)  # log-probabilities read as ≤ 0, as pgzoo documents
    p, p_old = torch.exp(x), torch.exp(old)
    if kl:
        d = p_old * (old - x) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
        valid = torch.where(adv > 0, (d <= 0.2) | (p <= p_old), (d <= 0.2) | (p >= p_old))
    else:
        valid = torch.where(adv > 0, p - p_old <= 0.2, p - p_old >= -0.2)
    return -(w * adv * lp * valid * m).sum() / m.sum()


def bare_bnpo(lp, m, adv, old, mu, ref):
    return -(_ppo(lp, old, adv, 0.8, 1.2) * m).sum() / m.sum()


def bare_luspo(lp, m, adv, old, mu, ref):
    n = m.sum(-1)
    s = torch.exp(((lp - old) * m).sum(-1) / n.clamp_min(1))
    a = adv[:, 0]
    t = torch.minimum(s * a, torch.clamp(s, 0.8, 1.2) * a)
    return -(t * n).sum() / m.any(-1).sum()


def bare_sapo(lp, m, adv, old, mu, ref):
    tau = torch.where(adv > 0, 1.0, 1.05)
    t = torch.sigmoid(tau * (torch.exp(lp - old) - 1)) * (4 / tau) * adv * m
    return -(t.sum(-1) / m.sum(-1).clamp_min(1)).sum() / m.any(-1).sum()


def bare_vespo(lp, m, adv, old, mu, ref):
    log_w = ((lp.detach() - old) * m).sum(-1).clamp(math.log(1e-8), 20.0)  # one weight per sequence
    a = adv[:, 0]
    pos = a >= 0
    k, lam = torch.where(pos, 2.0, 3.0), torch.where(pos, 3.0, 2.0)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return -((phi * a)[:, None] * lp * m).sum() / m.sum()


def bare_cross_entropy(lp, m, adv, old, mu, ref):
    return -(lp * m).sum()


def bare_importance_sampling(lp, m, adv, old, mu, ref):
    return -(torch.exp(lp - old) * adv * m).sum()


def bare_dro(lp, m, adv, old, mu, ref):
    return -((adv * lp - 0.05 * (lp - old).square()) * m).sum() / m.sum()


def bare_ipo(lp, m, adv, old, mu, ref):
    log_r = lp - old
    p, p_old = torch.exp(lp.detach().clamp(max=0.0)), torch.exp(old.clamp(max=0.0))  # probabilities read as ≤ 1
    inside = (p - p_old).abs() <= 0.1
    return -((torch.exp(log_r) * adv * inside - 1e-3 * log_r.square()) * m).sum() / m.sum()


def bare_topr(lp, m, adv, old, mu, ref):
    w = torch.where(adv > 0, 1.0, torch.exp(lp.detach() - old).clamp(max=1.0))
    return -(w * adv * lp * m).sum() / m.any(-1).sum()


def bare_raft(lp, m, adv, old, mu, ref):
    t = _ppo(lp, old, adv, 0.8, 1.2)
    t = torch.where(adv < 0, torch.maximum(t, 1.4 * adv), t) * m
    return -(t.sum(-1) / m.sum(-1).clamp_min(1)).sum() / m.any(-1).sum()


def bare_icepop(lp, m, adv, old, mu, ref):
    rho = torch.exp(old - mu)
    c = rho * ((rho >= 0.5) & (rho <= 5.0))
    return -(c * _ppo(lp, old, adv, 0.8, 1.2) * m).sum() / m.sum()


def bare_seq_mask_tis(lp, m, adv, old, mu, ref):
    g = torch.exp(((old - mu) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1))
    c = torch.exp(old - mu) * ((g >= 0.5) & (g <= 5.0))
    return -(c * _ppo(lp, old, adv, 0.8, 1.2) * m).sum() / m.sum()


def bare_decoupled_ppo(lp, m, adv, old, mu, ref):
    w = torch.exp(old - mu)
    return -(w * (w <= 5.0) * _ppo(lp, old, adv, 0.8, 1.2) * m).sum() / m.sum()


def bare_m2po(lp, m, adv, old, mu, ref):
    # the second-moment mask (a bare loss may sync): keep the k smallest (old − mu)² whose mean stays below 0.04
    flat = torch.where(m > 0, (old - mu).square(), torch.inf).reshape(-1)
    n = int(m.sum())
    sorted_m2, order = torch.sort(flat, stable=True)
    prefix_mean = sorted_m2[:n].cumsum(0) / torch.arange(1, n + 1, dtype=flat.dtype)
    k = max(int((prefix_mean < 0.04).sum()), 1)
    keep = torch.zeros_like(flat)
    keep[order[:k]] = 1.0
    return -(keep.reshape(lp.shape) * torch.exp(lp - mu) * adv * m).sum() / n


def bare_a_star_po(lp, m, adv, old, mu, ref):
    error = 1e-3 * ((lp - ref) * m).sum(-1) - adv[:, 0]
    return error.square().sum() / m.any(-1).sum()


BARE = {
    "minirl": bare_minirl,
    "minirl-no-clip": lambda *a: bare_minirl(*a, no_clip=True),
    "minirl-length-norm": lambda *a: bare_minirl(*a, length_norm=True),
    "minirl-no-is": lambda *a: bare_minirl(*a, no_is=True),
    "grpo": bare_grpo,
    "dr-grpo": bare_dr_grpo,
    "dapo": bare_dapo,
    "cispo": bare_cispo,
    "gspo": bare_gspo,
    "gspo-token": bare_gspo_token,
    "dual-clip-ppo": bare_dual_clip_ppo,
    "gpg": bare_gpg,
    "clip-cov": bare_clip_cov,
    "kl-cov": bare_kl_cov,
    "gmpo": bare_gmpo,
    "dppo-tv": bare_dppo,
    "dppo-kl": lambda *a: bare_dppo(*a, kl=True),
    "bnpo": bare_bnpo,
    "luspo": bare_luspo,
    "sapo": bare_sapo,
    "vespo": bare_vespo,
    "cross-entropy": bare_cross_entropy,
    "importance-sampling": bare_importance_sampling,
    "dro": bare_dro,
    "kimi15": bare_dro,
    "prime-ipo": bare_ipo,
    "ipo": bare_ipo,
    "topr": bare_topr,
    "raft++": bare_raft,
    "icepop": bare_icepop,
    "seq-mask-tis": bare_seq_mask_tis,
    "decoupled-ppo": bare_decoupled_ppo,
    "m2po": bare_m2po,
    "a-star-po": bare_a_star_po,
    "a2po": bare_a_star_po,
}


# ---------------------------------------------------------------------------------------------- timing
def make_inputs(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    m = torch.arange(T)[None] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = lp + 0.05 * torch.randn(B, T, generator=g)
    mu = old + 0.05 * torch.randn(B, T, generator=g)
    ref = lp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    z = torch.zeros(())
    clean = [torch.where(m, x, z) for x in (lp, old, mu, ref)]
    return m, adv, clean


def pgzoo_step(obj, lp0, m, adv, old, mu, ref, check_values=False):
    lp = lp0.detach().requires_grad_(True)
    batch = pgzoo.TokenBatch(logprobs=lp, mask=m, advantages=adv, old_logprobs=old, rollout_logprobs=mu,
                             ref_logprobs=ref, check_values=check_values)
    out = obj(batch)
    out.loss.backward()
    return lp.grad


def bare_step(fn, lp0, m, adv, old, mu, ref):
    lp = lp0.detach().requires_grad_(True)
    mf = m.to(lp.dtype)
    a = adv[:, None].expand_as(lp)
    fn(lp, mf, a, old, mu, ref).backward()
    return lp.grad


def timeit(fn, repeats):
    """CPU time of this process per call (robust to other processes competing for the cores; see --wall).

    On a GPU: wall-clock time with a device synchronisation before and after each call.
    """
    clock = time.perf_counter if WALL or DEVICE.type != "cpu" else time.process_time
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return times


WALL = False
DEVICE = torch.device("cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--names", nargs="*", default=None,
                        help="objectives to time (default: every registered one, pgzoo.available())")
    parser.add_argument("--loss-only", action="store_true",
                        help="time only the bare loss and pgzoo with metrics=False (no metrics, no checked column)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd versions")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of process CPU time")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU timings are wall-clock, synchronised)")
    args = parser.parse_args(argv)
    names = args.names if args.names else pgzoo.available()
    missing = [name for name in names if name not in BARE]
    if missing:  # every registered objective has its bare formula: a new one without it is a gap to fill here
        print(f"# no bare formula for: {', '.join(missing)}")
    global WALL, DEVICE
    WALL, DEVICE = args.wall, torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    m, adv, (lp, old, mu, ref) = (x.to(DEVICE) if isinstance(x, torch.Tensor) else [y.to(DEVICE) for y in x]
                                  for x in make_inputs(args.batch, args.length))
    where = str(DEVICE) if DEVICE.type != "cpu" else f"{torch.get_num_threads()} threads"
    clock = "wall" if WALL or DEVICE.type != "cpu" else "process CPU"
    print(f"# [{args.batch}, {args.length}] float32, torch {torch.__version__}, {where}, {clock} time, "
          f"{args.repeats} interleaved repeats; ms are minima; ratios: of the minima, and the median of the "
          "per-repeat ratios")
    header = "| objective | bare ms | loss only ms | loss-only ratio (min) | loss-only ratio (median) |"
    if not args.loss_only:
        header += " pgzoo ms | ratio (min) | checked ms |"
    if args.compile:
        header += " bare compiled ms | pgzoo compiled ms | compiled ratio | loss-only compiled ratio |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in names:
        obj = pgzoo.get(name)
        obj_loss_only = pgzoo.get(name, metrics=False)  # same loss and gradient, no diagnostics
        bare = BARE.get(name)
        if bare is not None:  # correctness first: the bare loss is the same formula (same gradient)
            g_ref = bare_step(bare, lp, m, adv, old, mu, ref)
            g_obj = pgzoo_step(obj_loss_only, lp, m, adv, old, mu, ref)
            torch.testing.assert_close(g_obj, g_ref, rtol=1e-4, atol=1e-9)
        run_p = lambda: pgzoo_step(obj, lp, m, adv, old, mu, ref)  # noqa: E731
        run_c = lambda: pgzoo_step(obj, lp, m, adv, old, mu, ref, True)  # noqa: E731
        run_n = lambda: pgzoo_step(obj_loss_only, lp, m, adv, old, mu, ref)  # noqa: E731
        run_b = (lambda: bare_step(bare, lp, m, adv, old, mu, ref)) if bare is not None else None  # noqa: E731
        if args.loss_only:
            run_p = run_c = None
        for f in (run_p, run_n, run_b):
            if f is not None:
                f()
        times = {"b": [], "n": [], "p": [], "c": []}
        for _ in range(args.repeats):  # interleaved: load affects all sides alike
            for key, f in (("b", run_b), ("n", run_n), ("p", run_p), ("c", run_c)):
                if f is not None:
                    times[key] += timeit(f, 1)
        n = min(times["n"]) * 1e3
        if times["b"]:
            b = min(times["b"]) * 1e3
            paired = statistics.median(tn / tb for tn, tb in zip(times["n"], times["b"]))
            row = f"| `{name}` | {b:.1f} | {n:.1f} | {n / b:.2f}x | {paired:.2f}x |"
        else:  # no hand-written baseline: pgzoo's own timings only
            b = None
            row = f"| `{name}` | | {n:.1f} | | |"
        if not args.loss_only:
            p, c = min(times["p"]) * 1e3, min(times["c"]) * 1e3
            row += f" {p:.1f} | {p / b:.2f}x | {c:.1f} |" if b else f" {p:.1f} | | {c:.1f} |"
        if args.compile:
            row += compiled_row(obj, obj_loss_only, bare, lp, m, adv, old, mu, ref, args.repeats)
        print(row, flush=True)
    return 0


def compiled_row(obj, obj_loss_only, bare, lp, m, adv, old, mu, ref, repeats):
    # Fresh compile caches per objective: the functions below are new closures each time, and past dynamo's
    # recompile limit (8) a function silently runs eager, which would time the last objectives uncompiled.
    torch._dynamo.reset()
    try:
        def make_p_loss(objective):
            def p_loss(lp_, m_, adv_, old_, mu_, ref_):
                batch = pgzoo.TokenBatch(logprobs=lp_, mask=m_, advantages=adv_, old_logprobs=old_,
                                         rollout_logprobs=mu_, ref_logprobs=ref_, check_values=False)
                out = objective(batch)
                return out.loss, out.metrics
            return p_loss

        def b_loss(lp_, m_, adv_, old_, mu_, ref_):
            return bare(lp_, m_.to(lp_.dtype), adv_[:, None].expand_as(lp_), old_, mu_, ref_)

        cp, cn = torch.compile(make_p_loss(obj)), torch.compile(make_p_loss(obj_loss_only))
        cb = torch.compile(b_loss) if bare is not None else None

        def run_compiled(fn):
            x = lp.detach().requires_grad_(True)
            loss, _ = fn(x, m, adv, old, mu, ref)
            loss.backward()
            return x.grad

        def run_cp():
            return run_compiled(cp)

        def run_cn():
            return run_compiled(cn)

        def run_cb():
            x = lp.detach().requires_grad_(True)
            cb(x, m, adv, old, mu, ref).backward()
            return x.grad

        if cb is not None:
            torch.testing.assert_close(run_cp(), run_cb(), rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(run_cn(), run_cb(), rtol=1e-4, atol=1e-9)
        for f in (run_cp, run_cn, run_cb if cb is not None else None):
            if f is not None:
                f()
        tp, tn, tb = [], [], []
        for _ in range(repeats):
            if cb is not None:
                tb += timeit(run_cb, 1)
            tp += timeit(run_cp, 1)
            tn += timeit(run_cn, 1)
        p = min(tp) * 1e3
        if not tb:  # no hand-written baseline
            return f" | {p:.1f} | | |"
        b, n = min(tb) * 1e3, min(tn) * 1e3
        return f" {b:.1f} | {p:.1f} | {p / b:.2f}x | {n / b:.2f}x |"
    except Exception as exc:  # report, do not hide: compile support varies by platform
        return f" failed: {type(exc).__name__}: {str(exc).splitlines()[0][:60]} | | | |"


if __name__ == "__main__":
    raise SystemExit(main())
