"""Overlay mode reads LOWERDIR's directories only when their own names are needed.

Listing a directory must not list each of its subdirectories on LOWERDIR: the
reply to READDIRPLUS (and LOOKUP) carries a subdirectory's attributes without
listing it.  A directory not listed yet cannot know its size and link count
(tmpfs counts its entries and subdirectories), so its attributes go out
uncached, and the first stat of it lists it.  A daemon that records every
directory of LOWERDIR it lists (``LowerDir.list``) shows what is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from conftest import Mount, patched_daemon_command, stop_mmfs


def test_listing_a_directory_lists_none_of_its_subdirectories(
    mmfs_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    lower = tmp_path / "lower"
    for n in range(20):
        (lower / "top" / f"sub{n}" / "deeper").mkdir(parents=True)
        (lower / "top" / f"sub{n}" / "file").write_bytes(b"x" * n)
    (lower / "top" / "plain").write_bytes(b"data")
    record = tmp_path / "listed"
    recording_daemon = patched_daemon_command(f"""
        from mmfs import lower
        original_list = lower.LowerDir.list
        def recorded_list(self, path):
            with open({str(record)!r}, "ab") as file:
                file.write((path or b".") + b"\\n")
            return original_list(self, path)
        lower.LowerDir.list = recorded_list
    """)
    mount = mmfs_factory("overlay", str(lower), options="size=64m", program=recording_daemon)

    def listed() -> list[bytes]:
        return record.read_bytes().splitlines() if record.exists() else []

    names = sorted(os.listdir(mount.path / "top"))
    assert names == sorted([f"sub{n}" for n in range(20)] + ["plain"])
    assert sorted(listed()) == [b".", b"top"], listed()  # the root (to find "top") and "top": no subdirectory
    with os.scandir(mount.path / "top") as entries:  # d_type comes with the names
        assert sum(entry.is_dir(follow_symlinks=False) for entry in entries) == 20
    assert sorted(listed()) == [b".", b"top"], listed()
    # The first stat of a subdirectory lists it (its size and link count count
    # its entries), and shows what kernel tmpfs shows for a copy of it.
    st = os.lstat(mount.path / "top" / "sub3")
    assert listed()[-1] == b"top/sub3"
    assert (st.st_nlink, st.st_size) == (3, 20 * (2 + 2))  # "deeper" and "file"; tmpfs: 20 bytes an entry
    assert os.lstat(mount.path / "top" / "sub3").st_size == 80 and listed().count(b"top/sub3") == 1
    assert (mount.path / "top" / "sub5" / "file").read_bytes() == b"x" * 5
    stop_mmfs(mount)
