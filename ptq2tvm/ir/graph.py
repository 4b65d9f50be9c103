"""The integer graph: the one definition of the deployed arithmetic (see docs/integer_arithmetic.md).

Every tensor is a uint8 container holding values in [0, 2^bits - 1] with a real value scale * (q - zero_point).
The ops and their exact semantics are those of the op registry (:mod:`ptq2tvm.ops`, ``OpDef.reference``): conv2d,
dense, add, mul, concat, lut, avgpool2d, maxpool2d, clamp, flatten, upsample, pixel_shuffle, pixel_unshuffle,
channel_shuffle, slice. A graph has one or more outputs (``output_names``). Serialized to one ``.npz`` file: integer
arrays plus a versioned JSON header with a SHA-256 of the arrays.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..errors import ArtifactError, not_found
from .outputs import GraphOutputs

IR_FORMAT = "ptq2tvm-integer-graph"
IR_VERSION = 2           # 2: several outputs (``output_names``); version 1 files (one ``output_name``) still load


@dataclass
class QTensor:
    """A quantized tensor: shape without the batch dim, real = scale * (q - zero_point), q in [0, 2^bits-1]."""

    name: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    bits: int

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float -> uint8: rint(x / scale) + zero_point in float32 (the fake-quant model's arithmetic: round half to
        even), clamped to [0, qmax]."""
        q = np.divide(np.asarray(x, dtype=np.float32), np.float32(self.scale), dtype=np.float32)
        np.rint(q, out=q)
        q += np.float32(self.zero_point)
        np.clip(q, 0, self.qmax, out=q)
        return q.astype(np.uint8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.float64) - self.zero_point) * self.scale).astype(np.float32)


@dataclass
class IntNode:
    name: str
    op: str
    inputs: list[str]
    out: QTensor
    attrs: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class IntegerGraph(GraphOutputs):
    _noun = "integer graph"

    input: QTensor
    nodes: list[IntNode]
    output_names: list[str] | str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> QTensor:
        return self.tensor(self.output_name)

    @property
    def outputs(self) -> list[QTensor]:
        return [self.tensor(n) for n in self.output_names]

    def tensor(self, name: str) -> QTensor:
        if name == self.input.name:
            return self.input
        for n in self.nodes:
            if n.name == name:
                return n.out
        raise KeyError(f"no tensor named {name!r} in the integer graph")

    def weight_bytes(self) -> int:
        return int(sum(n.arrays["weight"].size for n in self.nodes if "weight" in n.arrays))

    # ---- persistence -----------------------------------------------------------------------------------------
    def _header(self, version: int = IR_VERSION) -> dict[str, Any]:
        h = {
            "format": IR_FORMAT,
            "version": version,
            "ptq2tvm_version": __version__,
            "input": _tensor_json(self.input),
            "output_names": list(self.output_names),
            "meta": self.meta,
            "nodes": [dict(name=n.name, op=n.op, inputs=n.inputs, out=_tensor_json(n.out), attrs=n.attrs,
                           arrays=sorted(n.arrays)) for n in self.nodes],
        }
        if version == 1:
            h["output_name"] = h.pop("output_names")[0]
        return h

    def _array_items(self) -> dict[str, np.ndarray]:
        return {f"{i}/{k}": v for i, n in enumerate(self.nodes) for k, v in sorted(n.arrays.items())}

    def digest(self) -> str:
        """SHA-256 over the header (minus the digest) and every array: identifies this exact integer graph."""
        return self._digest(IR_VERSION)

    def _digest(self, version: int) -> str:
        h = hashlib.sha256(json.dumps(self._header(version), sort_keys=True).encode())
        for k, v in self._array_items().items():
            h.update(k.encode())
            h.update(str(v.dtype).encode() + str(v.shape).encode())
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the graph to one .npz file atomically (temp file, then rename)."""
        path = Path(path)
        header = self._header()
        header["sha256"] = self.digest()
        payload = self._array_items()
        payload["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with atomic_path(path, suffix=".tmp.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **payload)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "IntegerGraph":
        path = Path(path)
        if not path.is_file():
            raise not_found(path, "integer graph file")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise ArtifactError(f"{path} is not a readable integer graph (corrupted or truncated?): {e}") from e
        if "__header__" not in data:
            raise ArtifactError(f"{path} has no ptq2tvm header: not an integer graph")
        try:
            header = json.loads(data.pop("__header__").tobytes().decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: corrupted header: {e}") from e
        if header.get("format") != IR_FORMAT:
            raise ArtifactError(f"{path}: format {header.get('format')!r} is not {IR_FORMAT!r}")
        if header.get("version") == 1:           # one output: same arrays, same digest recipe with the old key
            header["output_names"] = [header.get("output_name")]
        elif header.get("version") != IR_VERSION:
            raise ArtifactError(f"{path}: integer graph version {header.get('version')} is not supported by "
                                f"ptq2tvm {__version__} (expected {IR_VERSION})")
        nodes = []
        for i, nd in enumerate(header["nodes"]):
            try:
                arrays = {k: data[f"{i}/{k}"] for k in nd["arrays"]}
            except KeyError as e:
                raise ArtifactError(f"{path}: array {e} of node {nd['name']!r} is missing") from e
            nodes.append(IntNode(nd["name"], nd["op"], list(nd["inputs"]), _tensor_from_json(nd["out"]),
                                 nd["attrs"], arrays))
        g = cls(_tensor_from_json(header["input"]), nodes, header["output_names"], header.get("meta", {}))
        if g._digest(header.get("version")) != header.get("sha256"):
            raise ArtifactError(f"{path}: checksum mismatch: the file was modified or corrupted")
        return g


def _tensor_json(t: QTensor) -> dict[str, Any]:
    d = asdict(t)
    d["shape"] = list(t.shape)
    return d


def _tensor_from_json(d: dict[str, Any]) -> QTensor:
    return QTensor(d["name"], tuple(d["shape"]), float(d["scale"]), int(d["zero_point"]), int(d["bits"]))
