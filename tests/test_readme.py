"""The README runs as written: its Python snippets and its commands, in order, in a temporary folder, after a short
main job (so `pgzoo eval runs/minirl` has a run to read).

The quick-start block is the one exception: `make test` is what CI runs, and `make train`'s command
(`pgzoo train recipes/tiny/minirl.yaml`, 200 steps with vLLM) is run in full by tests/test_tiny_jobs.py; here the same
command runs 2 steps. The snippets use tensors a user would have (`lp`, `mask`, `adv`, `mu`, `rewards`, `batch`,
`my_reinforce`): the prelude below defines them, nothing else.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _train_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)

PRELUDE = textwrap.dedent("""
    import torch
    import pgzoo
    torch.manual_seed(0)
    B, T = 16, 12
    lp = (-torch.rand(B, T) * 3).requires_grad_()          # log pi_theta of the sampled tokens
    mask = torch.rand(B, T) > 0.2
    adv = torch.randn(B)
    mu = lp.detach() + 0.01 * torch.randn(B, T)             # the inference engine's logprobs
    rewards = torch.randint(0, 2, (B,)).float()
    batch = pgzoo.TokenBatch(logprobs=lp, mask=mask, advantages=adv, rollout_logprobs=lp.detach())

    def my_reinforce(b):                                     # REINFORCE: -sum A * log pi / sequences
        return -(b.advantages[:, None] * b.logprobs * b.mask).sum() / b.mask.any(-1).sum()
""")


def _commands(block: str) -> list[str]:
    """The commands of a bash block: comments dropped, backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_has_what_this_test_runs():
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("python") >= 2 and kinds.count("bash") >= 2
    assert _commands(BLOCKS[kinds.index("bash")][1]) == ["make train", "make test"]


def test_python_snippets_run_in_order():
    scope: dict = {}
    exec(compile(PRELUDE, "prelude", "exec"), scope)
    for i, (kind, code) in enumerate(BLOCKS):
        if kind == "python":
            exec(compile(code, f"README.md python block {i}", "exec"), scope)
    assert scope["out"].loss.requires_grad and scope["lp"].grad is not None


@pytest.mark.slow
def test_commands_run_in_order(tmp_path_factory, pgzoo_cache):
    cache = pgzoo_cache  # shared with the cold-start and main-job tests
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "recipes", work / "recipes")  # a checkout's recipes/, as the README's paths assume
    env = {**subprocess_env(), "PGZOO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the `pgzoo` of this environment
    if not (bin_dir / "pgzoo").exists():
        pytest.skip("the pgzoo console script is not installed in this environment")

    def run(command: str) -> str:
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    # `make train`, short: the main job's command, 2 steps, transformers rollouts
    run("pgzoo train recipes/tiny/minirl.yaml train.steps=2 rollout.engine=transformers eval.num_problems=50 "
        "--quiet")
    assert (work / "runs" / "minirl" / "summary.json").is_file()
    bash = [code for kind, code in BLOCKS if kind == "bash"]
    for block in bash[1:]:
        for command in _commands(block):
            assert shlex.split(command)[0] == "pgzoo", command
            out = run(command)
            if command.startswith("pgzoo eval"):
                assert "greedy_accuracy" in out
    assert (work / "my-run.yaml").is_file() and (work / "runs" / "offpolicy-short" / "summary.json").is_file()
