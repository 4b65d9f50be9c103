"""Tuning (`ptq2tvm compile --tune-trials`): every schedule in the tuning space is bit-exact, a tuned build equals the
reference executor, and a rebuild from the records measures nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from tvm import te  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from test_kernels_x86 import CONV_CASES, HAS_VNNI, ISAS, _conv_case, _target  # noqa: E402


def _unscheduled(fn, arrays, **attrs):
    phs = [te.placeholder(tuple(a.shape), str(a.dtype), name=f"in{i}") for i, a in enumerate(arrays)]
    return te.create_prim_func([*phs, fn(*phs, **attrs)], index_dtype_override="int64")   # as Relax emit_te


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["3x3_s1", "1x1_s2_downsample", "depthwise_3x3_s1", "int4_3x3_s2_res",
                                  "3x3_s1_batch2_clamp", "int4_3x3_batch3_clamp"])
def test_every_schedule_in_the_tuning_space_is_bit_exact(name, isa):
    n, c, h, w, o, k, s, p, d, g, icb, res, int4, extra = CONV_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    cs = _conv_case(rng, n, c, h, w, o, k, s, p, d, g, res, int4, **extra)
    zx = extra.get("zx", 3)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], icb, zx), K.pack_conv_weight(cs["w"], g, ic_block=icb, isa=isa, int4=int4),
              *params[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    attrs = dict(stride=s, padding=p, dilation=d, groups=g, input_zero_point=zx, output_zero_point=extra.get("zo", 5),
                 lo=extra.get("lo", 0), hi=extra.get("hi", 255), residual_zero_point=extra.get("zr", 7), isa=isa)
    space = K.tuning_space(_unscheduled(K.conv2d_nchwc_requant, arrays, **attrs), _target(isa))
    assert space[0] == {} and len(space) >= (2 if isa == "vnni" else 1), space
    assert len({json.dumps({k: str(v) for k, v in o.items()}) for o in space}) == len(space), "duplicate options"
    for opt in space:
        kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, _target(isa), options=opt, **attrs)
        got = K.nchwc_to_nchw(kern.run(*arrays), o)
        assert np.array_equal(got, cs["ref"]), f"{name} {opt}: {int((got != cs['ref']).sum())} mismatches"


@pytest.mark.skipif(not HAS_VNNI, reason="the tap kernel is VNNI-only")
def test_depthwise_taps_tuning_space_is_bit_exact():
    rng = np.random.default_rng(7)
    cs = _conv_case(rng, 1, 32, 12, 12, 32, 3, 2, 1, 1, 32, True)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, 3), K.pack_depthwise_taps(cs["w"]), *params[:3],
              K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    attrs = dict(kernel_width=3, stride=2, padding=1, input_zero_point=3, output_zero_point=5, residual_zero_point=7)
    space = K.tuning_space(_unscheduled(K.depthwise_taps_requant, arrays, **attrs), _target("vnni"))
    assert space[0] == {} and len(space) >= 2, space
    for opt in space:
        kern = K.build_standalone(K.depthwise_taps_requant, arrays, _target("vnni"), options=opt, **attrs)
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 32), cs["ref"]), opt


def test_serial_conv_space_is_ranked_for_one_thread():
    """A small conv runs on the calling thread (kernels.schedule.parallel_threads); its tuning space
    lists the tiles in the order a 1-thread build ranks them (which differs from the 2-thread order at this shape),
    and the hand schedule's choice, option ``{}``, is that list's first tile. A conv above the threshold keeps the
    target's thread count."""
    rng = np.random.default_rng(3)
    target = K.host_target(num_cores=2, mcpu=None if HAS_VNNI else "znver4")
    for c, o, h, threads in ((16, 16, 4, 1), (1024, 16, 4, 2)):     # 4 K and 256 K multiply-adds
        cs = _conv_case(rng, 1, c, h, h, o, 1, 1, 0, 1, 1, False)
        params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
        arrays = [K.nchw_to_nchwc(cs["x"], 16, 3), K.pack_conv_weight(cs["w"], 1, 16), *params[:3]]
        assert K.schedule.runs_serial(h * h * c * o, h * h) == (threads == 1)
        space = K.tuning_space(_unscheduled(K.conv2d_nchwc_requant, arrays, input_zero_point=3), target)
        want = K.conv_tile_candidates(1, o // 16, h, h, isa="vnni", threads=threads)
        other = K.conv_tile_candidates(1, o // 16, h, h, isa="vnni", threads=3 - threads)
        assert want != other, "both shapes rank their tiles differently for 1 and 2 threads"
        assert space == [{}] + [{"tile": t} for t in want[1:]]
        built = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, input_zero_point=3)
        explicit = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, options={"tile": want[0]},
                                      input_zero_point=3)
        assert built.func.script() == explicit.func.script()


def test_conv_space_starts_with_the_hand_choice():
    tiles = K.conv_tile_candidates(1, 4, 56, 56, isa="vnni", threads=2)
    assert tiles[0] == K.choose_conv_tile(1, 4, 56, 56, isa="vnni", threads=2)
    assert all(t.P * t.Q * t.R <= 14 and t.Q <= 4 for t in tiles)
    assert len(set(tiles)) == len(tiles) > 5


def _per_task_balance(n, ob, oh, ow, tile, threads=2):
    from kernels.schedule import _task_chunks
    nc, rc = _task_chunks(ob // tile.Q, n, oh // tile.R, threads, n * oh * ow)
    tasks = ob // tile.Q * nc * rc
    return tasks / (threads * -(-tasks // threads))


@pytest.mark.parametrize("n", [1, 8])
def test_per_task_tile_balances_the_threads(n):
    """int4 convs unpack once per task (a whole group of output blocks): the tile is the hand choice where that
    already splits evenly over the threads, else the first candidate that does (MobileNetV2's 10 blocks at 7x7:
    Q = 2 gives 5 tasks, Q = 1 gives 10); shapes of MobileNetV2 / ResNet-18 / EfficientNet-B0 at 224."""
    from kernels.schedule import balanced_task_tile
    for ob, oh in [(1, 112), (2, 112), (6, 56), (9, 56), (9, 28), (12, 14), (24, 14), (36, 7), (10, 7), (60, 7),
                   (20, 7), (80, 7), (4, 56), (8, 28), (16, 14), (32, 7), (5, 28), (15, 14), (42, 7), (72, 7)]:
        hand, tile = K.choose_conv_tile(n, ob, oh, oh), balanced_task_tile(n, ob, oh, oh)
        if _per_task_balance(n, ob, oh, oh, hand) >= 0.9:
            assert tile == hand, (ob, oh)
        else:
            assert _per_task_balance(n, ob, oh, oh, tile) >= 0.9 and tile.P * tile.Q * tile.R >= 4, (ob, oh, tile)
    assert balanced_task_tile(1, 10, 7, 7) == K.ConvTile(7, 1, 1) != K.choose_conv_tile(1, 10, 7, 7)


def test_per_task_split_does_not_repeat_the_unpack_for_a_few_pixels():
    """Where no split within the unpack budget (pixels / 64 chunks) gives each thread 2 tasks, the split is the one
    of least estimated time, not the most chunks: ResNet-style 3x3 64 -> 64 at 7x7 (4 blocks, Q = 2) was cut into 7
    one-row chunks, each task unpacking its blocks' weights for 7 pixels (1.55x its int8 kernel on a Zen 4); now
    every task meets all 49 pixels."""
    from kernels.schedule import _task_chunks, balanced_task_tile, per_task_time
    tile = balanced_task_tile(1, 4, 7, 7)
    assert _task_chunks(4 // tile.Q, 1, 7 // tile.R, 2, 49) == (1, 1), tile
    for n, ob, oh in [(1, 4, 7), (1, 2, 14), (1, 1, 7), (1, 2, 7), (2, 1, 7), (1, 3, 14), (1, 1, 1), (1, 6, 1)]:
        tile = balanced_task_tile(n, ob, oh, oh)
        groups, rows, pixels = ob // tile.Q, oh // tile.R, n * oh * oh
        nc, rc = _task_chunks(groups, n, rows, 2, pixels)
        every = [per_task_time(groups, a * b, pixels, 2) for a in range(1, n + 1) if n % a == 0
                 for b in range(1, rows + 1) if rows % b == 0]
        if groups * nc * rc < 4:        # not the in-budget rule: the estimate decided
            assert per_task_time(groups, nc * rc, pixels, 2) == min(every), (n, ob, oh, tile, nc, rc)
    assert per_task_time(2, 7, 49, 2) > 1.2 * per_task_time(2, 1, 49, 2)


def test_per_task_split_gives_the_threads_equal_task_counts():
    """Within the unpack budget the split is the one of least estimated time among those with enough tasks, which
    avoids task counts the threads do not divide (TVM's static split leaves a thread idle): MobileNetV2's 24 -> 144
    expand at 56x56 (3 groups) took 7 row chunks, 21 tasks, 11 + 10 on 2 threads (1.045-1.063x its int8 kernel
    on a Zen 4), now 8 chunks, 24 tasks; its 576 -> 96 projections at 14x14 at batch 8 likewise (21 -> 24)."""
    from kernels.schedule import _divisors, _task_chunks, balanced_task_tile, per_task_time
    assert _task_chunks(3, 1, 56, 2, 3136) == (1, 8)
    assert _task_chunks(3, 8, 14, 2, 8 * 196) == (4, 2)
    for n in (1, 8):
        for ob, oh in [(9, 56), (9, 28), (6, 14), (3, 14), (42, 7), (42, 14), (5, 14), (4, 56), (10, 7), (60, 7)]:
            tile = balanced_task_tile(n, ob, oh, oh)
            groups, rows, pixels = ob // tile.Q, oh // tile.R, n * oh * oh
            nc, rc = _task_chunks(groups, n, rows, 2, pixels)
            splits = [a * b for a in _divisors(n) for b in _divisors(rows) if a * b <= max(1, pixels // 64)]
            for want in (16, 4):
                fit = [c for c in splits if groups * c >= want]
                if fit:
                    assert per_task_time(groups, nc * rc, pixels, 2) == min(per_task_time(groups, c, pixels, 2)
                                                                             for c in fit), (n, ob, oh, nc, rc)
                    break
    for n, ob, oh in [(1, 9, 56), (8, 9, 56), (8, 6, 14), (8, 9, 28), (8, 42, 7)]:     # 21 tasks before
        tile = balanced_task_tile(n, ob, oh, oh)
        nc, rc = _task_chunks(ob // tile.Q, n, oh // tile.R, 2, n * oh * oh)
        assert ob // tile.Q * nc * rc % 2 == 0, (n, ob, oh, nc, rc)


@pytest.mark.skipif(not HAS_VNNI, reason="tuning records are checked on the VNNI kernels")
def test_tuned_build_is_exact_and_a_rebuild_reuses_the_records(tmp_path, capfd):
    from conftest import tiny_integer_graph
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    graph = tiny_integer_graph(8, 4)
    rng = np.random.default_rng(1)
    first = compile_so(graph, tmp_path / "a.so", batch=2, tune_trials=2)
    tuning = first.meta["tuning"]
    assert first.meta["backend"].endswith("-tuned")
    assert (tmp_path / "a.tuning" / "database_tuning_record.json").is_file()
    convs = [t for t in tuning["tasks"] if t["kind"].startswith("conv2d")]
    assert convs and all(t["candidates"] == 2 and t["hand_ms"] and t["best_ms"] <= t["hand_ms"] for t in convs)
    # every conv task measured its 2 candidates (on an AMX host the int8 convs are AMX kernels, not tuned: fewer tasks)
    assert tuning["measured"] >= 2 * len(convs)
    q = graph.input.quantize(rng.standard_normal((2, 1, 12, 12)).astype(np.float32))
    capfd.readouterr()
    assert np.array_equal(CompiledModel(tmp_path / "a.so").run_int(q), run_reference(graph, q))
    # the exactness check runs the exported file, not the in-memory executable (running that first made the export
    # carry memory-scope entries, and TVM logged a warning per constant on every load)
    assert "Scope Loaded" not in capfd.readouterr().err

    again = compile_so(graph, tmp_path / "b.so", batch=2, tune_trials=2, tune_db=tmp_path / "a.tuning")
    assert again.meta["tuning"]["measured"] == 0
    assert all(t["from_records"] for t in again.meta["tuning"]["tasks"] if t["kind"].startswith("conv2d"))
    assert np.array_equal(CompiledModel(tmp_path / "b.so").run_int(q), run_reference(graph, q))

    # a rebuild from the records in a fresh process: the traces tensorize each conv's epilogue with an intrinsic
    # registered per layer's requant constants, which the tuner registers from the record file before TVM parses it
    # (kernels.register_named_epilogues)
    graph.save(tmp_path / "g.npz")
    code = ("import sys, json; from ptq2tvm.api import compile_so; from ptq2tvm.ir.graph import IntegerGraph; "
            f"r = compile_so(IntegerGraph.load({str(tmp_path / 'g.npz')!r}), {str(tmp_path / 'c.so')!r}, batch=2, "
            f"tune_trials=2, tune_db={str(tmp_path / 'a.tuning')!r}); print(json.dumps(r.meta['tuning']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["measured"] == 0 and all(t["from_records"] for t in fresh["tasks"] if t["kind"].startswith("conv2d"))
    assert np.array_equal(CompiledModel(tmp_path / "c.so").run_int(q), run_reference(graph, q))

    with pytest.raises(ValueError, match="tune trials must be >= 0"):
        compile_so(graph, tmp_path / "d.so", tune_trials=-1)
    assert not (tmp_path / "d.so").exists()


def test_epilogue_intrinsics_register_again_from_their_names():
    """A recorded trace names its epilogue intrinsics with every parameter in the name, so a fresh process registers
    the same intrinsic from the record text alone."""
    from tvm.s_tir import TensorIntrin

    name = K.epilogue_intrin.requant16_intrinsic_name(5, 4, 250, False, 200, "local")
    assert name == "ptq2tvm_requant16_z5_4_250_s64_r200_local"
    text = f'[["{name}"], ["ptq2tvm_requant16_z0_0_255_s32_none_global"], ["ptq2tvm_dot_16x4_u8i8i32_vnni"], ["{name}"]]'
    assert K.register_named_epilogues(text) == ["ptq2tvm_requant16_z0_0_255_s32_none_global", name]
    assert TensorIntrin.get(name) is not None
