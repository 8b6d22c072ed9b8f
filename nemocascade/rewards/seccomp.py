"""A tiny seccomp-BPF program for the code sandbox: no new processes, no ptrace.

Why: when the grader runs as root, bubblewrap maps the sandbox user onto host uid 0, and the kernel
never enforces RLIMIT_NPROC for uid 0, so a fork bomb would only be stopped by the wall-clock
timeout. This filter makes process creation fail with EPERM instead (threads stay allowed: `clone`
with CLONE_THREAD passes; `clone3` answers ENOSYS so glibc falls back to `clone`, whose flags a
classic BPF filter can inspect). It also denies ptrace / process_vm_* (reading the harness's
memory), unshare / setns and io_uring. Unknown architectures get no filter (`build_filter` returns
None).

The output is the raw `struct sock_filter[]` bytes that `bwrap --seccomp FD` loads.
"""

from __future__ import annotations

import platform
import struct

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K, _JGE_K, _JSET_K = 0x15, 0x35, 0x45
_RET_K = 0x06
_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000
# Offsets in struct seccomp_data: nr (int), arch (u32), instruction_pointer (u64), args[6] (u64).
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16

# Per architecture: (AUDIT_ARCH value, syscalls denied with EPERM, clone, clone3, x32 bit or 0).
_ARCHES = {
    "x86_64": (
        0xC000003E,
        {
            "fork": 57,
            "vfork": 58,
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "unshare": 272,
            "setns": 308,
            "io_uring_setup": 425,
        },
        56,
        435,
        0x40000000,
    ),
    "aarch64": (
        0xC00000B7,
        {
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "unshare": 97,
            "setns": 268,
            "io_uring_setup": 425,
        },
        220,
        435,
        0,
    ),
}


def _assemble(prog: list[tuple]) -> bytes:
    """Assemble (op, k, jt_label, jf_label) / ("label", name) items into sock_filter bytes.

    Jump targets are label names resolved to forward offsets; a missing label means "next".
    """
    labels, pos = {}, 0
    for item in prog:
        if item[0] == "label":
            labels[item[1]] = pos
        else:
            pos += 1

    def rel(label, at):
        if label is None:
            return 0
        off = labels[label] - at - 1
        if not 0 <= off <= 255:
            raise ValueError(f"seccomp jump to {label} out of range: {off}")
        return off

    out = []
    for item in prog:
        if item[0] != "label":
            code, k, jt, jf = item
            out.append(struct.pack("=HBBI", code, rel(jt, len(out)), rel(jf, len(out)), k))
    return b"".join(out)


def build_filter(machine: str | None = None) -> bytes | None:
    """The filter for `machine` (default: this host), or None for an architecture we do not know."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        return None
    audit_arch, denied, nr_clone, nr_clone3, x32_bit = _ARCHES[machine]
    prog: list[tuple] = [
        (_LD_W_ABS, _OFF_ARCH, None, None),
        (_JEQ_K, audit_arch, None, "kill"),
        (_LD_W_ABS, _OFF_NR, None, None),
    ]
    if x32_bit:
        prog.append((_JGE_K, x32_bit, "kill", None))
    for nr in denied.values():
        prog.append((_JEQ_K, nr, "eperm", None))
    prog += [
        (_JEQ_K, nr_clone3, "enosys", None),
        (_JEQ_K, nr_clone, None, "allow"),
        (_LD_W_ABS, _OFF_ARG0_LO, None, None),
        (_JSET_K, _CLONE_THREAD, "allow", "eperm"),
        ("label", "allow"),
        (_RET_K, _RET_ALLOW, None, None),
        ("label", "eperm"),
        (_RET_K, _RET_ERRNO | _EPERM, None, None),
        ("label", "enosys"),
        (_RET_K, _RET_ERRNO | _ENOSYS, None, None),
        ("label", "kill"),
        (_RET_K, _RET_KILL_PROCESS, None, None),
    ]
    return _assemble(prog)
