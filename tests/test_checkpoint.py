import os

import pytest
import torch

from casm_deploy.checkpoint import FORMAT, VERSION, load_checkpoint, save_atomic
from casm_deploy.errors import UserError
from casm_deploy.torchfile import load_file


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_save_atomic_round_trip_and_no_temporary_left(tmp_path):
    path = tmp_path / "x" / "c.pt"
    save_atomic({"format": FORMAT, "version": VERSION, "w": torch.ones(3)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "x": Payload()}, path)
    with pytest.raises(UserError, match="evil.pt: refused"):
        load_checkpoint(path)


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": FORMAT, "version": VERSION, "w": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated.pt"):
        load_file(truncated)
    for i, content in enumerate(["hello", "a longer text that is no pickle at all"]):
        text = tmp_path / f"notes{i}.txt"
        text.write_text(content)
        with pytest.raises(UserError, match=f"notes{i}.txt: not a readable checkpoint"):
            load_file(text)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    with pytest.raises(UserError, match="not a casm-deploy checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(UserError, match="no such file"):
        load_file(tmp_path / "missing.pt")
    old = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "version": 0}, old)
    with pytest.raises(UserError, match="version"):
        load_checkpoint(old)
