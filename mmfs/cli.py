"""The ``mmfs`` command: parse, check, daemonize once the mount is live.

Without ``-f`` the command forks before mounting; the parent waits on a pipe
and exits 0 only when the child reports the mount live, or prints the child's
one-line error and exits 1.  User errors are one line, never a traceback.

Where the daemon's messages go (``logging_target``): stderr in the
foreground; in the background the file of ``-o log=``, else syslog, else a
fallback file (manual.ROOT_LOG / manual.USER_LOG).  The daemon's stderr, where
faulthandler and libfuse write, is pointed at the same place.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import socket
import subprocess
import sys

from . import commands
from .options import HelpRequested, MountConfig, UsageError, parse_args, shown

FILE_FORMAT = "%(asctime)s mmfs[%(process)d] %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "mmfs[%(process)d]: %(levelname)s %(name)s: %(message)s"
STDERR_FORMAT = "mmfs %(levelname)s %(name)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"
REMOUNT_FAILED = 32  # mount(8)'s status when a mount or remount is refused, as for tmpfs (remount.FAILED)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in commands.VERBS:
        return commands.main(args[0], args[1:])
    if args and args[0] == "run":
        from . import run

        return run.main(args[1:])
    try:
        config = parse_args(args)
        if config.remount:
            from . import remount

            return remount.remount(config)
        # Imported here, not above: the verbs and remounts start fast without pyfuse3 and trio.
        from .mount import check_mountpoint

        config.mountpoint = os.path.abspath(config.mountpoint)  # the daemon runs in "/"
        if config.lowerdir is not None:
            config.lowerdir = os.path.abspath(config.lowerdir)
        check_mountpoint(config.mountpoint)
        log_file = open_log(config)
    except HelpRequested as text:
        return print_text(str(text))
    except UsageError as error:
        print(f"mmfs: {error}", file=sys.stderr)
        return REMOUNT_FAILED if "remount" in ",".join(args).split(",") else 1
    if config.foreground:
        return run_foreground(config, log_file)
    return run_background(config, log_file)


def print_text(text: str) -> int:
    """Print help or version; a reader that closed the pipe (``| head -1``) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def fallback_log() -> str:
    """The documented log file of a daemon in the background without syslog."""
    if os.geteuid() == 0:
        return "/var/log/mmfs.log"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "mmfs", "mmfs.log")


def syslog_available() -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(SYSLOG_SOCKET)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def log_destination(config: MountConfig) -> str:
    """"stderr", "syslog" or the path of the daemon's log file."""
    if config.log == "-" or config.log is None and not config.foreground and syslog_available():
        return "syslog"
    if config.log is None:
        return "stderr" if config.foreground else fallback_log()
    return config.log


def open_log(config: MountConfig) -> int | None:
    """The descriptor of the daemon's log file, opened now so that a bad path is
    a one-line error before mounting; None for stderr or syslog."""
    path = log_destination(config)
    if path in ("stderr", "syslog"):
        return None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise UsageError(f"cannot open log file {shown(path)}: {error.strerror}") from None


def setup_logging(config: MountConfig, log_file: int | None) -> None:
    """Log to ``log_file``, else to stderr or syslog as ``log_destination`` says."""
    handler: logging.Handler
    if log_file is not None:
        handler = logging.StreamHandler(os.fdopen(os.dup(log_file), "a", buffering=1, errors="replace"))
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
    elif log_destination(config) == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    else:
        handler = logging.handlers.SysLogHandler(SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    logging.basicConfig(level=logging.DEBUG if config.debug else logging.INFO, handlers=[handler], force=True)


def stderr_target(log_file: int | None) -> int:
    """A descriptor for the daemon's stderr that reaches its log: the log file, or
    a pipe into logger(1) when logging to syslog (crash dumps can't use a socket)."""
    if log_file is not None:
        return log_file
    logger = shutil.which("logger")
    if logger is None:
        return os.open(os.devnull, os.O_WRONLY)
    command = [logger, "-u", SYSLOG_SOCKET, f"--id={os.getpid()}", "-t", "mmfs", "-p", "daemon.err"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert process.stdin is not None
    return process.stdin.fileno()


def run_foreground(config: MountConfig, log_file: int | None) -> int:
    from .mount import serve

    setup_logging(config, log_file)
    if log_file is not None:
        os.dup2(log_file, 2)
    try:
        serve(config, ready=lambda: None)
    except (UsageError, RuntimeError, OSError) as error:
        print(f"mmfs: {error}", file=sys.stderr)
        return 1
    return 0


def run_background(config: MountConfig, log_file: int | None) -> int:
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message == "ok":
            return 0
        print(f"mmfs: {message or 'the daemon exited before the mount was ready'}", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    setup_logging(config, log_file)
    from .mount import serve


    def ready() -> None:
        os.write(write_end, b"ok")
        os.close(write_end)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(stderr_target(log_file), 2)

    code = 0
    try:
        serve(config, ready)
    except (UsageError, RuntimeError, OSError) as error:
        try:
            os.write(write_end, str(error).encode())
        except OSError:
            logging.getLogger(__name__).error("daemon failed: %s", error)
        code = 1
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
