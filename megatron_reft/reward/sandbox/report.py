"""The one start-up log line: which isolation mechanisms are in force, from a worker's probe
report (see worker.py's ready message), and which are missing."""


def describe_isolation(report: dict) -> tuple[str, list[str]]:
    """One log line saying which mechanisms are in force, and the list of missing ones."""
    steps, checks = report.get("steps", {}), report.get("checks", {})
    in_force, missing = [], []

    def ok(step):
        return str(steps.get(step, "")).startswith("ok")

    if report.get("sandbox_uid") is not None and ok("drop_user"):
        in_force.append(f"uid {report['sandbox_uid']}")
    elif report.get("euid") == 0 and "user" not in report.get("namespaces", []):
        missing.append("privilege drop")
    namespaces = report.get("namespaces", [])
    in_force.append("namespaces " + ("+".join(namespaces) if namespaces else "none"))
    for ns in ("pid", "net"):
        if ns not in namespaces:
            missing.append(f"{ns} namespace")
    if report.get("seccomp_denied") and ok("seccomp"):
        in_force.append(f"seccomp ({report['seccomp_denied']} syscalls denied, writes and "
                        "acting on other processes refused)")
    else:
        missing.append("seccomp")
    if report.get("landlock_abi") and ok("landlock"):
        in_force.append(f"landlock ABI {report['landlock_abi']}")
    else:
        missing.append("landlock")
    if ok("rlimits"):
        in_force.append("rlimits (cpu, as, nproc=0, fsize=0, nofile)")
    else:
        missing.append("rlimits")
    network = []
    if "net" in namespaces:
        network.append("empty net namespace")
    if str(checks.get("socket", "")).startswith("denied"):
        network.append("socket() denied")
    in_force.append("network: " + (" + ".join(network) if network else "OPEN"))
    for check in ("fork", "socket", "write_tmp", "signal_parent", "limit_parent"):
        if checks.get(check) == "ALLOWED":
            missing.append(f"{check} still allowed")
    if report.get("fast_path_budget_s"):
        in_force.append("statically pure programs share a jailed executor, others fork")
    summary = "sandbox isolation: " + "; ".join(in_force)
    if missing:
        summary += "; MISSING: " + ", ".join(missing)
    return summary, missing
