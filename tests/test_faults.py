"""Saves under faults: a writer SIGKILLed before and after every filesystem step of a save over an
existing model, a file-size limit, a full disk, blocked targets, concurrent writers.

After every fault the target holds the complete old model or the complete new one (compared byte
for byte with reference saves, then loaded with ``quantkit.load`` and compared tensor for tensor),
and the next load or save leaves nothing else beside it. Children are forked from this process
(no second torch import), so each kill point costs milliseconds.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import pathlib
import resource
import select
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

import quantkit
from quantkit.core import atomic, serialization
from quantkit.core.atomic import atomic_path
from quantkit.core.errors import SaveError

LAYOUTS = {"folder": ("model", {"quant_method": "rtn", "group_size": 32}), "file": ("model.gguf", "gguf-q8_0")}
FILE_SIZE_LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict[str, tuple[torch.nn.Module, dict[str, bytes]]]]:
    """Per layout, three different quantized tiny Llamas and the bytes of a reference save of each."""
    found: dict[str, dict] = {}
    for layout, (name, config) in LAYOUTS.items():
        found[layout] = {}
        for seed, label in enumerate(("old", "new", "other")):
            model = quantkit.quantize(make_tiny_llama(seed), config, device="cpu")
            reference = tmp_path_factory.mktemp(f"{layout}-{label}") / name
            found[layout][label] = (model, _snapshot(quantkit.save(model, reference)))
    return found


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file ``path``) by relative name, with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _litter(target: Path) -> list[str]:
    """Everything beside ``target`` in its (otherwise empty) folder."""
    return sorted(p.name for p in target.parent.iterdir() if p != target)


def _which(target: Path, models: dict) -> str:
    """The label of the model ``target`` holds, byte for byte; fails on anything else."""
    found = _snapshot(target)
    labels = [label for label, (_, reference) in models.items() if found == reference]
    assert labels, f"{target} holds neither complete model: {sorted(found)}"
    return labels[0]


def _assert_loads_as(target: Path, model: torch.nn.Module) -> None:
    loaded = serialization.unique_state_dict(quantkit.load(target, device="cpu"))
    expected = serialization.unique_state_dict(model)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


# -- forked children ---------------------------------------------------------------------------

_children: set[int] = set()


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    """A failed test may leave a child waiting on a pipe: kill and reap it."""
    yield
    for pid in _children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    _children.clear()


def _fork(work: Callable[[], str | None]) -> tuple[int, int]:
    """Run ``work`` in a forked child; (its pid, the pipe its result or traceback comes back on)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        os.close(read)
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP threads do not exist here: never wait for them
            os.write(write, (work() or "").encode())
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write)
    _children.add(pid)
    return pid, read


def _wait(child: tuple[int, int], timeout: float = 60.0) -> tuple[int, str]:
    """The child's exit status (minus the signal that killed it) and what it wrote."""
    pid, read = child
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            pytest.fail(f"child {pid} hung")
        time.sleep(0.002)
    _children.discard(pid)
    with os.fdopen(read, "rb") as pipe:
        return os.waitstatus_to_exitcode(done[1]), pipe.read().decode()


def _in_child(work: Callable[[], str | None]) -> tuple[int, str]:
    return _wait(_fork(work))


# -- SIGKILL at every step -----------------------------------------------------------------------

STEPS = [
    (os, "mkdir"),
    (os, "rename"),
    (os, "replace"),
    (os, "rmdir"),
    (os, "unlink"),
    (os, "chmod"),
    (os, "fsync"),
    (atomic, "_renameat2"),
    (serialization, "save_file"),
    (pathlib.Path, "write_text"),
    (pathlib.Path, "write_bytes"),
]
"""The filesystem steps of a save (``shutil.rmtree`` and ``Path`` methods go through ``os``'s)."""


def _instrument(setattr_: Callable, calls: list[str], kill_at: int | None = None, after: bool = False) -> None:
    """Record every step in ``calls``; SIGKILL this process before (or ``after``) step ``kill_at``."""
    for owner, name in STEPS:
        original = getattr(owner, name)

        def step(*args, _original=original, _name=name, **kwargs):
            index = len(calls)
            calls.append(_name)
            if index == kill_at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                return _original(*args, **kwargs)
            finally:  # after the step, whether it succeeded or raised
                if index == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        setattr_(owner, name, step)


def _no_renameat2(*args) -> int:
    """libc's ``renameat2`` on a filesystem without it."""
    ctypes.set_errno(errno.EINVAL)
    return -1


@pytest.mark.parametrize(
    "layout, exchange",
    [("folder", True), ("folder", False), ("file", True)],
    ids=["folder-renameat2", "folder-rename-aside", "file"],
)
def test_a_save_killed_at_any_step_loses_nothing(layout, exchange, saved, tmp_path, monkeypatch):
    models = saved[layout]
    target = tmp_path / LAYOUTS[layout][0]
    quantkit.save(models["old"][0], target)
    if not exchange:
        monkeypatch.setattr(atomic, "_LIBC_RENAMEAT2", _no_renameat2)
    steps: list[str] = []
    with monkeypatch.context() as patch:
        _instrument(patch.setattr, steps)
        quantkit.save(models["new"][0], target)
    commit = {"folder": "_renameat2" if exchange else "rename", "file": "replace"}[layout]
    assert commit in steps, steps
    assert _which(target, models) == "new" and not _litter(target)
    quantkit.save(models["old"][0], target)

    def killed_save(kill_at: int, after: bool) -> None:
        _instrument(setattr, [], kill_at, after)
        quantkit.save(models["new"][0], target)

    def kill_and_check(kill_at: int, after: bool, by_load: bool) -> str:
        where = f"killed {'after' if after else 'before'} step {kill_at} ({steps[kill_at]}) of {steps}"
        status, output = _in_child(functools.partial(killed_save, kill_at, after))
        assert status == -signal.SIGKILL, f"{where}: the child ended with {status}: {output}"
        if os.path.lexists(target):
            outcome = _which(target, models)
        else:  # only between the two renames of the rename-aside scheme, which recover() repairs
            assert layout == "folder" and not exchange, f"{where}: {target} is missing"
            assert any(".quantkit-old-" in name for name in _litter(target)), _litter(target)
            outcome = "restored"
        if by_load:  # the next load cleans up (and restores a folder set aside) ...
            _assert_loads_as(target, models["new" if outcome == "new" else "old"][0])
            assert not _litter(target), f"{where}: quantkit.load left {_litter(target)}"
            quantkit.save(models["old"][0], target)
        else:  # ... and so does the next save
            quantkit.save(models["old"][0], target)
            assert not _litter(target), f"{where}: the next save left {_litter(target)}"
            _assert_loads_as(target, models["old"][0])
        return outcome

    outcomes: Counter[str] = Counter()
    # Every step that changes the filesystem is instrumented, so "before step k+1" is "after step k".
    for kill_at, after in [(k, False) for k in range(len(steps))] + [(len(steps) - 1, True)]:
        outcome = kill_and_check(kill_at, after, by_load=kill_at % 2 == 1)
        outcomes[outcome] += 1
        if outcome == "restored":  # both ways of repairing it
            assert kill_and_check(kill_at, after, by_load=kill_at % 2 == 0) == outcome
    assert outcomes["old"] and outcomes["new"], outcomes
    assert bool(outcomes["restored"]) == (layout == "folder" and not exchange), outcomes


# -- failed writes --------------------------------------------------------------------------------


def test_a_file_size_limit_raises_save_error_and_keeps_the_old_model(saved, tmp_path):
    models = saved["folder"]
    target, fresh = tmp_path / "model", tmp_path / "fresh"
    quantkit.save(models["old"][0], target)
    assert (target / "model.safetensors").stat().st_size > FILE_SIZE_LIMIT

    def save_under_limit() -> str:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        outcomes = []
        for path in (target, fresh):
            try:
                quantkit.save(models["new"][0], path)
                outcomes.append("saved")
            except SaveError as exc:
                outcomes.append(f"{exc.errno}|{exc}")
        return "\n".join(outcomes)

    status, output = _in_child(save_under_limit)
    assert status == 0, output
    for line, path in zip(output.splitlines(), (target, fresh), strict=True):
        code, message = line.split("|", 1)
        assert int(code) == errno.EFBIG and repr(str(path)) in message, line
    assert _which(target, models) == "old"
    assert _litter(target) == [], "a temporary or the fresh target was left behind"


@pytest.mark.parametrize(
    "owner, name, code",
    [(serialization, "save_file", errno.ENOSPC), (os, "fsync", errno.EIO), (atomic, "_renameat2", errno.EIO)],
    ids=["disk-full-while-writing", "flush-fails", "commit-fails"],
)
def test_a_failed_write_raises_save_error_and_keeps_the_old_model(owner, name, code, saved, tmp_path, monkeypatch):
    models = saved["folder"]
    target = tmp_path / "model"
    quantkit.save(models["old"][0], target)
    original = getattr(owner, name)

    def failing(*args, **kwargs):
        if name == "save_file":  # part of the file reaches the disk first
            original(*args, **kwargs)
            Path(args[1]).write_bytes(Path(args[1]).read_bytes()[:1000])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(owner, name, failing)
    with pytest.raises(SaveError, match=f"cannot save {str(target)!r}: {os.strerror(code)}") as caught:
        quantkit.save(models["new"][0], target)
    assert caught.value.errno == code and isinstance(caught.value, OSError)
    assert _which(target, models) == "old"
    assert _litter(target) == []


def test_blocked_targets_raise_save_error_naming_the_path(saved, tmp_path):
    model = saved["folder"]["old"][0]
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a folder")
    for path, reason in (
        (blocker / "model", "File exists|Not a directory"),  # a file where the parent folder should be
        (blocker, "it exists and is not a folder"),  # a file where the model folder should be
    ):
        with pytest.raises(SaveError, match=f"cannot save {str(path)!r}: ({reason});"):
            quantkit.save(model, path)
    folder = tmp_path / "folder.bin"
    folder.mkdir()
    with pytest.raises(SaveError, match="Is a directory"), atomic_path(folder, directory=False) as tmp:
        tmp.write_bytes(b"x")  # a folder where a single file should go
    assert blocker.read_bytes() == b"not a folder" and folder.is_dir() and not any(folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.bin"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_raises_save_error(saved, tmp_path):
    models = saved["folder"]
    target = tmp_path / "model"
    quantkit.save(models["old"][0], target)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(SaveError, match=f"cannot save {str(target)!r}: Permission denied"):
            quantkit.save(models["new"][0], target)
    finally:
        tmp_path.chmod(0o755)
    assert _which(target, models) == "old" and _litter(target) == []


# -- concurrent writers and leftovers of other processes -----------------------------------------


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_concurrent_writers_leave_one_complete_model(exchange, saved, tmp_path, monkeypatch):
    models = saved["folder"]
    target = tmp_path / "model"
    quantkit.save(models["old"][0], target)
    if not exchange:
        monkeypatch.setattr(atomic, "_LIBC_RENAMEAT2", _no_renameat2)
    start_read, start_write = os.pipe()

    def writer(label: str) -> Callable[[], None]:
        def work() -> None:
            os.read(start_read, 1)
            for _ in range(8):
                quantkit.save(models[label][0], target)

        return work

    children = [_fork(writer("new")), _fork(writer("other"))]
    os.write(start_write, b"go")
    expected = [serialization.unique_state_dict(model) for model, _ in models.values()]
    loads = 0
    while exchange and loads < 30:  # a reader meanwhile (the rename-aside scheme has a gap readers can see)
        loaded = serialization.unique_state_dict(quantkit.load(target, device="cpu"))
        assert any(all(torch.equal(loaded[k], v) for k, v in tensors.items()) for tensors in expected), (
            "a load during concurrent saves got a mixed model"
        )
        loads += 1
    for child in children:
        status, output = _wait(child)
        assert status == 0, output
    assert _which(target, models) in ("new", "other")
    assert _litter(target) == []


def test_a_live_writers_temporary_survives_other_saves_and_loads(saved, tmp_path):
    models = saved["folder"]
    target = tmp_path / "model"
    quantkit.save(models["old"][0], target)
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()

    def slow_writer() -> None:
        original = serialization.save_file

        def paused(*args, **kwargs):
            original(*args, **kwargs)
            os.write(ready_write, b"1")
            os.read(go_read, 1)

        serialization.save_file = paused
        quantkit.save(models["new"][0], target)

    child = _fork(slow_writer)
    assert select.select([ready_read], [], [], 60)[0], "the writer never reached its pause"
    live = _litter(target)
    assert len(live) == 1 and ".quantkit-tmp-" in live[0], live
    _assert_loads_as(target, models["old"][0])
    quantkit.save(models["other"][0], target)
    assert _litter(target) == live and (tmp_path / live[0] / "model.safetensors").is_file()
    os.write(go_write, b"1")
    status, output = _wait(child)
    assert status == 0, output
    assert _which(target, models) == "new" and _litter(target) == []


def test_load_restores_a_folder_an_earlier_quantkit_left_aside(saved, tmp_path):
    """The loss issue 13 found: killed between its two renames, quantkit 0.1 left only ``.X.old-PID``."""
    models = saved["folder"]
    target = tmp_path / "model"
    quantkit.save(models["old"][0], target)
    live_aside = tmp_path / f".model.old-{os.getpid()}"
    os.rename(target, live_aside)
    with pytest.raises(quantkit.ModelFormatError, match="does not exist"):
        quantkit.load(target)  # a live writer's: it may still rename a new folder in
    exited = subprocess.Popen([sys.executable, "-c", ""])
    exited.wait()
    os.rename(live_aside, tmp_path / f".model.old-{exited.pid}")
    _assert_loads_as(target, models["old"][0])
    assert _which(target, models) == "old" and _litter(target) == []
