"""An uncredentialed W&B run makes no network call: no DNS lookup, no connection to anything but this machine.

W&B's Python SDK runs in the training process, but its service (wandb-core) and system monitor (wandb-symon) are
Go binaries in child processes, which a Python audit hook cannot see. So the training runs in a subprocess under
`strace -f`, which records the socket calls of that process and of everything it starts (Go calls the kernel
directly, so nothing gets past it). An audit hook in the child also names any host Python resolves or connects to,
for a readable failure and for lookups answered without a socket (/etc/hosts, a cache).

An isolated network namespace (`unshare -rn`) would be the other way: there a lookup fails at once instead of being
seen, so the test could only notice it through W&B logging the failure, which it does not always do (its telemetry
drops failed requests silently).
"""

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys

LOCAL = {None, "", b"", "localhost", b"localhost", "127.0.0.1", b"127.0.0.1", "::1", b"::1"}


def audit(event, args):
    if event == "socket.getaddrinfo" and args[0] not in LOCAL:
        sys.__stderr__.write(f"NETWORK getaddrinfo {args[0]!r} port {args[1]!r}\\n")
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
        sys.__stderr__.write(f"NETWORK connect {args[1]!r}\\n")


sys.addaudithook(audit)

from mlfab.loggers.wandb import WandbLogger
from mlfab.testing import BoringConfig, BoringTask


class WandbTask(BoringTask):
    def set_loggers(self):
        self.add_logger(WandbLogger(self.exp_dir, log_interval_seconds=0.0))


WandbTask.launch(BoringConfig(max_steps=4, valid_every_n_steps=2, run_dir=sys.argv[1]), argv=[])
"""

# An IPv4 or IPv6 socket address as strace prints it: the port, then the address.
ADDRESS = re.compile(
    r"sa_family=AF_INET6?, sin6?_port=htons\((\d+)\).*?(?:inet_addr\(\"([^\"]+)\"\)|inet_pton\(AF_INET6?, \"([^\"]+)\")"
)


def remote_addresses(trace: str) -> list[str]:
    """The strace lines that reach past this machine: an address that is not loopback, or DNS (port 53) anywhere,
    since a machine without a resolv.conf sends its lookups to 127.0.0.1:53."""
    found = []
    for line in trace.splitlines():
        for port, ipv4, ipv6 in ADDRESS.findall(line):
            ip = ipaddress.ip_address(ipv4 or ipv6)
            mapped = getattr(ip, "ipv4_mapped", None)
            if int(port) == 53 or not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
                found.append(line[:300])
    return found


@pytest.mark.unit
@pytest.mark.parametrize(
    "line, remote",
    [
        ('1 connect(6, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.2")}, 16) = 0', True),
        ('1 connect(6, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 0', True),
        ('1 connect(6, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("104.18.1.1")}, 16) = 0', True),
        ('1 connect(6, {sa_family=AF_INET, sin_port=htons(4567), sin_addr=inet_addr("127.0.0.1")}, 16) = 0', False),
        (
            "1 connect(6, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), "
            'inet_pton(AF_INET6, "2606:4700::1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
            True,
        ),
        (
            "1 connect(6, {sa_family=AF_INET6, sin6_port=htons(4567), sin6_flowinfo=htonl(0), "
            'inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
            False,
        ),
        ('1 connect(7, {sa_family=AF_UNIX, sun_path="/tmp/wandb-1/socket"}, 43) = 0', False),
    ],
)
def test_remote_addresses_reads_strace_lines(line: str, remote: bool) -> None:
    assert bool(remote_addresses(line)) == remote


@pytest.mark.slow
def test_uncredentialed_wandb_run_makes_no_network_call(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None or subprocess.run([strace, "-f", "-o", os.devnull, "true"], check=False).returncode != 0:
        pytest.skip("needs a working strace (apt-get install strace; ptrace allowed) to see wandb's Go processes")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}  # No credentials,
    env.update(  # no WANDB_MODE (tests/conftest.py sets it for this process), nothing from the real home.
        HOME=str(home),
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"),
    )
    trace = tmp_path / "strace.txt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    result = subprocess.run(
        [strace, "-f", "-qq", "-s", "256", "-e", "trace=connect,sendto,sendmsg,sendmmsg,execve", "-o", str(trace)]
        + [sys.executable, str(script), str(tmp_path / "runs")],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (exp,) = (tmp_path / "runs" / "wandb_task").iterdir()
    assert list((exp / "wandb").glob("offline-run-*")), "the run was not written offline"
    text = trace.read_text()
    assert re.search(r'execve\("[^"]*/wandb-core"', text), "wandb's service process did not run under strace"

    python_calls = [line for line in result.stderr.splitlines() if line.startswith("NETWORK ")]
    assert (python_calls, remote_addresses(text)) == ([], [])
