"""Atomic writes: nothing half-written on failure, and the final file readable as the umask says."""

from __future__ import annotations

import os
import stat

import pytest

from edgekd.fileio import atomic_path, save_torch, write_json


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        save_torch(tmp_path / "m.pt", {"w": 1})
    finally:
        os.umask(old)
    for f in ("r.json", "m.pt"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]
