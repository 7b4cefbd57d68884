"""The embedded tiny policy: tokenizer identity, model shape/determinism, save/load round trips, load errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pgzoo.errors import ConfigError
from pgzoo.models import (
    build_tiny_dense,
    build_tiny_moe,
    build_tokenizer,
    load_pretrained,
    read_card,
    save_pretrained,
)
from pgzoo.models.tiny import CHARACTERS

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_one_token_per_character_and_identity(tok):
    rng = random.Random(0)
    samples = ["".join(CHARACTERS), "12+7=19", " 0-5=-5\n", "a  b\n\nc", ""] + [
        "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s)
        assert tok.decode(ids) == s


def test_tokenizer_special_ids(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    ids = tok("19", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "19"
    assert tok.convert_tokens_to_ids("é") == tok.unk_token_id  # outside the character set


def test_tokenizer_round_trip_through_autotokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    s = "".join(CHARACTERS)
    assert again(s)["input_ids"] == tok(s)["input_ids"]
    assert again.decode(again(s)["input_ids"]) == s
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id


def test_tiny_moe_shape(tok):
    model = build_tiny_moe(vocab_size=len(tok))
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 <= n <= 2e6
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.head_dim) == (8, 2, 64)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    dense = build_tiny_dense(vocab_size=len(tok))
    assert type(dense).__name__ == "Qwen3ForCausalLM" and dense.config.head_dim == 64


def test_build_is_deterministic_for_seed_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_moe(vocab_size=len(tok), seed=0)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_tiny_moe(vocab_size=len(tok), seed=0)
    c = build_tiny_moe(vocab_size=len(tok), seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("builder", [build_tiny_moe, build_tiny_dense])
def test_save_load_identical_logits(tok, tmp_path, builder):
    model = builder(vocab_size=len(tok), seed=3)
    with torch.no_grad():  # move weights away from init so a wrong load cannot pass by chance
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_pretrained(model, tok, tmp_path / "ckpt", card={"task": "arithmetic"})
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tok("12+7=19")["input_ids"], tok("3*45=13")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
    m2, t2 = load_pretrained(path)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)
    assert t2.decode(t2("12+7=19")["input_ids"]) == "12+7=19"
    assert read_card(path) == {"task": "arithmetic"}
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["top_k"] == 0 and gen["top_p"] == 1.0 and gen["eos_token_id"] == tok.eos_token_id


def test_save_is_atomic_on_failure(tok, tmp_path, monkeypatch):
    model = build_tiny_moe(vocab_size=len(tok))
    target = tmp_path / "ckpt"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tok, target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder remains


def test_save_replaces_existing(tok, tmp_path):
    a = build_tiny_moe(vocab_size=len(tok), seed=0)
    b = build_tiny_moe(vocab_size=len(tok), seed=1)
    save_pretrained(a, tok, tmp_path / "ckpt", card={"v": 1})
    save_pretrained(b, tok, tmp_path / "ckpt", card={"v": 2})
    m, _ = load_pretrained(tmp_path / "ckpt")
    assert read_card(tmp_path / "ckpt") == {"v": 2}
    k = "model.embed_tokens.weight"
    assert torch.equal(m.state_dict()[k], b.state_dict()[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_errors(tok, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        load_pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    path = save_pretrained(build_tiny_moe(vocab_size=len(tok)), tok, tmp_path / "ckpt")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="corrupt"):
        load_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights"):
        load_pretrained(path)
    (path / "card.json").write_text("{broken")
    with pytest.raises(ConfigError, match="card.json is corrupt"):
        read_card(path)
    with pytest.raises(ConfigError, match="dtype"):
        load_pretrained(save_pretrained(build_tiny_moe(vocab_size=len(tok)), tok, tmp_path / "ok"), dtype="fp8")


def test_fresh_tiny_checkpoint_is_the_seeded_build_and_kept_once_written(tok, tmp_path):
    from pgzoo.models import build_tiny_moe, fresh_tiny_checkpoint

    path = fresh_tiny_checkpoint(tmp_path / "tiny", seed=3)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    built = build_tiny_moe(vocab_size=len(tok), seed=3)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in built.state_dict().items())
    assert loaded.generation_config.do_sample and (path / "tokenizer_config.json").is_file()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert fresh_tiny_checkpoint(path, seed=4) == path and (path / "config.json").stat().st_mtime_ns == stamp
