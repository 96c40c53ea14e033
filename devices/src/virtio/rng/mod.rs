//! virtio-rng: an entropy source backed by the host's getrandom(2). One request queue; the
//! guest posts device-writable buffers and gets them back filled.

mod worker;

use super::worker::{spawn, WorkerHandle};
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_RNG};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};

pub use worker::{fill_chain, RngWorker, MAX_REQUEST_BYTES};

/// Queue size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<WorkerHandle>,
    rate_limiter: Option<RateLimiterConfig>,
}

impl Rng {
    /// A new, inactive device, limited in bytes per second when `rate_limiter` says so.
    pub fn new(rate_limiter: Option<RateLimiterConfig>) -> Self {
        Self {
            worker: None,
            rate_limiter,
        }
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
        let worker = RngWorker::new(ctx.mem, q, ctx.interrupt.clone(), limiter);
        self.worker = Some(spawn(worker, ctx.health, ctx.interrupt)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}
