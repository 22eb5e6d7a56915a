"""Hostile inputs: files that try to run code, corrupt files, crashes and concurrent runs, bad input that
must give a clear error (exit 2, culprit named) instead of a traceback or a silently wrong result.

Each test here failed on the code before the fix it guards."""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile

import paddle
import pytest

import main_finetune
import predict
from helpers import FIXTURES, ROOT, TINY_ARGS, make_class_folders
from models import convert
from models.checkpoint_io import read_checkpoint
from util.errors import UserError

FIXTURES = os.path.join(FIXTURES, "convert")


class _Payload:
    """Unpickling this runs ``os.system`` (as a real attack would) to create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run: (data folder, run folder)."""
    root = tmp_path_factory.mktemp("trained")
    data = make_class_folders(root / "data")
    args = [*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", "1", "--output_dir", str(root / "out"),
            "--task", "run"]
    assert main_finetune.cli(args) == 0
    return data, root / "out" / "run"


def _poisoned(tmp_path, kind, trained_run):
    """A .pdparams whose pickle would create ``marker`` when loaded: a bare payload, or a payload added as one
    more key to a real checkpoint-last (the file is otherwise complete and resumable)."""
    marker = tmp_path / "marker"
    path = tmp_path / f"{kind}.pdparams"
    if kind == "bare":
        paddle.save({"model": _Payload(marker)}, str(path))
    else:
        state = paddle.load(str(trained_run / "checkpoint-last.pdparams"))
        state["extra"] = _Payload(marker)
        paddle.save(state, str(path))
    return path, marker


def _run(where, data, ckpt, out_dir):
    base = [*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", "2", "--output_dir", str(out_dir),
            "--task", "t"]
    if where == "resume":
        return main_finetune.cli(base + ["--resume", str(ckpt)])
    if where == "eval":
        return main_finetune.cli(base + ["--eval", "--resume", str(ckpt)])
    if where == "finetune":
        return main_finetune.cli(base + ["--finetune", str(ckpt)])
    if where == "predict":
        return predict.main(["--resume", str(ckpt), "--input", os.path.join(data, "test"),
                             "--output", str(out_dir / "r.csv")])
    if where == "convert":
        return convert.main([str(ckpt), str(out_dir / "converted.pdparams")])
    raise AssertionError(where)


@pytest.mark.parametrize("kind", ["bare", "extra_key"])
@pytest.mark.parametrize("where", ["resume", "eval", "predict", "finetune", "convert"])
def test_checkpoint_payload_never_runs(trained, tmp_path, capsys, where, kind):
    data, run = trained
    ckpt, marker = _poisoned(tmp_path, kind, run)
    assert not marker.exists()
    rc = _run(where, data, ckpt, tmp_path)
    err = capsys.readouterr().err
    assert not marker.exists(), f"{where}: the file's code ran"
    assert rc == 2, (rc, err[-2000:])
    assert "refused to load this checkpoint" in err and "posix.system" in err, err[-2000:]


def test_own_checkpoints_load_through_the_restricted_reader(trained, tmp_path, capsys):
    data, run = trained
    for name in ("checkpoint-best.pdparams", "checkpoint-last.pdparams"):
        state = read_checkpoint(str(run / name))          # no GeneratorState or other object in our files
        assert state["model"] and isinstance(state["rng"]["paddle"], list)
    # --finetune from one's own checkpoint (what the resume-mismatch error recommends) and models.convert
    assert _run("finetune", data, run / "checkpoint-best.pdparams", tmp_path) == 0
    assert _run("convert", data, run / "checkpoint-last.pdparams", tmp_path) == 0
    assert (tmp_path / "converted.pdparams").is_file()


def _flip_byte_in_entry(src, dst, entry_suffix):
    shutil.copy(src, dst)
    with zipfile.ZipFile(dst) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(entry_suffix))
    with open(dst, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))
    return info.filename


@pytest.mark.parametrize("mmap", [True, False])
def test_zip_checkpoint_with_bad_crc_is_refused_naming_the_entry(tmp_path, mmap):
    src = os.path.join(FIXTURES, "bare_state_dict.pth")
    with zipfile.ZipFile(src) as zf:
        data_entry = next(i.filename for i in zf.infolist() if "/data/" in i.filename and i.file_size >= 8)
    bad = tmp_path / "bad.pth"
    name = _flip_byte_in_entry(src, bad, data_entry)
    with pytest.raises(UserError, match="CRC") as exc:
        read_checkpoint(str(bad), mmap=mmap)
    assert name in str(exc.value)
    read_checkpoint(src, mmap=mmap)                      # the intact file still reads


def _safetensors(path, header: bytes, data: bytes = b"\0" * 16):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize("header, message", [
    (json.dumps({"w": [1, 2, 3]}), "malformed header entry"),
    (json.dumps(["w"]), "header is a JSON list"),
    (json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}), "overlapping byte ranges"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["x", 8]}}), "malformed header entry"),
])
def test_malformed_safetensors_headers_are_clear_errors(tmp_path, header, message):
    path = _safetensors(tmp_path / "w.safetensors", header.encode())
    with pytest.raises(UserError, match=message):
        read_checkpoint(path)


# ---------------------------------------------------------------------------------------------------
# 3. a run folder is never corrupted

def _tiny(data, out, task, *extra, epochs=3, workers=0):
    args = [*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", str(epochs), "--output_dir",
            str(out), "--task", task, *extra]
    i = args.index("--num_workers")
    args[i + 1] = str(workers)
    return args


def test_second_run_on_a_locked_folder_fails_naming_the_other_pid(class_folders, tmp_path, capsys):
    run = tmp_path / "out" / "t"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from util.outputs.run_folder import RunFolderLock; l = RunFolderLock(sys.argv[2]); "
                               "print('locked', flush=True); time.sleep(120)", ROOT, str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main_finetune.cli(_tiny(class_folders, tmp_path / "out", "t")) == 2
        err = capsys.readouterr().err
        assert f"another run (PID {holder.pid})" in err and str(run) in err
        assert not (run / "log.txt").exists()
    finally:
        holder.kill()                                   # SIGKILL: the kernel releases the lock
        holder.wait()
    assert main_finetune.cli(_tiny(class_folders, tmp_path / "out", "t", epochs=1)) == 0


def test_rerun_into_an_existing_run_without_resume_is_refused(class_folders, tmp_path, capsys):
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", epochs=1)) == 0
    before = (tmp_path / "t" / "metrics_val.csv").read_text()
    capsys.readouterr()
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", epochs=1)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err
    assert (tmp_path / "t" / "metrics_val.csv").read_text() == before


def _rows(path):
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.reader(f))


def test_resume_after_repeated_kills_keeps_one_row_per_epoch(class_folders, tmp_path, monkeypatch, capsys):
    """A kill after an epoch's rows are written but before its checkpoint-last is on disk, three times over,
    with a half-written temporary file left each time: the resumed run has one row per epoch everywhere."""
    import util.outputs.checkpoint

    real_save = util.outputs.checkpoint.save_checkpoint
    state = {"kill_at": None}

    def save(path, **kw):
        if path.endswith("checkpoint-last.pdparams") and kw["epoch"] == state["kill_at"]:
            (tmp_path / "t" / ".tmp-abc123.pdparams").write_bytes(b"half written")
            raise KeyboardInterrupt
        return real_save(path, **kw)

    monkeypatch.setattr(util.outputs.checkpoint, "save_checkpoint", save)
    run = tmp_path / "t"
    last = run / "checkpoint-last.pdparams"
    state["kill_at"] = 1
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", epochs=4)) == 130
    for kill_at in (1, 2):       # killed again in the same epoch, then in the next one
        state["kill_at"] = kill_at
        assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", "--resume", str(last), epochs=4)) == 130
    state["kill_at"] = None
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", "--resume", str(last), epochs=4)) == 0
    assert "dropped the records of epochs after" in capsys.readouterr().out
    assert len(_rows(run / "metrics_val.csv")) == 1 + 4
    epochs = [json.loads(ln)["epoch"] for ln in (run / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]
    per_class = _rows(run / "per_class_val.csv")
    assert sorted(int(r[0]) for r in per_class[1:]) == sorted([e for e in range(4) for _ in range(3)])
    assert not list(run.glob(".tmp-*"))


def test_interrupt_before_any_checkpoint_says_so(class_folders, tmp_path, monkeypatch, capsys):
    import engine_finetune

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_finetune, "train_one_epoch", interrupted)
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t")) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was written" in err and "intact" not in err


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _start_with_workers(data, out):
    args = [sys.executable, os.path.join(ROOT, "main_finetune.py"),
            *_tiny(data, out, "t", "--batch_size", "2", epochs=200, workers=2)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 90
    while time.time() < deadline and len(_children(proc.pid)) < 2:
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the data loader workers did not start"
    return proc, workers


def _wait_gone(pids, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


@pytest.fixture
def many_images(tmp_path):
    return make_class_folders(tmp_path / "data", counts={"train": 40, "val": 4, "test": 5})


@pytest.mark.slow
def test_workers_exit_when_the_main_process_is_killed(many_images, tmp_path):
    proc, workers = _start_with_workers(many_images, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _wait_gone(workers)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"


@pytest.mark.slow
def test_sigterm_ends_the_run_like_ctrl_c(many_images, tmp_path):
    proc, workers = _start_with_workers(many_images, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err and "C++" not in err, err[-3000:]
    assert not _wait_gone(workers)


@pytest.mark.slow
def test_a_killed_worker_gives_one_clear_line(many_images, tmp_path):
    proc, workers = _start_with_workers(many_images, tmp_path)
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "SystemError" not in err, err[-3000:]
    assert f"data loader worker (pid {workers[0]}) was killed by signal" in err
    assert not _wait_gone(workers[1:])


def test_outputs_get_the_umask_mode_like_every_other_file(trained):
    _, run = trained
    want = stat.S_IMODE(os.stat(run / "log.txt").st_mode)
    for name in ("checkpoint-best.pdparams", "checkpoint-last.pdparams", "config.yaml", "training_curves.png"):
        assert stat.S_IMODE(os.stat(run / name).st_mode) == want, name


def test_output_dir_that_is_a_file_is_a_clear_error(class_folders, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main_finetune.cli(_tiny(class_folders, tmp_path / "f", "t", epochs=1)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path / "f") in err


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
        class_folders, tmp_path, monkeypatch, capsys, errno_):
    import util.outputs.checkpoint

    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", epochs=1)) == 0
    last = tmp_path / "t" / "checkpoint-last.pdparams"
    before = last.read_bytes()
    real = util.outputs.checkpoint.pickle_checkpoint

    def failing_save(obj, path, *a, **k):
        real(obj, path, *a, **k)
        raise OSError(errno_, os.strerror(errno_), path)

    monkeypatch.setattr(util.outputs.checkpoint, "pickle_checkpoint", failing_save)
    capsys.readouterr()
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", "--resume", str(last), epochs=2)) == 2
    err = capsys.readouterr().err
    assert os.strerror(errno_) in err and "Traceback" not in err
    assert last.read_bytes() == before
    assert not list((tmp_path / "t").glob(".tmp-*"))


def test_convert_to_a_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "out.pdparams").mkdir()
    assert convert.main([os.path.join(FIXTURES, "bare_state_dict.pth"), str(tmp_path / "out.pdparams")]) == 2
    assert "is a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# 5. distributed faults: one rank dies or stalls

def _launch_two(data, out, log_dir):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           os.path.join(ROOT, "main_finetune.py"),
           *_tiny(data, out, "t", "--batch_size", "2", "--print_freq", "5", epochs=200)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    log0 = log_dir / "workerlog.0"
    deadline = time.time() + 120
    while time.time() < deadline and not (log0.exists() and "Epoch 0 [" in log0.read_text(errors="replace")):
        time.sleep(0.3)
    assert log0.exists(), "the two processes did not start"
    return proc


def _rank_pid(launcher_pid, rank):
    """PID of the launched process with PADDLE_TRAINER_ID == rank among the launcher's descendants."""
    def parent(pid):
        try:
            return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid, up = int(entry), int(entry)
        while up > 1 and up != launcher_pid:
            up = parent(up)
        if up != launcher_pid or pid == launcher_pid:
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if f"PADDLE_TRAINER_ID={rank}".encode() in env and b"main_finetune.py" in cmdline:
            return pid
    raise AssertionError(f"rank {rank} not found")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_dead_or_stalled_rank_stops_the_others_with_one_line(many_images, tmp_path, how):
    proc = _launch_two(many_images, tmp_path / "out", tmp_path / "log")
    try:
        victim = _rank_pid(proc.pid, 1)
        os.kill(victim, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        out, _ = proc.communicate(timeout=90)     # no hang: gloo alone would wait for PADDLE_PG_TIMEOUT (30 min)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            os.kill(victim, signal.SIGKILL)
        except (OSError, UnboundLocalError):
            pass
    log0 = (tmp_path / "log" / "workerlog.0").read_text(errors="replace")
    assert proc.returncode != 0
    assert "C++ Traceback" not in log0 and "Traceback (most recent call last)" not in log0, log0[-3000:]
    state = "is stopped" if how == "stop" else "has died"
    assert f"rank 1 (pid {victim}) {state}" in log0, log0[-3000:]
    assert "gloo::IoException'" not in log0 and "terminate called" not in log0, log0[-3000:]


# ---------------------------------------------------------------------------------------------------
# 4. bad input: a clear error or the right result, never a traceback or a silently wrong number

def test_file_names_that_are_not_utf8_are_written_escaped(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data")
    bad = os.fsdecode(b"caf\xe9_\xff.png")                       # Latin-1 bytes: not valid UTF-8
    for split in ("test",):
        src = tmp_path / "data" / split / "a" / "a_0.png"
        os.rename(src, os.path.join(os.path.dirname(src), bad))
    assert main_finetune.cli(_tiny(data, tmp_path / "out", "t", epochs=1)) == 0
    text = (tmp_path / "out" / "t" / "predictions_test.csv").read_text(encoding="utf8")
    assert "a/caf\\xe9_\\xff.png" in text
    assert len(_rows(tmp_path / "out" / "t" / "predictions_test.csv")) == 1 + 15
    ckpt = tmp_path / "out" / "t" / "checkpoint-best.pdparams"
    assert predict.main(["--resume", str(ckpt), "--input", os.path.join(data, "test"),
                         "--output", str(tmp_path / "r.csv")]) == 0
    assert "a/caf\\xe9_\\xff.png" in (tmp_path / "r.csv").read_text(encoding="utf8")


def test_accum_iter_larger_than_an_epoch_is_refused(class_folders, tmp_path, capsys):
    # 24 training images, batch 4: 6 batches per epoch
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", "--accum_iter", "7", epochs=1)) == 2
    err = capsys.readouterr().err
    assert "--accum_iter 7: more than the 6 batches of an epoch" in err


def test_accum_iter_that_does_not_divide_the_epoch_warns_once(class_folders, tmp_path, capsys):
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", "--accum_iter", "4", epochs=2)) == 0
    out = capsys.readouterr().out
    assert out.count("--accum_iter 4 does not divide the 6 batches") == 1


def test_duplicate_keys_in_a_preset_are_an_error_naming_both_lines(tmp_path):
    from util.config import resolve_config

    preset = tmp_path / "p.yaml"
    preset.write_text("data_path: x\nbatch_size: 8\nepochs: 3\nbatch_size: 32\n")
    with pytest.raises(UserError, match=r"'batch_size' is set twice, on line 2 and on line 4"):
        resolve_config(["--config", str(preset)])


def test_one_epoch_with_the_default_warmup_is_accepted_with_one_warning(class_folders, tmp_path, capsys):
    args = _tiny(class_folders, tmp_path, "t", epochs=1)
    i = args.index("--warmup_epochs")
    del args[i:i + 2]                                     # the default: 10 warmup epochs
    assert main_finetune.cli(args) == 0
    out = capsys.readouterr().out
    assert out.count("--warmup_epochs 10 is longer than --epochs 1") == 1


def test_eval_on_data_with_other_class_names_is_refused(trained, tmp_path, capsys):
    _, run = trained
    other = make_class_folders(tmp_path / "other", classes=("b", "c", "zz"))
    args = [*TINY_ARGS, "--data_path", other, "--eval", "--resume", str(run / "checkpoint-best.pdparams"),
            "--output_dir", str(tmp_path / "out"), "--task", "ev"]
    assert main_finetune.cli(args) == 2
    err = capsys.readouterr().err
    assert "trained on classes ['a', 'b', 'c']" in err and "['b', 'c', 'zz']" in err


def test_a_truncated_test_image_stops_the_run_before_training(class_folders, tmp_path, capsys):
    bad = os.path.join(class_folders, "test", "b", "b_1.png")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    assert main_finetune.cli(_tiny(class_folders, tmp_path, "t", epochs=1)) == 2
    captured = capsys.readouterr()
    assert bad in captured.err and "--skip_image_check" in captured.err
    assert "Epoch 0" not in captured.out and not (tmp_path / "t" / "log.txt").exists()
