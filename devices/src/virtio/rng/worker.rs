//! The virtio-rng device thread: fills each request's device-writable buffers with
//! getrandom(2) bytes.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::RngMetrics;
use crate::rate_limiter::{RateLimiter, TokenType};
use crate::seccomp::DeviceKind;
use crate::virtio::worker::{DeviceWorker, Sources};
use crate::virtio::{ActiveQueue, InterruptReason, VirtioInterrupt};

/// The most bytes one request gets, whatever buffers it offers: a guest cannot make one
/// request keep the thread busy.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

const QUEUE_TOKEN: u32 = 0;
const LIMITER_TOKEN: u32 = 1;

/// The entropy device's worker.
pub struct RngWorker {
    mem: GuestMemoryMmap,
    queue: ActiveQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    limiter: Option<RateLimiter>,
    metrics: Arc<RngMetrics>,
}

impl RngWorker {
    /// A worker for the request queue; `limiter` bounds the bytes per second it hands out,
    /// and what it serves is counted in `metrics`.
    pub fn new(
        mem: GuestMemoryMmap,
        queue: ActiveQueue,
        interrupt: Arc<dyn VirtioInterrupt>,
        limiter: Option<RateLimiter>,
        metrics: Arc<RngMetrics>,
    ) -> Self {
        Self {
            mem,
            queue,
            interrupt,
            limiter,
            metrics,
        }
    }

    /// The bytes `chain` asks for (its device-writable length, capped), without consuming it.
    fn wanted(chain: &DescriptorChain<&GuestMemoryMmap>) -> u64 {
        let total: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        total.min(MAX_REQUEST_BYTES as u64)
    }

    fn process_queue(&mut self) -> Result<(), String> {
        let mem = &self.mem;
        let q = &mut self.queue.queue;
        let mut used_any = false;
        'ring: loop {
            q.disable_notification(mem)
                .map_err(|e| format!("queue: {e}"))?;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                if let Some(limiter) = self.limiter.as_mut() {
                    if !limiter.consume(Self::wanted(&chain), TokenType::Bytes) {
                        // Back on the ring, notifications off: the limiter's timer resumes us.
                        q.go_to_previous_position();
                        self.metrics.throttled.fetch_add(1, Ordering::Relaxed);
                        break 'ring;
                    }
                }
                let head = chain.head_index();
                let len = fill_chain(mem, chain);
                q.add_used(mem, head, len)
                    .map_err(|e| format!("used ring: {e}"))?;
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes
                    .fetch_add(u64::from(len), Ordering::Relaxed);
                used_any = true;
            }
            if !q
                .enable_notification(mem)
                .map_err(|e| format!("queue: {e}"))?
            {
                break;
            }
        }
        if used_any
            && q.needs_notification(mem)
                .map_err(|e| format!("queue: {e}"))?
        {
            self.interrupt
                .trigger(InterruptReason::Queue(self.queue.index))
                .map_err(|e| format!("interrupt: {e}"))?;
        }
        Ok(())
    }
}

/// Fills the device-writable descriptors of `chain` with random bytes, up to
/// [`MAX_REQUEST_BYTES`]; returns how many bytes were written. Device-readable descriptors
/// and addresses outside guest memory end the request with what was written so far.
pub fn fill_chain(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
    let mut written = 0usize;
    let mut buf = vec![0u8; 4096];
    for desc in chain {
        if !desc.is_write_only() {
            log::debug!("virtio-rng: device-readable descriptor in a request; request ended");
            break;
        }
        let mut left = (desc.len() as usize).min(MAX_REQUEST_BYTES - written);
        let mut addr = desc.addr();
        while left > 0 {
            let n = left.min(buf.len());
            if getrandom(&mut buf[..n]).is_err() {
                return written as u32;
            }
            if mem.write_slice(&buf[..n], addr).is_err() {
                log::debug!("virtio-rng: buffer at {addr:?} is outside guest memory");
                return written as u32;
            }
            written += n;
            left -= n;
            addr = match addr.checked_add(n as u64) {
                Some(a) => a,
                None => return written as u32,
            };
        }
        if written >= MAX_REQUEST_BYTES {
            break;
        }
    }
    written as u32
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most the given length into the buffer we own.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

/// The entropy device thread: the host's getrandom and the limiter's timerfd.
pub(crate) static KIND: DeviceKind = DeviceKind {
    name: "virtio-rng",
    calls: &[
        libc::SYS_getrandom,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ],
    args: &[],
};

impl DeviceWorker for RngWorker {
    fn kind(&self) -> &'static str {
        "virtio-rng"
    }

    fn sources(&self) -> Vec<(RawFd, u32)> {
        let mut s = vec![(self.queue.notify.as_raw_fd(), QUEUE_TOKEN)];
        if let Some(l) = &self.limiter {
            s.push((l.as_raw_fd(), LIMITER_TOKEN));
        }
        s
    }

    fn seccomp(&self) -> &'static DeviceKind {
        &KIND
    }

    fn handle(&mut self, token: u32, _sources: &Sources<'_>) -> Result<(), String> {
        match token {
            QUEUE_TOKEN => {
                let _ = self.queue.notify.read();
            }
            LIMITER_TOKEN => {
                if let Some(l) = &mut self.limiter {
                    if let Err(e) = l.event_handler() {
                        log::debug!("virtio-rng: {e}");
                    }
                }
            }
            _ => return Ok(()),
        }
        self.process_queue()
    }
}
