//! The `vsock` check: does the virtio-vsock device (DeviceID 19) carry stream connections
//! both ways?
//!
//! The devices are found on the transports `probe.transport` allows (virtio-mmio: the command
//! line and the DSDT, which must agree; virtio-pci: bus 0; see `discovery`); the first
//! virtio-vsock device is driven by polling (`vsock`: Firecracker's
//! model, the guest CID from the configuration space, the host at CID 2):
//!
//! 1. echo server: listens on guest port `probe.vsock_port` (default 52), answers each host
//!    OP_REQUEST with OP_RESPONSE (up to 4 connections at once), sends every byte received back
//!    on its connection, within the host's credit, until the host sends OP_SHUTDOWN or OP_RST;
//!    runs until `probe.vsock_conns` (default 1) connections were served and closed, within
//!    `probe.vsock_timeout_s` (default 30) seconds;
//! 2. with `probe.vsock_host_port=P`: connects to host CID 2 port P, sends `probe vsock ok\n`,
//!    then OP_SHUTDOWN.
//!
//! The device is reset afterwards.

use core::fmt;

use crate::checks::{self, Context, Report, Via};
use crate::cmdline::Setting;
use crate::discovery::Found;
use crate::text::Escaped;
use crate::virtio::{AnyTransport, DmaPool, DEVICE_ID_VSOCK};
use crate::vsock::{Driver, Problem};

/// The line sent to `probe.vsock_host_port`.
pub const HOST_LINE: &[u8] = b"probe vsock ok\n";

/// Reads a numeric key in `range` (`default` when absent); reports a bad value.
fn number(
    setting: Setting<'_, u64>,
    key: &str,
    range: core::ops::RangeInclusive<u64>,
    default: Option<u64>,
    report: &mut Report,
) -> Result<Option<u64>, ()> {
    match setting {
        None => Ok(default),
        Some(Ok(n)) if range.contains(&n) => Ok(Some(n)),
        Some(Ok(n)) => {
            report.fail(format_args!(
                "probe.{key}={n}: expected {}..={}",
                range.start(),
                range.end()
            ));
            Err(())
        }
        Some(Err(raw)) => {
            report.fail(format_args!(
                "probe.{key}={}: expected {}..={}",
                Escaped(raw),
                range.start(),
                range.end()
            ));
            Err(())
        }
    }
}

/// Runs the vsock check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    let a = ctx.args;
    let port = number(
        a.vsock_port,
        "vsock_port",
        0..=0xffff_fffe,
        Some(52),
        report,
    );
    let host_port = number(
        a.vsock_host_port,
        "vsock_host_port",
        0..=0xffff_fffe,
        None,
        report,
    );
    let conns = number(a.vsock_conns, "vsock_conns", 0..=1_000_000, Some(1), report);
    let timeout = number(
        a.vsock_timeout_s,
        "vsock_timeout_s",
        1..=3600,
        Some(30),
        report,
    );
    let (Ok(Some(port)), Ok(host_port), Ok(Some(conns)), Ok(Some(timeout))) =
        (port, host_port, conns, timeout)
    else {
        return;
    };
    let Some(devices) = checks::find_devices(ctx, report, DEVICE_ID_VSOCK, "virtio-vsock") else {
        return;
    };
    let Some(d) = devices.iter().next() else {
        return;
    };
    let label = Label(d);
    let Some((result, irq)) = checks::with_transport(d, &label, report, |t, pool| {
        exercise(
            t,
            pool,
            port as u32,
            conns as u32,
            timeout * 1000,
            host_port.map(|p| p as u32),
        )
    }) else {
        return;
    };
    match result {
        Ok(o) => {
            report.detail(format_args!(
                "cid {}, echoed {} bytes over {} connections, {}",
                o.cid,
                o.echoed,
                o.served,
                Via { device: d, irq }
            ));
        }
        Err(Problem::Virtio(step, e)) => checks::fail_step(report, &label, step, e),
        Err(p) => report.fail(format_args!("{label}: {p}")),
    }
}

/// What the check found.
struct Outcome {
    cid: u64,
    echoed: u64,
    served: u32,
}

/// Starts the device, serves the echo connections, then connects to the host if asked.
fn exercise(
    t: &AnyTransport,
    pool: &DmaPool,
    port: u32,
    conns: u32,
    timeout_ms: u64,
    host_port: Option<u32>,
) -> Result<Outcome, Problem> {
    let mut d = Driver::start(t, pool)?;
    d.serve(port, conns, timeout_ms)?;
    if let Some(p) = host_port {
        d.connect_and_send(p, HOST_LINE)?;
    }
    Ok(Outcome {
        cid: d.cid(),
        echoed: d.stats.echoed,
        served: d.stats.served,
    })
}

/// How the device is named in problems (by the `vsockbench` check too): "virtio-vsock at
/// 0xc0005000", "virtio-vsock at 00:05.0".
pub struct Label<'a>(pub &'a Found);

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtio-vsock at {}", self.0.at())
    }
}
