"""Checksum records: a file altered after it was recorded (even at the same size) fails to verify."""

import os

import pytest

from snce.files import DamagedFileError, check_file, record_checksums


def test_same_size_change_after_a_verified_read_is_caught(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    record_checksums(tmp_path, ["weights.bin"])
    check_file(path)  # verifies (and remembers the hash of this version of the file)
    path.write_bytes(b"b" + b"a" * 999)  # same size, one byte different
    # the hash cache is keyed by (size, mtime_ns); on a filesystem with coarse timestamps a rewrite within one
    # tick could keep the mtime, so the test moves it on as any later rewrite would
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(DamagedFileError, match="SHA-256 differs"):
        check_file(path)
    path.write_bytes(b"a" * 10)
    with pytest.raises(DamagedFileError, match="10 bytes, 1000 were written"):
        check_file(path)
