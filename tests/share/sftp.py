"""An SFTP server of the test's own: Debian's sshd on a free loopback port, with its own host key, config,
authorized key and pid file, in the foreground (``-D -e``); no system sshd or system file is used.

``SftpServer.rclone_conf`` writes the rclone config a rig would have (``type = sftp``, ``key_file``,
``known_hosts_file``) for a remote named ``lab``; ``kill`` stops the server and every session it forked, as a
destination that goes away does, and ``start`` brings it back on the same port; ``freeze`` stops them answering
(SIGSTOP: a link that went silent), ``thaw`` lets them go on.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself: it needs its absolute path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return path


class SftpServer:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = keygen(folder / "host_key")
        self.client_key = keygen(folder / "client_key")
        (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {(folder / 'host_key.pub').read_text()}")
        self.config = folder / "sshd_config"
        self.config.write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {folder / "sshd.pid"}
AuthorizedKeysFile {folder / "authorized_keys"}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder (Debian creates it at boot)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, "sshd exited at start"
                assert time.monotonic() < deadline, "sshd did not listen"
                time.sleep(0.02)

    def kill(self) -> None:
        """kill -9 the listener and every connection it forked (as a destination that goes away)."""
        if self.proc is None:
            return
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self.proc = None

    def freeze(self, sig: int = signal.SIGSTOP) -> None:
        """SIGSTOP the listener and every connection it forked: connections stay open and say nothing, as over a
        network that drops packets without a reset (``thaw``: SIGCONT)."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def thaw(self) -> None:
        self.freeze(signal.SIGCONT)

    def rclone_conf(self, key: Path | None = None) -> Path:
        conf = self.folder / f"rclone-{(key or self.client_key).name}.conf"
        conf.write_text(f"""[lab]
type = sftp
host = 127.0.0.1
port = {self.port}
user = root
key_file = {key or self.client_key}
known_hosts_file = {self.folder / "known_hosts"}
shell_type = none
""")  # shell_type none: rclone runs no remote shell (root's login shell files are the host's, not the test's)
        return conf


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc/*/task/*/children), children first."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [*descendants(kid), kid]
    return out
