"""Tensor types and dtypes: normalisation, sizes, JSON, and binding symbols against real tensors."""
import pytest
import torch

from dsgraph import InputError, ShapeError, Sym, TensorType, tt
from dsgraph.dtypes import compute_dtype, dtype_name, is_float, itemsize, to_torch
from dsgraph.types import bind_symbols


def test_type_normalises_dims_and_dtype():
    t = TensorType(("B", "S*B", 4), "bf16")
    assert t.shape == (Sym("B"), Sym("B") * Sym("S"), 4)
    assert t.dtype == "bfloat16" and t.rank == 3 and t.is_float
    assert t == tt(("B", "B*S", 4), torch.bfloat16) and hash(t) == hash(tt(("B", "B*S", 4), "bfloat16"))
    assert str(t) == "bfloat16[B, B*S, 4]"
    assert t.symbols() == {"B", "S"}
    assert t.with_dtype("int64") == tt(("B", "B*S", 4), "int64") and not t.with_dtype("int64").is_float
    assert t.with_shape((2, 3)) == tt((2, 3), "bfloat16")
    assert tt((), "float32").rank == 0 and tt((), "float32").numel() == 1


def test_sizes():
    t = tt(("B", "S+1", 4), "float32")
    assert t.numel({"B": 2, "S": 3}) == 32 and t.nbytes({"B": 2, "S": 3}) == 128
    assert t.concrete({"B": 2, "S": 3}) == (2, 4, 4)
    assert tt((3, 5), "bf16").nbytes() == 30 and tt((8,), "float8_e4m3fn").nbytes() == 8
    with pytest.raises(ShapeError, match="'S' has no value bound"):
        t.numel({"B": 1})


def test_json_round_trip():
    for t in [tt(("B", "S+T", 7), "bf16"), tt((), "bool"), tt(("2*B*S",), "int64")]:
        assert TensorType.from_json(t.to_json()) == t
    assert tt(("B", 3), "float32").to_json() == {"shape": ["B", 3], "dtype": "float32"}


@pytest.mark.parametrize("spelling,name", [("fp32", "float32"), ("BF16", "bfloat16"), ("half", "float16"),
                                           (torch.int32, "int32"), ("e4m3", "float8_e4m3fn"), ("bool", "bool")])
def test_dtype_spellings(spelling, name):
    assert dtype_name(spelling) == name
    assert dtype_name(to_torch(name)) == name


def test_dtype_errors_and_helpers():
    with pytest.raises(InputError, match="unsupported dtype 'int16'"):
        dtype_name("int16")
    with pytest.raises(InputError, match="unsupported dtype"):
        dtype_name(torch.complex64)
    with pytest.raises(InputError, match="models run in"):
        compute_dtype("int64")
    assert compute_dtype("bf16") == "bfloat16"
    assert is_float("float8_e4m3fn") and not is_float("int64")
    assert [itemsize(d) for d in ("float32", "bfloat16", "int64", "bool")] == [4, 2, 8, 1]
    with pytest.raises(InputError):
        TensorType((2,), "quaternion")


def test_bind_symbols_binds_and_checks():
    env = {}
    bind_symbols(tt(("B", "S", 4), "float32"), torch.zeros(2, 3, 4), env, "x")
    assert env == {"B": 2, "S": 3}
    bind_symbols(tt(("B*S", "S+1"), "float32"), torch.zeros(6, 4), env, "y")  # composite dims are checked
    with pytest.raises(ShapeError, match=r"y: dim 0 is 5, expected B\*S = 6"):
        bind_symbols(tt(("B*S", 4), "float32"), torch.zeros(5, 4), env, "y")
    with pytest.raises(ShapeError, match="x: expected rank 2"):
        bind_symbols(tt(("B", 4), "float32"), torch.zeros(2, 4, 1), env, "x")
    with pytest.raises(ShapeError, match="x: expected dtype int64, got float32"):
        bind_symbols(tt(("B",), "int64"), torch.zeros(2), env, "x")
    with pytest.raises(ShapeError, match="dim 0 is 3, expected B = 2"):
        bind_symbols(tt(("B",), "float32"), torch.zeros(3), env, "z")


def test_bind_symbols_resolves_composites_after_plain_symbols():
    env = {}
    bind_symbols(tt(("2*S", "S"), "float32"), torch.zeros(6, 3), env, "x")  # S bound later in the same type
    assert env == {"S": 3}
    with pytest.raises(ShapeError, match=r"dim 0 is 7, expected 2\*S = 6"):
        bind_symbols(tt(("2*S", "S"), "float32"), torch.zeros(7, 3), {}, "x")
    with pytest.raises(ShapeError, match=r"cannot infer \['B', 'S'\] from dim 0"):
        bind_symbols(tt(("B*S",), "float32"), torch.zeros(6), {}, "x")
