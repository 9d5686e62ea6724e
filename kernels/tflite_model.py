"""An int8 TFLite model of Z^T = (O X)^T, written in pure Python from the TFLite schema.

The model is one 1x1 CONV_2D: input [1, 1, F, N] int8 (features as pixels, nodes as
channels), filter [N, 1, 1, N] = the off-diagonal operator O with per-output-channel scales,
int32 bias of zeros, output [1, 1, F, N] int8. No QUANTIZE/DEQUANTIZE ops: the host
quantises, so the Edge TPU compiler can map the whole graph (KERNELS-FACTS.md: Edge TPU).

Schema details a writer must get right: buffer 0 empty, weight buffers 16-byte aligned,
both `deprecated_builtin_code` and `builtin_code` set, int8 weight zero points 0, bias scale
= input scale x weight scale. `describe_model` parses a model back with the same package, so
tests and the Edge TPU path can check the op structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np
import tflite

from dgdm.kernels.errors import BackendError
from dgdm.kernels.quantize import INPUT_SCALE, QuantizedOperator

SCHEMA_VERSION = 3
CONV_2D_VERSION = 3  # int8 with per-channel filter quantisation
_ALIGNMENT = 16


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int
    buffer_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """What a parsed model contains: enough to check it is what an Edge TPU needs."""

    operators: tuple[str, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    filter: TensorInfo
    bias: TensorInfo
    first_buffer_empty: bool


def build_conv_model(qop: QuantizedOperator, features: int) -> bytes:
    """The flatbuffer bytes of the model for `qop` and `features` feature columns."""
    n = qop.n
    b = flatbuffers.Builder(n * n + 4096)
    buffers = [
        _buffer(b, None),
        _buffer(b, qop.weights.reshape(n, 1, 1, n).tobytes()),
        _buffer(b, np.zeros(n, dtype="<i4").tobytes()),
    ]
    bias_scales = INPUT_SCALE * qop.weight_scales.astype(np.float64)
    tensors = [
        _tensor(b, "x", [1, 1, features, n], tflite.TensorType.INT8, 0, [INPUT_SCALE], dimension=0),
        _tensor(
            b, "operator", [n, 1, 1, n], tflite.TensorType.INT8, 1, qop.weight_scales, dimension=0
        ),
        _tensor(b, "bias", [n], tflite.TensorType.INT32, 2, bias_scales, dimension=0),
        _tensor(
            b, "z", [1, 1, features, n], tflite.TensorType.INT8, 0, [qop.output_scale], dimension=0
        ),
    ]
    subgraph = _subgraph(b, tensors, _conv_operator(b))
    return _finish_model(b, buffers, subgraph)


def _vector(b: flatbuffers.Builder, start, items: list[int]) -> int:
    start(b, len(items))
    for item in reversed(items):
        b.PrependUOffsetTRelative(item)
    return b.EndVector()


def _buffer(b: flatbuffers.Builder, data: bytes | None) -> int:
    if data is None:
        tflite.BufferStart(b)
        return tflite.BufferEnd(b)
    b.StartVector(1, len(data), _ALIGNMENT)
    b.head -= len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    b.vectorNumElems = len(data)
    vec = b.EndVector()
    tflite.BufferStart(b)
    tflite.BufferAddData(b, vec)
    return tflite.BufferEnd(b)


def _quantization(b: flatbuffers.Builder, scales, dimension: int) -> int:
    scale_vec = b.CreateNumpyVector(np.asarray(scales, dtype="<f4"))
    zero_vec = b.CreateNumpyVector(np.zeros(len(scales), dtype="<i8"))
    tflite.QuantizationParametersStart(b)
    tflite.QuantizationParametersAddScale(b, scale_vec)
    tflite.QuantizationParametersAddZeroPoint(b, zero_vec)
    tflite.QuantizationParametersAddQuantizedDimension(b, dimension)
    return tflite.QuantizationParametersEnd(b)


def _tensor(b, name, shape, dtype, buffer, scales, *, dimension: int) -> int:  # noqa: PLR0917
    name_off = b.CreateString(name)
    shape_vec = b.CreateNumpyVector(np.asarray(shape, dtype="<i4"))
    quant = _quantization(b, scales, dimension)
    tflite.TensorStart(b)
    tflite.TensorAddShape(b, shape_vec)
    tflite.TensorAddType(b, dtype)
    tflite.TensorAddBuffer(b, buffer)
    tflite.TensorAddName(b, name_off)
    tflite.TensorAddQuantization(b, quant)
    return tflite.TensorEnd(b)


def _conv_operator(b: flatbuffers.Builder) -> int:
    tflite.Conv2DOptionsStart(b)
    tflite.Conv2DOptionsAddPadding(b, tflite.Padding.VALID)
    tflite.Conv2DOptionsAddStrideW(b, 1)
    tflite.Conv2DOptionsAddStrideH(b, 1)
    tflite.Conv2DOptionsAddDilationWFactor(b, 1)
    tflite.Conv2DOptionsAddDilationHFactor(b, 1)
    tflite.Conv2DOptionsAddFusedActivationFunction(b, tflite.ActivationFunctionType.NONE)
    options = tflite.Conv2DOptionsEnd(b)
    inputs = b.CreateNumpyVector(np.asarray([0, 1, 2], dtype="<i4"))
    outputs = b.CreateNumpyVector(np.asarray([3], dtype="<i4"))
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, 0)
    tflite.OperatorAddInputs(b, inputs)
    tflite.OperatorAddOutputs(b, outputs)
    tflite.OperatorAddBuiltinOptionsType(b, tflite.BuiltinOptions.Conv2DOptions)
    tflite.OperatorAddBuiltinOptions(b, options)
    return tflite.OperatorEnd(b)


def _subgraph(b: flatbuffers.Builder, tensors: list[int], operator: int) -> int:
    tensor_vec = _vector(b, tflite.SubGraphStartTensorsVector, tensors)
    op_vec = _vector(b, tflite.SubGraphStartOperatorsVector, [operator])
    inputs = b.CreateNumpyVector(np.asarray([0], dtype="<i4"))
    outputs = b.CreateNumpyVector(np.asarray([3], dtype="<i4"))
    name = b.CreateString("diffusion")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensor_vec)
    tflite.SubGraphAddInputs(b, inputs)
    tflite.SubGraphAddOutputs(b, outputs)
    tflite.SubGraphAddOperators(b, op_vec)
    tflite.SubGraphAddName(b, name)
    return tflite.SubGraphEnd(b)


def _finish_model(b: flatbuffers.Builder, buffers: list[int], subgraph: int) -> bytes:
    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, tflite.BuiltinOperator.CONV_2D)
    tflite.OperatorCodeAddBuiltinCode(b, tflite.BuiltinOperator.CONV_2D)
    tflite.OperatorCodeAddVersion(b, CONV_2D_VERSION)
    opcode = tflite.OperatorCodeEnd(b)
    opcodes = _vector(b, tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs = _vector(b, tflite.ModelStartSubgraphsVector, [subgraph])
    buffer_vec = _vector(b, tflite.ModelStartBuffersVector, buffers)
    description = b.CreateString("dgdm-edge diffusion operator (int8 1x1 CONV_2D)")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, opcodes)
    tflite.ModelAddSubgraphs(b, subgraphs)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffer_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


_TYPE_NAMES = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
_OP_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


def describe_model(data: bytes) -> ModelInfo:
    """Parse a model file's op structure; a malformed file raises BackendError."""
    try:
        return _describe(data)
    except BackendError:
        raise
    except Exception as exc:  # flatbuffers raises anything on garbage
        raise BackendError(f"the model file is not a valid TFLite model ({exc}).") from exc


def _describe(data: bytes) -> ModelInfo:
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise BackendError("the model file lacks the TFL3 identifier.")
    model = tflite.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    ops = []
    for i in range(graph.OperatorsLength()):
        code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
        ops.append(_OP_NAMES.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?"))
    conv_inputs = graph.Operators(0).InputsAsNumpy() if ops else []

    def info(index: int) -> TensorInfo:
        return _tensor_info(model, graph.Tensors(int(index)))

    return ModelInfo(
        operators=tuple(ops),
        inputs=tuple(info(i) for i in graph.InputsAsNumpy()),
        outputs=tuple(info(i) for i in graph.OutputsAsNumpy()),
        filter=info(conv_inputs[1]),
        bias=info(conv_inputs[2]),
        first_buffer_empty=model.Buffers(0).DataLength() == 0,
    )


def _tensor_info(model: tflite.Model, tensor: tflite.Tensor) -> TensorInfo:
    quant = tensor.Quantization()
    return TensorInfo(
        name=tensor.Name().decode(),
        shape=tuple(int(v) for v in tensor.ShapeAsNumpy()),
        dtype=_TYPE_NAMES.get(tensor.Type(), "?"),
        scales=tuple(float(v) for v in quant.ScaleAsNumpy()) if quant.ScaleLength() else (),
        zero_points=tuple(int(v) for v in quant.ZeroPointAsNumpy())
        if quant.ZeroPointLength()
        else (),
        quantized_dimension=quant.QuantizedDimension(),
        buffer_bytes=model.Buffers(tensor.Buffer()).DataLength(),
    )
