"""The embedded tiny policy: a Qwen3-MoE causal LM built from a config, its dense Qwen3 twin, and a
character-level tokenizer saved as a standard Hugging Face ``tokenizer.json``.

Nothing is downloaded: everything is built locally and saves with ``save_pretrained``; the result loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` and with vLLM (head_dim 64, which vLLM's CPU attention serves).

    from pgzoo.models import build_tiny_moe, build_tokenizer
    tok = build_tokenizer()
    model = build_tiny_moe(vocab_size=len(tok), seed=0)
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from pgzoo.errors import ConfigError, require
from pgzoo.fileio import atomic_folder, check_model_folder

CARD_NAME = "card.json"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII without the vertical-whitespace oddities, plus newline: enough for arithmetic and short math.
CHARACTERS = tuple(dict.fromkeys(string.digits + string.ascii_letters + string.punctuation + " \n"))

TINY_MOE_DEFAULTS: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    router_aux_loss_coef=0.0,
    output_router_logits=False,
)

# Named shapes for ``build_tiny_moe(shape=...)`` and the cold start's ``model`` option (overrides of the defaults).
# "routed-32x4": 32 experts, top-4, each expert half as wide, so a token's active expert width equals the default's
# (4 x 32 = 2 x 64) while a route is one of C(32, 4) = 35,960 expert sets instead of C(8, 2) = 28: near-ties in the
# router, and so routing flips under a lower-precision router, are far more frequent (docs/lab.md).
TINY_MOE_SHAPES: dict[str, dict[str, Any]] = {
    "default": {},
    "routed-32x4": dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=32),
}


def moe_shape(shape: str | dict[str, Any] | None) -> dict[str, Any]:
    """The config overrides of a named shape in :data:`TINY_MOE_SHAPES` (a dict is returned as is)."""
    if shape is None:
        return {}
    if isinstance(shape, dict):
        return dict(shape)
    if not isinstance(shape, str) or shape not in TINY_MOE_SHAPES:
        raise ConfigError(f"tiny MoE shape {shape!r}: use one of {', '.join(TINY_MOE_SHAPES)} or a dict of "
                          "Qwen3MoeConfig overrides")
    return dict(TINY_MOE_SHAPES[shape])



def build_tokenizer(model_max_length: int = 256):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, ``</s>`` as EOS and ``<pad>`` as pad.

    Decoding concatenates characters (no spaces inserted), so ``decode(encode(s)) == s`` for any string over
    :data:`CHARACTERS`.
    """
    tokenizers = require("tokenizers", "hf")
    transformers = require("transformers", "hf")
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


# Problems sampled per split to check a generated task's characters (a data-file task is checked whole).
CHECK_SAMPLES = 512


def check_characters(task) -> None:
    """Raise ConfigError when ``task``'s prompts or answers hold characters outside :data:`CHARACTERS`.

    The character tokenizer would turn them into ``<unk>`` at run time, silently: the policy could then never
    write such an answer. A task with a fixed list of problems (:meth:`~pgzoo.tasks.Task.all_problems`, e.g. a
    JSONL file) is checked whole and the error names the first offending line; a generated one on
    ``CHECK_SAMPLES`` problems of each split.
    """
    known = set(CHARACTERS)
    problems = task.all_problems()
    if problems is None:
        problems = [p for split in ("train", "test") for p in task.sample(CHECK_SAMPLES, split, seed=0)]
    for p in problems:
        bad = sorted(set(p.prompt + p.answer) - known)
        if bad:
            line = p.meta.get("line") if isinstance(p.meta, dict) else None
            where = f"line {line} of {task.options.get('path', 'the data')}" if line is not None else \
                f"problem {p.prompt!r}"
            raise ConfigError(
                f"task {task.name!r}: {where} uses character(s) {''.join(bad)!r} that the embedded tiny model's "
                "character tokenizer lacks (it knows printable ASCII and newline; others would become <unk>); "
                "rewrite them in ASCII, or train your own model with its tokenizer (model.path=...)")


def tiny_moe_config(vocab_size: int | None = None, **overrides: Any):
    """A ``Qwen3MoeConfig`` with the tiny defaults above (about 1 M parameters), ``overrides`` applied."""
    transformers = require("transformers", "hf")
    params = {**TINY_MOE_DEFAULTS, **overrides}
    params.setdefault("vocab_size", vocab_size or len(SPECIAL_TOKENS) + len(CHARACTERS))
    if vocab_size is not None:
        params["vocab_size"] = vocab_size
    params.setdefault("pad_token_id", 0)
    params.setdefault("bos_token_id", 1)
    params.setdefault("eos_token_id", 2)
    return transformers.Qwen3MoeConfig(**params)


def tiny_dense_config(vocab_size: int | None = None, **overrides: Any):
    """The dense Qwen3 twin of :func:`tiny_moe_config`: same attention and width, a plain MLP."""
    transformers = require("transformers", "hf")
    moe_only = {"moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits"}
    params = {k: v for k, v in TINY_MOE_DEFAULTS.items() if k not in moe_only}
    params.update(overrides)
    params["vocab_size"] = vocab_size or params.get("vocab_size") or len(SPECIAL_TOKENS) + len(CHARACTERS)
    params.setdefault("pad_token_id", 0)
    params.setdefault("bos_token_id", 1)
    params.setdefault("eos_token_id", 2)
    return transformers.Qwen3Config(**params)


def build_from_config(config, seed: int):
    torch = require("torch", "hf")
    transformers = require("transformers", "hf")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def build_tiny_moe(vocab_size: int | None = None, seed: int = 0, shape: str | None = None, **overrides: Any):
    """A freshly initialised tiny ``Qwen3MoeForCausalLM`` (deterministic for ``seed``); ``shape`` names one of
    :data:`TINY_MOE_SHAPES` (e.g. ``"routed-32x4"``), ``overrides`` apply on top."""
    return build_from_config(tiny_moe_config(vocab_size, **{**moe_shape(shape), **overrides}), seed)


def build_tiny_dense(vocab_size: int | None = None, seed: int = 0, **overrides: Any):
    """A freshly initialised tiny dense ``Qwen3ForCausalLM`` (deterministic for ``seed``)."""
    return build_from_config(tiny_dense_config(vocab_size, **overrides), seed)


def save_pretrained(model, tokenizer, path, card: dict | None = None) -> Path:
    """Save model, tokenizer and (optionally) ``card.json`` into ``path`` atomically.

    Everything is written to a temporary sibling folder, which is then moved into place with ``os.replace``: a crash
    or an error leaves either the previous folder or none, never a half-written checkpoint. The saved generation
    config sets ``do_sample=True``, ``temperature=1``, ``top_k=0`` and ``top_p=1`` so that default sampling with
    it (transformers or vLLM) is pure temperature sampling, as RL rollouts assume; pass ``do_sample=False`` for
    greedy decoding. Returns ``path``.
    """
    path = Path(path)
    with atomic_folder(path) as tmp:
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.do_sample, gen.temperature, gen.top_k, gen.top_p = True, 1.0, 0, 1.0
            gen.pad_token_id = tokenizer.pad_token_id
            gen.eos_token_id = tokenizer.eos_token_id
            gen.bos_token_id = tokenizer.bos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def fresh_tiny_checkpoint(path, seed: int = 0) -> Path:
    """A freshly initialised tiny MoE (:func:`build_tiny_moe`, ``seed``) and its tokenizer saved in ``path`` with
    :func:`save_pretrained`, unless ``path`` already holds a checkpoint; returns ``path``. No cold start: for tests and
    benchmarks of the machinery (engines, syncs, the loop), not of learning."""
    path = Path(path)
    if not (path / "config.json").exists():
        tok = build_tokenizer()
        save_pretrained(build_tiny_moe(vocab_size=len(tok), seed=seed), tok, path)
    return path


def read_card(path) -> dict | None:
    """The ``card.json`` of a checkpoint folder as a dict, or None when the folder has none."""
    card = Path(path) / CARD_NAME
    if not card.is_file():
        return None
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"checkpoint {str(path)!r}: {CARD_NAME} is corrupt ({exc}); delete the folder and "
                          "recreate it (e.g. `pgzoo cold-start`)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint {str(path)!r}: {CARD_NAME} is not a JSON object; delete and recreate it")
    return data


def load_pretrained(path, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` from a checkpoint folder, with clear errors for missing or corrupt folders."""
    torch = require("torch", "hf")
    transformers = require("transformers", "hf")
    path = check_model_folder(path, "checkpoint")
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"checkpoint {str(path)!r} has no tokenizer.json: it is not a complete Hugging Face "
                          "checkpoint; pass a folder written by `pgzoo cold-start` or `save_pretrained`")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r}; use 'float32', 'bfloat16' or 'float16'")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as exc:  # corrupt JSON / safetensors header / shape mismatch
        raise ConfigError(f"checkpoint {str(path)!r} could not be loaded ({type(exc).__name__}: {exc}); the folder "
                          f"is corrupt: delete it and recreate it") from exc
    return model.eval(), tokenizer
