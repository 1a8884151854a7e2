"""The options tier: ``-o`` values and the mount's rules as pure functions (no mount).

The same values on a real mount are in test_lifecycle.py (size=, nr_inodes=,
mode=, uid=, gid= against kernel tmpfs) and test_atime.py (the atime flags)."""

from __future__ import annotations

import pytest

from mmfs.options import MountConfig, UsageError, atime_rule, parse_args, ram_bytes

PAGE = 4096


def options(text: str, mode: str = "tmpfs") -> MountConfig:
    return parse_args([mode, "/mnt", "-o", text])


@pytest.mark.parametrize(
    ("text", "size"),
    [("1", PAGE), ("4096", PAGE), ("4097", 2 * PAGE), ("1k", PAGE), ("16m", 16 << 20), ("2G", 2 << 30),
     ("1t", 1 << 40), ("0", 0)],
)
def test_size_takes_tmpfs_suffixes_and_rounds_up_to_pages(text: str, size: int) -> None:
    assert options(f"size={text}").size == size


def test_size_in_percent_of_ram_and_defaults_like_tmpfs() -> None:
    assert options("size=10%").size == -(-(ram_bytes() * 10 // 100) // PAGE) * PAGE
    config = parse_args(["tmpfs", "/mnt"])
    assert config.size == ram_bytes() // 2 // PAGE * PAGE  # half of RAM
    assert config.nr_inodes == ram_bytes() // PAGE // 2  # half as many inodes as RAM pages
    assert (config.mode, config.uid, config.gid, config.lowerdir) == (None, None, None, None)


def test_nr_inodes_mode_uid_gid_values() -> None:
    config = options("nr_inodes=2k,mode=0700,uid=1000,gid=0")
    assert (config.nr_inodes, config.mode, config.uid, config.gid) == (2048, 0o700, 1000, 0)
    assert options("mode=1777").mode == 0o1777
    assert options("nr_inodes=0").nr_inodes == 0  # unlimited


@pytest.mark.parametrize(
    "bad",
    ["size=", "size=-1", "size=1x", "size=1.5g", "size=%", "nr_inodes=ten", "mode=800", "mode=17777", "mode=",
     "uid=-1", "uid=4294967295", "gid=x", "busy_poll=2", "log=", "fsname=a,b", "lowerdir=", "nosuchoption",
     "nosuch=1"],
)
def test_bad_values_are_one_line_errors(bad: str) -> None:
    with pytest.raises(UsageError) as error:
        options(bad)
    assert "\n" not in str(error.value) and str(error.value)


@pytest.mark.parametrize(
    ("flags", "rule"),
    [("", ("relatime", True)), ("noatime", ("noatime", True)), ("strictatime", ("strictatime", True)),
     ("noatime,strictatime", ("strictatime", True)), ("strictatime,noatime", ("strictatime", True)),
     ("noatime,atime", ("relatime", True)), ("nodiratime", ("relatime", False)),
     ("noatime,nodiratime,diratime", ("noatime", True)), ("relatime,norelatime,lazytime", ("relatime", True)),
     ("strictatime,nostrictatime,noatime", ("noatime", True))],
)
def test_atime_flags_give_the_rule_tmpfs_would(flags: str, rule: tuple[str, bool]) -> None:
    """relatime unless noatime; strictatime overrides noatime; the last of a flag and its negation wins."""
    config = options(flags) if flags else parse_args(["tmpfs", "/mnt"])
    assert atime_rule(config) == rule


def test_mount_flags_and_allow_other_pass_to_the_kernel() -> None:
    config = options("noexec,nosuid,nodev,allow_other,ro")
    assert {"noexec", "nosuid", "nodev", "allow_other", "ro"} <= config.fuse_options
    assert options("fsname=scratch").source == "scratch"
