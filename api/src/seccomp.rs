//! The API thread's seccomp filter: the system calls [`crate::server`]'s loop makes, and
//! nothing else (no `open`, no `socket`, no `execve`). A call outside the list kills the
//! process, as on a device thread ([`devices::seccomp`]).

use devices::seccomp::Policy;

/// What the API thread may call once its filter is installed, besides
/// what [`Policy::new`] gives every thread (the allocator, the reply channel's futex, the clock
/// for latencies and the accept back-off, signals, thread exit).
pub const API_THREAD_SYSCALLS: &[i64] = &[
    // The loop: one poll over the listener, the shutdown eventfd and every connection.
    libc::SYS_poll,
    libc::SYS_accept4,
    // Reading a connection (std reads a socket with recv).
    libc::SYS_recvfrom,
    // Answers (send with MSG_NOSIGNAL).
    libc::SYS_sendto,
    // The VMM's eventfd, log lines.
    libc::SYS_write,
    // Connections that end.
    libc::SYS_close,
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
        let base = devices::seccomp::THREAD_BASE.len() + devices::seccomp::THREAD_BASE_ARGS.len();
        assert_eq!(policy().syscall_count(), base + API_THREAD_SYSCALLS.len());
    }
}
