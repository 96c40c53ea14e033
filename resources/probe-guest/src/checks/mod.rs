//! The checks the probe can run, and what they share.
//!
//! A check is a function that looks at the platform and writes its findings into a [`Report`]:
//! details for the `ok` line, and problems that make it fail. `probe.tests=a,b,c` runs checks by
//! name, in order, from [`REGISTRY`]. To add one (`blk`, `rng`, `net`, `vsock`, `pci`...): write
//! `checks/NAME.rs` with `pub fn run(ctx: &Context<'_>, report: &mut Report)`, declare the module
//! here and add a [`Check`] to the registry.

use core::fmt::{self, Write};

use crate::bootparams::{BootParams, CmdlineError};
use crate::cmdline::Args;
use crate::discovery::{self, Device, DeviceList, Listed};
use crate::phys::PhysMem;
use crate::text::Line;
use crate::virtio::{self, DmaPool, Failure, Mmio, VirtioError};

pub mod blk;
pub mod blkbench;
pub mod boot;
pub mod net;
pub mod netbench;
pub mod rng;
pub mod vsock;
pub mod vsockbench;

/// What every check may look at.
pub struct Context<'a> {
    /// Physical address of the zero page.
    pub zero_page: u64,
    /// The zero page's fields.
    pub boot_params: &'a BootParams,
    /// The command line (without its NUL), or why it could not be read.
    pub cmdline: Result<&'a [u8], CmdlineError>,
    /// The probe's command-line settings.
    pub args: &'a Args<'a>,
    /// Guest memory, bounded by the e820 map.
    pub mem: &'a PhysMem,
}

/// Capacity of a report's detail and problem texts.
const REPORT_TEXT: usize = 2048;

/// What a check found: details for the `ok` line, or the problems that made it fail.
#[derive(Default)]
pub struct Report {
    details: Line<REPORT_TEXT>,
    problems: Line<REPORT_TEXT>,
}

impl Report {
    /// Adds a finding to the `ok` line (findings are separated by "; ").
    pub fn detail(&mut self, args: fmt::Arguments<'_>) {
        append(&mut self.details, args);
    }

    /// Records a problem: the check fails (problems are separated by "; ").
    pub fn fail(&mut self, args: fmt::Arguments<'_>) {
        append(&mut self.problems, args);
    }

    /// Whether any problem was recorded.
    pub fn failed(&self) -> bool {
        !self.problems.is_empty()
    }

    /// The details, for the `ok` line.
    pub fn details(&self) -> &Line<REPORT_TEXT> {
        &self.details
    }

    /// The problems, for the `FAIL` line.
    pub fn problems(&self) -> &Line<REPORT_TEXT> {
        &self.problems
    }
}

fn append(line: &mut Line<REPORT_TEXT>, args: fmt::Arguments<'_>) {
    // Line's write_str never fails (it truncates).
    if !line.is_empty() {
        let _ = line.write_str("; ");
    }
    let _ = line.write_fmt(args);
}

/// A check the probe can run.
pub struct Check {
    /// Its name in `probe.tests`.
    pub name: &'static str,
    /// Runs it.
    pub run: fn(&Context<'_>, &mut Report),
}

/// Every check, by name.
pub const REGISTRY: &[Check] = &[
    Check {
        name: "boot",
        run: boot::run,
    },
    Check {
        name: "blk",
        run: blk::run,
    },
    Check {
        name: "rng",
        run: rng::run,
    },
    Check {
        name: "blkbench",
        run: blkbench::run,
    },
    Check {
        name: "net",
        run: net::run,
    },
    Check {
        name: "vsock",
        run: vsock::run,
    },
    Check {
        name: "netbench",
        run: netbench::run,
    },
    Check {
        name: "vsockbench",
        run: vsockbench::run,
    },
];

/// The virtio-mmio devices with DeviceID `device_id`, in command-line order, for a check.
///
/// Finds every device both ways ([`discovery::find`]: the command line and the DSDT must
/// agree) and identifies each (MagicValue, Version 2, DeviceID; reads only). A window without
/// a virtio-mmio device behind it is a problem; DeviceID 0 (a placeholder) is skipped. With no
/// device of that kind, the problem is "no NAME device". `None` (problems reported) when the
/// devices could not be found or there is none of the kind.
pub fn virtio_devices(
    ctx: &Context<'_>,
    report: &mut Report,
    device_id: u32,
    name: &str,
) -> Option<DeviceList> {
    let all = discovery::find(ctx, report)?;
    let mut found = DeviceList::new();
    for d in all.as_slice() {
        match Mmio::new(d.base, d.size).and_then(|m| m.identify()) {
            Ok(id) if id.device_id == device_id => {
                // `found` is as large as `all`.
                let _ = found.push(*d);
            }
            Ok(_) => {}
            Err(e) => report.fail(format_args!("virtio-mmio device {d}: {e}")),
        }
    }
    if found.as_slice().is_empty() {
        report.fail(format_args!(
            "no {name} device (virtio-mmio devices: {})",
            Listed(all.as_slice())
        ));
        return None;
    }
    Some(found)
}

/// Reports that `step` failed with `error` on the device named `label`.
pub fn fail_step(report: &mut Report, label: &dyn fmt::Display, step: &str, error: VirtioError) {
    report.fail(format_args!(
        "{}",
        Failure {
            device: &label,
            step,
            error
        }
    ));
}

/// Runs `exercise` on the virtio-mmio device `d` with the DMA pool, then resets the device.
/// A window that cannot be mapped, no DMA pool, or a failed reset is reported under `label`;
/// after a failed reset the pool is never reused, since the device may still write to it.
/// `None` when `exercise` could not run.
pub fn with_device<T>(
    d: &Device,
    label: &dyn fmt::Display,
    report: &mut Report,
    exercise: impl FnOnce(&Mmio, &DmaPool) -> T,
) -> Option<T> {
    with_device_in(d, label, report, DmaPool::take, exercise)
}

/// [`with_device`] with the large DMA arena ([`DmaPool::take_large`]), for the benchmarks.
pub fn with_device_large<T>(
    d: &Device,
    label: &dyn fmt::Display,
    report: &mut Report,
    exercise: impl FnOnce(&Mmio, &DmaPool) -> T,
) -> Option<T> {
    with_device_in(d, label, report, DmaPool::take_large, exercise)
}

fn with_device_in<T>(
    d: &Device,
    label: &dyn fmt::Display,
    report: &mut Report,
    take: fn() -> Option<DmaPool>,
    exercise: impl FnOnce(&Mmio, &DmaPool) -> T,
) -> Option<T> {
    let mmio = match Mmio::new(d.base, d.size) {
        Ok(m) => m,
        Err(e) => {
            fail_step(report, label, "window", e);
            return None;
        }
    };
    let Some(pool) = take() else {
        fail_step(report, label, "setup", VirtioError::NoDma);
        return None;
    };
    let result = exercise(&mmio, &pool);
    match virtio::reset(&mmio) {
        Ok(()) => drop(pool),
        Err(e) => {
            fail_step(report, label, "reset", e);
            pool.keep_forever();
        }
    }
    Some(result)
}

/// The check called `name`.
pub fn find(name: &[u8]) -> Option<&'static Check> {
    REGISTRY.iter().find(|c| c.name.as_bytes() == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn registry_names_are_unique_and_findable() {
        for (i, check) in REGISTRY.iter().enumerate() {
            assert!(REGISTRY[..i].iter().all(|c| c.name != check.name));
            assert!(find(check.name.as_bytes()).is_some());
        }
        assert!(find(b"bogus").is_none());
    }

    #[test]
    fn report_joins_findings() {
        let mut r = Report::default();
        r.detail(format_args!("a {}", 1));
        r.detail(format_args!("b"));
        assert!(!r.failed());
        assert_eq!(r.details().to_string(), "a 1; b");
        r.fail(format_args!("x"));
        assert!(r.failed());
        assert_eq!(r.problems().to_string(), "x");
    }
}
