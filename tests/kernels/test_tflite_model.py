"""The int8 model file: it parses, and has the op structure an Edge TPU needs."""

from __future__ import annotations

import numpy as np
import pytest

from dgdm.kernels.diffusion import dense_propagator
from dgdm.kernels.errors import BackendError
from dgdm.kernels.quantize import INPUT_SCALE, quantize_operator
from dgdm.kernels.tflite_bench import rgg_problem
from dgdm.kernels.tflite_model import build_conv_model, describe_model


@pytest.fixture(scope="module")
def qop():
    problem = rgg_problem(96, seed=1)
    return quantize_operator(dense_propagator(problem.t, problem.method))


def test_model_is_one_int8_conv_with_edgetpu_shapes(qop) -> None:
    info = describe_model(build_conv_model(qop, 12))
    assert info.operators == ("CONV_2D",)  # no QUANTIZE/DEQUANTIZE: all on the TPU
    (inp,), (out,) = info.inputs, info.outputs
    assert inp.shape == out.shape == (1, 1, 12, 96)
    assert inp.dtype == out.dtype == "INT8"
    assert inp.zero_points == out.zero_points == (0,)
    assert inp.scales == pytest.approx((INPUT_SCALE,))
    assert info.first_buffer_empty


def test_filter_is_per_channel_int8_and_bias_int32(qop) -> None:
    info = describe_model(build_conv_model(qop, 4))
    assert info.filter.shape == (96, 1, 1, 96)
    assert info.filter.dtype == "INT8"
    assert len(info.filter.scales) == 96
    assert info.filter.quantized_dimension == 0
    assert set(info.filter.zero_points) == {0}
    assert info.filter.buffer_bytes == 96 * 96
    assert info.bias.dtype == "INT32"
    assert info.bias.shape == (96,)
    expected = INPUT_SCALE * np.asarray(info.filter.scales)
    np.testing.assert_allclose(info.bias.scales, expected, rtol=1e-6)


def test_weight_buffer_is_16_byte_aligned(qop) -> None:
    data = build_conv_model(qop, 4)
    weights = qop.weights.tobytes()
    offset = data.find(weights)
    assert offset > 0
    assert offset % 16 == 0


def test_off_diagonal_only_in_the_model(qop) -> None:
    assert not np.diag(qop.weights).any()
    assert np.abs(qop.weights).max(axis=1).min() >= 126  # each row uses its full range


@pytest.mark.parametrize("data", [b"", b"garbage" * 10, b"\x00" * 64])
def test_garbage_is_a_backend_error(data: bytes) -> None:
    with pytest.raises(BackendError):
        describe_model(data)


def test_truncated_model_is_a_backend_error(qop) -> None:
    data = build_conv_model(qop, 4)
    with pytest.raises(BackendError):
        describe_model(data[: len(data) // 3])
