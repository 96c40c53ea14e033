//! How a run ended, and the exit status the `cgvm` process gives for it.

use std::time::Duration;

use devices::stop::GuestStop;

use crate::vstate::vcpu::VcpuStop;

/// Exit status: the guest kernel panicked (pvpanic).
pub const EXIT_GUEST_PANIC: i32 = 120;
/// Exit status: a vCPU stopped in a way the VMM cannot continue from.
pub const EXIT_VCPU_FAULT: i32 = 121;
/// Exit status: `--timeout` expired.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status: cgvm itself failed (configuration, kernel, KVM).
pub const EXIT_VMM_ERROR: i32 = 125;
/// Exit status: the user quit with Ctrl-A x.
pub const EXIT_USER_QUIT: i32 = 130;

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest asked: exit device, poweroff, reset, panic.
    Guest(GuestStop),
    /// A vCPU stopped on its own (triple fault, KVM error).
    Vcpu(VcpuStop),
    /// The run's time limit passed.
    Timeout(Duration),
    /// The VMM got a terminating signal.
    Signal(i32),
    /// The user pressed Ctrl-A x.
    UserQuit,
    /// The VMM itself failed while the guest ran (its event loop could not run).
    VmmError(String),
}

impl RunOutcome {
    /// The process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Guest(GuestStop::ExitDevice(v)) => i32::from(*v),
            Self::Guest(GuestStop::Poweroff | GuestStop::Reset) => 0,
            Self::Guest(GuestStop::Panic) => EXIT_GUEST_PANIC,
            Self::Vcpu(_) => EXIT_VCPU_FAULT,
            Self::Timeout(_) => EXIT_TIMEOUT,
            Self::Signal(s) => 128 + s,
            Self::UserQuit => EXIT_USER_QUIT,
            Self::VmmError(_) => EXIT_VMM_ERROR,
        }
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Guest(GuestStop::ExitDevice(v)) => {
                write!(f, "guest exited with status {v} (exit device)")
            }
            Self::Guest(GuestStop::Poweroff) => write!(f, "guest powered off (ACPI)"),
            Self::Guest(GuestStop::Reset) => write!(f, "guest reset"),
            Self::Guest(GuestStop::Panic) => write!(f, "guest kernel panicked (pvpanic)"),
            Self::Vcpu(s) => write!(f, "{s}"),
            Self::Timeout(d) => write!(
                f,
                "timeout: the guest was still running after {} s",
                d.as_secs_f64()
            ),
            Self::Signal(s) => write!(f, "stopped by signal {s}"),
            Self::UserQuit => write!(f, "quit from the console (Ctrl-A x)"),
            Self::VmmError(e) => write!(f, "cgvm failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_a_distinct_documented_status() {
        assert_eq!(RunOutcome::Guest(GuestStop::ExitDevice(7)).exit_code(), 7);
        assert_eq!(RunOutcome::Guest(GuestStop::Poweroff).exit_code(), 0);
        assert_eq!(RunOutcome::Guest(GuestStop::Reset).exit_code(), 0);
        assert_eq!(RunOutcome::Guest(GuestStop::Panic).exit_code(), 120);
        let v = VcpuStop {
            vcpu: 0,
            reason: "triple fault".into(),
            rip: 0,
            bytes: String::new(),
        };
        assert_eq!(RunOutcome::Vcpu(v).exit_code(), 121);
        assert_eq!(RunOutcome::Timeout(Duration::from_secs(3)).exit_code(), 124);
        assert_eq!(RunOutcome::Signal(15).exit_code(), 143);
        assert_eq!(RunOutcome::UserQuit.exit_code(), 130);
        assert_eq!(RunOutcome::VmmError("epoll".into()).exit_code(), 125);
        assert!(RunOutcome::Timeout(Duration::from_secs(3))
            .to_string()
            .contains("after 3 s"));
    }
}
