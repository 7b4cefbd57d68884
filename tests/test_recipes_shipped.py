"""The recipes ship inside the package: `pgzoo train tiny/minirl` and the documented `recipes/...` paths work from any
folder and from a wheel install; `pgzoo recipe list` / `pgzoo recipe cp` expose them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pgzoo.cli.main import main
from pgzoo.errors import ConfigError
from pgzoo.recipes import load_recipe
from pgzoo.recipes.catalog import copy_recipe, find_recipe, list_recipes, shipped_recipes

REPO = Path(__file__).resolve().parents[1]
ON_DISK = sorted(f"{p.parent.name}/{p.stem}" for p in (REPO / "recipes").glob("*/*.yaml") if not p.stem.startswith("grid"))


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working folder with no recipes/ in it (a user outside the checkout)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_recipe_file_is_shipped():
    assert list(shipped_recipes()) == ON_DISK and len(ON_DISK) == 67


@pytest.mark.parametrize("name", ["tiny/minirl", "tiny/minirl.yaml", "recipes/tiny/minirl.yaml",
                                  "./recipes/tiny/minirl.yaml"])
def test_documented_names_resolve_outside_a_checkout(elsewhere, name):
    path = find_recipe(name)
    assert path.read_bytes() == (REPO / "recipes/tiny/minirl.yaml").read_bytes()
    assert load_recipe(name).name == "minirl"


def test_a_bare_name_resolves_when_one_grid_has_it(elsewhere):
    assert find_recipe("cold-start-minirl-r2").parent.name == "paper"
    with pytest.raises(ConfigError, match="ambiguous: lab/minirl or paper/minirl or tiny/minirl"):
        find_recipe("minirl")


def test_a_typo_suggests_the_nearest_and_a_folder_is_refused(elsewhere):
    with pytest.raises(ConfigError, match=r"not found.*Did you mean 'tiny/minirl'.*pgzoo recipe list"):
        load_recipe("tiny/minrl")
    (elsewhere / "mine").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        load_recipe("mine")


def test_a_local_file_wins_over_the_shipped_one(elsewhere):
    local = elsewhere / "recipes" / "tiny" / "minirl.yaml"
    local.parent.mkdir(parents=True)
    text = (REPO / "recipes/tiny/minirl.yaml").read_text()
    local.write_text("\n".join("description: my own copy" if line.startswith("description:") else line
                               for line in text.splitlines()))
    assert find_recipe("recipes/tiny/minirl.yaml") == Path("recipes/tiny/minirl.yaml")
    assert load_recipe("recipes/tiny/minirl.yaml").description == "my own copy"
    assert load_recipe("tiny/minirl").description != "my own copy"  # a name, not a path: the shipped one


def test_recipe_list_and_cp(elsewhere, capsys):
    assert main(["recipe", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ON_DISK
    assert any(line.startswith("tiny/minirl ") and "default main job" in line for line in lines)
    assert [n for n, _ in list_recipes("tiny/offpolicy-n2-*")] == [
        "tiny/offpolicy-n2-minirl-no-clip", "tiny/offpolicy-n2-minirl-no-clip-r2", "tiny/offpolicy-n2-minirl-r2",
        "tiny/offpolicy-n2-minirl-r3"]
    assert main(["recipe", "list", "nothing-*"]) == 2

    assert main(["recipe", "cp", "tiny/offpolicy-n4-minirl-r2", "my.yaml"]) == 0
    assert "pgzoo train my.yaml" in capsys.readouterr().out
    assert (elsewhere / "my.yaml").read_bytes() == (REPO / "recipes/tiny/offpolicy-n4-minirl-r2.yaml").read_bytes()
    assert main(["recipe", "cp", "tiny/minirl", "my.yaml"]) == 2  # never overwrites silently
    assert "--force" in capsys.readouterr().err
    assert (elsewhere / "my.yaml").read_bytes() != (REPO / "recipes/tiny/minirl.yaml").read_bytes()
    assert main(["recipe", "cp", "tiny/minirl", "my.yaml", "--force"]) == 0
    assert (elsewhere / "my.yaml").read_bytes() == (REPO / "recipes/tiny/minirl.yaml").read_bytes()
    (elsewhere / "edits").mkdir()
    assert copy_recipe("paper/minirl-r3", "edits").name == "minirl-r3.yaml"
    with pytest.raises(ConfigError, match="Did you mean 'paper/minirl-r3'"):
        copy_recipe("paper/minirl-r4", "x.yaml")


def test_train_dry_run_by_name_from_any_folder(elsewhere, capsys):
    assert main(["train", "tiny/offpolicy-n4-minirl-r2", "--dry-run"]) == 0
    assert "N=4" in capsys.readouterr().out


@pytest.mark.slow  # ~20 s: builds a wheel
def test_the_wheel_ships_the_recipes_and_an_installed_copy_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "pgzoo", "adapters", "recipes"):  # a clean copy: no build/ litter
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (REPO / name).is_dir() else {}))
    out = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                            str(out), str(src)], cwd=tmp_path, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    # setuptools warns when a folder with package data is not a listed package (its files are then shipped only
    # by a deprecated fallback), and when project.license is a table instead of an SPDX expression
    log = build.stdout + build.stderr
    assert "absent from the `packages` configuration" not in log and "license` as a TOML table" not in log
    (wheel,) = out.glob("pgzoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("pgzoo/recipe_files/").removesuffix(".yaml") for n in names
                     if n.startswith("pgzoo/recipe_files/") and n.endswith(".yaml"))
    grids = ["lab/grid", "lab/grid-async"]  # the lab's grids ship too
    assert [n for n in shipped if n not in grids] == ON_DISK and set(grids) <= set(shipped)
    # recipes/ and adapters/ install inside pgzoo, never as generic top-level packages
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"pgzoo"}
    # every Python file of the checkout ships (a new subpackage missing from pyproject's list would not)
    on_disk = {f"pgzoo/{p.relative_to(REPO / 'pgzoo').as_posix()}" for p in (REPO / "pgzoo").rglob("*.py")}
    on_disk |= {f"pgzoo/adapters/{p.relative_to(REPO / 'adapters').as_posix()}" for p in (REPO / "adapters").rglob("*.py")}
    assert on_disk <= set(names), sorted(on_disk - set(names))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    work = tmp_path / "work"
    work.mkdir()
    code = ("import pgzoo, pgzoo.recipes as r, pgzoo.recipes.catalog as c; print(pgzoo.__file__); print(c.shipped_recipe_dir()); "
            "print(r.load_recipe('recipes/tiny/minirl.yaml').name)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, check=True)
    module_file, folder, name = res.stdout.split()
    assert module_file.startswith(str(site)) and folder.startswith(str(site)) and name == "minirl"
    # the installed command lists the shipped recipes and plans a run by name, outside any checkout
    cli = [sys.executable, "-m", "pgzoo"]
    listed = subprocess.run([*cli, "recipe", "list"], cwd=work, env=env, capture_output=True, text=True, check=True)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ON_DISK
    plan = subprocess.run([*cli, "train", "tiny/minirl", "--dry-run"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "recipe        minirl" in plan.stdout
