//! The boot timeline: when the VMM started, when the guest first ran, when it reported boot
//! complete and when it stopped. Printed with `--timeline`, read by the boot benchmark.

use std::sync::{Mutex, OnceLock};

use devices::legacy::BootCompletion;
use std::time::{Duration, Instant};

/// Events of one run, each recorded once.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    start_monotonic_ns: u64,
    first_entry: OnceLock<Instant>,
    /// Shared with the boot timer device, which records the guest's signal.
    boot_complete: BootCompletion,
    stop: Mutex<Option<(Instant, String)>>,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into the valid pointer we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl Timeline {
    /// A timeline starting now.
    pub fn new() -> Self {
        Self::starting_at(Instant::now(), monotonic_ns())
    }

    /// A timeline whose start was taken earlier (e.g. first thing in `main`).
    pub fn starting_at(start: Instant, start_monotonic_ns: u64) -> Self {
        Self {
            start,
            start_monotonic_ns,
            first_entry: OnceLock::new(),
            boot_complete: BootCompletion::new(),
            stop: Mutex::new(None),
        }
    }

    /// When the VMM started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Records the first vCPU entry (only the first call counts).
    pub fn first_entry(&self) {
        let _ = self.first_entry.set(Instant::now());
    }

    /// The slot the boot timer fills when the guest signals boot complete.
    pub fn boot_completion(&self) -> BootCompletion {
        self.boot_complete.clone()
    }

    /// Records the end of the run and why.
    pub fn stopped(&self, why: &str) {
        let mut s = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            *s = Some((Instant::now(), why.to_string()));
        }
    }

    /// Time from start to the first vCPU entry.
    pub fn first_entry_after(&self) -> Option<Duration> {
        self.first_entry.get().map(|t| t.duration_since(self.start))
    }

    /// Time from start to boot complete.
    pub fn boot_complete_after(&self) -> Option<Duration> {
        self.boot_complete.get().map(|b| b.elapsed)
    }

    /// Time from start to the stop, and why.
    pub fn stop_after(&self) -> Option<(Duration, String)> {
        let s = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref()
            .map(|(t, w)| (t.duration_since(self.start), w.clone()))
    }

    /// The timeline as printed by `--timeline`: one line per event in milliseconds since the
    /// VMM started, then one machine-readable line of CLOCK_MONOTONIC nanoseconds.
    pub fn render(&self) -> String {
        let ms = |d: Option<Duration>| match d {
            Some(d) => format!("{:10.3} ms", d.as_secs_f64() * 1e3),
            None => format!("{:>13}", "-"),
        };
        let ns = |d: Option<Duration>| match d {
            Some(d) => (self.start_monotonic_ns + d.as_nanos() as u64).to_string(),
            None => "-".to_string(),
        };
        let stop = self.stop_after();
        let (stop_d, why) = match &stop {
            Some((d, w)) => (Some(*d), w.as_str()),
            None => (None, ""),
        };
        let mut out = String::new();
        out.push_str(&format!(
            "cgvm: timeline vmm-start         {}\n",
            ms(Some(Duration::ZERO))
        ));
        out.push_str(&format!(
            "cgvm: timeline first-instruction {}\n",
            ms(self.first_entry_after())
        ));
        out.push_str(&format!(
            "cgvm: timeline boot-complete     {}\n",
            ms(self.boot_complete_after())
        ));
        out.push_str(&format!(
            "cgvm: timeline guest-stop        {}  {why}\n",
            ms(stop_d)
        ));
        out.push_str(&format!(
            "cgvm: timeline-monotonic-ns vmm-start={} first-instruction={} boot-complete={} guest-stop={}\n",
            self.start_monotonic_ns,
            ns(self.first_entry_after()),
            ns(self.boot_complete_after()),
            ns(stop_d),
        ));
        out
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use devices::legacy::BootTimer;

    #[test]
    fn events_are_recorded_once_and_rendered_in_order() {
        let t = Timeline::starting_at(Instant::now(), 1_000_000);
        assert!(t.render().contains("first-instruction=-"));
        t.first_entry();
        let first = t.first_entry_after().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.first_entry();
        assert_eq!(
            t.first_entry_after().unwrap(),
            first,
            "only the first entry counts"
        );
        let mut timer = BootTimer::with_completion(t.start(), t.boot_completion());
        timer.write(0, &[123]);
        let booted = t.boot_complete_after().unwrap();
        assert!(booted >= first);
        t.stopped("exit device: status 7");
        t.stopped("later");
        let r = t.render();
        assert!(!r.contains("boot-complete             -"), "{r}");
        assert!(
            r.contains("guest-stop") && r.contains("exit device: status 7"),
            "{r}"
        );
        let ns = 1_000_000 + booted.as_nanos() as u64;
        assert!(r.contains(&format!("boot-complete={ns} ")), "{r}");
        let line = r.lines().last().unwrap();
        assert!(
            line.starts_with("cgvm: timeline-monotonic-ns vmm-start=1000000 first-instruction=")
        );
        assert!(!line.contains("=-"), "{line}");
    }
}
