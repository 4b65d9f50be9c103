"""Exceptions raised by ptq2tvm. Every message names the layer, file or value at fault."""


class Ptq2TvmError(Exception):
    """Base class of all ptq2tvm errors."""


class UnsupportedModelError(Ptq2TvmError):
    """The model contains layers or operations ptq2tvm cannot quantize."""


class QuantConfigError(Ptq2TvmError):
    """A quantization setting (bit width, method, ...) is out of range."""


class DataError(Ptq2TvmError):
    """Calibration or evaluation data is missing, empty, malformed or non-finite."""


class ArtifactError(Ptq2TvmError):
    """A saved artifact (integer graph, .so, metadata) is missing, corrupted or mismatched."""


class InputShapeError(Ptq2TvmError):
    """Run-time input does not match the compiled shape."""


class TargetError(Ptq2TvmError, ValueError):
    """A ``--target`` that names no known CPU/GPU target, or a build whose CPU features this host lacks."""
