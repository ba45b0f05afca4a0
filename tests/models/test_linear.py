"""The packed CPU inference path of `Linear` (models/linear.py): same results as nn.Linear up to
float rounding, never stale after an in-place weight update, never on the autograd path."""

from __future__ import annotations

import copy

import pytest
import torch

from respec.models import linear
from respec.models.linear import Linear, uses_packed

pytestmark = pytest.mark.skipif(not linear._ENABLED, reason="oneDNN packed linear unavailable")


def _layer(bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return Linear(48, 80, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(2, 48), (3, 5, 48), (64, 48)])
def test_packed_equals_nn_linear(dtype, tol, shape):
    lin = _layer(dtype=dtype)
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        assert uses_packed(x, lin.weight)
        got = lin(x)
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_an_in_place_update_is_never_served_stale():
    lin = _layer()
    x = torch.randn(4, 48)
    with torch.no_grad():
        lin(x)  # packs the current weight
        lin.weight.mul_(-2.0)  # optimizer steps, load_state_dict and copy_ are in-place writes like this
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
        lin.load_state_dict({"weight": torch.zeros(80, 48), "bias": torch.ones(80)})
        torch.testing.assert_close(lin(x), torch.ones(4, 80))


def test_a_layer_built_under_inference_mode_runs_unpacked():
    with torch.inference_mode():
        lin = _layer()
        x = torch.randn(4, 48)
        assert not uses_packed(x, lin.weight)  # no version counter: a packed copy could go stale
        lin.weight.mul_(3.0)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_training_forward_keeps_autograd_and_nn_linear():
    lin = _layer()
    x = torch.randn(4, 48)
    assert not uses_packed(x, lin.weight)  # grad enabled and weight requires grad
    lin(x).square().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_single_rows_and_small_weights_stay_unpacked(monkeypatch):
    lin = _layer()
    with torch.no_grad():
        assert not uses_packed(torch.randn(1, 1, 48), lin.weight)  # one row: MKL's gemv
        assert uses_packed(torch.randn(1, 2, 48), lin.weight)
        monkeypatch.setattr(linear, "MIN_WEIGHT_NUMEL", 80 * 48 + 1)
        assert not uses_packed(torch.randn(4, 48), lin.weight)
        monkeypatch.setattr(linear, "MIN_WEIGHT_NUMEL", 0)
        monkeypatch.setattr(linear, "_ENABLED", False)
        assert not uses_packed(torch.randn(4, 48), lin.weight)


def test_state_dict_and_deepcopy_never_see_the_packed_copy():
    lin = _layer()
    with torch.no_grad():
        lin(torch.randn(4, 48))  # builds the packed copy
    assert set(lin.state_dict()) == {"weight", "bias"}
    twin = copy.deepcopy(lin)
    with torch.no_grad():
        twin.weight.zero_()
        x = torch.randn(4, 48)
        torch.testing.assert_close(twin(x), twin.bias.expand(4, 80))  # the copy packs its own weight
        assert lin(x).abs().sum() > 0  # and the original is untouched


def test_a_build_whose_packed_ops_fail_keeps_nn_linear(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN kernel for this CPU")

    assert linear._available()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
    assert not linear._available()
    monkeypatch.setenv("RESPEC_PACKED_LINEAR", "0")
    assert not linear._available()


@pytest.mark.parametrize("bias", [True, False])
def test_one_fp32_row_runs_on_the_transposed_copy(bias):
    lin = _layer(bias=bias)
    with torch.no_grad():
        for shape in [(1, 48), (1, 1, 48)]:
            x = torch.randn(*shape)
            assert linear.path(x, lin.weight) == "transposed"
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
        assert linear.path(torch.randn(1, 48).bfloat16(), lin.weight.bfloat16()) == "plain"
        lin.weight.mul_(-2.0)  # the transposed copy is rebuilt after an in-place write, like the packed one
        x = torch.randn(1, 48)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert set(lin.state_dict()) == ({"weight", "bias"} if bias else {"weight"})
