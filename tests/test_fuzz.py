"""A fast seeded slice of the random-graph fuzzer (ptq2tvm/fuzz.py; the >= 500-graph run is
benchmarks/fuzz_graphs.py): fold succeeds or names its error, int32 bound, .so == reference on both CPU backends,
integer vs fake-quant within 1 LSB per node."""

from __future__ import annotations

from collections import Counter

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from ptq2tvm.fuzz import OPS, build_model, check_spec, graph_specs  # noqa: E402

_drawn: Counter = Counter()


@seed(20261130)
@settings(max_examples=150, database=None, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(graph_specs())
def _collect(spec):
    _drawn.update(b["op"] for b in spec["chain"])
    _drawn.update(f"degenerate:{b.get('degenerate', 'none')}" for b in spec["chain"])
    _drawn.update([f"data:{spec['data']}", f"a_bits:{spec['a_bits']}"])
    _drawn.update(f"w_bits:{b}" for b in spec["w_bits"])
    if 1 in spec["input_shape"][1:]:
        _drawn["map_with_1"] += 1
    build_model(spec)                          # every drawn spec builds a torch model


def test_generator_draws_every_registered_op_bit_width_and_degenerate_case():
    _collect()
    missing = [op for op in OPS if _drawn[op] == 0]
    assert not missing, f"ops never drawn: {missing}"
    assert all(_drawn[f"w_bits:{b}"] and _drawn[f"a_bits:{b}"] for b in range(2, 9))
    assert all(_drawn[f"degenerate:{k}"] for k in ("zero", "tiny", "dead"))
    assert all(_drawn[f"data:{k}"] for k in ("zeros", "const_channel", "normal"))
    assert _drawn["map_with_1"] > 0


_results = []


@seed(11)
@settings(max_examples=4, database=None, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(graph_specs(max_ops=4))
def _fuzz(spec):
    import tempfile
    from pathlib import Path

    r = check_spec(spec, Path(tempfile.mkdtemp()), schedules=("auto", "plain"))
    _results.append(r)
    assert r.status in ("ok", "named_error"), f"{r.stage}: {r.message}\nspec: {r.spec}"


def test_seeded_random_graphs_fold_and_run_bit_exact_on_both_cpu_backends():
    _fuzz()
    ok = [r for r in _results if r.status == "ok"]
    assert ok, "no graph got through the pipeline"
    assert all(r.schedules == ["auto", "plain"] and r.max_local_lsb <= 1 for r in ok)
