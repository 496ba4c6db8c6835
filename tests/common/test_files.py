"""common/files.py: a file is replaced whole or not at all; --overwrite removes only our entries."""

import os

import pytest

from casm_deploy.common.files import (
    atomic_file,
    make_folders,
    remove_owned,
    remove_tree,
    temporary_of,
    write_atomic,
)


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert not temporary_of(path).exists()


def test_a_link_planted_at_the_temporary_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "a.txt"
    os.symlink(outside, temporary_of(path))
    write_atomic(path, b"data")
    assert path.read_bytes() == b"data"
    assert outside.read_text() == "keep me"


def test_remove_owned_deletes_only_the_named_entries(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "x.png").write_bytes(b"")
    (tmp_path / "boxes.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("the user's")
    target = tmp_path.parent / f"{tmp_path.name}-target"
    target.mkdir()
    (target / "precious").write_text("x")
    os.symlink(target, tmp_path / "overlays")  # a link among our names: removed, not followed
    remove_owned(tmp_path, ("masks", "boxes.jsonl", "overlays", "summary.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (target / "precious").read_text() == "x"


def test_folders_1000_deep_are_made_and_removed_without_recursion(tmp_path):
    deep = tmp_path / "top" / "/".join(["d"] * 1000)
    make_folders(deep)  # Path.mkdir(parents=True) raised RecursionError here
    assert deep.is_dir()
    make_folders(deep)  # already there: nothing to do
    (deep / "x.png").write_bytes(b"")
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("x")
    os.symlink(target, deep.parent / "link")  # removed, not followed
    remove_tree(tmp_path / "top")  # shutil.rmtree recursed on Python 3.11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert (target / "precious").read_text() == "x"


def test_a_file_in_the_way_of_a_folder_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_text("in the way")
    with pytest.raises(NotADirectoryError) as caught:
        make_folders(tmp_path / "a" / "b" / "c" / "d")
    assert caught.value.filename == str(tmp_path / "a" / "b")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(NotADirectoryError):
        make_folders(tmp_path / "dangling" / "c")
    os.symlink(tmp_path / "a", tmp_path / "to-a")  # a link to a folder is a folder (mkdir -p)
    make_folders(tmp_path / "to-a" / "e")
    assert (tmp_path / "a" / "e").is_dir()


def test_a_folder_made_meanwhile_by_another_thread_is_no_error(tmp_path, monkeypatch):
    """infer's writers make the same class folder at once (a CI run lost an image to this):
    a folder that appears between the checks is the folder wanted, not a file in the way."""
    wanted = tmp_path / "masks" / "n01"
    lexists = os.path.lexists

    def made_meanwhile(path):
        if os.fspath(path) == os.fspath(wanted):  # the other thread wins the race here
            os.makedirs(wanted, exist_ok=True)
        return lexists(path)

    monkeypatch.setattr(os.path, "lexists", made_meanwhile)
    make_folders(wanted / "sub")
    assert (wanted / "sub").is_dir()


def test_threads_making_the_same_folders_all_succeed(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        for trial in range(50):
            folder = tmp_path / str(trial) / "a" / "b"
            list(pool.map(make_folders, [folder] * 8))  # raises what any thread raised
            assert folder.is_dir()
