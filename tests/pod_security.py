"""The Pod Security Standards' "restricted" profile, as the admission controller checks a pod.

No library checks these offline, so the controls are written out here from the published
profile (baseline + restricted, as of Kubernetes 1.30 and later), each as one rule. A pod
that passes is admitted into a namespace labelled ``pod-security.kubernetes.io/enforce:
restricted``; each violation names the control it breaks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

#: Volume types the restricted profile allows.
RESTRICTED_VOLUMES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
SECCOMP_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def violations(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Every control of the restricted profile that the pod spec (and its annotations) breaks."""
    found: list[str] = []
    pod_ctx = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"host namespaces: {key}")
    if (pod_ctx.get("windowsOptions") or {}).get("hostProcess"):
        found.append("HostProcess: pod")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            found.append(f"HostPath volumes: {volume['name']}")
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume types: {volume['name']} is {sorted(kinds - RESTRICTED_VOLUMES)}")
    for sysctl in pod_ctx.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"sysctls: {sysctl.get('name')}")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            found.append(f"AppArmor: {key}={value}")
    found += _selinux("pod", pod_ctx)
    found += _apparmor("pod", pod_ctx)
    pod_seccomp = (pod_ctx.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_ALLOWED:
        found.append(f"seccomp: pod type {pod_seccomp}")
    if pod_ctx.get("runAsUser") == 0:
        found.append("running as non-root user: pod runAsUser 0")
    for container in _containers(pod):
        name = container.get("name", "?")
        ctx = container.get("securityContext") or {}
        if ctx.get("privileged"):
            found.append(f"privileged containers: {name}")
        if (ctx.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"HostProcess: {name}")
        if ctx.get("procMount") not in (None, "Default"):
            found.append(f"/proc mount type: {name}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"host ports: {name} {port['hostPort']}")
        found += _selinux(name, ctx)
        found += _apparmor(name, ctx)
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"privilege escalation: {name} does not set allowPrivilegeEscalation: false")
        non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"running as non-root: {name}")
        if ctx.get("runAsUser") == 0:
            found.append(f"running as non-root user: {name} runAsUser 0")
        seccomp = (ctx.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_ALLOWED:
            found.append(f"seccomp: {name} has {seccomp or 'no profile'}")
        capabilities = ctx.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"capabilities: {name} does not drop ALL")
        added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            found.append(f"capabilities: {name} adds {sorted(added)}")
    return found


def _selinux(where: str, ctx: dict[str, Any]) -> list[str]:
    options = ctx.get("seLinuxOptions") or {}
    wrong = []
    if options.get("type", "") not in SELINUX_TYPES:
        wrong.append(f"SELinux: {where} type {options['type']}")
    if options.get("user") or options.get("role"):
        wrong.append(f"SELinux: {where} sets user or role")
    return wrong


def _apparmor(where: str, ctx: dict[str, Any]) -> list[str]:
    kind = (ctx.get("appArmorProfile") or {}).get("type")
    return [f"AppArmor: {where} type {kind}"] if kind not in (None, "RuntimeDefault", "Localhost") else []
