//! The checks the probe can run, and what they share.
//!
//! A check is a function that looks at the platform and writes its findings into a [`Report`]:
//! details for the `ok` line, and problems that make it fail. `probe.tests=a,b,c` runs checks by
//! name, in order, from [`REGISTRY`]. To add one (`blk`, `rng`, `net`, `vsock`, `pci`...): write
//! `checks/NAME.rs` with `pub fn run(ctx: &Context<'_>, report: &mut Report)`, declare the module
//! here and add a [`Check`] to the registry.

use core::fmt::{self, Write};

use crate::bootparams::{BootParams, CmdlineError};
use crate::cmdline::{Args, PciIrq, TransportChoice};
use crate::discovery::{self, DeviceList, Found, FoundList, Listed, ListedPci, PciDevice};
use crate::phys::PhysMem;
use crate::text::{Escaped, Line};
use crate::virtio::pci::{IrqVerdict, PciTransport};
use crate::virtio::{self, AnyTransport, DmaPool, Failure, Mmio, VirtioError};

pub mod blk;
pub mod blkbench;
pub mod boot;
pub mod net;
pub mod netbench;
pub mod pci;
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
    Check {
        name: "pci",
        run: pci::run,
    },
];

/// The transports `probe.transport` lets the checks use (default any); a bad value is a
/// problem (`None`).
pub fn transport_choice(ctx: &Context<'_>, report: &mut Report) -> Option<TransportChoice> {
    match ctx.args.transport {
        None => Some(TransportChoice::Any),
        Some(Ok(choice)) => Some(choice),
        Some(Err(raw)) => {
            report.fail(format_args!(
                "probe.transport={}: expected mmio, pci or any",
                Escaped(raw)
            ));
            None
        }
    }
}

/// How the virtio-pci transport is to take interrupts (`probe.pci_irq`, default msix-masked); a
/// bad value is a problem (`None`).
pub fn pci_irq(ctx: &Context<'_>, report: &mut Report) -> Option<PciIrq> {
    match ctx.args.pci_irq {
        None => Some(PciIrq::default()),
        Some(Ok(mode)) => Some(mode),
        Some(Err(raw)) => {
            report.fail(format_args!(
                "probe.pci_irq={}: expected msix-masked, intx, msix or intx-ioapic",
                Escaped(raw)
            ));
            None
        }
    }
}

/// The virtio devices with DeviceID `device_id`, for a check, on the transports
/// `probe.transport` allows: the virtio-mmio ones in command-line order, then the virtio-pci
/// ones in bus order.
///
/// virtio-mmio: every device is found both ways ([`discovery::find`]: the command line and the
/// DSDT must agree) and identified (MagicValue, Version 2, DeviceID; reads only); a window
/// without a virtio-mmio device behind it is a problem, DeviceID 0 (a placeholder) is skipped.
/// virtio-pci: bus 0 through the MCFG's ECAM region ([`discovery::find_pci`]; no MCFG, no PCI
/// devices, unless `probe.transport=pci`), each to be driven as `probe.pci_irq` says (checked
/// first when PCI is allowed); a malformed virtio function is a problem. With no
/// device of the kind, the problem is "no NAME device". `None` (problems reported) when the
/// devices could not be found or there is none of the kind.
pub fn find_devices(
    ctx: &Context<'_>,
    report: &mut Report,
    device_id: u32,
    name: &str,
) -> Option<FoundList> {
    let choice = transport_choice(ctx, report)?;
    let mmio = match choice {
        TransportChoice::Pci => None,
        _ => Some(discovery::find(ctx, report)),
    };
    let irq = match choice {
        TransportChoice::Mmio => PciIrq::default(),
        _ => pci_irq(ctx, report)?,
    };
    let pci = match choice {
        TransportChoice::Mmio => None,
        _ => Some(discovery::find_pci(
            ctx,
            report,
            choice == TransportChoice::Pci,
        )),
    };
    let mut found = FoundList::new();
    if let Some(all) = &mmio {
        for d in all.as_ref()?.as_slice() {
            match Mmio::new(d.base, d.size).and_then(|m| m.identify()) {
                Ok(id) if id.device_id == device_id => {
                    // `found` is as large as `all`.
                    let _ = found.push(Found::Mmio(*d));
                }
                Ok(_) => {}
                Err(e) => report.fail(format_args!("virtio-mmio device {d}: {e}")),
            }
        }
    }
    if let Some(list) = &pci {
        for p in list.as_ref()?.iter() {
            if u32::from(p.function.device_type) == device_id
                && !found.push(Found::Pci(PciDevice { irq, ..*p }))
            {
                report.fail(format_args!(
                    "more than {} virtio devices",
                    discovery::MAX_DEVICES
                ));
                return None;
            }
        }
    }
    if found.is_empty() {
        let seen = Seen {
            mmio: mmio.as_ref().and_then(Option::as_ref),
            pci: pci.as_ref().and_then(Option::as_ref),
        };
        report.fail(format_args!("no {name} device ({seen})"));
        return None;
    }
    Some(found)
}

/// What was found, for "no NAME device (...)".
struct Seen<'a> {
    mmio: Option<&'a DeviceList>,
    pci: Option<&'a discovery::PciList>,
}

impl fmt::Display for Seen<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = self.mmio {
            write!(f, "virtio-mmio devices: {}", Listed(m.as_slice()))?;
        }
        if let Some(p) = self.pci {
            if self.mmio.is_some() {
                write!(f, "; ")?;
            }
            write!(f, "virtio-pci devices: {}", ListedPci(p))?;
        }
        Ok(())
    }
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

/// Opens the device `d` for a driver: the virtio-mmio window, or the virtio-pci function
/// (memory decode, bus mastering, interrupts as its `irq` says; see `virtio::pci`). A device that
/// cannot be opened is reported under `label` (step "window" or "pci setup").
pub fn open(d: &Found, label: &dyn fmt::Display, report: &mut Report) -> Option<AnyTransport> {
    match d {
        Found::Mmio(m) => match Mmio::new(m.base, m.size) {
            Ok(mmio) => Some(AnyTransport::Mmio(mmio)),
            Err(e) => {
                fail_step(report, label, "window", e);
                None
            }
        },
        Found::Pci(p) => match PciTransport::open(&p.ecam, &p.function, p.irq) {
            Ok(t) => Some(AnyTransport::Pci(t)),
            Err(e) => {
                report.fail(format_args!("{label}: pci setup: {e}"));
                None
            }
        },
    }
}

/// Ends a driver's use of `t`: on virtio-pci, the interrupt verdict (a refused vector, used
/// buffers without a pending bit, an ISR bit or an interrupt, is a problem), then the reset;
/// after a failed reset the pool is never reused, since the device may still write to it.
/// Returns the interrupt verdict (virtio-pci only).
pub fn close(
    t: &AnyTransport,
    pool: DmaPool,
    label: &dyn fmt::Display,
    report: &mut Report,
) -> Option<IrqVerdict> {
    let verdict = t.as_pci().map(PciTransport::irq_verdict);
    if let Some(v) = verdict.filter(IrqVerdict::failed) {
        report.fail(format_args!("{label}: {v}"));
    }
    match virtio::reset(t) {
        Ok(()) => drop(pool),
        Err(e) => {
            fail_step(report, label, "reset", e);
            pool.keep_forever();
        }
    }
    verdict
}

/// Runs `exercise` on the device `d` (either transport) with the DMA pool, then ends with
/// [`close`]. A device that cannot be opened or no DMA pool is reported under `label`. `None`
/// when `exercise` could not run; else its result and the interrupt verdict (virtio-pci).
pub fn with_transport<T>(
    d: &Found,
    label: &dyn fmt::Display,
    report: &mut Report,
    exercise: impl FnOnce(&AnyTransport, &DmaPool) -> T,
) -> Option<(T, Option<IrqVerdict>)> {
    with_transport_in(d, label, report, DmaPool::take, exercise)
}

/// [`with_transport`] with the large DMA arena ([`DmaPool::take_large`]), for the benchmarks.
pub fn with_transport_large<T>(
    d: &Found,
    label: &dyn fmt::Display,
    report: &mut Report,
    exercise: impl FnOnce(&AnyTransport, &DmaPool) -> T,
) -> Option<(T, Option<IrqVerdict>)> {
    with_transport_in(d, label, report, DmaPool::take_large, exercise)
}

fn with_transport_in<T>(
    d: &Found,
    label: &dyn fmt::Display,
    report: &mut Report,
    take: fn() -> Option<DmaPool>,
    exercise: impl FnOnce(&AnyTransport, &DmaPool) -> T,
) -> Option<(T, Option<IrqVerdict>)> {
    let t = open(d, label, report)?;
    let Some(pool) = take() else {
        fail_step(report, label, "setup", VirtioError::NoDma);
        return None;
    };
    let result = exercise(&t, &pool);
    let irq = close(&t, pool, label, report);
    Some((result, irq))
}

/// Which transport a check used, for its `ok` line: "virtio-mmio at 0xc0001000 irq 5", or
/// "virtio-pci 00:01.0 (MSI-X masked, vector 1 pending)", "virtio-pci 00:03.0 (INTx GSI 19, ISR
/// 0x1)".
pub struct Via<'a> {
    /// The device.
    pub device: &'a Found,
    /// What the interrupt watch showed (virtio-pci).
    pub irq: Option<IrqVerdict>,
}

impl fmt::Display for Via<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.device {
            Found::Mmio(d) => write!(f, "virtio-mmio at 0x{:x} {}", d.base, d.irqs),
            Found::Pci(p) => {
                write!(f, "virtio-pci {}", p.function.bdf)?;
                match &self.irq {
                    Some(v) => write!(f, " ({v})"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Names a device of a kind in problems: "virtio-rng at 0xc0003000", "virtio-rng at 00:04.0".
pub struct Label<'a> {
    /// The kind ("virtio-rng").
    pub kind: &'static str,
    /// The device.
    pub device: &'a Found,
}

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.kind, self.device.at())
    }
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
