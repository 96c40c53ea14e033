//! Seccomp filters of the device threads: every device thread may make the system calls in
//! [`DEVICE_THREAD_BASE`] (waiting, eventfds, memory allocation, thread exit); each device
//! kind adds its own list beside its code. Anything else kills the process.
//!
//! Filters are on by default; [`set_enabled`] turns them off for debugging (`--no-seccomp`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns device-thread filters on or off for threads started from now on.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Release);
}

/// Whether device threads get a filter.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// What every device thread needs: waiting on its fds, reading and writing eventfds and its
/// backend, the allocator, logging to stderr, and ending the thread.
pub const DEVICE_THREAD_BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_futex,
    libc::SYS_mmap,
    // Also what unmaps an io_uring ring a disk swap retired (dropped on the device thread).
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // glibc's malloc grows a thread's own arena with mprotect (a vsock thread copying 64 KiB
    // packets for a guest with large buffers does).
    libc::SYS_mprotect,
    // Also what closes what a runtime change retires on the device thread: a swapped-out
    // image and its overlay, its ring and the ring's eventfd, a replaced limiter's timerfd.
    libc::SYS_close,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_gettid,
    libc::SYS_getcwd,
    libc::SYS_exit,
];

/// Why a filter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build a seccomp filter: {0}")]
pub struct FilterError(String);

impl From<FilterError> for std::io::Error {
    fn from(e: FilterError) -> Self {
        std::io::Error::other(e)
    }
}

/// The filter for a device thread that also needs `extra`; `None` when filters are off.
pub fn device_thread_filter(extra: &[i64]) -> Result<Option<BpfProgram>, FilterError> {
    let all: Vec<i64> = DEVICE_THREAD_BASE.iter().chain(extra).copied().collect();
    thread_filter(&all, BTreeMap::new())
}

/// The filter for a thread of another kind (the API thread, a vCPU): `allowed` without
/// conditions, `conditional` where only some arguments are (an ioctl's request numbers);
/// `None` when filters are off. Like a device thread's, it allows `fcntl(F_GETFD)`.
pub fn thread_filter(
    allowed: &[i64],
    conditional: BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<Option<BpfProgram>, FilterError> {
    if !enabled() {
        return Ok(None);
    }
    let err = |e: seccompiler::BackendError| FilterError(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.extend(conditional);
    // std checks that a descriptor is still open before closing it (debug builds): fcntl,
    // but only F_GETFD.
    let getfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .map_err(err)?;
    rules.insert(
        libc::SYS_fcntl,
        vec![SeccompRule::new(vec![getfd]).map_err(err)?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| FilterError(e.to_string()))?;
    BpfProgram::try_from(filter)
        .map(Some)
        .map_err(|e| FilterError(e.to_string()))
}

/// Builds the filter for `allowed` (see [`thread_filter`]), installs it on the calling thread
/// and marks the thread confined ([`crate::mark_confined_thread`]); nothing when filters are
/// off.
pub fn confine_thread(
    allowed: &[i64],
    conditional: BTreeMap<i64, Vec<SeccompRule>>,
) -> std::io::Result<()> {
    if let Some(f) = thread_filter(allowed, conditional)? {
        seccompiler::apply_filter(&f).map_err(std::io::Error::other)?;
        crate::mark_confined_thread();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_compiles_for_the_base_list_plus_extras() {
        let f = device_thread_filter(&[libc::SYS_getrandom, libc::SYS_read]).unwrap();
        assert!(f.is_some_and(|p| p.len() > DEVICE_THREAD_BASE.len()));
    }

    /// Runs `call` in a forked child under the base filter; returns the signal that killed
    /// the child, or None when it exited normally.
    fn under_filter(call: fn()) -> Option<i32> {
        // SAFETY: the child only applies a filter and makes raw syscalls before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if let Some(f) = device_thread_filter(&[]).ok().flatten() {
                if seccompiler::apply_filter(&f).is_ok() {
                    call();
                    // SAFETY: SYS_exit ends this (only) thread of the child; it is allowed.
                    unsafe { libc::syscall(libc::SYS_exit, 0) };
                }
            }
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(3) };
        }
        let mut status = 0;
        // SAFETY: waitpid writes the child's status into our integer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFSIGNALED(status) {
            Some(libc::WTERMSIG(status))
        } else {
            assert_eq!(libc::WEXITSTATUS(status), 0, "the filter was applied");
            None
        }
    }

    #[test]
    fn a_forbidden_syscall_kills_a_filtered_process() {
        assert_eq!(
            under_filter(|| {
                // SAFETY: getpid takes no arguments; the filter forbids it.
                unsafe { libc::syscall(libc::SYS_getpid) };
            }),
            Some(libc::SIGSYS)
        );
    }

    #[test]
    fn fcntl_is_allowed_only_for_f_getfd() {
        assert_eq!(
            under_filter(|| {
                // SAFETY: F_GETFD on fd 0 only reads its close-on-exec flag.
                unsafe { libc::fcntl(0, libc::F_GETFD) };
            }),
            None
        );
        assert_eq!(
            under_filter(|| {
                // SAFETY: F_SETFD on fd 0 only sets its close-on-exec flag.
                unsafe { libc::fcntl(0, libc::F_SETFD, 0) };
            }),
            Some(libc::SIGSYS)
        );
    }
}
