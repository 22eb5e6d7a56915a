"""Provenance of a report: file hashes against hashlib on the same bytes, a folder's listing fingerprint
changing with any file added, removed, renamed or resized."""
from __future__ import annotations

import hashlib

from util.outputs.provenance import describe_path, file_sha256, folder_fingerprint


def test_file_hash_is_the_sha256_of_its_bytes(tmp_path):
    data = bytes(range(256)) * 9000  # more than one 1 MiB chunk
    p = tmp_path / "w.pdparams"
    p.write_bytes(data)
    assert file_sha256(str(p)) == hashlib.sha256(data).hexdigest()
    assert describe_path(str(p)).endswith(f"sha256 {hashlib.sha256(data).hexdigest()}")


def test_folder_fingerprint_follows_names_and_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"12")
    (tmp_path / "y.png").write_bytes(b"3")
    (tmp_path / ".hidden").write_bytes(b"ignored")
    digest, n = folder_fingerprint(str(tmp_path))
    assert n == 2 and digest == hashlib.sha256(b"a/x.png\t2\ny.png\t1").hexdigest()
    (tmp_path / "y.png").write_bytes(b"34")  # resized
    assert folder_fingerprint(str(tmp_path))[0] != digest
    (tmp_path / "y.png").rename(tmp_path / "z.png")  # renamed
    assert folder_fingerprint(str(tmp_path))[0] == hashlib.sha256(b"a/x.png\t2\nz.png\t2").hexdigest()
    assert "(2 files)" in describe_path(str(tmp_path))
    assert describe_path(str(tmp_path / "gone")).endswith("(not found)")


def test_a_file_name_that_is_not_utf8_is_hashed_by_its_bytes(tmp_path):
    import os

    os.makedirs(tmp_path / "d")
    with open(os.path.join(os.fsencode(tmp_path / "d"), b"caf\xe9.png"), "wb") as f:
        f.write(b"1")
    digest, n = folder_fingerprint(str(tmp_path / "d"))
    assert n == 1 and digest == hashlib.sha256(b"caf\xe9.png\t1").hexdigest()
