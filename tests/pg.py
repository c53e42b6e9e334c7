"""A real PostgreSQL server (13 or newer) for the test session, as the ``postgres`` user."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _bin() -> Path:
    """Debian's server binaries: the newest version installed (13 or newer), else 15's place."""
    found = sorted((int(path.parent.parent.name), path.parent)
                   for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
                   if path.parent.parent.name.isdigit() and int(path.parent.parent.name) >= 13)
    return found[-1][1] if found else Path("/usr/lib/postgresql/15/bin")


BIN = _bin()
ROLE = "sidecar"


@dataclass(frozen=True)
class Server:
    """A running server: where it listens and the password-authenticated role tests use."""

    host: str
    port: int
    role: str
    password: str
    folder: Path | None = None  # its data directory's parent, for stop() and start()

    def url(self, database: str, *, password: str | None = None, port: int | None = None) -> str:
        """Return a postgresql:// URL for ``database`` (a wrong password or port on request)."""
        secret = self.password if password is None else password
        return (f"postgresql://{self.role}:{secret}@{self.host}:{port or self.port}"
                f"/{database}")


    def stop(self) -> None:
        """Stop the server at once (as a crash would), keeping its data."""
        assert self.folder is not None
        _as_postgres("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")

    def start(self) -> None:
        """Start the stopped server again on the same port."""
        assert self.folder is not None
        _start(self.folder, self.port)


def _start(folder: Path, port: int) -> None:
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' "
               "-c fsync=off -c max_connections=200")
    started = _as_postgres("pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "log"), "-w",
                           "-t", "30", "-o", options, "start", check=False)
    if started.returncode != 0:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{log}")


def _as_postgres(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a server binary as the postgres user (initdb refuses to run as root)."""
    command = [str(BIN / args[0]), *args[1:]]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgresql() -> Iterator[Server]:
    """Run a fresh server in a temporary directory; stop it and remove the directory after."""
    missing = [name for name in ("initdb", "pg_ctl", "postgres") if not (BIN / name).exists()]
    if missing:
        # Not a skip: the suite is meant to run these (CI installs the package).
        raise RuntimeError(f"PostgreSQL 15 is not installed ({', '.join(missing)} missing in "
                           f"{BIN}): apt-get install -y postgresql")
    folder = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
    try:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        data = folder / "data"
        password = secrets.token_urlsafe(18)
        pwfile = folder / "pw"
        pwfile.write_text(password)
        if os.geteuid() == 0:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        pwfile.chmod(0o600)
        # The superuser is the password-authenticated role: scram over TCP, nothing else.
        _as_postgres("initdb", "-D", str(data), "-U", ROLE, f"--pwfile={pwfile}",
                     "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        port = _free_port()
        try:
            _start(folder, port)
            yield Server("127.0.0.1", port, ROLE, password, folder)
        finally:
            _as_postgres("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop",
                         check=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
