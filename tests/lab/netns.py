"""posttls-finger against the lab, inside a private network+mount+pid namespace (dane.md §3.5).

glibc's resolver has no port setting and posttls-finger's TLSA name follows the port it connects to,
so Postfix can only see the lab on the real ports 53 and 25. Inside `unshare --net --mount --pid
--fork --mount-proc` those ports are private, /etc/resolv.conf is bind-mounted only for the
namespace, and nothing outlives the run (the runner is PID 1 there).

    python -m tests.lab.netns WORKDIR        # from the repository root, as root

writes WORKDIR/result.json: per domain our Diagnosis and posttls-finger's view of the domain, of each
MX host (per address family when it has both), and of each override the diagnosis recommends or
OVERRIDE_CHECKS lists. The lab's IPv6 MX addresses exist only inside this namespace.
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

from app.diagnosis.policy import MAILCOW_PROTOCOLS
from tests.lab.lab import Lab, LabError, missing_tools, which
from tests.lab.topology import IPV6_DOMAINS, OVERRIDE_CHECKS, SCENARIO_DOMAINS, SERVERS

REPO_ROOT = Path(__file__).resolve().parents[2]

MAIN_CF = """\
compatibility_level = 3.6
smtp_dns_support_level = dnssec
smtp_host_lookup = dns
dnssec_probe = ns:test
smtp_tls_fingerprint_digest = sha256
inet_protocols = all
smtp_address_preference = any
"""
"""posttls-finger reads only what it needs from main.cf; protocols and the cipher grade come from its
-p and -g options, which _finger() sets as mailcow's main.cf does (smtp_tls_mandatory_protocols =
>=TLSv1.2; smtp_tls_mandatory_ciphers left at medium). posttls-finger's own -p default is >=TLSv1."""

MAILCOW_GRADE = "medium"
FAMILIES = ("ipv4", "ipv6")


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
    ip = which("ip") or "ip"
    subprocess.run([ip, "link", "set", "lo", "up"], check=True)
    # The lab's IPv6 MX addresses exist only here, on this namespace's own `lo`.
    for server in SERVERS:
        if server.ipv6:
            subprocess.run([ip, "-6", "addr", "add", f"{server.address}/128", "dev", "lo", "nodad"], check=True)
    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    # unshare(1) makes the new mount namespace private, so this is invisible to the host.
    subprocess.run([which("mount") or "mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)


def _finger(
    target: str,
    mail_config: Path,
    level: str = "dane",
    match: tuple[str, ...] = (),
    protocols: str = MAILCOW_PROTOCOLS,
    grade: str = MAILCOW_GRADE,
    family: str = "any",
) -> str:
    command = [
        which("posttls-finger") or "posttls-finger",
        *("-v", "-t", "5", "-T", "5", "-l", level, "-p", protocols, "-g", grade, "-a", family),
        target,
        *match,
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "MAIL_CONFIG": str(mail_config)},
    )
    return result.stdout + result.stderr


def override_arguments(policy: str, parameters: str) -> dict[str, Any]:
    """A TLS policy-table entry as posttls-finger options: level, -p, -g and the match arguments."""
    arguments: dict[str, Any] = {"level": policy}
    for token in parameters.split():
        name, _, value = token.partition("=")
        if name == "protocols":
            arguments["protocols"] = value
        elif name == "ciphers":
            arguments["grade"] = value
        elif name == "match":
            arguments["match"] = tuple(value.split("|" if policy == "fingerprint" else ":"))
    return arguments


_TLS_LINE = re.compile(
    r"(Verified|Trusted|Untrusted|Anonymous) TLS connection established to (\S+): (\S+) with cipher (\S+)"
)
_PKEY = re.compile(r"pkey_fingerprint=([0-9A-F:]+)")
_TLSA_FOUND = re.compile(r"dns_query: _25\._tcp\.\S+ \(TLSA\): OK")
_LIBRARY_PROBLEM = re.compile(r"TLS library problem: error:[0-9A-F]+:SSL routines::([^:]+)")


def parse_finger(text: str, level: str = "dane") -> dict[str, Any]:
    """Would Postfix deliver, at `level`, to the first address posttls-finger reached?"""
    lines = [line.removeprefix("posttls-finger: ") for line in text.splitlines()]
    body = "\n".join(lines)
    tls = _TLS_LINE.search(body)
    pkey = _PKEY.search(body)
    problem = _LIBRARY_PROBLEM.search(body)
    result: dict[str, Any] = {
        "tls": tls.group(1) if tls else None,
        "address": tls.group(2) if tls else None,
        "tls_version": tls.group(3) if tls else None,
        "cipher": tls.group(4) if tls else None,
        "pkey_fingerprint": pkey.group(1) if pkey else None,
        "starttls_offered": "< 250-STARTTLS" in body or "< 250 STARTTLS" in body,
        "error": problem.group(1) if problem else None,
    }
    if level != "dane":
        # An override level: encrypt needs any TLS session; fingerprint, verify and secure a verified one.
        delivers = tls is not None and (level == "encrypt" or tls.group(1) == "Verified")
        reason = f"{tls.group(1)} TLS" if tls else (result["error"] or "TLS session not established")
        return {**result, "delivers": delivers, "reason": reason}
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


def _families(host: Any) -> list[str]:
    """Address families worth a posttls-finger run of their own: both when the host has both."""
    present = {a.family for a in host.addresses if a.tried}
    return sorted(present) if len(present) > 1 else ["any"]


def _override_options(diagnosis: Any, lab: Lab) -> list[tuple[str, str]]:
    """The diagnosis's recommendations (with their alternatives) and the domain's extra checks."""
    options: list[tuple[str, str]] = []
    for best in (diagnosis.recommended, diagnosis.contingency):
        if best is not None:
            options += [(o.policy, o.parameters) for o in (best, *best.alternatives)]
    for policy, template in OVERRIDE_CHECKS.get(diagnosis.domain, ()):
        parameters = re.sub(r"\{pkey:(\w+)\}", lambda m: lab.server(m.group(1))["pkey_fingerprint"], template)
        options.append((policy, parameters))
    return [o for o in dict.fromkeys(options) if o[0] not in ("may", "none")]  # plaintext needs no TLS check


def inside(workdir: Path) -> None:
    _enter_private_network(workdir)
    mail_config = workdir / "postfix"
    mail_config.mkdir(exist_ok=True)
    (mail_config / "main.cf").write_text(MAIN_CF)
    lab = Lab.build(workdir / "lab", resolver_port=53, smtp_port=25, ipv6=True)
    lab.start()
    domains = (*SCENARIO_DOMAINS, *IPV6_DOMAINS)
    try:
        from app.diagnosis import diagnose

        async def diagnose_all() -> list[Any]:
            return await asyncio.gather(*(diagnose(domain, lab.config()) for domain in domains))

        diagnoses = asyncio.run(diagnose_all())
        # Every posttls-finger run as (key, target, options): the domain and each MX host at mailcow's
        # dane level (per address family when a host has both), then each override on each host.
        jobs: list[tuple[tuple[str, ...], str, dict[str, Any]]] = []
        for diagnosis in diagnoses:
            jobs.append((("domain", diagnosis.domain), diagnosis.domain, {}))
            for host in diagnosis.hosts:
                jobs.append((("host", diagnosis.domain, host.name), f"[{host.name}]", {}))
                for family in _families(host):
                    if family != "any":
                        jobs.append(
                            (("family", diagnosis.domain, host.name, family), f"[{host.name}]", {"family": family})
                        )
            for policy, parameters in _override_options(diagnosis, lab):
                for host in diagnosis.hosts:
                    if not host.tried or not host.addresses:
                        continue
                    for family in _families(host):
                        key = ("override", diagnosis.domain, policy, parameters, host.name, family)
                        jobs.append(
                            (key, f"[{host.name}]", {**override_arguments(policy, parameters), "family": family})
                        )
        with ThreadPoolExecutor(max_workers=16) as pool:
            outputs = list(pool.map(lambda job: _finger(job[1], mail_config, **job[2]), jobs))
        result: dict[str, Any] = {
            d.domain: {
                "diagnosis": d.model_dump(mode="json"),
                "postfix": {"domain": {}, "hosts": {}, "families": {}, "overrides": []},
            }
            for d in diagnoses
        }
        for (kind, domain, *rest), output, (_, _, options) in zip((job[0] for job in jobs), outputs, jobs, strict=True):
            view = result[domain]["postfix"]
            level = options.get("level", "dane")
            parsed = parse_finger(output, level)
            if kind == "domain":
                view["domain"] = {**parsed, "raw": output[-4000:]}
            elif kind == "host":
                view["hosts"][rest[0]] = parsed
            elif kind == "family":
                view["families"].setdefault(rest[0], {})[rest[1]] = parsed
            else:
                policy, parameters, host_name, family = rest
                view["overrides"].append(
                    {"policy": policy, "parameters": parameters, "host": host_name, "family": family, "result": parsed}
                )
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
