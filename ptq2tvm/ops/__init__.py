"""Op families of ptq2tvm, one module each, registered in one table (:mod:`ptq2tvm.ops.base`).

Adding an op: write an :class:`~ptq2tvm.ops.base.OpDef` subclass in a module here (trace pattern, fake-quant forward,
fold, numpy reference, TVM computes), decorate it with ``@register``, import the module below, and add its cases to
``tests/test_ops.py`` (the parametrized template every op runs through). Nothing else in the pipeline names ops.
"""

from . import concat, eltwise, lut, pool, shape, weighted  # noqa: F401  (registration)
from .base import (FLOAT_OPS, IR_OPS, OpDef, Unsupported, float_op, ir_op, module_handler, ops_of_kind,
                   register)
from .lut import LUT_FUNCTIONS, lut_table

__all__ = ["FLOAT_OPS", "IR_OPS", "LUT_FUNCTIONS", "OpDef", "Unsupported", "float_op", "ir_op", "lut_table",
           "module_handler", "ops_of_kind", "register"]
