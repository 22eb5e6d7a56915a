"""Checkpoint cost (issue 13): the background checkpoint writer (``--async_save``) and ``--save_last_every``.

The background writer must write what the synchronous one writes (read back through the restricted reader and
``paddle.load``), copy the state when it is handed over (training goes on changing it), leave the previous
checkpoint whole when a write fails or the process dies mid-write, raise a failed write in the caller at the
next save or at the end, and make the next save wait for the write in flight. ``--save_last_every N`` skips
checkpoint-last between every Nth epoch but still writes it at the final epoch and with every new best, and a
resumed run keeps the setting from its config.yaml.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import paddle
import pytest

import engine_finetune
import main_finetune
from helpers import ROOT, TINY_ARGS, assert_same_tree
from models.checkpoint_io import read_checkpoint
from util.outputs import checkpoint as ck


def _trained(seed=0):
    """A tiny ViT and its AdamW optimizer after one step (so the moments exist)."""
    from models import create_model
    from util.lr_decay import build_optimizer

    paddle.seed(seed)
    model = create_model("vit_test", num_classes=3, input_size=32)
    opt = build_optimizer(model, lr=1e-3)
    model(paddle.randn([2, 3, 32, 32])).sum().backward()
    opt.step()
    opt.clear_grad()
    return model, opt


def _save(path, model, opt, writer=None, epoch=1):
    ck.save_checkpoint(str(path), model=model, optimizer=opt, epoch=epoch, best_score=0.5,
                       meta={"model": "vit_test", "nb_classes": 3}, extra={"best_epoch": 0, "thresholds": [0.5]},
                       writer=writer)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def test_background_write_holds_what_paddle_save_writes(tmp_path, monkeypatch):
    model, opt = _trained()
    # the reference: the file as paddle.save writes it (what every checkpoint was before)
    monkeypatch.setattr(ck, "pickle_checkpoint", lambda obj, path: paddle.save(obj, path))
    _save(tmp_path / "sync.pdparams", model, opt)
    monkeypatch.undo()
    writer = ck.CheckpointWriter(background=True)
    _save(tmp_path / "async.pdparams", model, opt, writer=writer)
    writer.wait()
    sync = read_checkpoint(str(tmp_path / "sync.pdparams"), mmap=False)
    background = read_checkpoint(str(tmp_path / "async.pdparams"), mmap=False)
    assert_same_tree(sync, background)
    # the tensors are there: every parameter and both AdamW moments of every parameter
    n_params = len(list(model.parameters()))
    assert len(background["model"]) == n_params
    assert sum("::moment1" in k for k in background["optimizer"]) == n_params
    assert sum("::moment2" in k for k in background["optimizer"]) == n_params
    # paddle.load gives tensors back from both files, as before
    a, b = paddle.load(str(tmp_path / "sync.pdparams")), paddle.load(str(tmp_path / "async.pdparams"))
    for key, value in a["model"].items():
        assert isinstance(b["model"][key], paddle.Tensor) and isinstance(value, paddle.Tensor)
        np.testing.assert_array_equal(value.numpy(), b["model"][key].numpy())
    assert sorted(os.listdir(tmp_path)) == ["async.pdparams", "sync.pdparams"]  # no temporary file left


def test_the_background_writer_copies_the_state_when_it_is_handed_over(tmp_path, monkeypatch):
    model, opt = _trained()
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    gate = threading.Event()
    real = ck.atomic_save

    def held_back(obj, path, fsync=False):  # the write starts only after training has changed every weight
        assert gate.wait(10)
        real(obj, path, fsync=fsync)

    monkeypatch.setattr(ck, "atomic_save", held_back)
    writer = ck.CheckpointWriter(background=True)
    _save(tmp_path / "c.pdparams", model, opt, writer=writer)
    assert writer.pending
    with paddle.no_grad():
        for p in model.parameters():
            p.set_value(p + 1.0)
    gate.set()
    writer.wait()
    saved = read_checkpoint(str(tmp_path / "c.pdparams"), mmap=False)["model"]
    for k, v in before.items():
        np.testing.assert_array_equal(saved[k], v, err_msg=k)


def test_tensors_shared_by_best_and_last_are_copied_once(tmp_path):
    model, opt = _trained()
    model_bytes = sum(int(np.prod(p.shape)) * 4 for p in model.state_dict().values())
    moment_bytes = 2 * sum(int(np.prod(p.shape)) * 4 for p in model.parameters())  # fp32 moment1 + moment2
    writer = ck.CheckpointWriter(background=True)
    with writer.group():
        ck.save_checkpoint(str(tmp_path / "best.pdparams"), model=model, epoch=1, best_score=0.5, meta={},
                           writer=writer)
        _save(tmp_path / "last.pdparams", model, opt, writer=writer)
    writer.wait()
    held = writer.last["snapshot_bytes"]
    # one copy of the weights and the moments (plus a few bytes: RNG state, beta powers), not two of the weights
    assert model_bytes + moment_bytes <= held < 2 * model_bytes + moment_bytes
    assert_same_tree(read_checkpoint(str(tmp_path / "best.pdparams"), mmap=False)["model"],
                      read_checkpoint(str(tmp_path / "last.pdparams"), mmap=False)["model"])


def test_the_next_snapshot_fills_the_previous_ones_buffers_with_the_new_values(tmp_path):
    model, opt = _trained()
    writer = ck.CheckpointWriter(background=True)
    _save(tmp_path / "a.pdparams", model, opt, writer=writer, epoch=1)
    writer.wait()
    first = {id(buf) for _, (_, buf) in writer._staged.values()}
    with paddle.no_grad():
        for p in model.parameters():
            p.set_value(p * 2.0 + 1.0)
    now = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    _save(tmp_path / "b.pdparams", model, opt, writer=writer, epoch=2)
    writer.wait()
    assert {id(buf) for _, (_, buf) in writer._staged.values()} == first  # no new host memory
    a, b = (read_checkpoint(str(tmp_path / f), mmap=False) for f in ("a.pdparams", "b.pdparams"))
    for k, v in now.items():
        np.testing.assert_array_equal(b["model"][k], v, err_msg=k)
        assert not np.array_equal(a["model"][k], v), k  # the first file kept the values it was given
    assert (a["epoch"], b["epoch"]) == (1, 2)
    writer.close()
    assert writer._staged == {}


def _dies_half_way(obj, path):
    """Writes part of the file, then fails as a full disk does."""
    with open(path, "wb") as f:
        f.write(b"\x80\x04partial")
    raise OSError(28, "No space left on device")


def test_a_failed_background_write_keeps_the_previous_checkpoint_and_raises_at_the_next_save(tmp_path, monkeypatch):
    model, opt = _trained()
    path = tmp_path / "checkpoint-last.pdparams"
    writer = ck.CheckpointWriter(background=True)
    _save(path, model, opt, writer=writer, epoch=1)
    writer.wait()
    good = path.read_bytes()
    monkeypatch.setattr(ck, "pickle_checkpoint", _dies_half_way)
    _save(path, model, opt, writer=writer, epoch=2)  # returns: the write fails in the background
    with pytest.raises(OSError, match="No space left"):
        _save(path, model, opt, writer=writer, epoch=3)  # the next save raises the previous one's error
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["checkpoint-last.pdparams"]  # the temporary file was removed
    assert read_checkpoint(str(path), mmap=False)["epoch"] == 1
    writer.wait()  # the error was raised once; epoch 3 was never handed to the writer
    assert read_checkpoint(str(path), mmap=False)["epoch"] == 1

    _save(path, model, opt, writer=writer, epoch=4)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()  # ... or at the end of training


def test_an_exception_leaving_training_waits_for_the_write_and_carries_its_failure(tmp_path, monkeypatch):
    model, opt = _trained()
    monkeypatch.setattr(ck, "pickle_checkpoint", _dies_half_way)
    writer = ck.CheckpointWriter(background=True)
    _save(tmp_path / "c.pdparams", model, opt, writer=writer)
    interrupt = KeyboardInterrupt()
    writer.abandon(interrupt)
    assert not writer.pending
    assert any("No space left" in note for note in getattr(interrupt, "__notes__", []))
    writer.wait()  # reported on the exception: not raised a second time


def test_the_next_save_waits_for_the_write_in_flight(tmp_path, monkeypatch):
    model, opt = _trained()
    gate, events, real = threading.Event(), [], ck.atomic_save

    def recorded(obj, path, fsync=False):
        name = os.path.basename(path)
        events.append(("start", name))
        if name == "one.pdparams":
            assert gate.wait(10)
        real(obj, path, fsync=fsync)
        events.append(("end", name))

    monkeypatch.setattr(ck, "atomic_save", recorded)
    writer = ck.CheckpointWriter(background=True)
    _save(tmp_path / "one.pdparams", model, opt, writer=writer)
    second = threading.Thread(target=_save, args=(tmp_path / "two.pdparams", model, opt, writer))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # held at the start of the save, before it copies anything
    assert events == [("start", "one.pdparams")]
    gate.set()
    second.join(10)
    writer.wait()
    assert events == [("start", "one.pdparams"), ("end", "one.pdparams"), ("start", "two.pdparams"),
                      ("end", "two.pdparams")]


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pdparams"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from util.outputs import checkpoint as ck
        writer = ck.CheckpointWriter(background=True)
        writer.submit({str(path)!r}, {{"epoch": 1, "model": {{}}}})
        writer.wait()

        def killed(obj, path):
            with open(path, "wb") as f:
                f.write(b"half of a checkpoint")
                f.flush()
                os._exit(9)  # the process dies in the middle of the write

        ck.pickle_checkpoint = killed
        writer.submit({str(path)!r}, {{"epoch": 2, "model": {{}}}})
        writer.wait()
        os._exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert read_checkpoint(str(path), mmap=False)["epoch"] == 1
    # beside it the killed write's temporary file, which the next run removes (remove_stale_temporaries)
    left = sorted(os.listdir(tmp_path), key=lambda n: n.startswith(".tmp-"))
    assert left[0] == "checkpoint-last.pdparams" and len(left) == 2 and left[1].startswith(".tmp-"), left


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    from util import fileio

    calls, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                        real_fsync(fd)))
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (calls.append(("replace", None)), real_replace(a, b)))
    with fileio.atomic_path(str(tmp_path / "x.bin"), fsync=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"data")
    assert calls == [("fsync", False), ("replace", None), ("fsync", True)]
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    calls.clear()
    with fileio.atomic_path(str(tmp_path / "y.bin")) as tmp:  # the default: no fsync, as before
        open(tmp, "wb").close()
    assert calls == [("replace", None)]


# ------------------------------------------------------------------ through main_finetune.py, tiny runs

def _args(data, out, task, *extra, epochs):
    return [*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", str(epochs), "--output_dir",
            str(out), "--task", task, *extra]


@pytest.fixture
def checkpoint_epochs(monkeypatch):
    """[(file name, epoch)] of every checkpoint written, and the validation score held constant so only
    epoch 0 of a run is a new best (strictly greater); everything else is the real run."""
    import util.outputs.checkpoint

    written, real_save, real_evaluate = [], util.outputs.checkpoint.save_checkpoint, engine_finetune.evaluate

    def save(path, **kw):
        written.append((os.path.basename(path), kw["epoch"]))
        return real_save(path, **kw)

    def constant_score(*a, **k):
        stats, y, out = real_evaluate(*a, **k)
        if k.get("header") == "Val":
            stats = {**stats, "score": 0.5}
        return stats, y, out

    monkeypatch.setattr(util.outputs.checkpoint, "save_checkpoint", save)
    monkeypatch.setattr(engine_finetune, "evaluate", constant_score)
    return written


def test_save_last_every_skips_epochs_writes_the_last_and_survives_a_resume(class_folders, tmp_path,
                                                                              checkpoint_epochs):
    assert main_finetune.cli(_args(class_folders, tmp_path, "t", "--save_last_every", "3", epochs=4)) == 0
    run = tmp_path / "t"
    last = [e for name, e in checkpoint_epochs if name == "checkpoint-last.pdparams"]
    best = [e for name, e in checkpoint_epochs if name == "checkpoint-best.pdparams"]
    assert best == [0]
    assert last == [0, 2, 3]  # with the new best (0), every 3rd epoch (2), the final epoch (3); not epoch 1
    assert read_checkpoint(str(run / "checkpoint-last.pdparams"), mmap=False)["epoch"] == 3
    assert "save_last_every: 3" in (run / "config.yaml").read_text()

    checkpoint_epochs.clear()  # resume to 6 epochs: the run's own --save_last_every 3 comes from config.yaml
    assert main_finetune.cli(["--resume", str(run), "--epochs", "6"]) == 0
    assert [e for name, e in checkpoint_epochs if name == "checkpoint-last.pdparams"] == [5]  # not 4
    assert read_checkpoint(str(run / "checkpoint-last.pdparams"), mmap=False)["epoch"] == 5
    assert not list(run.glob(".tmp-*"))


def test_async_save_run_writes_the_checkpoints_of_a_synchronous_run(class_folders, tmp_path):
    assert main_finetune.cli(_args(class_folders, tmp_path, "sync", epochs=2)) == 0
    assert main_finetune.cli(_args(class_folders, tmp_path, "async", "--async_save", epochs=2)) == 0
    assert not any(t.name == "checkpoint-writer" for t in threading.enumerate())  # every write waited for
    for name in ("checkpoint-last.pdparams", "checkpoint-best.pdparams"):
        a = read_checkpoint(str(tmp_path / "sync" / name), mmap=False)
        b = read_checkpoint(str(tmp_path / "async" / name), mmap=False)
        assert a["epoch"] == b["epoch"] and a.keys() == b.keys(), name
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:  # the same training: as reproducible as an interrupted run resumed (test_resume.py)
            np.testing.assert_allclose(a["model"][k], b["model"][k], atol=1e-6, err_msg=f"{name} {k}")
    assert "async_save: true" in (tmp_path / "async" / "config.yaml").read_text()
    assert not list((tmp_path / "async").glob(".tmp-*"))
