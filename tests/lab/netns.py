"""posttls-finger against the lab, inside a private network+mount+pid namespace (dane.md §3.5).

glibc's resolver has no port setting and posttls-finger's TLSA name follows the port it connects to,
so Postfix can only see the lab on the real ports 53 and 25. Inside `unshare --net --mount --pid
--fork --mount-proc` those ports are private, /etc/resolv.conf is bind-mounted only for the
namespace, and nothing outlives the run (the runner is PID 1 there).

    python -m tests.lab.netns WORKDIR        # from the repository root, as root

writes WORKDIR/result.json: per domain our Diagnosis and posttls-finger's view of the domain and of
each MX host.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.lab.lab import Lab, LabError, missing_tools, which
from tests.lab.topology import SCENARIO_DOMAINS

REPO_ROOT = Path(__file__).resolve().parents[2]

MAIN_CF = """\
compatibility_level = 3.6
smtp_dns_support_level = dnssec
smtp_host_lookup = dns
dnssec_probe = ns:test
smtp_tls_fingerprint_digest = sha256
"""


def unavailable_reason() -> str | None:
    """Why the namespace run cannot happen here, or None."""
    if os.geteuid() != 0:
        return "needs root for unshare --net --mount"
    for tool in ("unshare", "posttls-finger", "ip", "mount"):
        if which(tool) is None:
            return f"{tool} is not installed"
    missing = missing_tools()
    if missing:
        return f"lab tools missing: {', '.join(missing)}"
    probe = subprocess.run(
        [which("unshare") or "unshare", "--net", "--mount", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"unshare does not work here: {probe.stderr.strip()}"
    return None


def run_in_namespace(workdir: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Run this module inside a fresh namespace and return its result."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        which("unshare") or "unshare",
        "--net",
        "--mount",
        "--pid",
        "--fork",
        "--mount-proc",
        sys.executable,
        "-m",
        "tests.lab.netns",
        str(workdir),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    output = workdir / "result.json"
    if result.returncode != 0 or not output.exists():
        raise LabError(f"namespace run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(output.read_text())
    return data


def _enter_private_network(workdir: Path) -> None:
    subprocess.run([which("ip") or "ip", "link", "set", "lo", "up"], check=True)
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    # unshare(1) makes the new mount namespace private, so this is invisible to the host.
    subprocess.run([which("mount") or "mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)


def _finger(target: str, mail_config: Path, level: str = "dane", match: tuple[str, ...] = ()) -> str:
    command = [which("posttls-finger") or "posttls-finger", "-v", "-t", "5", "-T", "5", "-l", level, target, *match]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "MAIL_CONFIG": str(mail_config)},
    )
    return result.stdout + result.stderr


_TLS_LINE = re.compile(r"(Verified|Trusted|Untrusted|Anonymous) TLS connection established")
_PKEY = re.compile(r"pkey_fingerprint=([0-9A-F:]+)")
_TLSA_FOUND = re.compile(r"dns_query: _25\._tcp\.\S+ \(TLSA\): OK")


def parse_finger(text: str) -> dict[str, Any]:
    """Would Postfix (level dane) deliver to the first host posttls-finger reached?"""
    lines = [line.removeprefix("posttls-finger: ") for line in text.splitlines()]
    body = "\n".join(lines)
    tls = _TLS_LINE.search(body)
    pkey = _PKEY.search(body)
    result: dict[str, Any] = {
        "tls": tls.group(1) if tls else None,
        "pkey_fingerprint": pkey.group(1) if pkey else None,
        "starttls_offered": "< 250-STARTTLS" in body or "< 250 STARTTLS" in body,
    }
    if "Destination address lookup failed" in body:
        return {**result, "delivers": False, "reason": "address lookup failed"}
    if "TLSA lookup error" in body:
        return {**result, "delivers": False, "reason": "TLSA lookup error"}
    if "server certificate verification failed" in body:
        return {**result, "delivers": False, "reason": "server certificate not verified"}
    # Usable TLSA records make authentication mandatory: an "Untrusted" session (e.g. "CA certificate
    # verification failed … certificate has expired" for a DANE-TA anchor) is one Postfix defers.
    dane_level = bool(_TLSA_FOUND.search(body)) and not any(
        fallback in body for fallback in ('resorting to "secure"', "all TLSA records unusable")
    )
    if tls and dane_level and tls.group(1) not in ("Verified", "Trusted"):
        return {**result, "delivers": False, "reason": "server certificate not verified"}
    if tls:
        return {**result, "delivers": True, "reason": f"{tls.group(1)} TLS"}
    if "Connected to" not in body:
        return {**result, "delivers": False, "reason": "no connection"}
    if not result["starttls_offered"]:
        # No verdict line for this case: TLS is mandatory when TLSA records were found (dane or encrypt).
        required = bool(_TLSA_FOUND.search(body))
        reason = "TLS is required, but was not offered" if required else "plaintext (no STARTTLS)"
        return {**result, "delivers": not required, "reason": reason}
    return {**result, "delivers": False, "reason": "TLS session not established"}


def _serves_tls_without_sni(host: Any) -> bool:
    return any((probe := a.override_probe) is not None and probe.chain for a in host.addresses)


def inside(workdir: Path) -> None:
    _enter_private_network(workdir)
    mail_config = workdir / "postfix"
    mail_config.mkdir(exist_ok=True)
    (mail_config / "main.cf").write_text(MAIN_CF)
    lab = Lab.build(workdir / "lab", resolver_port=53, smtp_port=25)
    lab.start()
    try:
        from app.diagnosis import diagnose

        async def diagnose_all() -> list[Any]:
            return await asyncio.gather(*(diagnose(domain, lab.config()) for domain in SCENARIO_DOMAINS))

        diagnoses = asyncio.run(diagnose_all())
        targets = list(SCENARIO_DOMAINS)
        for diagnosis in diagnoses:
            targets.extend(f"[{host.name}]" for host in diagnosis.hosts)
        # The recommended `fingerprint` override, as Postfix applies it (no SNI, no servername=).
        pinned = {
            f"[{host.name}]": tuple(diagnosis.recommended.parameters.removeprefix("match=").split("|"))
            for diagnosis in diagnoses
            if diagnosis.recommended is not None and diagnosis.recommended.policy == "fingerprint"
            for host in diagnosis.hosts
            if _serves_tls_without_sni(host)
        }
        with ThreadPoolExecutor(max_workers=16) as pool:
            outputs = dict(zip(targets, pool.map(lambda t: _finger(t, mail_config), targets), strict=True))
            fingerprinted = dict(
                zip(
                    pinned,
                    pool.map(lambda t: _finger(t, mail_config, "fingerprint", pinned[t]), pinned),
                    strict=True,
                )
            )
        result = {
            diagnosis.domain: {
                "diagnosis": diagnosis.model_dump(mode="json"),
                "postfix": {
                    "domain": {**parse_finger(outputs[diagnosis.domain]), "raw": outputs[diagnosis.domain][-4000:]},
                    "hosts": {host.name: parse_finger(outputs[f"[{host.name}]"]) for host in diagnosis.hosts},
                    "fingerprint": {
                        host.name: parse_finger(fingerprinted[f"[{host.name}]"])
                        for host in diagnosis.hosts
                        if f"[{host.name}]" in fingerprinted
                    },
                },
            }
            for diagnosis in diagnoses
        }
        (workdir / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        lab.stop()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    workdir = Path(sys.argv[1]).resolve()
    if os.getpid() != 1 and shutil.which("unshare"):
        print("run me through run_in_namespace() (unshare ... --pid --fork), not directly", file=sys.stderr)
        return 2
    inside(workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
