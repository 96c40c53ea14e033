//! Seccomp filters of the device threads: every device thread may make the system calls in
//! [`DEVICE_THREAD_BASE`] (waiting, eventfds, memory allocation, thread exit); each device
//! kind adds its own list beside its code. Anything else kills the process.
//!
//! Filters are on by default; [`set_enabled`] turns them off for debugging (`--no-seccomp`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

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
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_close,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
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
    if !enabled() {
        return Ok(None);
    }
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = DEVICE_THREAD_BASE
        .iter()
        .chain(extra)
        .map(|&nr| (nr, Vec::new()))
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_compiles_for_the_base_list_plus_extras() {
        let f = device_thread_filter(&[libc::SYS_getrandom, libc::SYS_read]).unwrap();
        assert!(f.is_some_and(|p| p.len() > DEVICE_THREAD_BASE.len()));
    }

    #[test]
    fn a_forbidden_syscall_kills_a_filtered_process() {
        // Fork so that the kill hits a child, not the test runner.
        // SAFETY: the child only applies a filter and makes raw syscalls before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let f = device_thread_filter(&[]).ok().flatten();
            if let Some(f) = f {
                if seccompiler::apply_filter(&f).is_ok() {
                    // SAFETY: getpid takes no arguments; the filter forbids it.
                    unsafe { libc::syscall(libc::SYS_getpid) };
                }
            }
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waitpid writes the child's status into our integer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
