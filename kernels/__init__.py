"""Exact int8 (and packed-int4-weight) kernels for ptq2tvm: TE computes in a blocked NCHW[16]c layout, tensor
intrinsics (AVX-512 VNNI vpdpbusd, exact AVX2 vpmaddwd; CUDA dp4a) and hand schedules that need no tuning.

Typical use in a Relax build (see :mod:`kernels.schedule` for the loop structure)::

    import kernels as K
    isa = K.pack_isa(K.target_isa(target))                      # weight layout: 'vnni' or 'avx2'
    wp = K.pack_conv_weight(w_oihw, groups, ic_block=16, isa=isa)
    b, m, s = K.pack_channel_params(bias, mult, shift)
    y = bb.emit_te(K.conv2d_nchwc_requant, x_blocked, relax.const(wp), relax.const(b), relax.const(m),
                   relax.const(s), stride=(1, 1), padding=(1, 1), input_zero_point=zx, output_zero_point=zo,
                   lo=0, hi=255, isa=isa)
    ...
    mod = K.schedule_module(bb.get(), target)
    ex = K.compile_module(mod, target)             # tvm.compile, per-task buffers on the stack

Layouts and packing: :mod:`kernels.layout`. Arithmetic: :mod:`kernels.ops` (and :mod:`kernels.reference`, the numpy
truth).
"""

from .intrin import (AVX2_INTRIN, DP4A_INTRIN, TAPS_INTRIN, VNNI_INTRIN, patch_tvm_vnni_intrinsic,
                     register_avx2_intrinsic, register_dp4a_intrinsic, register_taps_intrinsic, register_vnni_intrinsic)
from .layout import (BLOCK, FIRST_BLOCK, conv_weight_mode, nchw_to_nchwc, nchw_to_rows, nchwc_to_nchw,
                     pack_channel_params, pack_conv_weight, pack_dense_weight, pack_depthwise_taps, pack_rows_weight,
                     rows_weight, depthwise_int16_exact, lifted_epilogue_exact, shifts_allow_int32_epilogue,
                     u8s8_int16_group, u8s8_pairs_exact, unpack_int2, unpack_int4)
from .ops import (KERNEL_ATTR, add_requant_nchwc, concat_requant_nchwc, lut_nchwc, mul_requant_nchwc,
                  upsample_nearest_nchwc, avgpool2d_nchwc_requant, clamp_nchwc, conv2d_nchwc_requant,
                  conv2d_rows_requant, dense_requant, depthwise_taps_requant, global_avgpool_nchwc_requant, maxpool2d_nchwc, nchwc_flatten,
                  quantize_input, requant_expr, rows_layout)
from .ops import nchw_to_rows as te_nchw_to_rows
from .ops import nchw_to_nchwc as te_nchw_to_nchwc
from .ops import nchwc_to_nchw as te_nchwc_to_nchw
from .standalone import StandaloneKernel, build_standalone, host_target
from .task_stack import compile_module
from .depthwise_vnni import DEPTHWISE_VNNI_KIND, depthwise_vnni_out_shape, depthwise_vnni_primfunc
from .expand_depthwise import EXPAND_DEPTHWISE_KIND, expand_depthwise_primfunc
from .stem_pool import STEM_POOL_KIND, rows_conv_maxpool_out_shape, rows_conv_maxpool_primfunc
from .rows_shuffle import nchw_to_rows_primfunc, rows_out_shape, rows_shuffle_supported
from .lut_vbmi import LUT_VBMI_KIND, lut_vbmi_primfunc, lut_vbmi_supported, pad_lut_table, target_has_vbmi
from .mul_vnni import MUL_VNNI_KIND, mul_vnni_out_shape, mul_vnni_primfunc
from .amx import (AMX_ATTR, AMX_ENV, amx_conv_out_shape, amx_conv_primfunc, amx_conv_supported, amx_kernel_count,
                  amx_rows_conv_primfunc, amx_rows_out_shape, pack_amx_int4, target_has_amx)
from .cuda import (CudaConvTile, choose_cuda_conv_tile, launch_shape, schedule_conv2d_dp4a, schedule_depthwise_cuda,
                   schedule_module_cuda, schedule_simple_cuda)
from .schedule import (ConvTile, apply_schedule, choose_conv_tile, conv_tile_candidates, finish_scheduled, kernel_kind,
                       schedule_conv2d_nchwc, schedule_module, schedule_primfunc, target_has_gfni512, target_isa,
                       tuning_space)
from .schedule import arithmetic_shortcuts, dot_product, pack_isa
from .intrin import (AVX2W_INTRIN, AVXVNNI_INTRIN, UBSW16_INTRIN, UBSW_INTRIN, WIDEN16_INTRIN, register_avx2w_intrinsic,
                     register_avxvnni_intrinsic, register_ubsw16_intrinsic, register_ubsw_intrinsic,
                     register_unpack4_intrinsic, register_widen16_intrinsic)
from .epilogue_intrin import register_named_epilogues, register_requant16_intrinsic

__all__ = [
    "AVX2_INTRIN", "DP4A_INTRIN", "TAPS_INTRIN", "VNNI_INTRIN", "patch_tvm_vnni_intrinsic", "register_avx2_intrinsic",
    "register_dp4a_intrinsic", "register_taps_intrinsic", "register_vnni_intrinsic",
    "BLOCK", "FIRST_BLOCK", "conv_weight_mode", "nchw_to_rows", "pack_rows_weight", "rows_weight",
    "conv2d_rows_requant", "rows_layout", "te_nchw_to_rows", "nchw_to_rows_primfunc", "rows_out_shape",
    "rows_shuffle_supported", "nchw_to_nchwc", "nchwc_to_nchw", "pack_channel_params",
    "pack_conv_weight", "pack_dense_weight", "pack_depthwise_taps", "unpack_int2", "unpack_int4",
    "KERNEL_ATTR", "add_requant_nchwc", "concat_requant_nchwc", "lut_nchwc", "mul_requant_nchwc",
    "upsample_nearest_nchwc", "avgpool2d_nchwc_requant", "clamp_nchwc", "conv2d_nchwc_requant",
    "dense_requant", "depthwise_taps_requant", "global_avgpool_nchwc_requant", "maxpool2d_nchwc", "nchwc_flatten", "quantize_input",
    "requant_expr", "shifts_allow_int32_epilogue", "lifted_epilogue_exact",
    "te_nchw_to_nchwc", "te_nchwc_to_nchw",
    "ConvTile", "apply_schedule", "choose_conv_tile", "conv_tile_candidates", "finish_scheduled", "kernel_kind",
    "schedule_conv2d_nchwc", "schedule_module", "schedule_primfunc", "target_has_gfni512", "target_isa", "tuning_space",
    "StandaloneKernel", "build_standalone", "host_target", "compile_module",
    "arithmetic_shortcuts", "dot_product", "pack_isa", "u8s8_pairs_exact", "AVXVNNI_INTRIN", "UBSW_INTRIN", "register_avxvnni_intrinsic",
    "AVX2W_INTRIN", "register_avx2w_intrinsic",
    "register_ubsw_intrinsic", "u8s8_int16_group", "depthwise_int16_exact", "UBSW16_INTRIN", "WIDEN16_INTRIN",
    "register_ubsw16_intrinsic", "register_widen16_intrinsic", "register_unpack4_intrinsic", "register_named_epilogues",
    "register_requant16_intrinsic",
    "CudaConvTile", "choose_cuda_conv_tile", "launch_shape", "schedule_conv2d_dp4a", "schedule_depthwise_cuda",
    "schedule_module_cuda", "schedule_simple_cuda",
    "DEPTHWISE_VNNI_KIND", "depthwise_vnni_out_shape", "depthwise_vnni_primfunc", "EXPAND_DEPTHWISE_KIND",
    "LUT_VBMI_KIND", "lut_vbmi_primfunc", "lut_vbmi_supported", "pad_lut_table", "target_has_vbmi", "MUL_VNNI_KIND",
    "mul_vnni_out_shape", "mul_vnni_primfunc",
    "expand_depthwise_primfunc", "STEM_POOL_KIND", "rows_conv_maxpool_out_shape", "rows_conv_maxpool_primfunc",
    "AMX_ATTR", "AMX_ENV", "amx_conv_out_shape", "amx_conv_primfunc", "amx_conv_supported", "amx_kernel_count",
    "amx_rows_conv_primfunc", "amx_rows_out_shape", "pack_amx_int4", "target_has_amx",
]
