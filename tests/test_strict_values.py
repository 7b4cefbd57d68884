"""Strict values: objective options by their annotations, the shared range helpers, corrections."""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
import pytest

import pgzoo
from pgzoo.errors import ConfigError
from pgzoo.objectives.base import field_types
from pgzoo.validate import check_bool, check_choice, check_int, check_number


def _fields_of(kind):
    """(objective, field) pairs whose annotation is ``kind`` (or ``kind | None``), over the whole registry."""
    out = []
    for name in pgzoo.available():
        cls = pgzoo.objectives.registry.get_class(name)
        for f, hint in field_types(cls.Config).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if args == [kind]:
                out.append((name, f))
    return out


BOOL_FIELDS = _fields_of(bool)
FLOAT_FIELDS = _fields_of(float)


def test_every_objective_has_resolvable_annotations():
    for name in pgzoo.available():
        cls = pgzoo.objectives.registry.get_class(name)
        assert set(field_types(cls.Config)) == {f.name for f in dataclasses.fields(cls.Config)}, name
    assert ("minirl", "clip") in BOOL_FIELDS and ("grpo", "beta") in FLOAT_FIELDS


@pytest.mark.parametrize("name,field", BOOL_FIELDS)
@pytest.mark.parametrize("bad", ["false", "true", 0, 1, None, np.bool_(True)])
def test_boolean_options_accept_only_booleans(name, field, bad):
    with pytest.raises(ConfigError, match=f"{field}=.*must be true or false"):
        pgzoo.get(name, **{field: bad})


@pytest.mark.parametrize("name,field", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", ["0.1", True, float("nan"), [0.1]])
def test_number_options_accept_only_numbers(name, field, bad):
    with pytest.raises(ConfigError, match=f"{field}="):
        pgzoo.get(name, **{field: bad})


@pytest.mark.parametrize("name,kw,match", [
    ("minirl", {"clip": "false"}, "clip='false' must be true or false"),
    ("minirl", {"is_cap": 0}, "is_cap=0 must be a number > 0"),
    ("minirl", {"is_cap": -1.0}, "is_cap"),
    ("minirl", {"eps_low": 1.0}, "eps_low"),
    ("minirl", {"eps_high": -0.1}, "eps_high"),
    ("grpo", {"beta": float("inf")}, "beta=inf must be a number >= 0, finite"),
    ("grpo", {"beta": -0.01}, "beta"),
    ("grpo", {"aggregation": "token_mean"}, "aggregation='token_mean' is not one of .* Did you mean 'token-mean'"),
    ("gspo", {"token_level": "yes"}, "token_level"),
    ("cispo", {"eps_low": "none"}, "eps_low"),
    ("grpo", {"paper": 3}, "paper"),
    ("grpo", {"correction": {"cap": True}}, "correction.cap=True must be a number"),
    ("grpo", {"correction": {"level": "Token"}}, "correction.level"),
    ("grpo", {"correction": {"low": "0.5"}}, "correction.low"),
])
def test_ranges_and_types_name_the_key(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        pgzoo.get(name, **kw)


def test_good_values_of_other_numeric_types_pass():
    assert pgzoo.get("grpo", beta=np.float32(0.5)).config.beta == 0.5
    assert pgzoo.get("minirl", is_cap=3).config.is_cap == 3
    assert pgzoo.get("minirl", is_cap=math.inf).config.is_cap == math.inf  # no truncation
    assert pgzoo.get("cispo", eps_low=None).config.eps_low is None


def test_the_helpers():
    assert check_bool("k", False) is False
    assert check_number("k", 2, low=0, high=2) == 2
    with pytest.raises(ConfigError, match=r"k=2 must be a number >= 0 and < 2"):
        check_number("k", 2, low=0, high=2, high_open=True)
    with pytest.raises(ConfigError, match="or null"):
        check_number("k", "x", optional=True)
    assert check_number("k", None, optional=True) is None
    assert check_int("k", np.int64(3), low=1) == 3
    with pytest.raises(ConfigError, match="an integer >= 1"):
        check_int("k", 2.0, low=1)
    with pytest.raises(ConfigError, match="Did you mean 'token-mean'"):
        check_choice("agg", "token_mean", ["token-mean", "constant"])


def test_a_field_defaulting_to_none_takes_none_and_its_type_otherwise():
    from dataclasses import dataclass

    class Opt(pgzoo.Objective):
        @dataclass(frozen=True)
        class Config:
            cap: float = None  # annotated float, default None: None is a value
            flag: bool = False

        def compute(self, batch):
            raise NotImplementedError

    assert Opt().config.cap is None and Opt(cap=2).config.cap == 2
    with pytest.raises(ConfigError, match="cap='2' must be a number"):
        Opt(cap="2")
    with pytest.raises(ConfigError, match="flag=None must be true or false"):
        Opt(flag=None)


@pytest.mark.parametrize("name,field", FLOAT_FIELDS)
@pytest.mark.parametrize("inf", [math.inf, -math.inf])
def test_an_infinity_is_refused_unless_the_field_gives_it_a_meaning(name, field, inf):
    """One shared check over every float option of every registered objective: ±inf is refused naming the field,
    except in the fields an objective declares (``infinite_ok``, e.g. MiniRL's is_cap: no truncation)."""
    cls = pgzoo.objectives.registry.get_class(name)
    if field in cls.infinite_ok:
        return
    with pytest.raises(ConfigError, match=f"{field}=-?inf"):  # the shared message, or the objective's own
        pgzoo.get(name, **{field: inf})


@pytest.mark.parametrize("name", [n for n in pgzoo.available() if pgzoo.objectives.registry.get_class(n).bands])
def test_a_reversed_or_empty_band_is_refused(name):
    cls = pgzoo.objectives.registry.get_class(name)
    for low, high in cls.bands:
        for lo, hi in ((5.0, 1.0), (2.0, 2.0)):
            with pytest.raises(ConfigError, match=f"{low}={lo!r} must be below {high}={hi!r}"):
                pgzoo.get(name, **{low: lo, high: hi})


def test_infinite_options_named_in_the_issue():
    with pytest.raises(ConfigError, match="kl_coef=inf must be"):
        pgzoo.get("kl-cov", kl_coef=math.inf)
    with pytest.raises(ConfigError, match="temperature_pos=inf must be"):
        pgzoo.get("sapo", temperature_pos=math.inf)
    assert pgzoo.get("minirl", is_cap=math.inf).config.is_cap == math.inf
