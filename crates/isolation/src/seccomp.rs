//! The syscall filter every `isolated` command runs under.
//!
//! A deny list, the shape Docker's and Firecracker's defaults take for general-purpose workloads: everything a
//! build, a test runner or an interpreter needs stays allowed, and the calls that reach past the sandbox — the
//! kernel's own state, other processes' memory, new namespaces, mounts, keyrings, BPF — fail with `EPERM`. `clone3`
//! fails with `ENOSYS` instead, because its flags live in memory a filter cannot read: libc then falls back to
//! `clone`, whose flags the filter does check. The list is documented in `docs/isolation.md`; keep the two in step.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::Error;

/// System calls refused outright, by name (for the probe and the docs) and number.
pub fn denied_syscalls() -> Vec<(&'static str, i64)> {
    let mut denied = vec![
        // Mounts and the filesystem tree.
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("pivot_root", libc::SYS_pivot_root),
        ("chroot", libc::SYS_chroot),
        ("open_tree", libc::SYS_open_tree),
        ("move_mount", libc::SYS_move_mount),
        ("fsopen", libc::SYS_fsopen),
        ("fsconfig", libc::SYS_fsconfig),
        ("fsmount", libc::SYS_fsmount),
        ("fspick", libc::SYS_fspick),
        ("mount_setattr", libc::SYS_mount_setattr),
        ("name_to_handle_at", libc::SYS_name_to_handle_at),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("quotactl", libc::SYS_quotactl),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        // Namespaces.
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        // Other processes' memory and tracing.
        ("ptrace", libc::SYS_ptrace),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("kcmp", libc::SYS_kcmp),
        ("pidfd_getfd", libc::SYS_pidfd_getfd),
        // The kernel's own state.
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("reboot", libc::SYS_reboot),
        ("acct", libc::SYS_acct),
        ("settimeofday", libc::SYS_settimeofday),
        ("clock_settime", libc::SYS_clock_settime),
        ("clock_adjtime", libc::SYS_clock_adjtime),
        ("adjtimex", libc::SYS_adjtimex),
        ("syslog", libc::SYS_syslog),
        ("vhangup", libc::SYS_vhangup),
        // Kernel attack surface a workload does not need.
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("io_uring_register", libc::SYS_io_uring_register),
        ("fanotify_init", libc::SYS_fanotify_init),
        ("personality", libc::SYS_personality),
    ];
    #[cfg(target_arch = "x86_64")]
    denied.extend([
        ("iopl", libc::SYS_iopl),
        ("ioperm", libc::SYS_ioperm),
        ("uselib", libc::SYS_uselib),
        ("ustat", libc::SYS_ustat),
        ("sysfs", libc::SYS_sysfs),
        ("_sysctl", libc::SYS__sysctl),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ("nfsservctl", libc::SYS_nfsservctl),
    ]);
    denied
}

fn target_arch() -> Result<TargetArch, Error> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|err| {
        Error::Seccomp(format!(
            "no filter for the {} architecture: {err}",
            std::env::consts::ARCH
        ))
    })
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    SeccompRule::new(conditions).map_err(|err| Error::Seccomp(err.to_string()))
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|err| Error::Seccomp(err.to_string()))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: u32,
    arch: TargetArch,
) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        arch,
    )
    .map_err(|err| Error::Seccomp(err.to_string()))?;
    filter
        .try_into()
        .map_err(|err: seccompiler::BackendError| Error::Seccomp(err.to_string()))
}

/// The filter, compiled for this machine's architecture. Two programs: the `EPERM` deny list, and `clone3` →
/// `ENOSYS`; both are installed, and the kernel applies the stricter answer. `tcp_only` adds a third: `socket()` only
/// for TCP over IPv4 and IPv6 (the Landlock tier, where no network namespace hides Unix sockets and UDP).
pub fn filters(tcp_only: bool) -> Result<Vec<BpfProgram>, Error> {
    let arch = target_arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, number) in denied_syscalls() {
        rules.insert(number, Vec::new());
    }
    // New namespaces through clone's flags (a user namespace would give back every capability inside it): one rule
    // per flag, `flags & FLAG == FLAG`.
    let clone_flags_arg = if cfg!(target_arch = "s390x") { 1 } else { 0 };
    let clone_rules = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ]
    .into_iter()
    .map(|flag| {
        let flag = flag as u64;
        rule(vec![condition(
            clone_flags_arg,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?])
    })
    .collect::<Result<Vec<_>, Error>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    // Pushing bytes into another terminal's input queue.
    rules.insert(
        libc::SYS_ioctl,
        vec![rule(vec![
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::TIOCSTI)
                .map_err(|err| Error::Seccomp(err.to_string()))?,
        ])?],
    );
    let deny = compile(rules, libc::EPERM as u32, arch)?;

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, Vec::new());
    let no_clone3 = compile(clone3, libc::ENOSYS as u32, arch)?;
    let mut programs = vec![deny, no_clone3];
    if tcp_only {
        programs.push(compile(tcp_only_sockets()?, libc::EPERM as u32, arch)?);
    }
    Ok(programs)
}

/// `socket(domain, type, …)` refused unless the domain is IPv4 or IPv6 and the type a stream.
fn tcp_only_sockets() -> Result<BTreeMap<i64, Vec<SeccompRule>>, Error> {
    let dword = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .map_err(|err| Error::Seccomp(err.to_string()))
    };
    let mut socket_rules = vec![rule(vec![
        dword(0, SeccompCmpOp::Ne, libc::AF_INET as u64)?,
        dword(0, SeccompCmpOp::Ne, libc::AF_INET6 as u64)?,
    ])?];
    for domain in [libc::AF_INET, libc::AF_INET6] {
        for kind in [
            libc::SOCK_DGRAM,
            libc::SOCK_RAW,
            libc::SOCK_RDM,
            libc::SOCK_SEQPACKET,
        ] {
            socket_rules.push(rule(vec![
                dword(0, SeccompCmpOp::Eq, domain as u64)?,
                dword(1, SeccompCmpOp::MaskedEq(0xf), kind as u64)?,
            ])?);
        }
    }
    Ok(BTreeMap::from([(libc::SYS_socket, socket_rules)]))
}

/// Installs the filter on the calling thread; threads and processes it starts afterwards inherit it.
pub fn apply(tcp_only: bool) -> Result<(), Error> {
    for program in filters(tcp_only)? {
        seccompiler::apply_filter(&program).map_err(|err| Error::Seccomp(err.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_machine() {
        let programs = filters(false).unwrap();
        assert_eq!(programs.len(), 2);
        assert_eq!(filters(true).unwrap().len(), 3);
        assert!(programs.iter().all(|program| !program.is_empty()));
    }

    #[test]
    fn every_denied_call_is_listed_once() {
        let denied = denied_syscalls();
        let mut names: Vec<_> = denied.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), denied.len());
        assert!(names.contains(&"ptrace") && names.contains(&"mount"));
    }
}
