"""Artifacts written by a process that was killed or ran out of disk space in the middle (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_tuning_records_with_a_truncated_last_line_are_repaired(tmp_path):
    """MetaSchedule appends one JSON line per record; a writer killed (or out of space) mid-append leaves a partial
    line, and TVM then refused the whole database ("parallel_for_dynamic error with Unexpected end of string"), so every
    later `compile --tune-db` failed with a raw traceback. The tuner now drops unreadable lines (with a warning)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from ptq2tvm.backend.tune import DB_FILES, KernelTuner, repair_json_lines

    a = te.placeholder((4,), "int32", name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((4,), lambda i: a[i] + 1, name="b")])})
    ms.database.JSONDatabase(work_dir=str(tmp_path)).commit_workload(mod)
    wl, rec = (tmp_path / f for f in DB_FILES)
    good = wl.read_text()
    assert good.count("\n") == 1
    with open(wl, "a") as f:
        f.write(good[: len(good) // 2])             # the interrupted append of a second workload
    rec.write_text('[0, [["b", [')
    with pytest.raises(Exception, match="parallel_for_dynamic error with Unexpected"):
        ms.database.JSONDatabase(work_dir=str(tmp_path))     # what TVM does with it
    with pytest.warns(RuntimeWarning) as caught:
        db, index = KernelTuner("llvm", tmp_path)._open()
    assert sorted(str(w.message).split(" of ")[1].split(" ")[0].rsplit("/", 1)[1] for w in caught) == sorted(DB_FILES)
    assert all("dropped 1 unreadable line(s)" in str(w.message) for w in caught)
    assert db.has_workload(mod) and index == {}
    assert wl.read_text() == good and rec.read_text() == ""
    assert repair_json_lines(wl) == 0                # a sound file is left alone


def test_quantize_save_on_a_full_disk_names_it_and_leaves_no_directory(tmp_path, tiny_model, tiny_data):
    """Found by benchmarks/robustness.py on a full 1 MiB tmpfs: torch's zip writer reports a short write as
    "[enforce fail at inline_container.cc:672] . unexpected pos 8128 vs 8016" (no errno), which was not recognised:
    `ptq2tvm quantize` died with a 33-line traceback and left run/model_src/ behind. Here the write fails for real
    (RLIMIT_FSIZE: files over 2 kB get EFBIG, as a full disk gives ENOSPC): one ArtifactError line, no directory."""
    import resource
    import signal

    from ptq2tvm.api import ModelSpec, RunDir, quantize, save_run, to_integer
    from ptq2tvm.errors import ArtifactError
    from ptq2tvm.frontend.qmodel import QuantConfig

    src = tmp_path / "mymodel.py"
    src.write_text("import torch.nn as nn\n\ndef make():\n    return nn.Conv2d(1, 1, 1)\n")
    qm = quantize(tiny_model, tiny_data[:8], QuantConfig(8, 8), progress=False)
    graph = to_integer(qm)
    run = RunDir(tmp_path / "run")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        with pytest.raises(ArtifactError) as e:
            save_run(run, tiny_model, ModelSpec(f"{src}:make"), qm, graph)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    msg = str(e.value)
    assert "\n" not in msg and "fp32.pt: file too large" in msg and "nothing was written" in msg, msg
    assert not run.path.exists()
    save_run(run, tiny_model, ModelSpec(f"{src}:make"), qm, graph)      # with room: the same save works
    assert (run.path / "model_src" / "mymodel.py").read_text() == src.read_text() and run.info()


def _read_only(monkeypatch, root):
    """Make ``root`` and everything under it look like a read-only mount to ptq2tvm's checks (root ignores file
    modes, so a chmod cannot stand in for one) and refuse every temporary file created in it with EROFS."""
    import errno
    import os
    import tempfile
    from pathlib import Path

    import ptq2tvm.outpaths as outpaths

    root = Path(root).absolute()
    under = lambda p: Path(p).absolute() == root or root in Path(p).absolute().parents  # noqa: E731
    real_access, real_statvfs, real_mkstemp = os.access, os.statvfs, tempfile.mkstemp

    class _RO:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(outpaths.os, "access", lambda p, mode: False if under(p) else real_access(p, mode))
    monkeypatch.setattr(outpaths.os, "statvfs", lambda p: _RO() if under(p) else real_statvfs(p))

    def mkstemp(*a, dir=None, **k):
        if dir is not None and under(dir):
            raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / ".x.tmp"))
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_outputs_fail_before_any_work_in_one_line(tmp_path, monkeypatch, capsys):
    """A new user's run directory on a read-only mount: `compile` built for 6 s, `sensitivity` computed for 66 s,
    then both ended in a raw OSError traceback. Every output path (and the run directory of the commands that write
    into it) is now checked for write access before any work; a write refused later is one line too."""
    from ptq2tvm.atomic import write_text
    from ptq2tvm.cli import main
    from ptq2tvm.errors import ArtifactError
    from ptq2tvm.outpaths import check_output_path

    ro = tmp_path / "ro"
    (ro / "run").mkdir(parents=True)
    _read_only(monkeypatch, ro)
    for path, kind in ((ro / "run", "dir"), (ro / "new" / "sub", "dir"), (ro / "p.json", "file")):
        with pytest.raises(ArtifactError, match=rf"--out {path}: {ro}\S* is on a read-only file system; nothing"):
            check_output_path(path, kind)
    check_output_path(tmp_path / "ok" / "p.json", "file")            # a writable place passes
    with pytest.raises(ArtifactError, match=rf"cannot write {ro}/x.txt: read-only file system"):
        write_text(ro / "x.txt", "x")
    assert [p.name for p in ro.iterdir()] == ["run"]                # nothing left by the refused write
    for argv in (["compile", str(ro / "run")], ["sensitivity", str(ro / "run")],
                 ["export", str(ro / "run"), "--format", "onnx"], ["bench", str(ro / "run")],
                 ["bundle", str(ro / "run"), "--out", str(ro / "b")], ["bundle", str(ro / "run")],
                 ["parity", str(ro / "run"), "--json", str(ro / "p.json")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "read-only file system" in err and "Traceback" not in err, (argv, err)
    assert [p.name for p in ro.iterdir()] == ["run"] and not list((ro / "run").iterdir())


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc pseudo file system (Linux)")
def test_a_folder_that_refuses_new_entries_is_one_line_before_any_work(tmp_path, capsys):
    """`bench RUN --out-dir /proc/x` passed the write check (os.access allows root to write into /proc) and ended
    in a FileNotFoundError traceback after the ONNX exports. The check now creates and removes a probe folder."""
    from ptq2tvm.cli import main
    from ptq2tvm.errors import ArtifactError
    from ptq2tvm.outpaths import check_output_path

    for kind in ("dir", "file"):
        with pytest.raises(ArtifactError, match=r"--out /proc/x: /proc does not accept new files or folders"):
            check_output_path("/proc/x", kind)
    (tmp_path / "run").mkdir()
    assert main(["bench", str(tmp_path / "run"), "--out-dir", "/proc/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out-dir /proc/x: /proc does not accept" in err, err
    check_output_path(tmp_path / "out", "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]      # the probe left nothing behind


def test_a_refused_json_write_after_the_work_is_one_line(tmp_path, monkeypatch, capsys):
    """--json is written after the command's work: a refusal there (or a file that cannot be read: EACCES is not
    only about writing) was a traceback with exit status 1."""
    import errno

    import ptq2tvm.api as api
    import ptq2tvm.cli as cli

    monkeypatch.setattr(cli, "cmd_compile", lambda args: {"so": "x.so"})
    monkeypatch.setattr(api, "write_json", lambda path, obj: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(path))))
    assert cli.main(["compile", str(tmp_path), "--out", str(tmp_path / "m.so"), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"ptq2tvm compile: error: {tmp_path / 'r.json'}: permission denied\n"
