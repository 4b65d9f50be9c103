"""Accuracy sweeps on Ray: ``ptq2tvm sweep config.yaml`` (models x methods x bits x seeds, one Ray task per row).

    ptq2tvm sweep sweep.yaml                          # a local Ray instance (ray.init(), --num-cpus to cap it)
    ptq2tvm sweep sweep.yaml --address ray://head:10001   # a running cluster (ptq2tvm's code is shipped with the job)

The config (YAML; every key optional except ``models``)::

    models: [resnet_small]          # zoo names or path/to/file.py:factory
    checkpoints: {}                 # model -> state_dict path (default for built-in data: train once and cache)
    model_kwargs: {}                # model -> constructor kwargs
    data: fashion-mnist             # calibration (train split) and evaluation (test split) data
    methods: [qdrop+adaq]           # method[:granularity][+adaq], e.g. qdrop:mrecg-modcap+adaq, rtn
    bits: [W2A4]
    seeds: [0, 1, 2]
    multi_seed_bits: null           # bit settings that run every seed (null: all); the others run the first seed
    iters: 2000                     # per unit (rtn rows: 0)
    calib: 1024
    batch_size: 32
    eval_limit: null                # test images (null: the whole split)
    cpus_per_task: 1                # Ray CPUs per row = torch threads of the row
    device: cpu                     # cpu | cuda | auto (a row asks Ray for one GPU when cuda)
    time_budget: null               # per row, e.g. 10m (reconstruct/budget.py)
    early_stop: false
    compile_so: false               # also compile the integer graph and report the .so's top-1
    results: sweep_results.json     # relative to the config file; rows keyed by config (row_key)

Resumable at two levels: rows already in the results file are not submitted again (so a killed sweep, re-run,
runs only the missing rows), and an interrupted row resumes after its last finished reconstruction unit
(``<results>_ckpt/<row key>``). The driver is the only writer of the results file: it rewrites it atomically after
every finished row, so no file locks are needed. A failed row is reported and left missing (re-run to retry).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .atomic import write_text
from .errors import Ptq2TvmError

RAY_VERSION = "2.60.0"


class SweepError(Ptq2TvmError):
    """A bad sweep config or a sweep that cannot start."""


@dataclass
class SweepConfig:
    models: list[str]
    checkpoints: dict[str, str] = field(default_factory=dict)
    model_kwargs: dict[str, dict] = field(default_factory=dict)
    data: str = "fashion-mnist"
    methods: list[str] = field(default_factory=lambda: ["qdrop+adaq"])
    bits: list[str] = field(default_factory=lambda: ["W2A4"])
    seeds: list[int] = field(default_factory=lambda: [0])
    multi_seed_bits: list[str] | None = None
    iters: int = 2000
    calib: int = 1024
    batch_size: int = 32
    eval_limit: int | None = None
    cpus_per_task: int = 1
    device: str = "cpu"
    time_budget: str | float | None = None
    early_stop: bool = False
    compile_so: bool = False
    so_batch: int = 250
    results: str = "sweep_results.json"
    epochs: int | None = None
    #: directory of the config file (relative paths resolve against it)
    base_dir: str = "."

    @classmethod
    def load(cls, path: str | Path) -> "SweepConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise SweepError(f"sweep config not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise SweepError(f"{path}: the config must be a mapping of keys (models, methods, bits, ...)")
        known = {f for f in cls.__dataclass_fields__ if f != "base_dir"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "models" not in raw:
            raise SweepError(f"{path}: 'models' is required (a list of zoo names or file.py:factory)")
        for k in ("models", "methods", "bits", "seeds"):
            if k in raw and not isinstance(raw[k], list):
                raw[k] = [raw[k]]
        cfg = cls(**raw, base_dir=str(path.resolve().parent))
        return cfg.validate()

    def validate(self) -> "SweepConfig":
        from .frontend.quantizers import check_bits
        from .reconstruct.budget import parse_duration

        if not self.models:
            raise SweepError("sweep config: 'models' is empty")
        for b in self.bits:
            w, a = parse_bits(b)
            check_bits(w, f"weight bits of {b!r}")
            check_bits(a, f"activation bits of {b!r}")
        for m in self.methods:
            parse_method(m)
        for k in ("iters", "calib", "batch_size", "cpus_per_task"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SweepError(f"sweep config: {k} must be a positive integer, got {v!r}")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        return self

    def path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else Path(self.base_dir) / q

    @property
    def results_path(self) -> Path:
        return self.path(self.results)

    def rows(self) -> list[dict[str, Any]]:
        """Every row of the sweep, in order (models x bits x methods x seeds)."""
        from .reconstruct import ReconSettings

        multi = None if self.multi_seed_bits is None else {b.upper() for b in self.multi_seed_bits}
        out = []
        for model in self.models:
            for bits in self.bits:
                w, a = parse_bits(bits)
                for spec in self.methods:
                    method, gran, adaq = parse_method(spec)
                    seeds = self.seeds if multi is None or bits.upper() in multi else self.seeds[:1]
                    for seed in seeds:
                        out.append(dict(model=model, dataset=self.data, method=method,
                                        granularity=gran or ReconSettings(method=method).resolved_granularity,
                                        adaqtransform=adaq, w_bits=w, a_bits=a, seed=int(seed),
                                        iters=0 if method == "rtn" else self.iters, n_calib=self.calib,
                                        eval_images=self.eval_limit or "all"))
        return out


def parse_method(spec: str) -> tuple[str, str | None, bool]:
    """``method[:granularity][+adaq]`` -> (method, granularity or None, adaq)."""
    from .reconstruct import GRANULARITIES, METHODS

    adaq = spec.endswith("+adaq")
    s = spec[:-5] if adaq else spec
    method, _, gran = s.partition(":")
    if method not in METHODS:
        raise SweepError(f"method {spec!r}: unknown method {method!r}; available: {', '.join(METHODS)}")
    if gran and gran not in GRANULARITIES:
        raise SweepError(f"method {spec!r}: unknown granularity {gran!r}; available: {', '.join(GRANULARITIES)}")
    return method, (gran or None), adaq


def parse_bits(spec: str) -> tuple[int, int]:
    s = str(spec).upper()
    try:
        w, a = s[1:].split("A")
        if not s.startswith("W"):
            raise ValueError
        return int(w), int(a)
    except ValueError:
        raise SweepError(f"bits must look like W4A4, got {spec!r}") from None


def row_key(r: dict[str, Any]) -> str:
    """The identity of a row (the same fields as benchmarks/accuracy_fmnist.py's keys)."""
    return (f"{r['model']}|{r['method']}|{r['granularity']}|{'adaq' if r['adaqtransform'] else '-'}|"
            f"W{r['w_bits']}A{r['a_bits']}|s{r['seed']}|i{r['iters']}|c{r['n_calib']}|e{r['eval_images']}")


def key_dir(key: str) -> str:
    return key.replace("|", "_").replace(":", "-").replace("/", "-")


# ---- results file ----------------------------------------------------------------------------------------------
class ResultsStore:
    """``{"rows": [...]}`` JSON, rewritten atomically after every added row (+ an optional markdown view)."""

    def __init__(self, path: str | Path, key: Callable[[dict], str] = row_key,
                 markdown: Callable[[list[dict]], str] | None = None, extra: dict[str, Any] | None = None):
        self.path = Path(path)
        self.key = key
        self.markdown = markdown
        self.extra = extra or {}
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                self.rows = json.loads(self.path.read_text())["rows"]
            except (ValueError, KeyError, TypeError) as e:
                raise SweepError(f"{self.path}: not a sweep results file ({e}); move it away or fix it") from e

    def keys(self) -> set[str]:
        return {self.key(r) for r in self.rows}

    def add(self, row: dict[str, Any]) -> None:
        k = self.key(row)
        self.rows = [r for r in self.rows if self.key(r) != k] + [row]
        write_text(self.path, json.dumps(dict(rows=self.rows, **self.extra), indent=1))
        if self.markdown is not None:
            write_text(self.path.with_suffix(".md"), self.markdown(self.rows))


# ---- the engine ------------------------------------------------------------------------------------------------
@dataclass
class SweepSummary:
    total: int
    skipped: int
    ran: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    ray_init_seconds: float = 0.0
    address: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _code_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def slow_host_defaults() -> None:
    """Longer Ray agent start-up timeouts (unless set): on a loaded 2-core host the metrics agent took more than the
    default 30 s to register and the raylet aborted ("Timed out waiting for file .../metrics_agent_port")."""
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")


def runtime_env(address: str | None = None) -> dict[str, Any]:
    """The Ray job environment: this checkout on the workers' PYTHONPATH (local), or the ``ptq2tvm`` package
    shipped with the job (``ray://`` clusters)."""
    if address is not None and address.startswith("ray://"):
        return {"py_modules": [str(Path(__file__).resolve().parent)]}
    paths = [_code_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def run_sweep(rows: list[dict[str, Any]], row_fn: Callable[[dict[str, Any]], dict[str, Any]], store: ResultsStore,
              *, cpus_per_task: int = 1, gpus_per_task: float = 0, address: str | None = None,
              num_cpus: int | None = None, progress: bool = True,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> SweepSummary:
    """Run ``row_fn(row)`` as one Ray task per row missing from ``store`` and add each result as it arrives.

    ``address``: None starts (or joins, with RAY_ADDRESS) a local instance with ``num_cpus``; ``ray://host:port``
    connects through Ray Client; a GCS address ``host:port`` joins that cluster. Local jobs get this checkout on
    PYTHONPATH; remote ones get the ``ptq2tvm`` package shipped with the job (``py_modules``); the workers need
    the project's other dependencies (torch, numpy, ...). ``row_fn`` must be picklable (a module-level function)."""
    t0 = time.perf_counter()
    done = store.keys()
    todo = [r for r in rows if store.key(r) not in done]
    summary = SweepSummary(total=len(rows), skipped=len(rows) - len(todo), address=address)
    if not todo:
        return summary
    try:
        import ray
    except ImportError as e:
        raise SweepError(f"the sweep needs Ray: pip install 'ray[client]=={RAY_VERSION}' ({e})") from e
    started_here = not ray.is_initialized()
    t_init = time.perf_counter()
    if started_here:
        slow_host_defaults()
        try:
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=progress, runtime_env=runtime_env(address), configure_logging=progress)
        except Exception as e:  # noqa: BLE001 - any failure to reach/start Ray is one clear error
            raise SweepError(f"cannot start/connect Ray (address {address or 'local'}): {type(e).__name__}: "
                             f"{e}") from e
    summary.ray_init_seconds = round(time.perf_counter() - t_init, 1)
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)(row_fn)
    pending = {task.remote(r): r for r in todo}
    if progress:
        print(f"sweep: {len(todo)} row(s) submitted, {summary.skipped} already in {store.path} "
              f"(Ray up in {summary.ray_init_seconds} s)", file=sys.stderr, flush=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                row = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a failed row is reported and left for a re-run
                    summary.failed.append(dict(key=store.key(row), error=f"{type(e).__name__}: {str(e)[-500:]}"))
                    print(f"sweep: row {store.key(row)} failed: {type(e).__name__}: {str(e)[-300:]}",
                          file=sys.stderr, flush=True)
                    continue
                store.add(res)
                summary.ran += 1
                if on_row is not None:
                    on_row(res)
                if progress:
                    print(f"sweep: [{summary.ran + len(summary.failed)}/{len(todo)}] {store.key(res)} "
                          f"{_short(res)}", file=sys.stderr, flush=True)
    finally:
        for ref in pending:                  # interrupted (Ctrl-C, an error): stop the rows still running
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    summary.seconds = round(time.perf_counter() - t0, 1)
    return summary


def _short(res: dict[str, Any]) -> str:
    parts = []
    for k in ("fp32_top1", "fakequant_top1", "so_top1"):
        if res.get(k) is not None:
            parts.append(f"{k.split('_')[0]} {100 * res[k]:.2f}")
    if "seconds" in res:
        parts.append(f"{res['seconds']:.0f} s")
    return "  ".join(parts)


# ---- the built-in row: quantize, evaluate --------------------------------------------------------------------
def run_row(row: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """One sweep row in a worker: model (cached training for built-in data), calibration set, reconstruction with a
    per-row checkpoint, fake-quant top-1 on the test split (+ the .so's with ``compile_so``)."""
    import torch

    from .data import calibration_set, load_dataset
    from .frontend.qmodel import QuantConfig
    from .reconstruct import ReconSettings, reconstruct

    c = SweepConfig(**cfg)
    torch.set_num_threads(c.cpus_per_task)
    model = load_model(row["model"], c)
    test = load_dataset(c.data, split="test", limit=c.eval_limit)
    calib = calibration_set(c.data, c.calib, seed=0)
    settings = ReconSettings(method=row["method"], granularity=row["granularity"],
                             adaqtransform=row["adaqtransform"], iters=max(1, row["iters"]), seed=row["seed"],
                             batch_size=c.batch_size, threads=c.cpus_per_task, device=c.device,
                             time_budget=c.time_budget, early_stop=c.early_stop)
    ckpt = Path(str(c.results_path.with_suffix("")) + "_ckpt") / key_dir(row_key(row))
    t0 = time.perf_counter()
    qm, rep = reconstruct(model, calib, QuantConfig(row["w_bits"], row["a_bits"]), settings, progress=False,
                          checkpoint_dir=None if row["method"] == "rtn" else ckpt)
    seconds = time.perf_counter() - t0
    res = dict(row, fp32_top1=top1(model, test.images, test.labels),
               fakequant_top1=top1(qm.eval(), test.images, test.labels), seconds=round(seconds, 2),
               iterations=rep.iterations, iters_per_s=round(rep.iters_per_s, 2), units=len(rep.units),
               resumed_units=rep.resumed_units, device=rep.device, host=socket.gethostname(), pid=os.getpid(),
               finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if c.compile_so:
        import tempfile

        from .api import compile_so, to_integer, top1_so
        from .backend.runtime import CompiledModel

        with tempfile.TemporaryDirectory() as td:
            so = Path(td) / "model.so"
            compile_so(to_integer(qm), so, batch=c.so_batch)
            res["so_top1"] = top1_so(CompiledModel(so), test.images, test.labels)
    return res


def load_model(name: str, c: SweepConfig):
    from .api import ModelSpec, build_model

    kwargs = dict(c.model_kwargs.get(name, {}))
    ckpt = c.checkpoints.get(name)
    if ckpt is None and c.data in ("fashion-mnist", "digits") and ":" not in name:
        from .train import train_builtin

        return train_builtin(name, dataset=c.data, epochs=c.epochs, progress=False)[0].eval()
    if ":" in name and not Path(name.rsplit(":", 1)[0]).is_absolute():
        name = f"{c.path(name.rsplit(':', 1)[0])}:{name.rsplit(':', 1)[1]}"
    return build_model(ModelSpec(name, kwargs, str(c.path(ckpt)) if ckpt else None)).eval()


def top1(model: Any, images: Any, labels: Any, bs: int = 500) -> float:
    import numpy as np
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), bs):
            out = model(torch.from_numpy(np.ascontiguousarray(images[i:i + bs])))
            correct += int((out.argmax(1).numpy() == labels[i:i + bs]).sum())
    return correct / len(images)


def _builtin_row(row: dict[str, Any]) -> dict[str, Any]:
    cfg = row.pop("_cfg")
    return run_row(row, cfg)


def markdown(rows: list[dict[str, Any]]) -> str:
    """mean ± std over seeds of the fake-quant (and .so) top-1 per (model, bits, method, iterations)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        spec = r["method"] + (f":{r['granularity']}" if r["granularity"] else "") + ("+adaq" if r["adaqtransform"]
                                                                                       else "")
        groups.setdefault((r["model"], r["w_bits"], r["a_bits"], spec, r["iters"]), []).append(r)

    def ms(v: list[float]) -> str:
        v = [100 * x for x in v if x is not None]
        if not v:
            return "-"
        return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")

    lines = ["| model | W/A | method | iters/unit | seeds | FP32 | fake-quant | .so | s/row | it/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(groups, key=lambda k: (k[0], -k[1], -k[2], k[4], k[3])):
        g = groups[k]
        lines.append(f"| {k[0]} | W{k[1]}A{k[2]} | {k[3]} | {k[4] or '-'} | {len(g)} | "
                     f"{ms([r['fp32_top1'] for r in g])} | {ms([r['fakequant_top1'] for r in g])} | "
                     f"{ms([r.get('so_top1') for r in g])} | {statistics.mean(r['seconds'] for r in g):.0f} | "
                     f"{statistics.mean(r.get('iters_per_s', 0.0) for r in g):.1f} |")
    return "# Sweep results\n\n" + "\n".join(lines) + "\n"


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    """Register ``ptq2tvm sweep``."""
    s = sub.add_parser("sweep", help="accuracy sweep (models x methods x bits x seeds) as Ray tasks, resumable "
                       "from its results file")
    s.add_argument("config", help="sweep YAML (see ptq2tvm/sweep.py for the keys)")
    s.add_argument("--address", help="Ray cluster: ray://host:10001 (Ray Client) or host:port; default: a local "
                   "instance")
    s.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    s.add_argument("--dry-run", action="store_true", help="list the rows to run and exit")
    s.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SweepConfig.load(args.config)
    rows = cfg.rows()
    store = ResultsStore(cfg.results_path, markdown=markdown)
    missing = [r for r in rows if row_key(r) not in store.keys()]
    if args.dry_run:
        for r in missing:
            print(row_key(r))
        print(f"{len(missing)} of {len(rows)} rows to run; results in {cfg.results_path}")
        return dict(total=len(rows), missing=len(missing))
    cfg_dict = asdict(cfg)
    for r in rows:
        r["_cfg"] = cfg_dict
    summary = run_sweep(rows, _builtin_row, store, cpus_per_task=cfg.cpus_per_task,
                        gpus_per_task=1 if cfg.device.startswith("cuda") else 0, address=args.address,
                        num_cpus=args.num_cpus, progress=not args.no_progress)
    for r in rows:
        r.pop("_cfg", None)
    print(f"sweep: {summary.ran} row(s) run, {summary.skipped} already done, {len(summary.failed)} failed "
          f"in {summary.seconds:.0f} s; results {cfg.results_path} (+ .md)")
    if summary.failed:
        raise SweepError(f"{len(summary.failed)} row(s) failed (first: {summary.failed[0]['key']}: "
                         f"{summary.failed[0]['error'][:200]}); re-run the same command to retry them")
    return summary.to_dict()
