//! Seccomp filters, one per thread kind. Each kind's list of system calls is written beside
//! the code that makes them (a device's worker, the API server, the vCPU loop, the VMM loop)
//! as a [`Policy`]: calls allowed whatever their arguments, and calls allowed only with some
//! values of one argument (an ioctl's request number, an fcntl command). Every device thread
//! may make the calls in [`THREAD_BASE`] and [`THREAD_BASE_ARGS`] (memory allocation without
//! PROT_EXEC, futexes, signals, thread exit, which every thread has) and [`DEVICE_THREAD_BASE`] (waiting, eventfds) and adds its kind's
//! own ([`DeviceKind`]).
//!
//! A call outside the list kills the process. With [`set_log`] (`--seccomp-log`) the filter
//! traps instead, and a SIGSYS handler names the thread kind and the call on stderr before
//! the process dies of SIGSYS all the same. Filters are on by default; [`set_enabled`] turns
//! them off for debugging (`--no-seccomp`). [`set_overrides`] replaces the filter of a kind
//! with one compiled from Firecracker's JSON format (`--seccomp-filter`).

mod names;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

static ENABLED: AtomicBool = AtomicBool::new(true);
static LOG: AtomicBool = AtomicBool::new(false);
static OVERRIDES: OnceLock<BTreeMap<String, BpfProgram>> = OnceLock::new();

std::thread_local! {
    /// The kind of the calling thread's filter, for the SIGSYS report.
    static KIND: std::cell::Cell<&'static str> = const { std::cell::Cell::new("unconfined") };
}

/// Turns filters on or off for threads confined from now on.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Release);
}

/// Whether threads get a filter.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Makes filters built from now on trap a forbidden call (SIGSYS to the thread, reported by
/// the handler [`install_sigsys_reporter`] installs) instead of killing the process at once.
pub fn set_log(on: bool) {
    LOG.store(on, Ordering::Release);
}

/// Whether forbidden calls are reported before the process dies.
pub fn log_enabled() -> bool {
    LOG.load(Ordering::Acquire)
}

/// Filters given by the user, by kind (`vmm`, `api`, `vcpu`), used instead of cgvm's own
/// lists; set once, before any thread is confined. False when they were already set.
pub fn set_overrides(filters: BTreeMap<String, BpfProgram>) -> bool {
    OVERRIDES.set(filters).is_ok()
}

/// The kinds whose filter a user may replace (Firecracker's three).
pub const OVERRIDABLE_KINDS: [&str; 3] = ["vmm", "api", "vcpu"];

/// Compiles a filter file in Firecracker's JSON format (an object with `vmm`, `api` and
/// `vcpu` filters, each with `default_action`, `filter_action` and `filter` rules) for
/// [`set_overrides`]. Kinds other than those three are refused by name.
pub fn compile_json(json: &[u8]) -> Result<BTreeMap<String, BpfProgram>, FilterError> {
    let filters = seccompiler::compile_from_json(json, TargetArch::x86_64)
        .map_err(|e| FilterError(format!("the filter file is not valid: {e}")))?;
    if let Some(k) = filters
        .keys()
        .find(|k| !OVERRIDABLE_KINDS.contains(&k.as_str()))
    {
        return Err(FilterError(format!(
            "the filter file names thread kind {k:?}; it may only name vmm, api and vcpu"
        )));
    }
    Ok(filters.into_iter().collect())
}

/// The name of x86_64 system call `nr` ("read"), if it is one.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    names::SYSCALL_NAMES
        .binary_search_by_key(&nr, |&(n, _)| n)
        .ok()
        .map(|i| names::SYSCALL_NAMES[i].1)
}

/// The number of the x86_64 system call called `name`.
pub fn syscall_number(name: &str) -> Option<i64> {
    names::SYSCALL_NAMES
        .iter()
        .find(|&&(_, n)| n == name)
        .map(|&(nr, _)| nr)
}

/// A call allowed only when one of its arguments has one of some values.
#[derive(Debug, Clone, Copy)]
pub struct ArgRule {
    /// The system call.
    pub nr: i64,
    /// Which argument (0-5); compared as its low 32 bits, which is what ioctl requests and
    /// fcntl commands are.
    pub arg: u8,
    /// The values allowed, each with its name for the report.
    pub values: &'static [(u64, &'static str)],
}

/// `fcntl(fd, F_GETFD)`: std checks that a descriptor is open before closing it (debug
/// builds), so every thread may ask.
pub const FCNTL_GETFD: ArgRule = ArgRule {
    nr: libc::SYS_fcntl,
    arg: 1,
    values: &[(libc::F_GETFD as u64, "F_GETFD")],
};

/// Values an argument may have, each with its name.
pub type NamedValues = Vec<(u64, &'static str)>;

/// One allowed call of a [`Policy`]: its number, and the argument and values it is limited
/// to (`None`: any arguments).
pub type Rule<'a> = (i64, Option<(u8, &'a [(u64, &'static str)])>);

/// What one thread kind may call.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The thread kind ("vcpu", "virtio-blk-uring").
    pub kind: &'static str,
    calls: BTreeSet<i64>,
    args: BTreeMap<i64, (u8, NamedValues)>,
}

impl Policy {
    /// A policy for `kind` that allows what every thread needs ([`THREAD_BASE`],
    /// [`THREAD_BASE_ARGS`]) so far.
    pub fn new(kind: &'static str) -> Self {
        Self::empty(kind)
            .allow(THREAD_BASE)
            .allow_args(THREAD_BASE_ARGS)
    }

    /// A policy for `kind` that allows nothing yet.
    pub fn empty(kind: &'static str) -> Self {
        Self {
            kind,
            calls: BTreeSet::new(),
            args: BTreeMap::new(),
        }
    }

    /// Allows `calls` whatever their arguments.
    pub fn allow(mut self, calls: &[i64]) -> Self {
        for &nr in calls {
            self.args.remove(&nr);
            self.calls.insert(nr);
        }
        self
    }

    /// Allows each rule's call with the values it lists (added to those already allowed).
    /// A call already allowed without conditions stays so.
    pub fn allow_args(mut self, rules: &[ArgRule]) -> Self {
        for r in rules {
            self.add_values(r.nr, r.arg, r.values);
        }
        self
    }

    fn add_values(&mut self, nr: i64, arg: u8, values: &[(u64, &'static str)]) {
        if self.calls.contains(&nr) {
            return;
        }
        let entry = self.args.entry(nr).or_insert((arg, Vec::new()));
        if entry.0 != arg {
            // Conditions on two different arguments of one call: allow the call.
            self.args.remove(&nr);
            self.calls.insert(nr);
            return;
        }
        for v in values {
            if !entry.1.iter().any(|(x, _)| *x == v.0) {
                entry.1.push(*v);
            }
        }
    }

    /// Everything `other` allows too.
    pub fn merge(mut self, other: &Policy) -> Self {
        let calls: Vec<i64> = other.calls.iter().copied().collect();
        self = self.allow(&calls);
        for (&nr, (arg, values)) in &other.args {
            self.add_values(nr, *arg, values);
        }
        self
    }

    /// Whether `nr` is allowed with at least some arguments.
    pub fn allows(&self, nr: i64) -> bool {
        self.calls.contains(&nr) || self.args.contains_key(&nr)
    }

    /// How many system calls are allowed (a call allowed with some arguments counts once).
    pub fn syscall_count(&self) -> usize {
        self.calls.len() + self.args.len()
    }

    /// Every allowed call in number order, with the argument and values it is limited to
    /// (`None`: any arguments).
    pub fn rules(&self) -> Vec<Rule<'_>> {
        let mut all: Vec<_> = self
            .calls
            .iter()
            .map(|&nr| (nr, None))
            .chain(
                self.args
                    .iter()
                    .map(|(&nr, (arg, v))| (nr, Some((*arg, v.as_slice())))),
            )
            .collect();
        all.sort_unstable_by_key(|&(nr, _)| nr);
        all
    }

    /// One line per allowed call, in number order: `read`, or
    /// `ioctl (argument 1: KVM_RUN, KVM_GET_REGS)`.
    pub fn describe(&self) -> Vec<String> {
        self.rules()
            .into_iter()
            .map(|(nr, only)| {
                let name = syscall_name(nr)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("syscall {nr}"));
                match only {
                    None => name,
                    Some((arg, values)) => {
                        let v: Vec<&str> = values.iter().map(|(_, n)| *n).collect();
                        format!("{name} (argument {arg}: {})", v.join(", "))
                    }
                }
            })
            .collect()
    }

    /// The BPF program: these calls allowed, anything else killing the process (or trapping,
    /// with [`set_log`]).
    pub fn compile(&self) -> Result<BpfProgram, FilterError> {
        let err = |e: seccompiler::BackendError| FilterError(e.to_string());
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            self.calls.iter().map(|&nr| (nr, Vec::new())).collect();
        for (&nr, (arg, values)) in &self.args {
            let mut list = Vec::new();
            for &(v, _) in values {
                let c = SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                    .map_err(err)?;
                list.push(SeccompRule::new(vec![c]).map_err(err)?);
            }
            rules.insert(nr, list);
        }
        let mismatch = if log_enabled() {
            SeccompAction::Trap
        } else {
            SeccompAction::KillProcess
        };
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(err)?;
        BpfProgram::try_from(filter).map_err(err)
    }
}

/// What every thread of cgvm needs whatever it does: the allocator (glibc's malloc grows a
/// thread's own arena with mprotect), futexes (locks, channels, joins), the clock (usually the
/// vDSO), signal delivery and ending the thread or the process.
pub const THREAD_BASE: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    // glibc ends the process from the last thread to exit (a thread that outlives the main
    // thread's exit, such as passt's log thread at the very end, does).
    libc::SYS_exit_group,
];

/// The protections a confined thread may map or set: none (guard pages, a reserved arena) and
/// read-write. Never executable: code that took over a thread cannot make memory it can run.
const DATA_PROTECTIONS: &[(u64, &str)] = &[
    (libc::PROT_NONE as u64, "PROT_NONE"),
    (
        (libc::PROT_READ | libc::PROT_WRITE) as u64,
        "PROT_READ|PROT_WRITE",
    ),
];

/// The calls of [`THREAD_BASE`] allowed with some arguments only: mmap and mprotect without
/// PROT_EXEC (glibc's allocator, thread stacks, io_uring rings), and fcntl(F_GETFD) (std
/// checks that a descriptor is open before closing it, in debug builds).
pub const THREAD_BASE_ARGS: &[ArgRule] = &[
    ArgRule {
        nr: libc::SYS_mmap,
        arg: 2,
        values: DATA_PROTECTIONS,
    },
    ArgRule {
        nr: libc::SYS_mprotect,
        arg: 2,
        values: DATA_PROTECTIONS,
    },
    FCNTL_GETFD,
];

/// What every device thread adds to [`THREAD_BASE`]: waiting on its fds, reading and writing
/// eventfds and its backend, logging to stderr.
pub const DEVICE_THREAD_BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_ctl,
    // Also what closes what a runtime change retires on the device thread: a swapped-out
    // image and its overlay, its ring and the ring's eventfd, a replaced limiter's timerfd.
    // (munmap, in the base, unmaps a retired io_uring ring.)
    libc::SYS_close,
    libc::SYS_gettid,
    libc::SYS_getcwd,
];

/// A device thread kind: its name and what it adds to [`THREAD_BASE`] and
/// [`DEVICE_THREAD_BASE`].
#[derive(Debug)]
pub struct DeviceKind {
    /// The kind's name in the report and the SIGSYS log ("virtio-blk-uring").
    pub name: &'static str,
    /// The calls this kind makes beyond the base list.
    pub calls: &'static [i64],
    /// The calls it makes with some argument values only.
    pub args: &'static [ArgRule],
}

impl DeviceKind {
    /// The kind's whole policy: the base list and its own calls.
    pub fn policy(&self) -> Policy {
        Policy::new(self.name)
            .allow(DEVICE_THREAD_BASE)
            .allow(self.calls)
            .allow_args(self.args)
    }
}

/// The clone flags glibc's pthread_create passes: shared memory, files, fs and signal handlers,
/// same thread group, System V semaphore undo list, TLS, and the parent's and child's tid.
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// What starting a thread and confining it take beyond [`THREAD_BASE`], on the thread that
/// starts it and on the new thread before its own filter is in place (so under the filter of
/// the thread that started it): the clone, glibc's per-thread set-up, naming the thread, and
/// installing its filter. (The stack, its guard page and the signal stack are mapped with the
/// base list's mmap and mprotect.)
pub fn spawn_and_confine() -> Policy {
    Policy::empty("thread start")
        .allow(&[
            // Its flags are in a struct the filter cannot read.
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
            libc::SYS_gettid,
        ])
        .allow_args(&[
            // glibc's fallback where clone3 is missing: a thread's flags exactly, not a fork.
            ArgRule {
                nr: libc::SYS_clone,
                arg: 0,
                values: &[(THREAD_CLONE_FLAGS, "thread flags")],
            },
            ArgRule {
                nr: libc::SYS_prctl,
                arg: 0,
                values: &[
                    (libc::PR_SET_NAME as u64, "PR_SET_NAME"),
                    (libc::PR_SET_NO_NEW_PRIVS as u64, "PR_SET_NO_NEW_PRIVS"),
                ],
            },
            ArgRule {
                nr: libc::SYS_seccomp,
                arg: 0,
                values: &[(
                    libc::SECCOMP_SET_MODE_FILTER as u64,
                    "SECCOMP_SET_MODE_FILTER",
                )],
            },
        ])
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("seccomp: {0}")]
pub struct FilterError(String);

impl From<FilterError> for std::io::Error {
    fn from(e: FilterError) -> Self {
        std::io::Error::other(e)
    }
}

/// A filter compiled for a kind, ready to be installed on the thread that runs it (a device
/// thread's is compiled by the thread that starts it).
#[derive(Debug, Clone)]
pub struct Prepared {
    kind: &'static str,
    program: BpfProgram,
    /// A call the policy forbids, for the test-only violation hook.
    #[cfg(feature = "test-hooks")]
    forbidden: i64,
}

/// Compiles `policy` (or the user's filter for its kind, see [`set_overrides`]); `None` when
/// filters are off.
pub fn prepare(policy: &Policy) -> Result<Option<Prepared>, FilterError> {
    if !enabled() {
        return Ok(None);
    }
    let program = match OVERRIDES.get().and_then(|o| o.get(policy.kind)) {
        Some(p) => p.clone(),
        None => policy.compile()?,
    };
    Ok(Some(Prepared {
        kind: policy.kind,
        program,
        #[cfg(feature = "test-hooks")]
        forbidden: [libc::SYS_getppid, libc::SYS_uname, libc::SYS_acct]
            .into_iter()
            .find(|&nr| !policy.allows(nr))
            .unwrap_or(libc::SYS_acct),
    }))
}

impl Prepared {
    /// Installs the filter on the calling thread and marks the thread confined
    /// ([`crate::mark_confined_thread`]).
    pub fn install(&self) -> Result<(), FilterError> {
        KIND.with(|k| k.set(self.kind));
        seccompiler::apply_filter(&self.program)
            .map_err(|e| FilterError(format!("cannot install the {} filter: {e}", self.kind)))?;
        crate::mark_confined_thread();
        #[cfg(feature = "test-hooks")]
        self.test_violation();
        Ok(())
    }

    /// Test builds only: when `CGVM_TEST_SECCOMP_VIOLATION` names this kind, makes a call the
    /// filter forbids, to show that it is fatal.
    #[cfg(feature = "test-hooks")]
    fn test_violation(&self) {
        if std::env::var_os("CGVM_TEST_SECCOMP_VIOLATION").is_some_and(|v| v == self.kind) {
            // SAFETY: the calls chosen (getppid, uname with a null pointer, acct with a null
            // pointer) touch no memory of ours; the filter stops the process first.
            unsafe { libc::syscall(self.forbidden, 0usize) };
        }
    }
}

/// Compiles and installs `policy` on the calling thread; nothing when filters are off.
pub fn confine(policy: &Policy) -> Result<(), FilterError> {
    match prepare(policy)? {
        Some(p) => p.install(),
        None => Ok(()),
    }
}

/// Installs the SIGSYS handler that reports a call a filter trapped ([`set_log`]): it writes
/// the thread kind and the call to stderr, then makes the call again with SIGSYS blocked, so
/// that the kernel ends the process with SIGSYS's default action.
pub fn install_sigsys_reporter() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value (no handler, empty mask) that is filled in
    // below before use.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a sigset_t we own.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: the handler is an extern "C" function of the right signature that stays valid
    // for the life of the process; no previous action is asked for.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Offset of `_sigsys._syscall` in the kernel's siginfo (after signo, errno, code, padding
/// and the `void *_call_addr`).
const SIGINFO_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SIGSYS it sends for a seccomp trap,
    // with the system call number at `_sigsys._syscall`.
    let nr = i64::from(unsafe {
        std::ptr::read_unaligned(
            info.cast::<u8>()
                .add(SIGINFO_SYSCALL_OFFSET)
                .cast::<libc::c_int>(),
        )
    });
    // SAFETY: ctx is the ucontext the kernel gives a SA_SIGINFO handler, with the registers
    // of the trapped call.
    let g = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let args = [
        g[libc::REG_RDI as usize],
        g[libc::REG_RSI as usize],
        g[libc::REG_RDX as usize],
        g[libc::REG_R10 as usize],
        g[libc::REG_R8 as usize],
        g[libc::REG_R9 as usize],
    ];
    // A const-initialised thread local without a destructor: reading it makes no call.
    let kind = KIND.with(|k| k.get());
    let mut buf = StackText::<320>::new();
    let _ = std::fmt::Write::write_fmt(
        &mut buf,
        format_args!(
            "cgvm: seccomp: a thread of kind '{kind}' made system call {} ({nr}, arguments \
             {:#x}, {:#x}, {:#x}), which its filter forbids; the process stops\n",
            syscall_name(nr).unwrap_or("unknown"),
            args[0],
            args[1],
            args[2],
        ),
    );
    let text = buf.as_bytes();
    // SAFETY: writes bytes of our stack buffer to stderr.
    unsafe { libc::write(libc::STDERR_FILENO, text.as_ptr().cast(), text.len()) };
    // SAFETY: the call made again has the arguments the forbidden call had, and the filter
    // traps it again: with SIGSYS blocked in its own handler, the kernel delivers it with its
    // default action instead, which ends the process. _exit is for a filter that let it pass.
    unsafe {
        libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Formats into a fixed buffer (a signal handler must not allocate); text past the end is
/// cut.
struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> std::fmt::Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Policy {
        Policy::new("test").allow(DEVICE_THREAD_BASE)
    }

    #[test]
    fn a_filter_compiles_for_the_base_list_plus_extras() {
        let p = base().allow(&[libc::SYS_getrandom, libc::SYS_read]);
        assert_eq!(
            p.syscall_count(),
            THREAD_BASE.len() + THREAD_BASE_ARGS.len() + DEVICE_THREAD_BASE.len() + 1,
            "fcntl and getrandom"
        );
        assert!(p.compile().unwrap().len() > DEVICE_THREAD_BASE.len());
    }

    #[test]
    fn argument_rules_merge_and_yield_to_unconditional_ones() {
        const A: ArgRule = ArgRule {
            nr: libc::SYS_ioctl,
            arg: 1,
            values: &[(1, "ONE")],
        };
        const B: ArgRule = ArgRule {
            nr: libc::SYS_ioctl,
            arg: 1,
            values: &[(2, "TWO"), (1, "ONE")],
        };
        let p = Policy::new("t").allow_args(&[A]);
        let q = Policy::new("u").allow_args(&[B]).merge(&p);
        let lines = q.describe();
        assert!(
            lines.contains(&"ioctl (argument 1: TWO, ONE)".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"fcntl (argument 1: F_GETFD)".to_string()),
            "{lines:?}"
        );
        let r = q.allow(&[libc::SYS_ioctl]);
        assert!(r.describe().contains(&"ioctl".to_string()));
        let base = THREAD_BASE.len() + THREAD_BASE_ARGS.len();
        assert_eq!(r.syscall_count(), base + 1);
        assert_eq!(Policy::empty("e").allow_args(&[A]).syscall_count(), 1);
    }

    #[test]
    fn syscall_names_and_numbers_agree() {
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(
            syscall_name(libc::SYS_io_uring_enter),
            Some("io_uring_enter")
        );
        assert_eq!(syscall_number("ioctl"), Some(libc::SYS_ioctl));
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn firecracker_json_filters_compile_for_its_three_kinds_only() {
        let json = br#"{
            "vcpu": {"default_action": "trap", "filter_action": "allow",
                     "filter": [{"syscall": "read"},
                                {"syscall": "ioctl", "args": [{"index": 1, "type": "dword",
                                 "op": "eq", "val": 44672, "comment": "KVM_RUN"}]}]}
        }"#;
        let f = compile_json(json).unwrap();
        assert!(f.contains_key("vcpu"));
        let bad = br#"{"virtio-rng": {"default_action": "trap", "filter_action": "allow",
                      "filter": []}}"#;
        let e = compile_json(bad).unwrap_err().to_string();
        assert!(e.contains("\"virtio-rng\""), "{e}");
        let e = compile_json(b"{ not json").unwrap_err().to_string();
        assert!(e.contains("not valid"), "{e}");
    }

    /// Runs `call` in a forked child under the base filter; returns the signal that killed
    /// the child, or None when it exited normally.
    fn under_filter(call: fn()) -> Option<i32> {
        under(&base(), call)
    }

    /// Runs `call` in a forked child under `policy` (compiled before the fork, so that the
    /// child allocates nothing); the signal that killed the child, if one did.
    fn under(policy: &Policy, call: fn()) -> Option<i32> {
        let filter = policy.compile().expect("the filter compiles");
        // SAFETY: the child only applies a filter and makes raw syscalls before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&filter).is_ok() {
                call();
                // SAFETY: SYS_exit ends this (only) thread of the child; it is allowed.
                unsafe { libc::syscall(libc::SYS_exit, 0) };
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

    /// A fresh anonymous read-write page.
    fn map_rw() -> *mut libc::c_void {
        // SAFETY: a new anonymous private mapping touches no existing memory.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        }
    }

    #[test]
    fn memory_may_be_mapped_read_write_but_never_executable() {
        assert_eq!(
            under_filter(|| {
                let p = map_rw();
                // SAFETY: `p` is our own fresh page, unmapped at once.
                unsafe {
                    libc::mprotect(p, 4096, libc::PROT_NONE);
                    libc::munmap(p, 4096);
                }
            }),
            None
        );
        assert_eq!(
            under_filter(|| {
                // SAFETY: an anonymous mapping nobody uses; the filter stops the call.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
            }),
            Some(libc::SIGSYS)
        );
        assert_eq!(
            under_filter(|| {
                let p = map_rw();
                // SAFETY: `p` is our own fresh page; making it executable is stopped by the
                // filter.
                unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) };
            }),
            Some(libc::SIGSYS)
        );
    }

    #[test]
    fn the_thread_start_list_clones_threads_but_not_processes() {
        let spawner = base().merge(&spawn_and_confine());
        assert_eq!(
            under(&spawner, || {
                // SAFETY: a fork-style clone; the filter stops it before a child exists.
                unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            }),
            Some(libc::SIGSYS)
        );
        assert_eq!(
            under(&spawner, || {
                // SAFETY: PR_SET_NAME reads a NUL-terminated name from our stack.
                unsafe { libc::prctl(libc::PR_SET_NAME, c"cgvm-test".as_ptr()) };
            }),
            None
        );
        assert_eq!(
            under(&spawner, || {
                // SAFETY: PR_SET_DUMPABLE takes an integer; the filter stops it.
                unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
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
