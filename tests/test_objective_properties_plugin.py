"""The property suite follows the registry: an objective registered before collection is checked by every property
test without editing a list, and a broken one fails the property it breaks.

The objectives are registered by pytest plugins (tests/_example_objective.py, tests/_broken_objectives.py) before
collection of a child pytest, as an entry-point plugin or a conftest would register them, so they never enter this
session's registry (other tests read ``pgzoo.available()`` and would pick them up).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import test_objective_properties as suite
from _broken_objectives import BROKEN

TESTS = Path(__file__).parent
# Every property test of the suite: a new one is expected to cover a new objective too.
PROPERTIES = {name for name in dir(suite) if name.startswith("test_")}


def _run_suite(tmp_path, plugin: str, select: str) -> dict[str, dict[str, str]]:
    """Run the property suite in a child pytest with ``plugin`` loaded, restricted to test ids matching ``select``;
    returns {objective: {test id: outcome}} where outcome is passed, failed, skipped or xfailed."""
    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", str(TESTS / "test_objective_properties.py"), "-p", plugin,
           "-k", select, "-q", "-n", "0", "-p", "no:cacheprovider", f"--junitxml={report}"]
    proc = subprocess.run(cmd, check=False, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes: dict[str, dict[str, str]] = {}
    for case in ET.parse(report).iter("testcase"):
        test_id = case.get("name")
        function, _, params = test_id.partition("[")
        kinds = {child.tag for child in case}
        outcome = ("failed" if kinds & {"failure", "error"} else
                   "xfailed" if "skipped" in kinds and "xfail" in (case.find("skipped").get("type") or "") else
                   "skipped" if "skipped" in kinds else "passed")
        objective = next(n for n in [*BROKEN, "example-reinforce"] if params.startswith(n + "-"))
        outcomes.setdefault(objective, {})[test_id] = (function, outcome)
    return outcomes


@pytest.mark.slow  # a child pytest collecting the whole suite
def test_a_registered_objective_gets_every_property_test(tmp_path):
    """``example-reinforce``, registered by a plugin and named in no list, is collected by every property test
    (its name in the parametrisation ids) and passes them all."""
    outcomes = _run_suite(tmp_path, "_example_objective", "example-reinforce")["example-reinforce"]
    assert {function for function, _ in outcomes.values()} == PROPERTIES
    failed = [test_id for test_id, (_, outcome) in outcomes.items() if outcome != "passed"]
    assert not failed, failed


@pytest.mark.slow
def test_each_broken_objective_fails_the_property_it_breaks(tmp_path):
    """Each ``broken-*`` objective fails the property tests its mistake breaks: none of them can pass vacuously."""
    assert set().union(*(tests for _, tests in BROKEN.values())) == PROPERTIES  # every property shown to bite
    outcomes = _run_suite(tmp_path, "_broken_objectives", "broken-")
    assert set(outcomes) == set(BROKEN)
    for name, (_, must_fail) in BROKEN.items():
        failed = {function for function, outcome in outcomes[name].values() if outcome == "failed"}
        assert must_fail <= failed, (name, sorted(failed))
