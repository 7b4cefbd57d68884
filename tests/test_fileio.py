"""Durable writes and integrity checks (pgzoo.fileio): manifests, truncated safetensors, model-folder errors,
leftovers of killed writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pgzoo.errors import ConfigError
from pgzoo.fileio import (
    MANIFEST,
    atomic_folder,
    check_model_folder,
    clean_stale,
    safetensors_problem,
    verify_folder,
)


def _write_weights(folder, n=64):
    from safetensors.torch import save_file

    save_file({"a": torch.arange(n, dtype=torch.float32), "b": torch.ones(3, 3)}, str(folder / "model.safetensors"))


def _model_folder(path):
    with atomic_folder(path) as tmp:
        (tmp / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
        _write_weights(tmp)
    return path


def test_manifest_written_and_verified(tmp_path):
    path = _model_folder(tmp_path / "m")
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert set(files) == {"config.json", "model.safetensors"}
    assert all("sha256" in e and e["size"] > 0 for e in files.values())
    assert verify_folder(path) is None
    assert check_model_folder(path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left


def test_bit_flip_and_truncation_are_found(tmp_path):
    path = _model_folder(tmp_path / "m")
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert "checksum" in verify_folder(path)
    w.write_bytes(bytes(data[:-10]))
    assert "bytes" in verify_folder(path)
    with pytest.raises(ConfigError, match="model.path=.* is corrupt: model.safetensors"):
        check_model_folder(path)


def test_safetensors_structure_without_manifest(tmp_path):
    _write_weights(tmp_path)
    w = tmp_path / "model.safetensors"
    assert safetensors_problem(w) is None
    full = w.read_bytes()
    w.write_bytes(full[:-4])
    assert "truncated" in safetensors_problem(w)
    w.write_bytes(full[:5])
    assert "truncated" in safetensors_problem(w)
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert "corrupt header" in safetensors_problem(w)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("file", "is a file, not a folder"),
    ("empty", "has no config.json .the folder is empty."),
    ("nested", "has no config.json .its sub-folder 'inner' has one."),
    ("broken-config", "config.json is not valid JSON"),
    ("not-hf-config", "not a Hugging Face model config"),
    ("no-weights", "has no weights"),
    ("truncated", "is corrupt: model.safetensors is truncated"),
])
def test_model_folder_errors(tmp_path, case, match):
    p = tmp_path / "model"
    if case == "file":
        p.write_text("x")
    elif case != "missing":
        p.mkdir()
    if case == "nested":
        _model_folder(p / "inner")
    if case == "broken-config":
        (p / "config.json").write_text("{oops")
    if case == "not-hf-config":
        (p / "config.json").write_text("[1, 2]")
    if case in ("no-weights", "truncated"):
        (p / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    if case == "truncated":
        _write_weights(p)
        w = p / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-8])
    with pytest.raises(ConfigError, match=f"model.path=.*{match}.*model.path=/path|model.path=.*{match}"):
        check_model_folder(p)


def test_failed_write_leaves_previous(tmp_path):
    path = _model_folder(tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_folder(path) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_clean_stale_after_real_kill(tmp_path):
    """A process killed (SIGKILL) inside atomic_folder leaves a .tmp folder; clean_stale removes it."""
    script = textwrap.dedent(f"""
        import os, time
        from pgzoo.fileio import atomic_folder
        with atomic_folder({str(tmp_path / 'ckpt')!r}) as tmp:
            (tmp / "part").write_text("half")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".ckpt.tmp.")
    assert [p.name for p in clean_stale(tmp_path)] == left
    assert list(tmp_path.iterdir()) == []


def test_clean_stale_restores_folder_moved_aside(tmp_path):
    """Killed between the two renames of a replacement: the previous version is put back."""
    path = _model_folder(tmp_path / "m")
    old = tmp_path / ".m.old.abc"
    old.mkdir()
    os.replace(path, old / "previous")
    (tmp_path / ".m.tmp.xyz").mkdir()
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert verify_folder(path) is None


def test_resume_hints_name_the_newest_intact_checkpoint(tmp_path):
    """An error's resume hint calls a checkpoint intact only after checking it against its manifest."""
    from pgzoo.adapters.lightning.distributed import with_resume_hint
    from pgzoo.errors import PgzooError
    from pgzoo.adapters.lightning.run_folder import STATE_FILE, latest_checkpoint

    for step in (1, 2):
        with atomic_folder(tmp_path / "checkpoints" / f"step-{step:06d}") as tmp:
            torch.save({"step": step - 1}, tmp / STATE_FILE)
            _write_weights(tmp)
    newest = tmp_path / "checkpoints" / "step-000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # the write of the newest was cut short
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert latest_checkpoint(tmp_path, intact=True).name == "step-000001"
    exc = with_resume_hint(PgzooError("boom"), tmp_path, 1, 2, "pgzoo train r.yaml")
    assert "step-000001) is intact" in str(exc) and "step-000002" not in str(exc)
