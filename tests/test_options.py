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


# --- remount ------------------------------------------------------------------
# What mount(8) and mount.fuse3 pass for `mount -o remount,size=2G MNT` on an
# mmfs mount: the options given, mixed with what mountinfo shows of the mount.
MOUNT8_REMOUNT = "rw,relatime,remount,user_id=0,group_id=0,default_permissions,size=2G,dev,suid"


def test_remount_as_mount8_passes_it_names_only_the_options_given() -> None:
    config = options(MOUNT8_REMOUNT)
    assert config.remount and config.size == 2 << 30
    assert config.named == {"size", "user_id", "group_id"}  # not nr_inodes: it stays as it is
    assert "rw" in config.fuse_options and "ro" not in config.fuse_options
    assert not options("size=2G").remount


def test_remount_of_an_overlay_needs_no_lowerdir() -> None:
    """mount(8) passes the mount's source, "overlay", and the mountpoint only."""
    config = options("ro,relatime,remount,user_id=0,group_id=0,default_permissions", mode="overlay")
    assert config.remount and config.lowerdir is None and "ro" in config.fuse_options
    with pytest.raises(UsageError, match="overlay mode needs LOWERDIR"):
        options("ro", mode="overlay")


@pytest.mark.parametrize("echo", ["user_id=0", "group_id=0"])
def test_mountinfo_echoes_are_options_of_a_remount_only(echo: str) -> None:
    options(f"{echo},remount")  # mount(8) puts remount before them or after: either way
    with pytest.raises(UsageError, match=f"unknown option: '{echo}'"):
        options(echo)
    with pytest.raises(UsageError, match="bad value for user_id"):
        options("remount,user_id=x")


def test_the_last_of_ro_and_rw_wins() -> None:
    assert {"ro", "rw"} & options("remount,ro,rw").fuse_options == {"rw"}
    assert {"ro", "rw"} & options("rw,ro").fuse_options == {"ro"}


@pytest.mark.parametrize("bad", ["size=abc", "nr_inodes=-1", "size=1x", "nosuchoption", "mode=9"])
def test_bad_values_on_remount_are_one_line_errors(bad: str) -> None:
    with pytest.raises(UsageError) as error:
        options(f"remount,{bad}")
    assert "\n" not in str(error.value) and str(error.value)
