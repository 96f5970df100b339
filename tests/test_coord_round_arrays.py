"""A round's arrays file (coordinator.round_arrays) is kept open between appends: one open for
a round's reports, every blob read back where its append said; a file unlinked under it is made
anew, not written where no name reaches; removing a round or closing lets the descriptor go."""

from __future__ import annotations

import os

import pytest

from coordinator import round_arrays
from coordinator.round_arrays import FOLDER, ArraysGone, RoundArrayFiles


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def opens(monkeypatch) -> list[str]:
    """The paths round_arrays opened, in order."""
    opened: list[str] = []
    real_open = os.open

    def counting(path, flags, *args):
        opened.append(str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(round_arrays.os, "open", counting)
    return opened


def test_a_rounds_appends_open_its_file_once_and_each_blob_reads_back(tmp_path, opens):
    files = RoundArrayFiles(tmp_path)
    blobs = [b"first", b"the second blob", b"3"]
    placed = [files.append("r1", blobs[0])]
    assert opens  # the first append opened the file (after making the folder)
    opened = len(opens)
    placed += [files.append("r1", blob) for blob in blobs[1:]]
    assert len(opens) == opened  # the later ones did not
    assert len({name for name, _ in placed}) == 1
    assert [offset for _, offset in placed] == [0, 5, 20]
    for (name, offset), blob in zip(placed, blobs, strict=True):
        assert files.read("r1", name, offset, len(blob)) == blob
    files.close()


def test_a_file_unlinked_under_its_descriptor_is_made_anew_for_the_next_append(
    tmp_path, monkeypatch
):
    synced: list[str] = []
    monkeypatch.setattr(round_arrays, "_sync_folder", lambda folder: synced.append(folder.name))
    files = RoundArrayFiles(tmp_path)
    name, _ = files.append("r1", b"lost with its file")
    files.sync()
    synced.clear()
    (tmp_path / FOLDER / name).unlink()  # an operator's rm, not remove()
    again, offset = files.append("r1", b"kept")
    files.sync()
    assert synced == [FOLDER]  # the new file's entry in the folder is made durable too
    assert (again, offset) == (name, 0)  # the same name, a new file
    assert files.read("r1", name, 0, 4) == b"kept"
    with pytest.raises(ArraysGone):
        files.read("r1", name, 4, 14)  # the bytes that went with the old file
    files.close()


def test_removing_a_round_lets_its_descriptor_go_and_a_later_append_opens_a_new_file(tmp_path):
    files = RoundArrayFiles(tmp_path)
    before = open_descriptors()
    name, _ = files.append("r1", b"blob")
    assert open_descriptors() == before + 1
    files.remove(["r1"])
    assert open_descriptors() == before
    assert not (tmp_path / FOLDER / name).exists()
    later, offset = files.append("r1", b"late")
    assert later != name and offset == 0
    assert files.read("r1", later, 0, 4) == b"late"
    files.close()
    assert open_descriptors() == before


def test_removing_a_round_whose_file_is_gone_already_lets_its_descriptor_go(tmp_path):
    files = RoundArrayFiles(tmp_path)
    before = open_descriptors()
    name, _ = files.append("r1", b"blob")
    (tmp_path / FOLDER / name).unlink()
    files.remove(["r1"])
    assert open_descriptors() == before


def test_closing_lets_every_descriptor_go_and_appends_go_on_after(tmp_path):
    files = RoundArrayFiles(tmp_path)
    before = open_descriptors()
    first, _ = files.append("r1", b"one")
    files.append("r2", b"two")
    assert open_descriptors() == before + 2
    files.close()
    assert open_descriptors() == before
    name, offset = files.append("r1", b"three")
    assert (name, offset) == (first, 3)  # the same file, appended to after its end
    files.close()
