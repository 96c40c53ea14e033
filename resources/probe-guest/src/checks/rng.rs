//! The `rng` check: does every virtio-rng (entropy, DeviceID 4) device hand out random bytes?
//!
//! The devices are found on the transports `probe.transport` allows (virtio-mmio: the command
//! line and the DSDT, which must agree; virtio-pci: bus 0; see `discovery`); there must be at
//! least one. Each is initialized (no feature beyond
//! VIRTIO_F_VERSION_1), given one device-writable 64-byte buffer on queue 0, and polled for
//! the answer: the used length must be 1..=64 and the bytes written not all equal. The device
//! is reset afterwards.

use crate::checks::{self, Context, Label, Report, Via};
use crate::discovery::Found;
use crate::virtio::{self, AnyTransport, DmaPool, VirtioError, DEVICE_ID_ENTROPY};

/// Bytes asked for.
const REQUEST_LEN: usize = 64;
/// Entries of queue 0 at most.
const QUEUE_LIMIT: u16 = 16;
/// How long the device may take, ms.
const TIMEOUT_MS: u64 = 2000;

/// Runs the rng check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    let Some(devices) = checks::find_devices(ctx, report, DEVICE_ID_ENTROPY, "virtio-rng") else {
        return;
    };
    for d in devices.iter() {
        check_device(d, report);
    }
}

/// What went wrong with one device.
enum Problem {
    /// In the virtio machinery, at a step.
    Virtio(&'static str, VirtioError),
    /// The used length is not 1..=64.
    Len(u32),
    /// Every byte written is this one.
    AllEqual(u8, u32),
}

/// Drives one device through a request, then resets it.
fn check_device(d: &Found, report: &mut Report) {
    let label = Label {
        kind: "virtio-rng",
        device: d,
    };
    let Some((result, irq)) = checks::with_transport(d, &label, report, request) else {
        return;
    };
    match result {
        Ok(len) => report.detail(format_args!(
            "{}, {len} bytes",
            Via { device: d, irq }
        )),
        Err(Problem::Virtio(step, error)) => checks::fail_step(report, &label, step, error),
        Err(Problem::Len(len)) => report.fail(format_args!(
            "{label}: used length {len} for a {REQUEST_LEN}-byte buffer (expected 1..={REQUEST_LEN})"
        )),
        Err(Problem::AllEqual(b, len)) => report.fail(format_args!(
            "{label}: all {len} bytes are 0x{b:02x}"
        )),
    }
}

/// Initializes the device, asks for [`REQUEST_LEN`] bytes, checks them; the number of bytes.
fn request(t: &AnyTransport, pool: &DmaPool) -> Result<u32, Problem> {
    let v = |step| move |e| Problem::Virtio(step, e);
    let (_, _, mut queue) = virtio::start_one_queue(t, pool, 0, QUEUE_LIMIT)
        .map_err(|(step, e)| Problem::Virtio(step, e))?;
    let buf = pool
        .alloc(REQUEST_LEN, 16)
        .ok_or(Problem::Virtio("setup", VirtioError::NoDma))?;
    let used = virtio::transact(t, &mut queue, &[buf.writable(REQUEST_LEN)], TIMEOUT_MS)
        .map_err(v("request"))?;
    if used.len == 0 || used.len as usize > REQUEST_LEN {
        return Err(Problem::Len(used.len));
    }
    let first = buf.read_u8(0);
    if used.len >= 2 && (1..used.len as usize).all(|i| buf.read_u8(i) == first) {
        return Err(Problem::AllEqual(first, used.len));
    }
    Ok(used.len)
}
