"""Hostile inputs: files that try to run code, corrupt files, crashes and concurrent runs, bad input that
must give a clear error (exit 2, culprit named) instead of a traceback or a silently wrong result.

Each test here failed on the code before the fix it guards."""
from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile

import paddle
import pytest

import main_finetune
import predict
from conftest import ROOT, TINY_ARGS, make_class_folders
from models import convert
from models.checkpoint_io import read_checkpoint
from util.errors import UserError

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "convert")


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
