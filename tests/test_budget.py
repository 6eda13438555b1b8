"""Budget parsing and the memory model (nto_ext/budget.py)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nto_ext.blocks import ParamInfo
from nto_ext.budget import (
    STEP_BYTES,
    Budget,
    bytes_per_element,
    format_bytes,
    parse_budget,
    state_bytes,
    storage_bytes,
)
from nto_ext.policies import make_policy

TOTAL = 45_344  # elements of the tiny Llama of the other tests

GOOD = [
    (1000, "elements", 1000),
    ("1000", "elements", 1000),
    (0.1, "elements", 4534),
    (1.0, "elements", TOTAL),
    ("10%", "elements", 4534),
    (" 50 % ", "elements", TOTAL // 2),
    ("100%", "elements", TOTAL),
    ("0.5%", "elements", 226),
    ("512MiB", "bytes", 512 * 2**20),
    ("2GB", "bytes", 2 * 10**9),
    ("1.5GiB", "bytes", int(1.5 * 2**30)),
    ("100KB", "bytes", 100_000),
    ("100kb", "bytes", 100_000),
    ("64 KiB", "bytes", 65_536),
    ("3B", "bytes", 3),
    ("1TiB", "bytes", 2**40),
]


@pytest.mark.parametrize("budget,kind,amount", GOOD)
def test_parse_good(budget, kind, amount):
    b = parse_budget(budget, TOTAL)
    assert (b.kind, b.amount) == (kind, amount)


# (budget, exception, regex the message must match: what was given and what is allowed)
BAD_BUDGETS = [
    (0, ValueError, r"budget=0: an element budget must be > 0; allowed: an int"),
    (-5, ValueError, r"budget=-5: .*> 0"),
    (1.5, ValueError, r"budget=1.5: .*\(0, 1\]"),
    (0.0, ValueError, r"budget=0.0: .*\(0, 1\]"),
    (float("nan"), ValueError, r"budget=nan"),
    (float("inf"), ValueError, r"budget=inf"),
    ("0%", ValueError, r"budget='0%': a percentage must be in \(0%, 100%\]"),
    ("101%", ValueError, r"budget='101%': a percentage must be in"),
    ("abc", ValueError, r"budget='abc': cannot parse it .*allowed:"),
    ("12XB", ValueError, r"budget='12XB': cannot parse it \(byte units: B, KB"),
    ("", ValueError, r"budget='': cannot parse"),
    ("0B", ValueError, r"budget='0B': a byte budget must be at least 1 byte"),
    ("0.1B", ValueError, r"budget='0.1B': a byte budget must be at least 1 byte"),
    (True, TypeError, r"budget=True has type bool; allowed"),
    (None, TypeError, r"budget=None has type NoneType; allowed"),
    ([1], TypeError, r"budget=\[1\] has type list; allowed"),
    # odd strings: each named as given, with the allowed forms (never "invalid literal")
    ("\u00b2", ValueError, r"budget='\u00b2': cannot parse it .*ASCII digits.*; allowed: an int"),
    ("\u0663", ValueError, r"budget='\u0663': cannot parse it"),  # Arabic-Indic 3
    ("\uff11\uff10%", ValueError, r"budget='\uff11\uff10%': cannot parse it"),  # fullwidth 10
    ("1e400", ValueError, r"budget='1e400': cannot parse it .*no sign or exponent"),
    ("1e400B", ValueError, r"budget='1e400B': cannot parse it"),
    ("1" + "0" * 400 + "B", ValueError, r"budget='10+B': a byte budget must be at most 2\*\*63-1"),
    ("1" + "0" * 400, ValueError, r"budget='10+': an element budget must be at most 2\*\*63-1"),
    (2**63, ValueError, r"budget=9223372036854775808: an element budget must be at most"),
    ("9" * 5000, ValueError, r"budget='9{40}\.\.\.': 5,000 characters; at most 1,000"),
    ("nan%", ValueError, r"budget='nan%': cannot parse it"),
    ("inf", ValueError, r"budget='inf': cannot parse it"),
    ("-5%", ValueError, r"budget='-5%': cannot parse it .*no sign"),
    ("-5", ValueError, r"budget='-5': cannot parse it"),
    ("10 % %", ValueError, r"budget='10 % %': cannot parse it"),
    ("0.5", ValueError, r"budget='0.5': cannot parse it"),  # a share is a float, not a str
    ("1.5 GiB extra", ValueError, r"budget='1.5 GiB extra': cannot parse it"),
]


@pytest.mark.parametrize("budget,exc,msg", BAD_BUDGETS, ids=[repr(b[0])[:24] for b in BAD_BUDGETS])
def test_parse_bad(budget, exc, msg):
    with pytest.raises(exc, match=msg):
        parse_budget(budget, TOTAL)


def test_numpy_numbers_are_python_numbers():
    np = pytest.importorskip("numpy")
    for value, want in [(np.int64(1000), 1000), (np.int32(7), 7), (np.uint8(200), 200)]:
        b = parse_budget(value, TOTAL)
        assert (b.kind, b.amount, b.given) == ("elements", want, repr(want))
        assert type(b.amount) is int
    for value in (np.float32(0.5), np.float64(0.5), np.float16(0.5)):
        b = parse_budget(value, TOTAL)
        assert (b.kind, b.amount, b.given) == ("elements", TOTAL // 2, "0.5")
    with pytest.raises(ValueError, match=r"budget=np.int64\(0\): an element budget must be > 0"):
        parse_budget(np.int64(0), TOTAL)
    with pytest.raises(ValueError, match=r"budget=np.float32\(nan\): a float budget"):
        parse_budget(np.float32("nan"), TOTAL)
    with pytest.raises(TypeError, match=r"has type bool_?; allowed"):
        parse_budget(np.bool_(True), TOTAL)
    with pytest.raises(TypeError, match=r"has type ndarray; allowed"):
        parse_budget(np.array([5]), TOTAL)


def test_largest_budgets():
    assert parse_budget(2**63 - 1, TOTAL).amount == 2**63 - 1
    assert parse_budget(str(2**63 - 1), TOTAL).amount == 2**63 - 1
    assert parse_budget("8191TiB", TOTAL).amount == 8191 * 2**40
    with pytest.raises(ValueError, match="at most 2\\*\\*63-1 bytes"):
        parse_budget("8388608TiB", TOTAL)  # 2**63 bytes


def test_small_share_is_at_least_one_element():
    assert parse_budget("0.0001%", 100).amount == 1


def _policy(name: str, **cfg):
    """A policy over one bf16 and one fp32 tensor (formats depend on the config)."""
    infos = [ParamInfo("w", (4, 4), torch.bfloat16, True), ParamInfo("b", (4,), torch.float32,
                                                                      True)]
    return make_policy(name, infos, parse_budget("100%", 20), **cfg)


def test_memory_model_table():
    # DESIGN.md "Memory model": fp32 param, bf16 param. Sparse: 4 (compact fp32 grad) + 8
    # (fp32 moments) + 4 (int32 index); step counts are per cohort, not per element.
    assert bytes_per_element("adamw", torch.float32) == 12
    assert bytes_per_element("adamw", torch.bfloat16) == 6
    block, sample, sparse = (_policy(name) for name in ("block", "sample", "sparse"))
    assert block.bytes_per_element(torch.float32) == 12
    assert _policy("block", master_weights=False).bytes_per_element(torch.bfloat16) == 10
    assert block.bytes_per_element(torch.bfloat16) == 14  # + the fp32 master (the default)
    assert _policy("block", stochastic_rounding=True).bytes_per_element(torch.bfloat16) == 10
    assert _policy("sample", master_weights=False).bytes_per_element(torch.float16) == 10
    assert sample.bytes_per_element(torch.float16) == 14
    assert sparse.bytes_per_element(torch.float32) == 16
    assert sparse.bytes_per_element(torch.bfloat16) == 20  # + the chosen elements' masters
    assert _policy("sparse", master_weights=False).bytes_per_element(torch.bfloat16) == 16
    assert _policy("sparse", stochastic_rounding=True).bytes_per_element(torch.float16) == 16
    assert bytes_per_element("adamw8bit", torch.bfloat16) == 4
    assert block.state_bytes(10, torch.float32) == 120 + STEP_BYTES
    assert sparse.state_bytes(10, torch.float32) == 160  # steps per cohort
    assert state_bytes("adamw", 10, torch.float32) == 120 + STEP_BYTES
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; allowed"):
        bytes_per_element("lion", torch.float32)


def test_cost_in_budget_units():
    items = [(10, torch.float32), (5, torch.bfloat16)]
    block = _policy("block", master_weights=False).state_bytes  # bf16 without masters
    assert Budget("elements", 100, "100").cost(items, block) == 15
    assert Budget("bytes", 100, "'100B'").cost(items, block) == 10 * 12 + 5 * 10 + 2 * 4


def test_text_and_describe():
    assert parse_budget("10%", TOTAL).text == "10%"
    assert parse_budget(1000, TOTAL).text == "1000"
    assert "elements" in parse_budget(1000, TOTAL).describe()
    assert "MiB" in parse_budget("2MiB", TOTAL).describe()
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(12) == "12 B"


@given(st.floats(min_value=1e-6, max_value=1.0), st.integers(min_value=1, max_value=10**12))
def test_share_never_exceeds_total(frac, total):
    b = parse_budget(frac, total)
    assert 1 <= b.amount <= total
    assert b.amount <= math.floor(frac * total) + 1


def test_storage_bytes_counts_each_storage_once():
    """One measure for every module (demo's AdamW memory, NTO's report): views and aliases
    count once, meta tensors and non-tensors 0."""
    a = torch.zeros(100)
    assert storage_bytes([a, a[:10], a.view(10, 10), torch.zeros(3, dtype=torch.bfloat16),
                          torch.zeros(5, device="meta"), None, 3]) == 400 + 6
