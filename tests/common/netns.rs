//! Network namespaces the tests create (`ip netns add`), with taps inside, deleted on every
//! path (a failed assertion included) when dropped.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace with `lo` up, deleted when dropped. Declare it before any process
/// running in it, so that the process is stopped first.
pub struct NetNs {
    /// Its name (under /run/netns).
    pub name: String,
}

/// Runs `ip ARGS`; panics with its stderr if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A new namespace named after this process and a counter.
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cgvm-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` inside the namespace; panics if it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A tap `name` (`extra`: more `ip tuntap add` words, e.g. `user UID`), with the address
    /// `addr` if given, up.
    pub fn tap(&self, name: &str, addr: Option<&str>, extra: &[&str]) {
        let mut add = vec!["tuntap", "add", name, "mode", "tap"];
        add.extend_from_slice(extra);
        self.ip(&add);
        if let Some(a) = addr {
            self.ip(&["addr", "add", a, "dev", name]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// The MAC address of `dev` in the namespace.
    pub fn mac_of(&self, dev: &str) -> String {
        let out = self
            .command(Path::new("cat"))
            .arg(format!("/sys/class/net/{dev}/address"))
            .output()
            .expect("read the interface's address");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `body` on a thread that has entered the namespace (setns changes only the
    /// calling thread's); what it creates (a socket) stays in the namespace.
    pub fn run_in<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        let path = Path::new("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a descriptor we own, for this thread only.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            body()
        })
        .join()
        .expect("thread in the namespace")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}
