"""A fast seeded slice of the random-graph fuzzer (ptq2tvm/fuzz.py; the >= 500-graph run is
benchmarks/fuzz_graphs.py): the op list comes from the registry (an op registered without a fuzzer entry fails
here), fold succeeds or names its error, every integer bound, .so == reference on both CPU backends, integer vs
fake-quant within 1 LSB per node."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from ptq2tvm.fold.bounds import BOUND_RULES  # noqa: E402
from ptq2tvm.frontend.trace import trace_model  # noqa: E402
from ptq2tvm.fuzz import OPS, build_model, check_spec, fresh_specs  # noqa: E402
from ptq2tvm.ops import FLOAT_OPS, IR_OPS, LUT_FUNCTIONS  # noqa: E402


def test_every_registered_op_has_a_fuzzer_entry():
    """Derived from the registry: every op family (trace-only ones included) is exercised by some fuzzer entry."""
    covered = {op for e in OPS.values() for op in e.covers}
    assert set(FLOAT_OPS) <= covered, f"registered ops without a fuzzer entry: {sorted(set(FLOAT_OPS) - covered)}"
    assert covered <= set(FLOAT_OPS), f"fuzzer entries name unknown ops: {sorted(covered - set(FLOAT_OPS))}"


def test_every_computing_integer_op_has_a_bound_rule():
    """ops that compute (not only move codes) need a rule in ptq2tvm.fold.bounds.check_graph_bounds"""
    computing = {name for name, d in IR_OPS.items() if d.kind != "grid"}
    assert computing <= set(BOUND_RULES), f"no bound rule: {sorted(computing - set(BOUND_RULES))}"


_drawn: Counter = Counter()


def _collect(spec):
    """Tally one drawn spec (and check it builds and traces)."""
    _drawn.update(b["op"] for b in spec["chain"])
    _drawn.update(f"degenerate:{b.get('degenerate', 'none')}" for b in spec["chain"])
    _drawn.update([f"data:{spec['data']}", f"a_bits:{spec['a_bits']}", f"lut_bits:{spec['lut_input_bits']}"])
    _drawn.update(f"w_bits:{b}" for b in spec["w_bits"])
    _drawn.update(f"layer_a_bits:{b}" for b in spec["layer_a_bits"])
    _drawn["odd_channels"] += spec["input_shape"][0] % 2
    _drawn["map_with_1"] += 1 in spec["input_shape"][1:]
    _drawn["multi_output"] += bool(spec["outputs"])
    _drawn["ceil_mode"] += any(b["op"] == "maxpool" and b["ceil_mode"] for b in spec["chain"])
    _drawn["gap_to_size"] += any(b["op"] == "gap" and b["how"].startswith("adaptive") and b["size"] != [1, 1]
                                 for b in spec["chain"])
    _drawn["broadcast_mul"] += any(b["op"] == "se" for b in spec["chain"])
    _drawn["concat_scales"] += any(b["op"] == "concat" and {1e-3, 1e3} & {x.get("gain") for x in b["branches"]}
                                   for b in spec["chain"])
    model = build_model(spec)                          # every drawn spec builds a torch model
    g = trace_model(model, tuple(spec["input_shape"]))  # ... that traces
    _drawn.update(f"traced:{n.op}" for n in g.nodes)
    _drawn.update(f"lut:{n.attrs['fn']}" for n in g.nodes if n.op == "lut")
    _drawn["traced_outputs>1"] += len(g.output_names) > 1


def test_generator_draws_every_registered_op_bit_width_and_degenerate_case():
    for spec in fresh_specs(20261130, 120):      # independent seeded draws (deterministic)
        _collect(spec)
    real = {name for name, d in FLOAT_OPS.items() if d.kind != "trace"}
    missing = sorted(op for op in real if not _drawn[f"traced:{op}"])
    assert not missing, f"registered ops no drawn graph traces to: {missing}"
    assert not [e for e in OPS if not _drawn[e]], "fuzzer entries never drawn"
    assert not [f for f in LUT_FUNCTIONS if not _drawn[f"lut:{f}"]], \
        f"lookup-table functions never drawn: {[f for f in LUT_FUNCTIONS if not _drawn[f'lut:{f}']]}"
    for b in range(2, 9):
        assert _drawn[f"w_bits:{b}"] and _drawn[f"a_bits:{b}"] and _drawn[f"layer_a_bits:{b}"], b
    assert all(_drawn[f"degenerate:{k}"] for k in ("zero", "tiny", "dead"))
    assert all(_drawn[f"data:{k}"] for k in ("zeros", "const_channel", "normal", "large"))
    for k in ("odd_channels", "map_with_1", "multi_output", "traced_outputs>1", "ceil_mode", "gap_to_size",
              "broadcast_mul", "concat_scales", "lut_bits:4", "lut_bits:None"):
        assert _drawn[k] > 0, k


@pytest.mark.parametrize("spec", fresh_specs(11, 3, max_ops=5), ids=lambda s: "-".join(b["op"] for b in s["chain"]))
def test_seeded_random_graphs_fold_and_run_bit_exact_on_both_cpu_backends(spec, tmp_path):
    r = check_spec(spec, tmp_path, schedules=("auto", "plain"))
    assert r.status in ("ok", "named_error"), f"{r.stage}: {r.message}\nspec: {r.spec}"
    if r.status == "ok":
        assert r.schedules == ["auto", "plain"] and r.max_local_lsb <= 1


FOUND_GRAPHS = json.loads((Path(__file__).parent / "data" / "fuzz_found_graphs.json").read_text())


@pytest.mark.parametrize("name", sorted(FOUND_GRAPHS))
def test_graphs_the_fuzzer_found_failing_now_run_bit_exact(name, tmp_path):
    """Each graph a fuzz run found failing (tests/data/fuzz_found_graphs.json: the spec and what failed), replayed."""
    found = FOUND_GRAPHS[name]
    if found.get("cuda") and not __import__("kernels.cuda_emulator", fromlist=["x"]).available():
        pytest.skip("no g++ to run the CUDA emulation")
    r = check_spec(found["spec"], tmp_path, schedules=("auto",), cuda=bool(found.get("cuda")))
    assert r.status == "ok" and r.max_local_lsb <= 1, f"{r.stage}: {r.message}"
