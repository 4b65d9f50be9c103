"""benchmarks/layer_gap.py's layer typing: OpenVINO's ONNX node names mapped back to module paths, and a fused
1x1 expand + depthwise kernel (kernels/expand_depthwise.py) typed as the pair on both sides (before, the .so's fused
kernel counted as a plain stride-2 depthwise conv while OpenVINO's expand counted as a 1x1 conv: MobileNetV2's
"dw 3x3/2" row read 1.3-1.45x OpenVINO's time, the pair itself runs at about half of OpenVINO's two layers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from conftest import tiny_integer_graph  # noqa: E402
from layer_gap import kernel_macs, macs_of, module_path, node_types  # noqa: E402

from ptq2tvm.backend.blocked_builder import _BlockedBuilder, _hint  # noqa: E402
from ptq2tvm.mixed.latency import layer_macs  # noqa: E402


@pytest.mark.parametrize("name, path", [
    ("/features/features.2/conv/conv.0/conv.0.0/Conv/WithoutBiases", "features.2.conv.0.0"),
    ("/features/features.0/features.0.0/Conv/WithoutBiases", "features.0.0"),
    ("/layer2/layer2.0/downsample/downsample.0/Conv/WithoutBiases", "layer2.0.downsample.0"),
    ("/layer1/layer1.0/conv1/Conv/WithoutBiases", "layer1.0.conv1"),
    ("/conv1/Conv/WithoutBiases", "conv1"),
    ("/classifier/classifier.1/Gemm", "classifier.1"),
    ("Conv_12", ""),            # no module scope: matches no graph node
])
def test_module_path_of_onnx_node_names(name: str, path: str) -> None:
    assert module_path(name) == path


def test_fused_expand_depthwise_pair_is_typed_as_the_pair() -> None:
    graph = tiny_integer_graph(8, 8)
    pairs = {d: e.name for d, e in _BlockedBuilder(graph, "vnni").expand_depthwise_pairs().items()}
    assert pairs, "TinyNet has a 1x1 expand from <= 16 channels read only by a depthwise conv"
    by_name = {n.name: n for n in graph.nodes}
    plain, kinds = node_types(graph), node_types(graph, pairs)
    fused_syms = {_hint(by_name[d]) for d in pairs}
    for d, e in pairs.items():
        sym = _hint(by_name[d])
        assert plain[sym].startswith("dw ") and plain[_hint(by_name[e])] == "conv 1x1"
        assert kinds[sym] == "1x1 + " + plain[sym]
        assert kinds[f"node:{d}"] == kinds[f"node:{e}"] == kinds[sym]      # OpenVINO's two layers of the pair
    assert {k: v for k, v in kinds.items() if k in plain and k not in fused_syms} == \
        {k: v for k, v in plain.items() if k not in fused_syms}


def test_kernel_macs_count_dense_kernels_once_and_give_grouped_ones_no_floor() -> None:
    """The VNNI floor column's products per kernel: the stem + pool kernel ``k_<conv>_<pool>`` carries its conv's,
    a kernel without products none, every dense conv / linear its own once; a kernel with a depthwise conv in it
    (alone, or fused after its 1x1 expand) has no floor (None), as latency_cpu gives none for such a network."""
    graph = tiny_integer_graph(8, 8)
    pairs = {d: e.name for d, e in _BlockedBuilder(graph, "vnni").expand_depthwise_pairs().items()}
    by_name = {n.name: n for n in graph.nodes}
    grouped = {n.name for n in graph.nodes if n.op == "conv2d" and int(n.attrs["groups"]) > 1}
    assert grouped and set(pairs) <= grouped
    real = layer_macs(graph, skip_padding=True)
    macs = kernel_macs(graph, pairs)
    assert all(macs[_hint(by_name[g])] is None for g in grouped)
    expands = {_hint(by_name[e]) for e in pairs.values()}
    dense = {k: v for k, v in macs.items() if v is not None and k not in expands}
    assert dense and sum(dense.values()) == sum(v for k, v in real.items() if k not in grouped and k not in
                                                 set(pairs.values()))
    stem = _hint(by_name["stem"])
    assert macs_of(stem + "_maxpool", macs) == macs_of(stem, macs) == real["stem"] > 0
    assert macs_of("k_avgpool", macs) == macs_of("quantize_input", macs) == 0


def test_floor_cell_shared_by_both_benchmarks() -> None:
    """latency_cpu's and layer_gap's floor column: floor ms, then ours / floor and theirs / floor."""
    import vnni_peak

    assert vnni_peak.floor_cell(20.0, 22.0, 27.0) == "20.00 (1.10x, 1.35x)"
    assert vnni_peak.floor_cell(20.0, 22.0, None) == vnni_peak.floor_cell(20.0, 22.0, 0.0) == "20.00 (1.10x)"
    assert vnni_peak.floor_cell(None, 22.0, 27.0) == vnni_peak.floor_cell(0.0, 22.0, 27.0) == "-"
