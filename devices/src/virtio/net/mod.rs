//! virtio-net (device type 1) over a host TAP interface or a stream to passt.
//!
//! - `tap`: opening an existing TAP interface by name ([`Tap`]), with the 12-byte virtio-net
//!   header on every frame and the offloads the guest negotiated.
//! - `stream`: a stream socket to passt ([`FrameStream`]): each frame behind its length as a
//!   4-byte big-endian number, no virtio-net header, partial reads and writes buffered.
//! - `worker`: the device thread ([`NetWorker`]): the receive queue (frames from the backend
//!   into guest buffers, mergeable or not), the transmit queue (guest frames to the backend),
//!   the two rate limiters.
//! - `control`: [`NetControl`], changing the rate limiters while the guest runs.
//!
//! Two queues: 0 is receive, 1 is transmit (no multiqueue, no control queue). The backend
//! ([`Backend`]) and the rate limiters (their timers) are set up by [`Net::new`], before any
//! guest runs, and outlive activations: a worker takes the limiters when the driver sets
//! DRIVER_OK and gives them back when it stops, so no descriptor is created on a device
//! thread. A tap's offloads are set at each activation from the features the driver accepted.
//!
//! Features offered over a tap:
//! - VERSION_1 (always; the header is then `virtio_net_hdr_v1`, 12 bytes, with
//!   `num_buffers`), EVENT_IDX;
//! - MAC when a MAC address is configured (otherwise the guest picks one), STATUS (the link
//!   is always up);
//! - MRG_RXBUF: a received frame may span several receive chains;
//! - CSUM, HOST_TSO4, HOST_TSO6, HOST_ECN, HOST_UFO: the guest may send frames with a partial
//!   checksum or needing segmentation; the tap's kernel side does that work;
//! - GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN, GUEST_UFO: each only when the kernel
//!   accepts the matching TUNSETOFFLOAD flag on this tap (UFO is refused by some kernels).
//!
//! Over a stream to passt, the same without any offload (no CSUM, HOST_*, GUEST_*): passt
//! takes and gives only complete frames with their checksums.
//!
//! Not offered: CTRL_VQ (and so no promiscuous/VLAN filtering or announce), MQ, MTU,
//! GUEST_ANNOUNCE, the hash and RSS features, USO.

mod control;
mod stream;
mod tap;
mod worker;

/// The seccomp kinds of net device threads, one per backend.
pub(crate) fn seccomp_kinds() -> [&'static crate::seccomp::DeviceKind; 2] {
    [&worker::TAP_KIND, &worker::PASST_KIND]
}

#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::worker::{spawn, WorkerHandle};
use super::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::rate_limiter::{RateLimiterConfig, RateLimiterError};

pub use control::{NetControl, CONTROL_TIMEOUT};
pub use stream::{FrameStream, StreamError, MAX_STREAM_FRAME};
pub use tap::{
    check_name as check_tap_name, Tap, TapError, MAX_NAME_LEN, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6,
    TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN,
};
pub use worker::{NetWorker, MAX_RX_FRAME, MAX_TX_FRAME, RX_BATCH};

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;

/// virtio-net feature bits (virtio 1.2, 5.1.3).
pub mod features {
    /// The device handles packets with a partial checksum (the guest may offload it).
    pub const CSUM: u32 = 0;
    /// The driver handles packets with a partial checksum.
    pub const GUEST_CSUM: u32 = 1;
    /// The device has a MAC address in its configuration space.
    pub const MAC: u32 = 5;
    /// The driver can receive TSOv4.
    pub const GUEST_TSO4: u32 = 7;
    /// The driver can receive TSOv6.
    pub const GUEST_TSO6: u32 = 8;
    /// The driver can receive TSO with ECN.
    pub const GUEST_ECN: u32 = 9;
    /// The driver can receive UFO.
    pub const GUEST_UFO: u32 = 10;
    /// The device can receive TSOv4.
    pub const HOST_TSO4: u32 = 11;
    /// The device can receive TSOv6.
    pub const HOST_TSO6: u32 = 12;
    /// The device can receive TSO with ECN.
    pub const HOST_ECN: u32 = 13;
    /// The device can receive UFO.
    pub const HOST_UFO: u32 = 14;
    /// The driver can merge receive buffers.
    pub const MRG_RXBUF: u32 = 15;
    /// The configuration status field is available.
    pub const STATUS: u32 = 16;
}

/// The link-up bit of the configuration space's status field.
pub const STATUS_LINK_UP: u16 = 1;

/// What a network device's frames go through on the host.
#[derive(Debug)]
pub enum NetBackendConfig {
    /// An existing host TAP interface, by name.
    Tap {
        /// The interface's name.
        name: String,
    },
    /// A connected stream socket whose other end passt serves (`passt --fd`): frames behind
    /// 4-byte big-endian lengths. The device takes ownership of the descriptor.
    Stream(OwnedFd),
}

/// How to build a network device.
#[derive(Debug)]
pub struct NetConfig {
    /// Where the frames go.
    pub backend: NetBackendConfig,
    /// The guest's MAC address; `None` leaves the choice to the guest.
    pub mac: Option<[u8; 6]>,
    /// Limits what the guest receives (bytes and frames).
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits what the guest sends (bytes and frames).
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Why a network device could not be created or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The stream to passt could not be set up.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A rate limiter (its timer) could not be created.
    #[error("virtio-net ({device}): cannot create the rate limiter: {source}")]
    RateLimiter {
        /// The backend ("tap NAME").
        device: String,
        /// The error.
        #[source]
        source: RateLimiterError,
    },
    /// An eventfd of the device could not be created or written.
    #[error("virtio-net ({device}): {what}: {source}")]
    Io {
        /// The backend ("tap NAME").
        device: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The device thread did not take a change ([`NetControl`]) in time; the change was
    /// withdrawn and the limiters are as they were.
    #[error(
        "virtio-net ({device}): the device thread did not take the change within {timeout:?}; \
         nothing was changed"
    )]
    Timeout {
        /// The backend ("tap NAME").
        device: String,
        /// How long the caller waited.
        timeout: std::time::Duration,
    },
}

/// The host side of a network device.
#[derive(Debug)]
pub enum Backend {
    /// A TAP interface: frames with a virtio-net header, offloads.
    Tap(Tap),
    /// A stream to passt: length-prefixed frames, no header, no offloads.
    Stream(FrameStream),
}

impl Backend {
    /// Sets up the backend `config` describes.
    pub fn open(config: NetBackendConfig) -> Result<Self, NetError> {
        Ok(match config {
            NetBackendConfig::Tap { name } => Backend::Tap(Tap::open(&name)?),
            NetBackendConfig::Stream(fd) => Backend::Stream(FrameStream::new(fd)?),
        })
    }

    /// What the backend is, for messages: "tap NAME" or "stream to passt".
    pub fn describe(&self) -> String {
        match self {
            Backend::Tap(t) => format!("tap {}", t.name()),
            Backend::Stream(_) => "stream to passt".to_string(),
        }
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Backend::Tap(t) => t.as_raw_fd(),
            Backend::Stream(s) => s.as_raw_fd(),
        }
    }
}

/// Counters of a network device, shared with whoever reads them (the VMM's metrics). They
/// count from the device's creation, across resets. Bytes are those of Ethernet frames,
/// without the virtio-net header.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Bytes of the frames delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames read from the backend that never reached the guest (bad receive chains, a frame
    /// larger than every buffer the guest could post, tap read errors).
    pub rx_dropped: AtomicU64,
    /// Malformed receive chains (device-readable descriptors, addresses outside guest
    /// memory, a first buffer shorter than the header), returned to the guest unused.
    pub rx_errors: AtomicU64,
    /// Times a received frame was held back by the receive rate limiter.
    pub rx_throttled: AtomicU64,
    /// Bytes of the frames written to the backend (or, on a full stream, queued for it).
    pub tx_bytes: AtomicU64,
    /// Frames written to the backend (or, on a full stream, queued for it).
    pub tx_frames: AtomicU64,
    /// Guest frames that were not sent (malformed chains, tap write errors).
    pub tx_dropped: AtomicU64,
    /// Malformed transmit chains (short header, device-writable descriptors, larger than
    /// [`MAX_TX_FRAME`], addresses outside guest memory).
    pub tx_errors: AtomicU64,
    /// Times a transmit chain was held back by the transmit rate limiter.
    pub tx_throttled: AtomicU64,
}

/// The network device.
pub struct Net {
    backend: Arc<Backend>,
    mac: Option<[u8; 6]>,
    /// The rate limiters (while no worker runs) and their control.
    shared: Arc<control::Shared>,
    avail_features: u64,
    worker: Option<WorkerHandle>,
    metrics: Arc<NetMetrics>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("backend", &self.backend.describe())
            .field("mac", &self.mac)
            .field("rate_limiters", &self.shared.rate_limiters())
            .field("active", &self.worker.is_some())
            .finish()
    }
}

/// The features offered whatever the backend.
fn base_features(mac: bool) -> u64 {
    use features::*;
    let mut f: u64 = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << STATUS)
        | (1 << MRG_RXBUF);
    if mac {
        f |= 1 << MAC;
    }
    f
}

/// The features offered over `backend`: over a tap, the host offloads and the guest
/// offloads its kernel accepts; over a stream, none.
fn offered_features(mac: bool, backend: &Backend) -> u64 {
    use features::*;
    let Backend::Tap(tap) = backend else {
        return base_features(mac);
    };
    let offloads = tap.supported_offloads();
    let mut f = base_features(mac)
        | (1 << CSUM)
        | (1 << HOST_TSO4)
        | (1 << HOST_TSO6)
        | (1 << HOST_ECN)
        | (1 << HOST_UFO);
    if offloads & TUN_F_CSUM != 0 {
        f |= 1 << GUEST_CSUM;
        for (flag, bit) in [
            (TUN_F_TSO4, GUEST_TSO4),
            (TUN_F_TSO6, GUEST_TSO6),
            (TUN_F_TSO_ECN, GUEST_ECN),
            (TUN_F_UFO, GUEST_UFO),
        ] {
            if offloads & flag != 0 {
                f |= 1 << bit;
            }
        }
    }
    f
}

/// The TUNSETOFFLOAD flags matching the features the driver accepted: what the tap may hand
/// us is what the guest can take.
pub fn offloads_for(acked: u64) -> u32 {
    use features::*;
    let has = |bit: u32| acked & (1 << bit) != 0;
    if !has(GUEST_CSUM) {
        return 0;
    }
    let mut o = TUN_F_CSUM;
    for (bit, flag) in [
        (GUEST_TSO4, TUN_F_TSO4),
        (GUEST_TSO6, TUN_F_TSO6),
        (GUEST_ECN, TUN_F_TSO_ECN),
        (GUEST_UFO, TUN_F_UFO),
    ] {
        if has(bit) {
            o |= flag;
        }
    }
    o
}

impl Net {
    /// Sets up the backend (opens the tap, or takes the stream) and the rate limiters (their
    /// timers), and makes an inactive device over them.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let backend = Backend::open(config.backend)?;
        let device = backend.describe();
        let limiters = control::Limiters::new(
            config.rx_rate_limiter.as_ref(),
            config.tx_rate_limiter.as_ref(),
        )
        .map_err(|source| NetError::RateLimiter {
            device: device.clone(),
            source,
        })?;
        let shared =
            control::Shared::new(device.clone(), limiters).map_err(|source| NetError::Io {
                device,
                what: "cannot create the control eventfd",
                source,
            })?;
        let avail_features = offered_features(config.mac.is_some(), &backend);
        Ok(Self {
            backend: Arc::new(backend),
            mac: config.mac,
            shared: Arc::new(shared),
            avail_features,
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// A handle that changes the rate limiters while the guest runs; take it before the
    /// device goes into its transport.
    pub fn control(&self) -> NetControl {
        NetControl::new(self.shared.clone())
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The tap's name; `None` over a stream.
    pub fn tap_name(&self) -> Option<&str> {
        match &*self.backend {
            Backend::Tap(t) => Some(t.name()),
            Backend::Stream(_) => None,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The configuration space: the MAC address (zeros without one) and the status.
    fn config_space(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac.unwrap_or_default());
        c[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        use virtio_queue::QueueT;
        let got = ctx.queues.len();
        if self.worker.is_some() {
            return Err(ActivateError::Backend(format!(
                "virtio-net ({}): activated twice",
                self.backend.describe()
            )));
        }
        let mut queues = ctx.queues.into_iter();
        let (Some(mut rx), Some(mut tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::MissingQueues { want: 2, got });
        };
        let acked = ctx.acked_features & self.avail_features;
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.queue.set_event_idx(event_idx);
        tx.queue.set_event_idx(event_idx);
        if let Backend::Tap(tap) = &*self.backend {
            tap.set_offloads(offloads_for(acked))
                .map_err(|e| ActivateError::Backend(e.to_string()))?;
        }
        let limiters = match self.shared.take_limiters() {
            Some(l) => l,
            None => {
                // A previous worker never gave them back: start again from what was in force.
                let (rx, tx) = self.shared.rate_limiters();
                control::Limiters::new(rx.as_ref(), tx.as_ref()).map_err(|e| {
                    ActivateError::Backend(format!("virtio-net ({}): {e}", self.backend.describe()))
                })?
            }
        };
        let worker = NetWorker::new(
            ctx.mem,
            rx,
            tx,
            self.backend.clone(),
            ctx.interrupt.clone(),
            limiters.rx,
            limiters.tx,
            acked & (1 << features::MRG_RXBUF) != 0,
            self.metrics.clone(),
        )
        .with_control(self.shared.clone());
        // On failure the worker is dropped here and gives the limiters back.
        self.worker = Some(spawn(worker, ctx.health, ctx.interrupt)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}
