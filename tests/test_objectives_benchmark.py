"""benchmarks/objectives.py has a bare formula for every registered objective, each with pgzoo's gradient."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import pgzoo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("objectives_benchmark", ROOT / "benchmarks" / "objectives.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_objective_has_a_bare_formula(bench):
    missing = sorted(set(pgzoo.available()) - set(bench.BARE))
    assert not missing, f"add a bare formula to benchmarks/objectives.py BARE for: {missing}"


@pytest.mark.parametrize("name", pgzoo.available())
def test_bare_formula_has_pgzoo_gradient(bench, name):
    if name not in bench.BARE:
        pytest.skip("no bare formula (the test above names it)")
    m, adv, (lp, old, mu, ref) = bench.make_inputs(8, 64, seed=1)
    g_bare = bench.bare_step(bench.BARE[name], lp, m, adv, old, mu, ref)
    g_pgzoo = bench.pgzoo_step(pgzoo.get(name, metrics=False), lp, m, adv, old, mu, ref)
    torch.testing.assert_close(g_pgzoo, g_bare, rtol=1e-4, atol=1e-9)
