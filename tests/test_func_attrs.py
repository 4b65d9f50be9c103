"""PrimFunc attribute keys (kernels/func_attrs.py): TVM 0.27 reads ``tirx.noalias`` / ``tirx.is_scheduled`` and
silently ignores the older ``tir.*`` keys, so no kernel or backend module may write one, and a hand-written kernel
built with ``hand_kernel_attrs`` gets its noalias compute scope."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kernels.func_attrs import NOALIAS_ATTR, SCHEDULED_ATTR, hand_kernel_attrs

ROOT = Path(__file__).resolve().parents[1]
OLD_KEY = re.compile(r"^tir\.[A-Za-z_.]+$")


def _old_keys(path: Path) -> list[str]:
    """``file:line key`` for every string literal of the form ``tir.<name>`` used as a dict key or a call argument
    (docstrings and comments that mention the old keys are fine)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Dict):
            values = node.keys
        elif isinstance(node, ast.Call):
            values = node.args
        else:
            continue
        for value in values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str) and OLD_KEY.match(value.value):
                found.append(f"{path.name}:{value.lineno} {value.value}")
    return found


def test_no_module_writes_an_attribute_key_tvm_027_ignores():
    files = sorted((ROOT / "kernels").glob("*.py")) + sorted((ROOT / "ptq2tvm").rglob("*.py"))
    assert len(files) > 30
    offenders = [hit for f in files for hit in _old_keys(f)]
    assert not offenders, f"use kernels.func_attrs' tirx.* keys (TVM 0.27 ignores these): {offenders}"


def test_the_lint_sees_an_old_key(tmp_path):
    bad = tmp_path / "old_key.py"
    bad.write_text('"""Mentions "tir.noalias" in a docstring."""\n'
                   'T.func_attr({"global_symbol": "f", "tir.noalias": True})\nf.with_attr("tir.is_scheduled", True)\n')
    assert sorted(h.split()[-1] for h in _old_keys(bad)) == ["tir.is_scheduled", "tir.noalias"]


def test_hand_kernel_attrs():
    attrs = hand_kernel_attrs("k_conv", "stem_pool", {"int32_epilogue": 1})
    assert attrs == {"global_symbol": "k_conv", NOALIAS_ATTR: True, SCHEDULED_ATTR: True, "ptq2tvm_kernel": "stem_pool",
                     "int32_epilogue": 1}
    assert "ptq2tvm_kernel" not in hand_kernel_attrs("k_quantize")
    assert NOALIAS_ATTR == "tirx.noalias" and SCHEDULED_ATTR == "tirx.is_scheduled"
    with pytest.raises(ValueError, match=r"k_conv.*tirx\.noalias"):
        hand_kernel_attrs("k_conv", extra={NOALIAS_ATTR: False})
    with pytest.raises(TypeError, match=r"k_conv.*extra="):
        hand_kernel_attrs("k_conv", {"int32_epilogue": 1})


def test_a_hand_kernel_gets_its_noalias_compute_scope():
    """quantize_checked (an IRBuilder kernel with a parallel loop): TVM outlines the parallel body into
    ``main_compute_`` with noalias pointer arguments; with the old ``tir.noalias`` key it made no such function."""
    tvm = pytest.importorskip("tvm")
    from kernels.quantize_checked import quantize_checked_primfunc
    from ptq2tvm.backend.compile import host_target

    f = quantize_checked_primfunc("main", (2, 3, 64, 64), 0.02, 114, 255, threads=2)
    assert bool(f.attrs[NOALIAS_ATTR]) and bool(f.attrs[SCHEDULED_ATTR])
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(host_target(2)))
    mods = [lib.mod, *lib.mod.imports]
    ir = next(m.inspect_source("ll") for m in mods if m.kind == "llvm")
    signature = re.search(r"define [^@\n]*@main_compute_\(([^)]*)\)", ir)
    assert signature is not None, "no noalias compute scope for the parallel body"
    pointers = re.findall(r"ptr [^,]*", signature.group(1))
    assert pointers and all("noalias" in p for p in pointers), pointers
