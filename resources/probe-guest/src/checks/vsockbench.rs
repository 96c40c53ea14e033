//! The `vsockbench` check: how fast does the virtio-vsock device (DeviceID 19) carry one
//! stream connection?
//!
//! A benchmark, not a verification: the first virtio-vsock device is driven by polling with
//! the large DMA arena (`vsock::bench`: 64 KiB buffers, credit kept open). It prints `probe:
//! vsockbench ready MODE (...)`, accepts one host connection to guest port
//! `probe.vsockbench_port` (default 52) within 30 s, and by `probe.vsockbench`:
//!
//! - `echo` (default): sends every byte back until the host shuts the connection down;
//! - `sink`: counts what arrives and drops it, until the host shuts the connection down;
//! - `source`: sends packets of up to 64 KiB (as the host's credit allows) for
//!   `probe.vsockbench_ms` (default 2000), then shuts the connection down.
//!
//! Then one line for tools: `probe: vsockbench MODE rx_bytes=B rx_packets=P tx_bytes=B
//! tx_packets=P ns=T credit_updates=U` (ns: from the first data packet, either way, to the
//! last, by the TSC). A connection that does not end within 10 minutes fails. The device is
//! reset afterwards.

use core::fmt;

use crate::checks::vsock::Label;
use crate::checks::{self, Context, Report};
use crate::text::Escaped;
use crate::tsc;
use crate::virtio::{AnyTransport, DmaPool, DEVICE_ID_VSOCK};
use crate::vsock::bench::{BenchDriver, Mode, Stats};
use crate::vsock::Problem;

/// Default port.
const DEFAULT_PORT: u64 = 52;
/// Default sending time of a source, ms.
const DEFAULT_MS: u64 = 2000;
/// How long the host has to connect, ms.
const ACCEPT_MS: u64 = 30_000;
/// How long an echo or sink connection may last, ms.
const SERVE_MS: u64 = 600_000;

/// Runs the vsockbench check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    let a = ctx.args;
    let mode = match a.vsockbench {
        None => Mode::Echo,
        Some(raw) => match Mode::parse(raw) {
            Some(m) => m,
            None => {
                return report.fail(format_args!(
                    "probe.vsockbench={}: expected echo, sink or source",
                    Escaped(raw)
                ))
            }
        },
    };
    let port = match a.vsockbench_port {
        None => DEFAULT_PORT,
        Some(Ok(p)) if p < 0xffff_ffff => p,
        Some(Ok(p)) => {
            return report.fail(format_args!(
                "probe.vsockbench_port={p}: expected 0..=4294967294"
            ))
        }
        Some(Err(raw)) => {
            return report.fail(format_args!(
                "probe.vsockbench_port={}: expected 0..=4294967294",
                Escaped(raw)
            ))
        }
    };
    let ms = match a.vsockbench_ms {
        None => DEFAULT_MS,
        Some(Ok(ms)) if ms > 0 => ms,
        Some(Ok(_)) | Some(Err(_)) => {
            return report.fail(format_args!(
                "probe.vsockbench_ms: expected a number of ms from 1"
            ))
        }
    };
    let Some(devices) = checks::find_devices(ctx, report, DEVICE_ID_VSOCK, "virtio-vsock") else {
        return;
    };
    let Some(d) = devices.iter().next() else {
        return;
    };
    let label = Label(d);
    // Interrupts are suppressed in the benchmark: the MSI-X verdict proves nothing here.
    let Some((result, _)) = checks::with_transport_large(d, &label, report, |t, pool| {
        exercise(t, pool, mode, port as u32, ms)
    }) else {
        return;
    };
    match result {
        Ok((cid, stats)) => report.detail(format_args!(
            "{label}, cid {cid}, port {port}, {}",
            Summary(mode, stats)
        )),
        Err(Problem::Virtio(step, e)) => checks::fail_step(report, &label, step, e),
        Err(p) => report.fail(format_args!("{label}: {p}")),
    }
}

/// Starts the device, serves the connection, prints the line.
fn exercise(
    t: &AnyTransport,
    pool: &DmaPool,
    mode: Mode,
    port: u32,
    ms: u64,
) -> Result<(u64, Stats), Problem> {
    let mut d = BenchDriver::start(t, pool, mode, port)?;
    let ticks_per_ms = tsc::ticks_per_ms();
    crate::println!(
        "probe: vsockbench ready {} (cid {}, port {port}, {} receive buffers of 64 KiB, \
         buf_alloc {})",
        mode.name(),
        d.cid(),
        d.rx_chains(),
        mode.buf_alloc()
    );
    d.accept(ACCEPT_MS)?;
    match mode {
        Mode::Echo | Mode::Sink => d.serve(SERVE_MS)?,
        Mode::Source => d.source(ms)?,
    }
    let s = d.stats;
    let ns = s.first.map_or(0, |f| {
        tsc::ticks_to_ns_at(s.last.wrapping_sub(f), ticks_per_ms)
    });
    crate::println!(
        "probe: vsockbench {} rx_bytes={} rx_packets={} tx_bytes={} tx_packets={} ns={ns} \
         credit_updates={}",
        mode.name(),
        s.rx_bytes,
        s.rx_packets,
        s.tx_bytes,
        s.tx_packets,
        s.credit_updates
    );
    Ok((d.cid(), s))
}

/// The ok line's figures.
struct Summary(Mode, Stats);

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.1;
        write!(
            f,
            "{}: received {} bytes in {} packets, sent {} bytes in {} packets",
            self.0.name(),
            s.rx_bytes,
            s.rx_packets,
            s.tx_bytes,
            s.tx_packets
        )
    }
}
