//! The API thread's seccomp filter: the system calls [`crate::server`]'s loop makes, and
//! nothing else (no `open`, no `socket`, no `execve`). A call outside the list kills the
//! process, as on a device thread ([`devices::seccomp`]).

use devices::seccomp::Policy;

/// What the API thread may call once its filter is installed.
pub const API_THREAD_SYSCALLS: &[i64] = &[
    // The loop: one poll over the listener, the shutdown eventfd and every connection
    // (glibc's poll is either of the two).
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_accept4,
    // Reading a connection (std reads a socket with recv) and the shutdown eventfd.
    libc::SYS_read,
    libc::SYS_recvfrom,
    // Answers (send with MSG_NOSIGNAL), the VMM's eventfd, log lines.
    libc::SYS_sendto,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_shutdown,
    // The reply channel (std's channels park on a futex and back off with sched_yield).
    libc::SYS_futex,
    libc::SYS_sched_yield,
    // The allocator.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mprotect,
    // Latencies and the accept back-off (usually the vDSO).
    libc::SYS_clock_gettime,
    // Signals delivered to this thread, and ending it.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
];

/// The API thread's policy (kind `api`, the name Firecracker's filter files use).
pub fn policy() -> Policy {
    Policy::new("api").allow(API_THREAD_SYSCALLS)
}

/// Installs the API thread's filter on the calling thread (nothing when filters are off,
/// see [`devices::seccomp::set_enabled`]). For [`crate::ApiServer::spawn_with`].
pub fn confine_api_thread() -> std::io::Result<()> {
    devices::seccomp::confine(&policy()).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_filter_compiles() {
        let f = policy().compile().unwrap();
        assert!(f.len() > API_THREAD_SYSCALLS.len());
        assert_eq!(
            policy().syscall_count(),
            API_THREAD_SYSCALLS.len() + 1,
            "and fcntl"
        );
    }
}
