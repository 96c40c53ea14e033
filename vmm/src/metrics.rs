//! Counters the metrics file reports: each thread bumps its own atomics (no locks on the hot
//! path) and the VMM thread writes one JSON line with all of them, every
//! [`FLUSH_INTERVAL`] and on `FlushMetrics`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::block::BlockMetrics;
use devices::virtio::net::NetMetrics;
use devices::virtio::rng::RngMetrics;
use serde_json::{json, Map, Value};

/// How often the metrics line is written without being asked.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The API server's counters.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests answered (any status).
    pub requests: AtomicU64,
    /// `GET` requests.
    pub get_requests: AtomicU64,
    /// `PUT` requests.
    pub put_requests: AtomicU64,
    /// `PATCH` requests.
    pub patch_requests: AtomicU64,
    /// Requests answered with a 4xx or 5xx status.
    pub failed_requests: AtomicU64,
    /// Requests that were not valid HTTP (the connection was closed).
    pub malformed_requests: AtomicU64,
    /// Sum of request latencies (request fully read to answer written), microseconds.
    pub latency_us_total: AtomicU64,
    /// Largest request latency, microseconds.
    pub latency_us_max: AtomicU64,
}

impl ApiMetrics {
    /// Counts one answered request.
    pub fn record(&self, method: &str, ok: bool, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let per = match method {
            "GET" => Some(&self.get_requests),
            "PUT" => Some(&self.put_requests),
            "PATCH" => Some(&self.patch_requests),
            _ => None,
        };
        if let Some(c) = per {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if !ok {
            self.failed_requests.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us_total.fetch_add(us, Ordering::Relaxed);
        self.latency_us_max.fetch_max(us, Ordering::Relaxed);
    }

    fn to_json(&self) -> Value {
        let requests = get(&self.requests);
        let total = get(&self.latency_us_total);
        json!({
            "connections": get(&self.connections),
            "requests": requests,
            "get_requests": get(&self.get_requests),
            "put_requests": get(&self.put_requests),
            "patch_requests": get(&self.patch_requests),
            "failed_requests": get(&self.failed_requests),
            "malformed_requests": get(&self.malformed_requests),
            "latency_us_total": total,
            "latency_us_avg": total.checked_div(requests).unwrap_or(0),
            "latency_us_max": get(&self.latency_us_max),
        })
    }
}

/// vCPU exits by kind, summed over the vCPUs.
#[derive(Debug, Default)]
pub struct VcpuExitMetrics {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// KVM_RUN interrupted (kicks, signals).
    pub interrupted: AtomicU64,
    /// System events (shutdown, reset, crash).
    pub system_event: AtomicU64,
    /// Exits that stopped the vCPU (faults, internal errors).
    pub fatal: AtomicU64,
}

impl VcpuExitMetrics {
    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn to_json(&self) -> Value {
        json!({
            "exit_io_in": get(&self.io_in),
            "exit_io_out": get(&self.io_out),
            "exit_mmio_read": get(&self.mmio_read),
            "exit_mmio_write": get(&self.mmio_write),
            "exit_interrupted": get(&self.interrupted),
            "exit_system_event": get(&self.system_event),
            "exit_fatal": get(&self.fatal),
        })
    }
}

fn block_json(m: &BlockMetrics) -> Value {
    json!({
        "read_bytes": get(&m.read_bytes),
        "write_bytes": get(&m.write_bytes),
        "read_count": get(&m.read_ops),
        "write_count": get(&m.write_ops),
        "flush_count": get(&m.flush_ops),
        "error_count": get(&m.errors),
        "rate_limiter_throttled_events": get(&m.throttled),
    })
}

/// The entropy device's section.
pub fn rng_json(m: &RngMetrics) -> Value {
    json!({
        "bytes": get(&m.bytes),
        "requests": get(&m.requests),
        "rate_limiter_throttled_events": get(&m.throttled),
    })
}

/// A network interface's section of the metrics line (Firecracker's `net_<id>` names where
/// they exist).
pub fn net_json(m: &NetMetrics) -> Value {
    json!({
        "rx_bytes_count": get(&m.rx_bytes),
        "rx_packets_count": get(&m.rx_frames),
        "rx_dropped_count": get(&m.rx_dropped),
        "rx_fails": get(&m.rx_errors),
        "rx_rate_limiter_throttled": get(&m.rx_throttled),
        "tx_bytes_count": get(&m.tx_bytes),
        "tx_packets_count": get(&m.tx_frames),
        "tx_dropped_count": get(&m.tx_dropped),
        "tx_fails": get(&m.tx_errors),
        "tx_rate_limiter_throttled": get(&m.tx_throttled),
    })
}

/// Everything the metrics line reports.
#[derive(Default)]
pub struct Metrics {
    /// The API server.
    pub api: Arc<ApiMetrics>,
    /// vCPU exits.
    pub vcpu: Arc<VcpuExitMetrics>,
    /// Each drive's counters, by drive id (set when the VM is built).
    pub blocks: std::sync::Mutex<Vec<(String, Arc<BlockMetrics>)>>,
    /// Other sections by name (the entropy device, ...), as functions producing their JSON.
    #[allow(clippy::type_complexity)]
    pub extra: std::sync::Mutex<Vec<(String, Box<dyn Fn() -> Value + Send>)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// One metrics line as JSON.
    pub fn snapshot(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        m.insert(
            "utc_timestamp_ms".into(),
            json!(u64::try_from(now.as_millis()).unwrap_or(u64::MAX)),
        );
        m.insert("api_server".into(), self.api.to_json());
        m.insert("vcpu".into(), self.vcpu.to_json());
        let blocks = lock(&self.blocks);
        let total = BlockMetrics::default();
        for (id, b) in blocks.iter() {
            m.insert(format!("block_{id}"), block_json(b));
            for (t, s) in [
                (&total.read_bytes, &b.read_bytes),
                (&total.write_bytes, &b.write_bytes),
                (&total.read_ops, &b.read_ops),
                (&total.write_ops, &b.write_ops),
                (&total.flush_ops, &b.flush_ops),
                (&total.errors, &b.errors),
                (&total.throttled, &b.throttled),
            ] {
                t.fetch_add(get(s), Ordering::Relaxed);
            }
        }
        m.insert("block".into(), block_json(&total));
        for (name, f) in lock(&self.extra).iter() {
            m.insert(name.clone(), f());
        }
        m
    }
}

/// Where metrics lines go, and what each line carries besides the counters.
pub struct MetricsSink {
    path: PathBuf,
    file: std::fs::File,
    id: Option<String>,
    properties: BTreeMap<String, String>,
}

impl MetricsSink {
    /// Opens (appends to, or creates) the metrics file or named pipe.
    pub fn open(
        path: &Path,
        id: Option<String>,
        properties: BTreeMap<String, String>,
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            id,
            properties,
        })
    }

    /// Writes one line with the current counters.
    pub fn flush(&mut self, metrics: &Metrics) -> std::io::Result<()> {
        let mut line = metrics.snapshot();
        if let Some(id) = &self.id {
            line.insert("id".into(), json!(id));
        }
        if !self.properties.is_empty() {
            line.insert("properties".into(), json!(self.properties));
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        self.file.write_all(text.as_bytes())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_every_section_and_the_counts() {
        let m = Metrics::default();
        m.api.record("GET", true, Duration::from_micros(30));
        m.api.record("PUT", false, Duration::from_micros(50));
        VcpuExitMetrics::inc(&m.vcpu.io_out);
        let b = Arc::new(BlockMetrics::default());
        b.read_bytes.fetch_add(4096, Ordering::Relaxed);
        lock(&m.blocks).push(("rootfs".into(), b));
        let dir = std::env::temp_dir().join(format!("cgvm-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        let _ = std::fs::remove_file(&path);
        let mut sink = MetricsSink::open(
            &path,
            Some("vm1".into()),
            BTreeMap::from([("team".to_string(), "ci".to_string())]),
        )
        .unwrap();
        sink.flush(&m).unwrap();
        sink.flush(&m).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        assert_eq!(l["api_server"]["requests"], 2);
        assert_eq!(l["api_server"]["failed_requests"], 1);
        assert_eq!(l["api_server"]["latency_us_max"], 50);
        assert_eq!(l["api_server"]["latency_us_avg"], 40);
        assert_eq!(l["vcpu"]["exit_io_out"], 1);
        assert_eq!(l["block_rootfs"]["read_bytes"], 4096);
        assert_eq!(l["block"]["read_bytes"], 4096);
        assert_eq!(l["id"], "vm1");
        assert_eq!(l["properties"]["team"], "ci");
        assert!(l["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
