//! virtio-rng: an entropy source backed by the host's getrandom(2). One request queue; the
//! guest posts device-writable buffers and gets them back filled.

mod worker;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::worker::{spawn, WorkerHandle};
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_RNG};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};

pub use worker::{fill_chain, RngWorker, MAX_REQUEST_BYTES};

/// Queue size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Counters of the entropy device, shared with whoever reads them (the VMM's metrics). They
/// count from the device's creation, across resets.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Random bytes written into guest buffers.
    pub bytes: AtomicU64,
    /// Requests answered (put in the used ring), whatever they got.
    pub requests: AtomicU64,
    /// Times a request was held back by the rate limiter.
    pub throttled: AtomicU64,
}

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<WorkerHandle>,
    rate_limiter: Option<RateLimiterConfig>,
    metrics: Arc<RngMetrics>,
}

impl Rng {
    /// A new, inactive device, limited in bytes per second when `rate_limiter` says so.
    pub fn new(rate_limiter: Option<RateLimiterConfig>) -> Self {
        Self {
            worker: None,
            rate_limiter,
            metrics: Arc::default(),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let Some(q) = ctx.queues.pop() else {
            return Err(ActivateError::MissingQueues { want: 1, got: 0 });
        };
        let limiter = match &self.rate_limiter {
            Some(c) => {
                Some(RateLimiter::new(c).map_err(|e| ActivateError::Backend(e.to_string()))?)
            }
            None => None,
        };
        let worker = RngWorker::new(
            ctx.mem,
            q,
            ctx.interrupt.clone(),
            limiter,
            self.metrics.clone(),
        );
        self.worker = Some(spawn(worker, ctx.health, ctx.interrupt)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

/// The seccomp kind of the entropy device thread.
pub(crate) fn seccomp_kind() -> &'static crate::seccomp::DeviceKind {
    &worker::KIND
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::rate_limiter::TokenBucket;
    use crate::virtio::worker::{DeviceWorker, Sources};
    use crate::virtio::{ActiveQueue, InterruptReason, VirtioInterrupt};

    struct NoInterrupt;

    impl VirtioInterrupt for NoInterrupt {
        fn trigger(&self, _reason: InterruptReason) -> std::io::Result<()> {
            Ok(())
        }
    }

    const SIZE: u16 = 16;

    /// A queue (descriptors at 0, available ring at 0x1000, used ring at 0x2000) with one
    /// device-writable buffer of each length of `lens` made available.
    fn queue_with(lens: &[u32]) -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_ready(true);
        for (i, &len) in lens.iter().enumerate() {
            let i = i as u64;
            let d = GuestAddress(i * 16);
            mem.write_obj(0x10000 * (i + 1), d).unwrap();
            mem.write_obj(len, GuestAddress(i * 16 + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(i * 16 + 12)).unwrap(); // device-writable
            mem.write_obj(i as u16, GuestAddress(0x1004 + 2 * i))
                .unwrap();
        }
        mem.write_obj(lens.len() as u16, GuestAddress(0x1002))
            .unwrap();
        (mem, q)
    }

    /// Runs a worker over buffers of `lens` once; returns the used index and the metrics.
    fn serve(lens: &[u32], limiter: Option<RateLimiter>) -> (u16, Arc<RngMetrics>) {
        let (mem, queue) = queue_with(lens);
        let rng = Rng::new(None);
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut w = RngWorker::new(
            mem.clone(),
            ActiveQueue {
                index: 0,
                queue,
                notify: notify.try_clone().unwrap(),
            },
            Arc::new(NoInterrupt),
            limiter,
            rng.metrics(),
        );
        notify.write(1).unwrap();
        w.handle(0, &Sources::detached()).unwrap();
        let used: u16 = mem.read_obj(GuestAddress(0x2002)).unwrap();
        (used, rng.metrics())
    }

    #[test]
    fn metrics_count_bytes_and_requests() {
        // The third buffer is larger than a request gets.
        let (used, m) = serve(&[4096, 100, 70_000], None);
        assert_eq!(used, 3);
        assert_eq!(m.requests.load(Ordering::Relaxed), 3);
        assert_eq!(
            m.bytes.load(Ordering::Relaxed),
            4196 + MAX_REQUEST_BYTES as u64
        );
        assert_eq!(m.throttled.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn metrics_count_requests_the_limiter_holds_back() {
        let limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: Some(TokenBucket {
                size: 5000,
                one_time_burst: None,
                refill_time_ms: 3_600_000,
            }),
            ops: None,
        })
        .unwrap();
        let (used, m) = serve(&[4096, 100, 4096], Some(limiter));
        assert_eq!(used, 2);
        assert_eq!(m.requests.load(Ordering::Relaxed), 2);
        assert_eq!(m.bytes.load(Ordering::Relaxed), 4196);
        assert_eq!(m.throttled.load(Ordering::Relaxed), 1);
    }
}
