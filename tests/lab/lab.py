"""A real DANE lab on loopback (dane.md §3): NSD serving zones signed by ldns-signzone, a validating
Unbound with a private trust anchor for `test.`, and aiosmtpd STARTTLS listeners on 127.0.0.x.

    python -m tests.lab.lab build [--dir DIR] [--resolver-port N] [--smtp-port N] [--auth-port N]
    python -m tests.lab.lab start [--dir DIR]
    python -m tests.lab.lab stop  [--dir DIR]

Ports default to free high ports. Every daemon's PID is recorded in DIR/lab.json and stopped by
that PID (and its own process group), nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.lab import zones
from tests.lab.pki import Issued, issue, write_pem
from tests.lab.topology import DRIP_INTERVAL, SERVERS

if TYPE_CHECKING:
    from app.diagnosis import DiagnosisConfig

REQUIRED_TOOLS = ("nsd", "unbound", "ldns-keygen", "ldns-signzone")
DEFAULT_DIR = Path(__file__).resolve().parent / "run"
DEFAULT_BANNER_DELAY = 0.2
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
_SIGNED_ZONES = ("example.test", "bogus.test", "test")
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Popen objects of daemons this process started, kept so they are reaped and never garbage-collected live."""


class LabError(RuntimeError):
    """The lab could not be built, started or stopped."""


def which(tool: str) -> str | None:
    return shutil.which(tool, path=_SBIN_PATH)


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if which(tool) is None]


@dataclass
class Lab:
    directory: Path
    auth_port: int
    resolver_port: int
    smtp_port: int
    banner_delay: float = DEFAULT_BANNER_DELAY
    plain_resolver_port: int = 0
    """A second Unbound like mailcow's: validating, but without `ede: yes` (no Extended DNS Errors)."""
    ipv6: bool = False
    """Also start the IPv6 listeners; their addresses must exist (tests/lab/netns.py adds them to `lo`)."""
    servers: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per server key: host, address and the digests of the leaf it serves."""
    pids: dict[str, int] = field(default_factory=dict)
    start_times: dict[str, int] = field(default_factory=dict)
    """Kernel start time of each PID, so a recycled PID is never mistaken for ours."""

    # -- what tests use -------------------------------------------------------------------

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.resolver_port}"

    @property
    def resolver_without_ede(self) -> str:
        """Unbound configured as mailcow's: it validates, but sends no Extended DNS Errors."""
        return f"127.0.0.1:{self.plain_resolver_port}"

    def config(self, **overrides: Any) -> DiagnosisConfig:
        from app.diagnosis import DiagnosisConfig

        settings: dict[str, Any] = {
            "resolver": self.resolver,
            "smtp_port": self.smtp_port,
            "allow_reserved": True,
            "selftest_name": "test.",
            "timeout": 3.0,
        }
        settings.update(overrides)
        return DiagnosisConfig(**settings)

    def server(self, key: str) -> dict[str, str]:
        return self.servers[key]

    # -- build ----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        directory: Path | str,
        *,
        auth_port: int | None = None,
        resolver_port: int | None = None,
        smtp_port: int | None = None,
        banner_delay: float = DEFAULT_BANNER_DELAY,
        ipv6: bool = False,
    ) -> Lab:
        """Fresh certificates, keys, signed zones and daemon configs in `directory`."""
        missing = missing_tools()
        if missing:
            raise LabError(f"missing tools: {', '.join(missing)} (see tests/lab/README.md)")
        directory = Path(directory).resolve()
        existing = directory / "lab.json"
        if existing.exists() and cls.load(directory).running():
            raise LabError(f"a lab is running from {directory}; stop it first")
        for sub in ("certs", "keys", "zones", "run"):
            shutil.rmtree(directory / sub, ignore_errors=True)
            (directory / sub).mkdir(parents=True)
        used: set[int] = set()
        auth_port = auth_port or _free_port(["127.0.0.1"], udp=True, avoid=used)
        used.add(auth_port)
        resolver_port = resolver_port or _free_port(["127.0.0.1"], udp=True, avoid=used)
        used.add(resolver_port)
        plain_resolver_port = _free_port(["127.0.0.1"], udp=True, avoid=used)
        used.add(plain_resolver_port)
        smtp_port = smtp_port or _free_port([s.address for s in SERVERS if not s.ipv6], udp=False, avoid=used)
        lab = cls(directory, auth_port, resolver_port, smtp_port, banner_delay, plain_resolver_port, ipv6)
        certs, extra = lab._make_certificates()
        lab._make_zones(certs, extra)
        lab._write_configs()
        lab.save()
        return lab

    def _make_certificates(self) -> tuple[dict[str, Issued], dict[str, Issued]]:
        now = datetime.now(UTC)
        ca = issue("tlsoverride lab CA", ca=True, not_after=now + timedelta(days=365))
        expired_ca = issue(
            "tlsoverride lab old CA", ca=True, not_before=now - timedelta(days=400), not_after=now - timedelta(days=10)
        )
        extra = {
            "ca": ca,
            "ca-expired": expired_ca,
            "mx1-next": issue("mx1.example.test"),
            "mx2-old": issue("mx2.example.test"),
            "mx12-old": issue("mx12.example.test"),
        }
        certs: dict[str, Issued] = {}
        cert_dir = self.directory / "certs"
        for server in SERVERS:
            chain: list[Issued] = []
            if server.cert == "ca":
                leaf = issue(server.host, issuer=ca)
                chain = [ca]
            elif server.cert == "ca-expired":
                leaf = issue(server.host, issuer=expired_ca)
                chain = [expired_ca]
            elif server.cert == "ca-wrongname":
                leaf = issue("other.invalid", issuer=ca)
                chain = [ca]
            elif server.cert == "expired":
                leaf = issue(
                    server.host, not_before=datetime(2020, 1, 1, tzinfo=UTC), not_after=datetime(2021, 1, 1, tzinfo=UTC)
                )
            elif server.cert == "reissued":
                previous = issue(server.host, not_before=now - timedelta(days=100), not_after=now - timedelta(days=10))
                extra[f"{server.key}-old"] = previous
                leaf = issue(server.host, key=previous.key)
            else:
                leaf = issue(server.host, san=[server.host, *server.extra_names])
            certs[server.key] = leaf
            write_pem(cert_dir, server.key, leaf, chain)
            self.servers[server.key] = {
                "host": server.host,
                "address": server.address,
                "pkey_fingerprint": leaf.pkey_fingerprint,
                "tlsa_3_1_1": leaf.spki_sha256,
                "tlsa_3_0_1": leaf.cert_sha256,
            }
            if server.sni_only:
                default = issue("mail.hosting.invalid")
                write_pem(cert_dir, f"{server.key}-default", default)
                self.servers[server.key]["default_pkey_fingerprint"] = default.pkey_fingerprint
        return certs, extra

    def _make_zones(self, certs: dict[str, Issued], extra: dict[str, Issued]) -> None:
        zone_dir = self.directory / "zones"
        sources = {
            "example.test": zones.example_zone(certs, extra),
            "bogus.test": zones.bogus_zone(certs),
            "unsigned.test": zones.unsigned_zone(certs),
        }
        ds: dict[str, list[str]] = {}
        for zone in ("example.test", "bogus.test"):
            dates = ["-i", zones.BOGUS_INCEPTION, "-e", zones.BOGUS_EXPIRATION] if zone == "bogus.test" else []
            ds[zone] = self._sign(zone, sources[zone], dates)
        (zone_dir / "unsigned.test.zone").write_text(sources["unsigned.test"])
        signed = zone_dir / "example.test.zone.signed"
        signed.write_text(zones.corrupt_signed_zone(signed.read_text()))
        anchor = self._sign("test", zones.root_zone(ds), [])
        (self.directory / "run" / "test.ds").write_text("".join(f"test. IN DS {line}\n" for line in anchor))

    def _sign(self, zone: str, text: str, extra_args: list[str]) -> list[str]:
        """Sign with a fresh ECDSAP256 key (flags 257, NSEC3); returns the DS rdata for the parent."""
        keys = self.directory / "keys"
        source = self.directory / "zones" / f"{zone}.zone"
        source.write_text(text)
        base = _run([which("ldns-keygen") or "ldns-keygen", "-a", "ECDSAP256SHA256", "-k", zone], cwd=keys).strip()
        _run(
            [
                which("ldns-signzone") or "ldns-signzone",
                "-n",
                *extra_args,
                "-o",
                zone,
                "-f",
                str(source) + ".signed",
                str(source),
                str(keys / base),
            ],
            cwd=keys,
        )
        ds_lines = (keys / f"{base}.ds").read_text().splitlines()
        return [line.split("DS", 1)[1].strip() for line in ds_lines if "\tDS\t" in line or " DS " in line]

    def _write_configs(self) -> None:
        run = self.directory / "run"
        zone_dir = self.directory / "zones"
        nsd_zones = (
            "".join(
                f'zone:\n    name: "{zone}."\n    zonefile: "{zone_dir / (zone + ".zone.signed")}"\n'
                for zone in _SIGNED_ZONES
            )
            + f'zone:\n    name: "unsigned.test."\n    zonefile: "{zone_dir / "unsigned.test.zone"}"\n'
        )
        (run / "nsd.conf").write_text(
            f"""server:
    ip-address: 127.0.0.1@{self.auth_port}
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{zone_dir}"
    database: ""
    pidfile: "{run / "nsd.pid"}"
    logfile: "{run / "nsd.log"}"
    xfrdfile: "{run / "xfrd.state"}"
    xfrdir: "{run}"
    zonelistfile: "{run / "zone.list"}"
    server-count: 1
    verbosity: 1
    hide-version: yes
remote-control:
    control-enable: no
{nsd_zones}"""
        )
        stubs = "".join(
            f'stub-zone:\n    name: "{zone}."\n    stub-addr: 127.0.0.1@{self.auth_port}\n'
            for zone in ("test", "example.test", "unsigned.test", "bogus.test", "lame.lab")
        )
        (run / "unbound-extra.conf").touch()
        (run / "unbound.conf").write_text(self._unbound_conf("unbound", self.resolver_port, ede=True, stubs=stubs))
        (run / "unbound-plain.conf").write_text(
            self._unbound_conf("unbound-plain", self.plain_resolver_port, ede=False, stubs=stubs)
        )
        listeners = [
            {
                "address": s.address,
                "host": s.host,
                "cert": str(self.directory / "certs" / f"{s.key}.pem"),
                "key": str(self.directory / "certs" / f"{s.key}.key"),
                "starttls": s.starttls,
                "banner_delay": self.banner_delay if s.slow else 0.0,
                "drip_interval": DRIP_INTERVAL if s.drip else 0.0,
                "legacy": s.legacy,
                **(
                    {
                        "default_cert": str(self.directory / "certs" / f"{s.key}-default.pem"),
                        "default_key": str(self.directory / "certs" / f"{s.key}-default.key"),
                    }
                    if s.sni_only
                    else {}
                ),
            }
            for s in SERVERS
            if self.ipv6 or not s.ipv6
        ]
        (run / "smtp.json").write_text(json.dumps({"port": self.smtp_port, "listeners": listeners}, indent=1))

    def _unbound_conf(self, name: str, port: int, *, ede: bool, stubs: str) -> str:
        run = self.directory / "run"
        return f"""server:
    interface: 127.0.0.1@{port}
    port: {port}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{run}"
    pidfile: "{run / (name + ".pid")}"
    logfile: "{run / (name + ".log")}"
    use-syslog: no
    verbosity: 1
    val-log-level: 2
    ede: {"yes" if ede else "no"}
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    trust-anchor-file: "{run / "test.ds"}"
    local-zone: "test." nodefault
    cache-max-ttl: 5
    cache-max-negative-ttl: 5
    qname-minimisation: no
    prefetch: no
    serve-expired: no
    include: "{run / "unbound-extra.conf"}"
remote-control:
    control-enable: no
{stubs}"""

    # -- state ----------------------------------------------------------------------------

    def save(self) -> None:
        data = asdict(self)
        data["directory"] = str(self.directory)
        (self.directory / "lab.json").write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, directory: Path | str) -> Lab:
        path = Path(directory).resolve() / "lab.json"
        if not path.exists():
            raise LabError(f"no lab built in {path.parent}; run `python -m tests.lab.lab build` first")
        data = json.loads(path.read_text())
        data["directory"] = Path(data["directory"])
        return cls(**data)

    def running(self) -> bool:
        return any(self._alive(name) for name in self.pids)

    def _alive(self, name: str) -> bool:
        pid = self.pids.get(name)
        return pid is not None and _start_time(pid) == self.start_times.get(name)

    # -- start / stop ---------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Start NSD, Unbound and the SMTP listeners; return once all of them answer."""
        if self.running():
            raise LabError(f"the lab in {self.directory} is already running")
        run = self.directory / "run"
        (run / "ready").unlink(missing_ok=True)
        commands = {
            "nsd": [which("nsd") or "nsd", "-d", "-c", str(run / "nsd.conf")],
            "unbound": [which("unbound") or "unbound", "-d", "-c", str(run / "unbound.conf")],
            "unbound-plain": [which("unbound") or "unbound", "-d", "-c", str(run / "unbound-plain.conf")],
            "smtp": [sys.executable, str(Path(__file__).with_name("smtp_lab.py")), str(run / "smtp.json")],
        }
        self.pids, self.start_times = {}, {}
        try:
            for name, command in commands.items():
                with open(run / f"{name}.out", "wb") as out:
                    process = subprocess.Popen(
                        command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
                    )
                self.pids[name] = process.pid
                self.start_times[name] = _start_time(process.pid) or -1
                _CHILDREN[process.pid] = process
            self.save()
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {"nsd", "unbound", "unbound-plain", "smtp"}
        while pending:
            for name in list(pending):
                if not self._alive(name):
                    raise LabError(f"{name} exited during start-up:\n{self._log_tail(name)}")
            if "nsd" in pending and _dns_answers(self.auth_port, "test.", need_ad=False):
                pending.discard("nsd")
            for name, port in (("unbound", self.resolver_port), ("unbound-plain", self.plain_resolver_port)):
                if name in pending and "nsd" not in pending and _dns_answers(port, "example.test."):
                    pending.discard(name)
            if "smtp" in pending and (self.directory / "run" / "ready").exists():
                pending.discard("smtp")
            if not pending:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n{self._log_tail(n)}" for n in sorted(pending))
                raise LabError(f"lab not ready after {timeout:g} s: {', '.join(sorted(pending))}\n{tails}")
            time.sleep(0.05)

    def _log_tail(self, name: str) -> str:
        parts = []
        for suffix in (".out", ".log"):
            path = self.directory / "run" / f"{name}{suffix}"
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM each recorded PID (checked to be ours), then SIGKILL its process group if needed."""
        for name, pid in self.pids.items():
            if not self._alive(name):
                _reap(pid)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while (self._alive(name) or _group_alive(pid)) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.02)
            if self._alive(name) or _group_alive(pid):
                # Started with start_new_session, so the group is the daemon and its own children.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        self.pids, self.start_times = {}, {}
        if (self.directory / "lab.json").exists():
            self.save()


def _run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; None otherwise."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[-1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _group_alive(pgid: int) -> bool:
    """Is any live process left in the group (NSD's children)? The group is ours: start_new_session."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _free_port(addresses: list[str], *, udp: bool, avoid: set[int]) -> int:
    """A high port that is free (TCP, and UDP when asked) on every address."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, 32000)
        if port in avoid:
            continue
        if all(_bindable(addr, port, socket.SOCK_STREAM) for addr in addresses) and (
            not udp or all(_bindable(addr, port, socket.SOCK_DGRAM) for addr in addresses)
        ):
            return port
    raise LabError("no free port found")


def _bindable(address: str, port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _dns_answers(port: int, name: str, *, need_ad: bool = True) -> bool:
    import dns.exception
    import dns.flags
    import dns.message
    import dns.query
    import dns.rcode

    query = dns.message.make_query(name, "SOA", want_dnssec=True)
    query.flags |= dns.flags.AD
    try:
        response = dns.query.udp(query, "127.0.0.1", timeout=0.5, port=port)
    except (dns.exception.DNSException, OSError):
        return False
    if response.rcode() != dns.rcode.NOERROR:
        return False
    return bool(response.flags & dns.flags.AD) or not need_ad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--auth-port", type=int)
    parser.add_argument("--resolver-port", type=int)
    parser.add_argument("--smtp-port", type=int)
    parser.add_argument("--banner-delay", type=float, default=DEFAULT_BANNER_DELAY)
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            started = time.monotonic()
            lab = Lab.build(
                args.dir,
                auth_port=args.auth_port,
                resolver_port=args.resolver_port,
                smtp_port=args.smtp_port,
                banner_delay=args.banner_delay,
            )
            print(f"built in {time.monotonic() - started:.2f} s: {lab.directory}")
        else:
            lab = Lab.load(args.dir)
            if args.action == "start":
                started = time.monotonic()
                lab.start()
                print(f"started in {time.monotonic() - started:.2f} s; pids {lab.pids}")
            elif args.action == "stop":
                lab.stop()
                print("stopped")
            else:
                print("running" if lab.running() else "stopped")
        print(f"resolver {lab.resolver}  authority 127.0.0.1:{lab.auth_port}  smtp port {lab.smtp_port}")
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
