"""The rollout-engine contract: every engine in ``pgzoo.rollout.builders.engines`` against its own declaration.

Each registered engine is built through its registered builder from a float32 tiny Qwen3-MoE checkpoint (as a recipe
builds it) and checked for what trainers rely on: the :class:`~pgzoo.rollout.Rollouts` layout, μ equal to the
policy's own logprobs within the engine's declared ``logprob_tolerance`` (rescored with the training model), per-prompt
seeds, sync parity after the policy changes, routes where the engine declares them on this machine, and ``close()``.
A new engine registers a builder (and declares its :class:`~pgzoo.rollout.capabilities.EngineCapabilities`) and is
covered here without edits: :class:`TorchSamplerEngine` below, registered by this module, is such a third engine.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import types
import weakref
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from pgzoo.errors import ConfigError, EngineError
from pgzoo.models.tiny import build_tiny_moe, build_tokenizer, save_pretrained
from pgzoo.recipes.sections import RolloutSection
from pgzoo.rollout import Rollouts, check_sync, sync_weights
from pgzoo.rollout.base import assemble, check_generate_args, prompt_seeds, unwrap
from pgzoo.rollout.builders import capabilities_of, engines
from pgzoo.rollout.capabilities import UNDECLARED, EngineCapabilities, declare
from pgzoo.rollout.transformers_engine import top_p_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the torch-sampler engine runs 288 tiny forwards a test

PROMPTS = [[1, 20, 21, 22, 23, 24], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45, 46, 47]]
SEEDS = [11, 5, 907]


# -- a third engine: plain torch sampling from the policy, one full forward per token ---------------------------
class TorchSamplerEngine:
    """Samples from a float32 copy of the policy without a KV cache (each token from a forward over the whole
    prefix), μ = log_softmax(top-p(logits / T)) of the sampled token; row j of prompt i draws from its own generator
    seeded with ``seeds[i] + j``. Small and slow, but a real engine: a different sampling loop from the built-ins'."""

    capabilities = EngineCapabilities(dtypes=("float32",), logprob_tolerance=1e-5)
    supports_routes = False

    def __init__(self, model_path: str | Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.max_model_len = int(config.max_position_embeddings)
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad_token_id = int(config.pad_token_id if config.pad_token_id is not None else 0)

    def _check_open(self) -> None:
        if self.model is None:
            raise EngineError("this TorchSamplerEngine was closed; create a new one")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | Sequence[int] | None = None, return_routes: bool = False) -> Rollouts:
        self._check_open()
        prompts = check_generate_args(prompts, n, max_new_tokens, temperature, top_p, self.max_model_len,
                                      self.vocab_size)
        if return_routes:
            raise EngineError("TorchSamplerEngine records no routes (its capabilities declare routes=False)")
        seeds = prompt_seeds(seed, len(prompts))
        completions, logprobs, truncated = [], [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                gen = None if seeds[i] is None else torch.Generator().manual_seed(seeds[i] + j)
                ids, lps = list(prompt), []
                for _ in range(max_new_tokens):
                    logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                    if temperature == 0:
                        lp = torch.log_softmax(logits, -1)
                        tok = int(lp.argmax())
                    else:
                        lp = torch.log_softmax(top_p_mask(logits / temperature, top_p), -1)
                        tok = int(torch.multinomial(lp.exp(), 1, generator=gen))
                    ids.append(tok)
                    lps.append(float(lp[tok]))
                    if tok in self.eos_token_ids:
                        break
                completion = ids[len(prompt):]
                completions.append(completion)
                logprobs.append(lps)
                truncated.append(completion[-1] not in self.eos_token_ids and len(completion) == max_new_tokens)
        return assemble(prompts, n, completions, logprobs, truncated, self.pad_token_id)

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module) -> None:
        self._check_open()
        state = unwrap(model).state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise EngineError(f"load_weights: {bad[:3]} hold NaN/Inf; nothing was copied")
        try:
            self.model.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise EngineError(f"load_weights: the module does not match the engine's model: {exc}") from None

    def close(self) -> None:
        self.model = None


@declare(TorchSamplerEngine.capabilities)
def build_torch_sampler(rollout, model_path, *, seed: int = 0, return_routes: bool = False, world_size: int = 1):
    if rollout.dtype not in TorchSamplerEngine.capabilities.dtypes:
        raise ConfigError(f"rollout.dtype={rollout.dtype}: the torch-sampler engine samples in float32 only")
    return TorchSamplerEngine(model_path)


# Registered at import, before the parameter list below is read, as a package's entry point would register it.
FAKE = "contract-torch-sampler"
engines.register(FAKE, build_torch_sampler)
ENGINES = engines.available()


def needs(name: str) -> list:
    """Marks for an engine's parameter: vLLM's tests need vLLM installed, and start a vLLM engine (seconds to tens of
    seconds): they run in the full suite, the quick `-m "not slow"` loop checks the other engines."""
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        return [pytest.mark.skip(reason="vllm is not installed (pip install 'pgzoo[cpu]' or 'pgzoo[vllm]')")]
    return [pytest.mark.vllm, pytest.mark.slow] if name == "vllm" else []


@pytest.fixture(scope="module", autouse=True)
def _unregister_fake():
    yield
    engines.unregister(FAKE)


@pytest.fixture(scope="module")
def vocab():
    return len(build_tokenizer())


@pytest.fixture(scope="module")
def policy(vocab):
    return build_tiny_moe(vocab, seed=0).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, policy):
    path = tmp_path_factory.mktemp("contract_moe")
    save_pretrained(policy, build_tokenizer(), path)
    return path


@pytest.fixture(scope="module", params=[pytest.param(name, marks=needs(name)) for name in ENGINES])
def built(request, checkpoint):
    """``(name, capabilities, engine)``: one engine per registered name, built by its builder as a recipe would."""
    name = request.param
    caps = capabilities_of(name)
    rollout = RolloutSection(engine=name, dtype="float32", max_new_tokens=24, gpu_memory_utilization=0.1)
    engine = engines.build(name, rollout, checkpoint, seed=0, return_routes=caps.routes_here(), world_size=1)
    yield name, caps, engine
    engine.close()


def rescore(model, ro: Rollouts, temperature: float) -> torch.Tensor:
    """The training model's log softmax(logits / T) of every completion token (one forward; 0 at padding)."""
    am = ro.attention_mask
    with torch.no_grad():
        logits = model(ro.input_ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.float()
    p = ro.prompt_ids.shape[1]
    lp = torch.log_softmax(logits[:, p - 1: -1] / temperature, -1).gather(-1, ro.completion_ids[..., None])
    return torch.where(ro.completion_mask, lp.squeeze(-1), torch.zeros_like(ro.logprobs))


# -- the contract ------------------------------------------------------------------------------------------------
def test_declares_capabilities(built):
    name, caps, engine = built
    assert isinstance(caps, EngineCapabilities)
    # what the engine object says agrees with what its builder declared (recipes read the builder's)
    assert getattr(type(engine), "capabilities", caps) == caps
    assert "float32" in caps.dtypes  # every engine here is checked at float32 against the float32 policy
    if caps.routes_here():  # built with return_routes, it must be ready to return them
        assert getattr(engine, "supports_routes", True)


def test_generate_layout(built, policy):
    name, caps, engine = built
    n, new = 4, 24
    ro = engine.generate(PROMPTS, n=n, max_new_tokens=new, temperature=1.5, seed=3)
    rows, p_len = len(PROMPTS) * n, max(len(p) for p in PROMPTS)
    assert ro.prompt_ids.shape == (rows, p_len) and ro.prompt_ids.dtype == torch.long
    assert ro.prompt_mask.dtype == torch.bool and ro.completion_mask.dtype == torch.bool
    assert ro.completion_ids.dtype == torch.long and ro.logprobs.dtype == torch.float32
    assert ro.truncated.shape == (rows,) and ro.truncated.dtype == torch.bool and ro.routes is None
    assert 1 <= ro.completion_ids.shape[1] <= new and ro.logprobs.shape == ro.completion_ids.shape
    assert ro.group.tolist() == [i // n for i in range(rows)]
    for r in range(rows):  # prompts left-padded, completions right-padded (the mask a prefix of each row)
        assert ro.prompt_ids[r][ro.prompt_mask[r]].tolist() == PROMPTS[r // n]
        assert ro.prompt_mask[r].tolist() == sorted(ro.prompt_mask[r].tolist())
        assert ro.completion_mask[r].tolist() == sorted(ro.completion_mask[r].tolist(), reverse=True)
    lengths = ro.completion_lengths
    assert (lengths >= 1).all()
    mu = ro.logprobs[ro.completion_mask]
    assert torch.isfinite(mu).all() and (mu <= 0).all() and (ro.logprobs[~ro.completion_mask] == 0).all()
    eos = policy.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for comp, trunc in zip(ro.completions(), ro.truncated.tolist()):
        assert not eos & set(comp[:-1]), "EOS stops a completion: it can only be its last token"
        assert trunc == (comp[-1] not in eos and len(comp) == new), (comp, trunc)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_mu_is_the_policys_logprobs_at_float32(built, policy, temperature):
    name, caps, engine = built
    ro = engine.generate(PROMPTS, n=2, max_new_tokens=12, temperature=temperature, seed=0)
    diff = (ro.logprobs.double() - rescore(policy, ro, temperature).double()).abs()[ro.completion_mask]
    assert diff.numel() > 0 and diff.mean() <= caps.logprob_tolerance, (name, float(diff.mean()), float(diff.max()))
    if temperature == 1.0:  # the run-time probe (rollout.verify_sync) agrees at the declared tolerance
        assert check_sync(engine, policy, PROMPTS, tolerance=caps.logprob_tolerance).num_tokens > 0


def test_per_prompt_seeds(built):
    name, caps, engine = built
    whole = engine.generate(PROMPTS, n=2, max_new_tokens=10, seed=SEEDS)
    rows = whole.completions()
    for i in range(len(PROMPTS)):  # a prompt's rows depend on its seed only: not on the other prompts
        alone = engine.generate([PROMPTS[i]], n=2, max_new_tokens=10, seed=[SEEDS[i]])
        assert alone.completions() == rows[2 * i: 2 * i + 2], (name, i)
    backwards = engine.generate(PROMPTS[::-1], n=2, max_new_tokens=10, seed=SEEDS[::-1])
    assert backwards.completions() == rows[4:6] + rows[2:4] + rows[0:2]  # nor on their order
    # seed=s means [s, s + 1, ...]; completion j of a prompt draws with its seed + j
    assert engine.generate(PROMPTS, n=2, max_new_tokens=10, seed=SEEDS[0]).completions()[:2] == rows[:2]
    assert engine.generate([PROMPTS[0]], n=1, max_new_tokens=10, seed=[SEEDS[0] + 1]).completions() == rows[1:2]
    assert len({tuple(c) for c in rows}) > 1  # and the rows differ from each other
    with pytest.raises(EngineError, match="2 seeds for 3 prompts"):
        engine.generate(PROMPTS, n=2, max_new_tokens=2, seed=[1, 2])


def test_sync_parity_after_the_policy_changes(built, policy, vocab):
    name, caps, engine = built
    other = build_tiny_moe(vocab, seed=13).eval()
    try:
        engine.load_weights(other)
        assert check_sync(engine, other, PROMPTS, tolerance=caps.logprob_tolerance).num_tokens > 0
        # the engine really samples from the new weights: against the old policy the gap is far above tolerance
        assert check_sync(engine, policy, PROMPTS).mean_abs_diff > 100 * caps.logprob_tolerance
        if caps.sharded_sync:  # the streamed sync (what an FSDP2 policy goes through), in small buckets
            sync_weights(policy, engine, bucket_mb=0.05)
        else:
            engine.load_weights(policy)
        assert check_sync(engine, policy, PROMPTS, tolerance=caps.logprob_tolerance).num_tokens > 0
    finally:
        engine.load_weights(policy)


def test_lora_sync_where_declared(built, policy):
    name, caps, engine = built
    if not caps.lora_sync:
        pytest.skip(f"{name} declares no LoRA sync")
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(copy.deepcopy(policy), peft.LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # PEFT starts B at 0 (a no-op adapter): give it weight, so the sync has something to carry
        gen = torch.Generator().manual_seed(0)
        for pname, p in lora.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    merged = copy.deepcopy(lora).merge_and_unload().eval()
    try:
        engine.load_weights(lora)
        assert check_sync(engine, merged, PROMPTS, tolerance=caps.logprob_tolerance).num_tokens > 0
        assert check_sync(engine, policy, PROMPTS).mean_abs_diff > 100 * caps.logprob_tolerance
    finally:
        engine.load_weights(policy)


def test_routes_where_declared_on_this_device(built, policy):
    name, caps, engine = built
    if not caps.routes_here():
        with pytest.raises(EngineError):  # asked anyway, the engine says so (a pgzoo error, not garbage)
            engine.generate(PROMPTS, n=1, max_new_tokens=4, return_routes=True)
        return
    from pgzoo.routing import find_moe_layers

    ro = engine.generate(PROMPTS, n=2, max_new_tokens=8, seed=0, return_routes=True)
    config = policy.config
    layers, top_k = len(find_moe_layers(policy)), config.num_experts_per_tok
    assert ro.routes.shape == (len(ro), ro.input_ids.shape[1], layers, top_k) and ro.routes.dtype == torch.long
    assert (ro.routes[:, : ro.prompt_ids.shape[1]][ro.prompt_mask] >= 0).all()  # every prompt token routed
    assert (ro.routes[:, : ro.prompt_ids.shape[1]][~ro.prompt_mask] == -1).all()  # padding never
    assert int(ro.routes.max()) < config.num_experts


def test_close_releases_and_refuses(built, policy):
    """Runs last for each engine (pytest keeps definition order within a module-scoped parameter): it closes it."""
    name, caps, engine = built
    held = [weakref.ref(v) for v in vars(engine).values() if _weakrefable_resource(v)]
    engine.close()
    gc.collect()
    assert [r for r in held if r() is not None] == [], f"{name}: close() kept its model/backend alive"
    with pytest.raises(EngineError, match="closed"):
        engine.generate(PROMPTS, n=1, max_new_tokens=2)
    with pytest.raises(EngineError, match="closed"):
        engine.load_weights(policy)
    engine.close()  # twice is fine


def _weakrefable_resource(value) -> bool:
    """An attribute that holds the engine's weights or backend (a module, or an object of a third-party class), not
    a setting, a path, a container or a Python module."""
    if isinstance(value, torch.nn.Module):
        return True
    if value is None or isinstance(value, (types.ModuleType, type, types.FunctionType, Path, torch.dtype,
                                           torch.device, str, bytes, int, float, bool, tuple, list, dict, set)):
        return False
    origin = type(value).__module__.split(".")[0]
    if origin in ("builtins", "torch", "pgzoo", "pathlib"):
        return False
    try:
        weakref.ref(value)
    except TypeError:
        return False
    return True


# -- the declarations themselves ---------------------------------------------------------------------------------
def test_an_undeclared_builder_gets_the_conservative_default():
    engines.register("contract-undeclared", lambda rollout, model_path, *, seed, return_routes, world_size=1: None)
    try:
        assert capabilities_of("contract-undeclared") == UNDECLARED
        assert UNDECLARED.dtypes == ("float32",) and not (UNDECLARED.fp8 or UNDECLARED.routes or UNDECLARED.lora_sync
                                                          or UNDECLARED.sharded_sync or UNDECLARED.router_dtype)
    finally:
        engines.unregister("contract-undeclared")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtypes=("fp8",)), "dtypes"), (dict(dtypes=()), "dtypes is empty"), (dict(fp8=True), "needs fp8_dtypes"),
    (dict(fp8_dtypes=("bfloat16",)), "fp8=False"), (dict(routes_need_cuda=True), "needs routes=True"),
    (dict(fp8_needs_cuda=True), "needs fp8=True"),
    (dict(logprob_tolerance=0), "logprob_tolerance"), (dict(notes=(("speed", "fast"),)), "notes"),
])
def test_malformed_declarations_are_rejected_by_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineCapabilities(**kwargs)


def test_docs_table_is_the_built_in_declarations():
    from pgzoo.rollout.builders import capability_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "rollout.md").read_text()
    assert capability_table(["transformers", "vllm"]) in docs, "regenerate the table in docs/rollout.md"


def test_recipe_errors_name_the_setting_the_engine_and_the_engines_that_declare_it(monkeypatch):
    """A registered engine's declaration is what a recipe is checked against (no engine is built)."""
    from pgzoo.recipes import Recipe

    engines.register("contract-declared-little", build_torch_sampler)  # the sampler's declaration: float32 only
    try:
        base = {"rollout": {"engine": "contract-declared-little"}, "objective": {"name": "grpo"}}
        Recipe.model_validate(base).check()  # what it declares passes
        for section, key, value, field in [("rollout", "dtype", "bfloat16", "dtypes"),
                                           ("rollout", "router_dtype", "bfloat16", "router_dtype"),
                                           ("train", "routing_replay", "R3", "routes"),
                                           ("train", "strategy", "fsdp", "sharded_sync")]:
            recipe = Recipe.model_validate({**base, section: {**base.get(section, {}), key: value}})
            with pytest.raises(ConfigError, match=rf"{section}\.{key}={value}.*rollout\.engine=contract-declared-"
                                                  rf"little does not declare.*EngineCapabilities\.{field}.*engines "
                                                  rf"that do: .*transformers.*set rollout\.engine=transformers"):
                recipe.check()
        fp8 = Recipe.model_validate({**base, "rollout": {**base["rollout"], "fp8": True}})
        with pytest.raises(ConfigError, match=r"rollout\.fp8=true.*engines that do: .*transformers"):
            fp8.check()
    finally:
        engines.unregister("contract-declared-little")
