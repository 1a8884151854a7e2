"""``mmfs run``: run a command in a throwaway overlay of a directory.

``mmfs run [-o OPTIONS] [--dir DIR] [--keep UPPERDIR] -- COMMAND [ARGS...]``
overlays DIR (default: the current directory) by mmfs in overlay mode at its
own path, in a mount namespace of this process's own, runs COMMAND there, then
prints a summary of what COMMAND changed (stderr: COMMAND's stdout stays
clean), exports the changes to UPPERDIR if asked, unmounts and exits with
COMMAND's status (128+N if a signal N killed it, as a shell does).

How, in order:

* **The namespace.** ``unshare(CLONE_NEWNS)`` when this process may (root),
  else ``unshare(CLONE_NEWUSER|CLONE_NEWNS)`` with the caller's own uid and gid
  mapped to themselves (setgroups denied): COMMAND keeps its identity.  Then
  every mount is made private, so the overlay propagates nowhere: other
  processes never see it, and it goes when the namespace does.
* **The daemon** is ``python -P -m mmfs overlay DIR DIR -f -o OPTIONS``, a child
  in the foreground mode in a session of its own (the terminal's signals never
  reach it), stdin from /dev/null and its log into a private directory, so it
  never keeps or writes to the terminal; warnings it logged are repeated on
  stderr at the end.  A direct child rather than a background daemon because
  the kernel then stops it (``PR_SET_PDEATHSIG``: SIGTERM, it unmounts) if
  ``mmfs run`` itself is killed outright; nothing is left in a namespace
  nobody can see.  Mounted means: a new mmfs mount on DIR in our mount table
  and its control socket present.  In a user namespace its uid is not 0, so
  it gets CAP_SYS_ADMIN as an ambient capability, which mounting FUSE there
  needs.  LowerDir opens DIR before mounting (as root through a read-only,
  noatime clone), so DIR is never written, atimes included.  Without root the
  clone cannot be made noatime (a user namespace may not change the atime
  flags of the mounts it was given): files are opened O_NOATIME where the
  kernel allows it (the caller's own), and a symlink's atime may change when
  its directory is listed.
* **The control channel** of that daemon lives in a private 0700 directory
  (``MMFS_RUNTIME_DIR`` for the daemon and for our ``control.call``), so its
  socket is not mixed with the system's; it is chosen outside DIR, as the
  daemon never touches its own mount.  For the same reason DIR may not hold
  the Python or mmfs the daemon runs from (it would deadlock importing a module
  through its own mount): that is refused in one line.
* **COMMAND** runs with the caller's environment, stdio and process group, in
  the caller's working directory entered again after the mount (on the overlay
  when under DIR).  The terminal's Ctrl-C (and Ctrl-\\) reach it directly, and
  ``mmfs run`` lets them pass; SIGTERM and SIGHUP sent to ``mmfs run`` are
  forwarded to it.  A signal that comes before COMMAND starts stops the run
  (exit status 128+N) after the cleanup.
* **After COMMAND**: ``{"op": "diff"}`` gives the summary; ``{"op": "export"}``
  with UPPERDIR's descriptor, opened before anything was mounted (UPPERDIR
  must be outside DIR), keeps the changes; then ``umount2(DIR)``.  If
  processes COMMAND left behind still use the overlay, it is detached and the
  daemon stopped: they lose it.  The daemon is waited for, the private
  directory removed.

Errors are one line and exit status 1; COMMAND that cannot be found or
executed is 127 or 126, as in a shell, after the cleanup.  A failed export
is exit status 1 as well: the changes asked for were not kept.

Synchronous and single-threaded (``unshare(CLONE_NEWUSER)`` requires it);
signal handlers only record or forward.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType

from . import control, linux, manual, mounts
from .options import HelpRequested, UsageError, shown
from .quoting import quote_path

MOUNT_SECONDS = 30  # how long the daemon may take to mount
SOCKET_SECONDS = 5  # then its control socket, which it makes right after mounting
DAEMON_EXIT_SECONDS = 10  # how long the daemon may take to end after the unmount
SUMMARY_LINES = 10
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = re.compile(r"^mmfs (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", re.MULTILINE)


class Interrupted(Exception):
    """A signal came before COMMAND started: stop, clean up, exit 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class RunArgs:
    command: list[str]
    directory: str  # a real path
    keep: str | None = None
    options: list[str] = field(default_factory=list)


def main(argv: list[str]) -> int:
    """``mmfs run ARGV...`` (the arguments after "run")."""
    try:
        args = parse(argv)
        check_directory(args.directory)
        with ExitStack() as stack:
            keep_fd = open_keep(args.keep, args.directory) if args.keep is not None else None
            if keep_fd is not None:
                stack.callback(os.close, keep_fd)
            return run(args, keep_fd, stack)
    except HelpRequested as text:
        print(text)
        return 0
    except UsageError as error:
        say(str(error))
        return 1
    except Interrupted as stop:
        return 128 + stop.signum


def say(line: str) -> None:
    print(f"mmfs run: {line}", file=sys.stderr, flush=True)


# --- arguments ----------------------------------------------------------------------
def parse(argv: list[str]) -> RunArgs:
    """Options up to ``--`` or the first argument that is not one, then COMMAND."""
    given: dict[str, list[str]] = {"-o": [], "--dir": ["."], "--keep": []}
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            raise HelpRequested(manual.verb_help("run"))
        if arg == "--":
            break
        name, value = split_option(arg)
        if name is None:
            rest.insert(0, arg)  # COMMAND starts here
            break
        if value is None and rest:
            value = rest.pop(0)
        if not value:
            raise UsageError(f"option {name} needs a value")
        given[name].append(value)
    if not rest:
        raise UsageError(f"no COMMAND given: {manual.VERBS['run'].synopsis}")
    keep = given["--keep"][-1] if given["--keep"] else None
    directory = os.path.realpath(os.path.join(current_directory(), given["--dir"][-1]))
    return RunArgs(rest, directory, keep, given["-o"])


def split_option(arg: str) -> tuple[str | None, str | None]:
    """(option, value) of ``-o X``, ``-oX``, ``--dir D``, ``--dir=D``, ``--keep U``,
    ``--keep=U`` (value None: it is the next argument); (None, None) for COMMAND."""
    if arg in ("-o", "--dir", "--keep"):
        return arg, None
    if arg.startswith("-o"):
        return "-o", arg[2:]
    name, equals, value = arg.partition("=")
    if equals and name in ("--dir", "--keep"):
        return name, value
    if arg.startswith("-") and arg != "-":
        raise UsageError(f"unknown argument: {arg!r} (see mmfs run --help)")
    return None, None


def current_directory() -> str:
    try:
        return os.getcwd()
    except OSError as error:
        raise UsageError(f"cannot tell the current directory: {error.strerror}") from None


def inside(path: str, directory: str) -> bool:
    """Whether real path ``path`` is ``directory`` or under it."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_directory(directory: str) -> None:
    """DIR exists, is a directory, and holds nothing the daemon runs from."""
    if not os.path.exists(directory):
        raise UsageError(f"no such directory: {shown(directory)}")
    if not os.path.isdir(directory):
        raise UsageError(f"not a directory: {shown(directory)}")
    for used in daemon_runtime_paths():
        if inside(used, directory):
            raise UsageError(
                f"cannot overlay {shown(directory)}: mmfs runs from {shown(used)}, which its daemon "
                "would then read through its own mount"
            )


def daemon_runtime_paths() -> list[str]:
    """Where the daemon's interpreter and modules come from (real paths)."""
    places = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable), PACKAGE_ROOT]
    places += [entry for entry in sys.path[1:] if entry]  # sys.path[0] is our script's or cwd; -P drops it
    return sorted({os.path.realpath(place) for place in places if os.path.exists(place)})


def open_keep(keep: str, directory: str) -> int:
    """UPPERDIR, made if missing, opened now: outside DIR, and empty."""
    if inside(os.path.realpath(keep), directory):
        raise UsageError(f"--keep {shown(keep)} is inside {shown(directory)}: keep the changes outside it")
    try:
        os.makedirs(keep, exist_ok=True)
        fd = os.open(keep, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise UsageError(f"--keep {shown(keep)}: {error.strerror}") from None
    if os.listdir(fd):
        os.close(fd)
        raise UsageError(f"--keep {shown(keep)}: not empty")
    return fd


# --- the run ------------------------------------------------------------------------
def run(args: RunArgs, keep_fd: int | None, stack: ExitStack) -> int:
    forwarder = stack.enter_context(forwarded_signals())
    cwd, command_env = current_directory(), dict(os.environ)
    in_user_namespace = enter_private_namespace()
    runtime = stack.enter_context(private_runtime_dir(args.directory))
    daemon = OverlayDaemon(args, runtime, in_user_namespace)
    stack.callback(daemon.stop)
    daemon.wait_until_mounted(forwarder)
    status = run_command(args.command, cwd, command_env, forwarder)
    if status is None:
        return forwarder.exit_status()
    if forwarder.child is None:  # it never started: nothing to show or keep
        return status
    summarize(args.directory)
    if keep_fd is not None and args.keep is not None and not export(args.directory, args.keep, keep_fd):
        return 1
    return status


class Forwarder:
    """What ``mmfs run`` does with the signals it handles: before COMMAND runs,
    note the first; while it runs, forward SIGTERM and SIGHUP to it (the
    terminal sends SIGINT and SIGQUIT to it directly); after, nothing."""

    FROM_TERMINAL = (signal.SIGINT, signal.SIGQUIT)
    HANDLED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.child is None:
            self.pending = self.pending or signum
        elif signum not in self.FROM_TERMINAL:
            self.child.send_signal(signum)  # a no-op once it has been reaped

    def started(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        if self.pending is not None:  # it came between the last check and the start
            child.send_signal(self.pending)

    def check(self) -> None:
        if self.pending is not None:
            raise Interrupted(self.pending)

    def exit_status(self) -> int:
        return 128 + (self.pending or 0)


@contextmanager
def forwarded_signals() -> Iterator[Forwarder]:
    """Handlers, not SIG_IGN: a child's caught signals go back to the default at exec."""
    forwarder = Forwarder()
    previous = {signum: signal.signal(signum, forwarder.handle) for signum in Forwarder.HANDLED}
    try:
        yield forwarder
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def enter_private_namespace() -> bool:
    """A mount namespace of our own, whose mounts never propagate out; True if it took a user
    namespace (no privilege to unshare the mount namespace alone)."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        linux.unshare(linux.CLONE_NEWNS)
        in_user_namespace = False
    except PermissionError:
        try:
            linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
        except OSError as error:
            why = "the limit in /proc/sys/user/max_user_namespaces" if error.errno == errno.ENOSPC else error.strerror
            raise UsageError(f"without root, mmfs run needs a user namespace; the system refuses one ({why})") from None
        map_own_ids(uid, gid)
        in_user_namespace = True
    try:
        linux.make_mounts_slaves()
    except OSError as error:
        raise UsageError(f"cannot keep the mounts of a new namespace to itself: {error.strerror}") from None
    return in_user_namespace


def map_own_ids(uid: int, gid: int) -> None:
    """In a new user namespace: we are who we were (uid and gid mapped to themselves)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as proc_file:
            proc_file.write(text)


@contextmanager
def private_runtime_dir(directory: str) -> Iterator[str]:
    """A 0700 directory outside DIR for the daemon's socket and log, named in
    ``MMFS_RUNTIME_DIR`` for the daemon and for ``control.call``; removed after."""
    base = next((place for place in runtime_bases() if not inside(os.path.realpath(place), directory)), None)
    if base is None:
        raise UsageError(f"cannot overlay {shown(directory)}: no place outside it for the daemon's control socket")
    try:
        runtime = tempfile.mkdtemp(prefix="mmfs-run-", dir=base)
    except OSError as error:
        raise UsageError(f"cannot make a private directory in {shown(base)}: {error.strerror}") from None
    previous = os.environ.get(control.RUNTIME_ENV)
    os.environ[control.RUNTIME_ENV] = runtime
    try:
        yield runtime
    finally:
        if previous is None:
            del os.environ[control.RUNTIME_ENV]
        else:
            os.environ[control.RUNTIME_ENV] = previous
        shutil.rmtree(runtime, ignore_errors=True)


def runtime_bases() -> list[str]:
    """Where a private runtime directory may go, best first."""
    places = ["/run"] if os.geteuid() == 0 else [os.environ.get("XDG_RUNTIME_DIR", "")]
    places += [tempfile.gettempdir(), "/dev/shm"]
    return [place for place in places if place and os.access(place, os.W_OK | os.X_OK)]


class OverlayDaemon:
    """The mmfs daemon overlaying DIR in our namespace: started, waited for,
    stopped; what it logged at WARNING or worse is repeated on stderr."""

    def __init__(self, args: RunArgs, runtime: str, in_user_namespace: bool) -> None:
        self.directory = args.directory
        self.mounted = False
        self.reported = False  # its failure was said already
        self.covered = mounts.mounted_at(self.directory)  # what DIR's mount is before ours
        self.log_path = os.path.join(runtime, "daemon.log")
        command = [sys.executable, "-P", "-m", "mmfs", "overlay", self.directory, self.directory, "-f"]
        if args.options:
            command += ["-o", ",".join(args.options)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        parent = os.getpid()

        def in_child() -> None:
            linux.die_with_parent(signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before that took effect
                os._exit(1)
            if in_user_namespace:
                linux.keep_sys_admin_across_exec()

        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env,
                    start_new_session=True, preexec_fn=in_child,
                )
        except (OSError, subprocess.SubprocessError) as error:
            raise UsageError(f"cannot start the daemon: {error}") from None

    def wait_until_mounted(self, forwarder: Forwarder) -> None:
        """Until our mmfs is mounted on DIR and its socket is there; UsageError with
        the daemon's own line if it gave up; Interrupted by a signal."""
        deadline = time.monotonic() + MOUNT_SECONDS
        while (entry := self.our_mount()) is None:
            self.check_alive(forwarder)
            if time.monotonic() > deadline:
                raise UsageError(f"the daemon did not mount {shown(self.directory)} within {MOUNT_SECONDS} s")
            time.sleep(0.01)
        self.mounted = True
        socket_path = control.socket_of(entry)
        deadline = time.monotonic() + SOCKET_SECONDS  # without one, only the summary and --keep will fail
        while not os.path.exists(socket_path) and time.monotonic() < deadline:
            self.check_alive(forwarder)
            time.sleep(0.01)
        self.check_alive(forwarder)

    def our_mount(self) -> mounts.MountEntry | None:
        """DIR's mount once it is a new mmfs one (not one that was there before)."""
        entry = mounts.mounted_at(self.directory)
        if entry is None or entry.fstype != "fuse.mmfs" or entry == self.covered:
            return None
        return entry

    def check_alive(self, forwarder: Forwarder) -> None:
        forwarder.check()
        if self.process.poll() is not None:
            self.reported = True
            raise UsageError(self.startup_error())

    def startup_error(self) -> str:
        """The daemon's one line ("mmfs: ..."), or its exit status."""
        lines = [line for line in self.log_text().splitlines() if line.startswith("mmfs: ")]
        if lines:
            return lines[-1].removeprefix("mmfs: ")
        self.repeat_warnings()
        return f"the daemon exited with status {self.process.returncode}"

    def stop(self) -> None:
        """Unmount (detach if something COMMAND left behind still uses it, and
        stop the daemon: they lose the overlay), wait for the daemon."""
        if self.reported:
            return
        terminated = self.process.poll() is None and not (self.mounted and self.unmounted())
        if terminated:
            self.process.terminate()
        try:
            self.process.wait(timeout=DAEMON_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            say(f"the daemon did not end within {DAEMON_EXIT_SECONDS} s: killed")
            self.process.kill()
            self.process.wait()
        self.repeat_warnings()
        if self.process.returncode not in (0, -signal.SIGTERM if terminated else 0):  # (before its handler was in)
            say(f"the daemon exited with status {self.process.returncode}")

    def unmounted(self) -> bool:
        """Unmount DIR; True if that ends the daemon's session (it then exits)."""
        try:
            linux.unmount(self.directory)
            return True
        except OSError as error:
            if error.errno == errno.EINVAL:  # COMMAND unmounted it itself
                return True
            if error.errno != errno.EBUSY:
                say(f"cannot unmount {shown(self.directory)}: {error.strerror}")
                return False
        say(f"{shown(self.directory)} is still in use (by what COMMAND left running): detached")
        try:
            linux.unmount(self.directory, detach=True)
        except OSError as error:
            say(f"cannot detach {shown(self.directory)}: {error.strerror}")
        return False

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def repeat_warnings(self) -> None:
        """The daemon's records at WARNING or worse (with their tracebacks), on stderr."""
        text = self.log_text()
        bounds = [*(match.start() for match in RECORD.finditer(text)), len(text)]
        for start, end in itertools.pairwise(bounds):
            record = text[start:end]
            if record.split(" ", 2)[1] not in ("DEBUG", "INFO"):
                sys.stderr.write(record if record.endswith("\n") else record + "\n")


def run_command(command: list[str], cwd: str, env: dict[str, str], forwarder: Forwarder) -> int | None:
    """COMMAND's exit status as a shell gives it; None if a signal came before it started."""
    if forwarder.pending is not None:
        return None
    try:
        child = subprocess.Popen(command, cwd=cwd, env=env)
    except OSError as error:
        if error.filename == cwd:
            say(f"cannot enter {shown(cwd)}: {error.strerror}")
            return 126
        if isinstance(error, FileNotFoundError):
            say(f"{shown(command[0])}: command not found")
            return 127
        say(f"{shown(command[0])}: {error.strerror}")
        return 126
    forwarder.started(child)
    code = child.wait()
    return 128 - code if code < 0 else code


# --- after COMMAND ------------------------------------------------------------------
def summarize(directory: str) -> None:
    """How many paths COMMAND added, deleted and changed, and the first few."""
    try:
        changes = control.call(directory, {"op": "diff"})["changes"]
    except UsageError as error:
        say(f"no summary: {error}")
        return
    if not changes:
        say(f"no changes in {shown(directory)}")
        return
    counts = {kind: sum(1 for change in changes if change[0] == kind) for kind in ("A", "D", "M")}
    say(
        f"{len(changes)} change{'s' if len(changes) != 1 else ''} in {shown(directory)}: "
        f"{counts['A']} added, {counts['D']} deleted, {counts['M']} changed"
    )
    lines = [f"  {kind} {quote_path(os.fsencode(path))}" for kind, path in changes[:SUMMARY_LINES]]
    if len(changes) > SUMMARY_LINES:
        lines.append(f"  ... and {len(changes) - SUMMARY_LINES} more")
    print("\n".join(lines), file=sys.stderr, flush=True)


def export(directory: str, keep: str, keep_fd: int) -> bool:
    """Write the changes into UPPERDIR; False (said) if that failed."""
    try:
        report = control.call(directory, {"op": "export"}, fds=[keep_fd])
    except UsageError as error:
        say(f"the changes were not kept: {error}")
        return False
    say(f"changes kept in {shown(keep)} (an overlayfs upper directory over {shown(directory)})")
    if report.get("owners_not_kept") or report.get("xattrs_not_kept"):
        say(f"not kept there: {report['owners_not_kept']} owners, {report['xattrs_not_kept']} xattrs (not root)")
    return True

