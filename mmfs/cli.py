"""The ``mmfs`` command: parse, check, daemonize once the mount is live.

Without ``-f`` the command forks before mounting; the parent waits on a pipe
and exits 0 only when the child reports the mount live, or prints the child's
one-line error and exits 1.  User errors are one line, never a traceback.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from .mount import check_mountpoint, serve
from .options import HelpRequested, MountConfig, UsageError, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        check_mountpoint(config.mountpoint)
    except HelpRequested as usage:
        print(usage)
        return 0
    except UsageError as error:
        print(f"mmfs: {error}", file=sys.stderr)
        return 1
    if config.foreground:
        return run_foreground(config)
    return run_background(config)


def setup_logging(config: MountConfig, to_syslog: bool) -> None:
    handler: logging.Handler
    if to_syslog and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("mmfs[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    elif to_syslog:
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mmfs %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if config.debug else logging.INFO, handlers=[handler])


def run_foreground(config: MountConfig) -> int:
    setup_logging(config, to_syslog=False)
    try:
        serve(config, ready=lambda: None)
    except (UsageError, RuntimeError, OSError) as error:
        print(f"mmfs: {error}", file=sys.stderr)
        return 1
    return 0


def run_background(config: MountConfig) -> int:
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
    setup_logging(config, to_syslog=True)

    def ready() -> None:
        os.write(write_end, b"ok")
        os.close(write_end)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)

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
