"""files.py: atomic writes that keep the previous file on failure and honour the user's umask."""
import os
import stat

import pytest
import torch

from dictionary_learning.files import atomic_torch_save, atomic_write, atomic_write_json, load_state_dict


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_permissions_of_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        paths = [atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x")),
                 atomic_write_json({"a": 1}, tmp_path / "b.json"),
                 atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "c.pt")]
    finally:
        os.umask(previous)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_json({"version": 1}, tmp_path / "config.json")

    def fail(file):
        file.write(b'{"version": 2')
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fail)
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"version":1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_state_dicts_load_without_running_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.zeros(2), "evil": Payload()}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(tmp_path / "ae.pt")
