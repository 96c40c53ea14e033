//! The API end to end: the real binary, a real HTTP client on its Unix socket, the probe
//! guest booted through the API alone, then paused, resumed, given a new disk and stopped
//! with Ctrl+Alt+Del or by its own exit. Every body received is checked against
//! api/openapi.yaml.

mod common;

#[path = "../api/tests/support/openapi.rs"]
mod openapi;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::*;
use common::*;

fn spec() -> openapi::Spec {
    openapi::Spec::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("api/openapi.yaml"))
        .expect("load api/openapi.yaml")
}

/// Sends a request and checks the answer against the spec.
fn call(s: &Served, spec: &openapi::Spec, method: &str, path: &str, body: Option<&str>) -> Answer {
    let a = s.call(method, path, body);
    spec.validate_response(method, path, a.status, &a.json())
        .unwrap_or_else(|e| panic!("{method} {path} -> {}: {e}\nbody: {}", a.status, a.body));
    a
}

fn expect(a: &Answer, status: u16, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
}

/// `PUT /actions` with `action_type`; it must be accepted (204).
fn action(s: &Served, spec: &openapi::Spec, action_type: &str) {
    let body = format!(r#"{{"action_type": "{action_type}"}}"#);
    expect(
        &call(s, spec, "PUT", "/actions", Some(&body)),
        204,
        action_type,
    );
}

fn image(dir: &Path, name: &str, mib: u64, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; (mib << 20) as usize]).expect("write the image");
    p
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn the_probe_boots_through_the_api_alone_then_pauses_resumes_swaps_a_drive_and_stops_on_ctrl_alt_del(
) {
    let spec = spec();
    let d = scratch("api-lifecycle");
    let disk_a = image(&d, "a.img", 8, 0xa1);
    let disk_b = image(&d, "b.img", 16, 0x42);
    let console = d.join("console.txt");
    let metrics = d.join("metrics.json");
    let mut s = Served::serve(&d, &[]);

    let a = call(&s, &spec, "GET", "/", None);
    expect(&a, 200, "GET /");
    assert_eq!(a.json()["state"], "Not started");
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "probe.tests=boot,blk,rng probe.exit=hang probe.tick_ms=50 \
                      probe.blk_id=rootfs probe.blk_sector=8",
    });
    for (method, path, body) in [
        ("PUT", "/boot-source", boot.to_string()),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64}"#.to_string(),
        ),
        (
            "PUT",
            "/drives/rootfs",
            serde_json::json!({
                "drive_id": "rootfs", "path_on_host": disk_a,
                "is_root_device": false, "is_read_only": false
            })
            .to_string(),
        ),
        ("PUT", "/entropy", "{}".to_string()),
        (
            "PUT",
            "/serial",
            serde_json::json!({ "serial_out_path": console }).to_string(),
        ),
        (
            "PUT",
            "/metrics",
            serde_json::json!({ "metrics_path": metrics }).to_string(),
        ),
    ] {
        let a = call(&s, &spec, method, path, Some(&body));
        expect(&a, 204, &format!("{method} {path}"));
    }
    let a = call(&s, &spec, "GET", "/machine-config", None);
    assert_eq!(a.json()["vcpu_count"], 2);
    assert_eq!(a.json()["mem_size_mib"], 64);

    action(&s, &spec, "InstanceStart");
    let text = wait_for_text(&console, "probe: waiting", Duration::from_secs(60));
    assert!(text.contains("probe: blk ok"), "{text}");
    assert!(text.contains("probe: rng ok"), "{text}");
    assert!(text.contains("probe: 3 passed, 0 failed"), "{text}");
    assert_eq!(call(&s, &spec, "GET", "/", None).json()["state"], "Running");

    // Pre-boot requests are refused now, with Firecracker's message.
    let a = call(
        &s,
        &spec,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    expect(&a, 400, "machine-config after start");
    assert!(
        a.fault().contains("not supported after starting"),
        "{}",
        a.body
    );

    // Pause: the ticks stop; resume: they go on.
    wait_for_text(&console, "probe: tick 3", Duration::from_secs(30));
    let a = call(&s, &spec, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    expect(&a, 204, "pause");
    assert_eq!(call(&s, &spec, "GET", "/", None).json()["state"], "Paused");
    let before = std::fs::read_to_string(&console).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(600));
    let after = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(
        count(&before, "probe: tick"),
        count(&after, "probe: tick"),
        "the guest ran while paused"
    );
    let a = call(&s, &spec, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    expect(&a, 204, "resume");
    let ticks = count(&after, "probe: tick");
    let start = Instant::now();
    while count(
        &std::fs::read_to_string(&console).unwrap_or_default(),
        "probe: tick",
    ) < ticks + 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no ticks after resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(call(&s, &spec, "GET", "/", None).json()["state"], "Running");

    // Swap the drive: the guest sees the new capacity and the new file's bytes.
    let body = serde_json::json!({ "drive_id": "rootfs", "path_on_host": disk_b }).to_string();
    let a = call(&s, &spec, "PATCH", "/drives/rootfs", Some(&body));
    expect(&a, 204, "drive swap");
    let text = wait_for_text(
        &console,
        "config changed: capacity 32768 sectors",
        Duration::from_secs(30),
    );
    let line = text
        .lines()
        .find(|l| l.contains("config changed"))
        .expect("the change line");
    assert!(line.contains("sector 8: 42 42 42 42"), "{line}");
    let a = call(&s, &spec, "GET", "/vm/config", None);
    assert_eq!(
        a.json()["drives"][0]["path_on_host"],
        disk_b.to_str().expect("utf-8")
    );
    // A swap to a missing file is refused and names it; the drive keeps working.
    let a = call(
        &s,
        &spec,
        "PATCH",
        "/drives/rootfs",
        Some(r#"{"drive_id": "rootfs", "path_on_host": "/nonexistent/disk.img"}"#),
    );
    expect(&a, 400, "swap to a missing file");
    assert!(a.fault().contains("/nonexistent/disk.img"), "{}", a.body);

    // Metrics on demand.
    action(&s, &spec, "FlushMetrics");
    let m = std::fs::read_to_string(&metrics).expect("metrics file");
    let last: serde_json::Value =
        serde_json::from_str(m.lines().last().expect("a metrics line")).expect("JSON line");
    assert!(
        last["block_rootfs"]["read_bytes"].as_u64().unwrap_or(0) >= 4096,
        "{last}"
    );
    assert!(
        last["block_rootfs"]["write_count"].as_u64().unwrap_or(0) >= 1,
        "{last}"
    );
    assert!(last["entropy"]["bytes"].as_u64().unwrap_or(0) > 0, "{last}");
    assert!(
        last["vcpu"]["exit_io_out"].as_u64().unwrap_or(0) > 0,
        "{last}"
    );
    assert!(
        last["api_server"]["requests"].as_u64().unwrap_or(0) >= 10,
        "{last}"
    );

    // Ctrl+Alt+Del: the probe resets, the process exits 0 and removes its socket.
    action(&s, &spec, "SendCtrlAltDel");
    let end = s.wait(Duration::from_secs(30));
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(text.contains("probe: ctrl-alt-del received"), "{text}");
    assert_eq!(end.status, Some(0), "{}", end.stderr);
    assert!(!s.sock.exists(), "the API socket was left behind");
    // The image the guest wrote is a real file write (API drives are persistent).
    let a_bytes = std::fs::read(&disk_a).expect("disk a");
    assert_eq!(&a_bytes[8 * 512..8 * 512 + 4096], &probe_pattern(8)[..]);
}

#[test]
fn the_guests_exit_status_is_the_process_status() {
    let spec = spec();
    let d = scratch("api-exit-status");
    let mut s = Served::serve(&d, &[]);
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "probe.tests=boot probe.exit=7",
    });
    expect(
        &call(&s, &spec, "PUT", "/boot-source", Some(&boot.to_string())),
        204,
        "boot-source",
    );
    expect(
        &call(
            &s,
            &spec,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
        ),
        204,
        "machine-config",
    );
    action(&s, &spec, "InstanceStart");
    let end = s.wait(Duration::from_secs(60));
    assert_eq!(end.status, Some(7), "{}", end.stderr);
    assert!(
        end.stdout.contains("probe: 1 passed, 0 failed"),
        "{}",
        end.stdout
    );
    assert!(end.stderr.contains("exit device"), "{}", end.stderr);
    assert!(!s.sock.exists(), "the API socket was left behind");
}

#[test]
fn a_signal_before_the_start_ends_the_process_and_removes_the_socket() {
    let d = scratch("api-signal");
    let mut s = Served::serve(&d, &[]);
    assert_eq!(s.call("GET", "/", None).status, 200);
    s.signal(libc::SIGTERM);
    let end = s.wait(Duration::from_secs(10));
    assert_eq!(end.status, Some(128 + libc::SIGTERM), "{}", end.stderr);
    assert!(!s.sock.exists(), "the API socket was left behind");
}

#[test]
fn an_existing_socket_path_is_an_error_and_is_left_alone() {
    let d = scratch("api-existing-sock");
    let sock = d.join("api.sock");
    std::fs::write(&sock, b"not a socket").expect("write");
    let mut c = cgvm();
    c.args(["serve", "--api-sock", sock.to_str().expect("utf-8")]);
    let r = run_with_limit(c, Duration::from_secs(10));
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(
        r.stderr.contains(&sock.display().to_string()) && r.stderr.contains("already exists"),
        "{}",
        r.both()
    );
    assert_eq!(std::fs::read(&sock).expect("read"), b"not a socket");
}

fn config_file(d: &Path, boot_args: &str, disk: &Path) -> PathBuf {
    // The shape of Firecracker's tests/framework/vm_config.json.
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe_elf(),
            "boot_args": boot_args,
            "initrd_path": null
        },
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": disk,
            "is_root_device": true,
            "partuuid": null,
            "is_read_only": false,
            "cache_type": "Unsafe",
            "io_engine": "Sync",
            "rate_limiter": null
        }],
        "machine-config": {
            "vcpu_count": 2,
            "mem_size_mib": 64,
            "smt": false,
            "track_dirty_pages": false,
            "huge_pages": "None"
        },
        "cpu-config": null,
        "balloon": null,
        "network-interfaces": [],
        "vsock": null,
        "logger": null,
        "metrics": null,
        "mmds-config": null,
        "entropy": null
    });
    let p = d.join("vm_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).expect("write");
    p
}

#[test]
fn a_firecracker_config_file_boots_the_probe_without_the_api() {
    let d = scratch("api-config-file");
    let disk = image(&d, "root.img", 8, 0);
    let cfg = config_file(&d, "probe.tests=boot,blk probe.blk_id=rootfs", &disk);
    let mut c = cgvm();
    c.args(["--no-api", "--config-file", cfg.to_str().expect("utf-8")]);
    let r = run_with_limit(c, Duration::from_secs(60));
    assert_eq!(r.status, Some(0), "{}", r.both());
    assert!(r.stdout.contains("probe: blk ok"), "{}", r.both());
    assert!(r.stdout.contains("root=/dev/vda rw"), "{}", r.both());
    assert!(
        r.stdout.contains("probe: 2 passed, 0 failed"),
        "{}",
        r.both()
    );
}

#[test]
fn a_bad_config_file_is_refused_before_anything_starts() {
    let d = scratch("api-bad-config-file");
    let disk = image(&d, "root.img", 1, 0);
    let cfg = config_file(&d, "probe.tests=boot", &disk);
    let text = std::fs::read_to_string(&cfg).expect("read");
    for (from, to, word) in [
        (r#""vcpu_count": 2"#, r#""vcpu_count": 0"#, "vcpu_count"),
        (r#""smt": false"#, r#""smt": false, "bogus": 1"#, "bogus"),
        (
            r#""vsock": null"#,
            r#""vsock": {"guest_cid": 2, "uds_path": "/v"}"#,
            "guest_cid 2",
        ),
        (
            r#""network-interfaces": []"#,
            r#""network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00"}]"#,
            "guest_mac",
        ),
        (
            r#""network-interfaces": []"#,
            r#""network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 9000}]"#,
            "mtu",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        std::fs::write(&cfg, text.replace(from, to)).expect("write");
        let mut c = cgvm();
        c.args(["--no-api", "--config-file", cfg.to_str().expect("utf-8")]);
        let r = run_with_limit(c, Duration::from_secs(20));
        assert_eq!(r.status, Some(125), "{word}: {}", r.both());
        assert!(r.stderr.contains(word), "{word}: {}", r.both());
    }
    let mut c = cgvm();
    c.args(["--no-api", "--config-file", "/nonexistent/vm.json"]);
    let r = run_with_limit(c, Duration::from_secs(20));
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(r.stderr.contains("/nonexistent/vm.json"), "{}", r.both());
}

#[test]
fn invoked_as_firecracker_it_is_a_drop_in() {
    let spec = spec();
    let d = scratch("api-as-firecracker");
    let fc = d.join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_cgvm"), &fc).expect("symlink");
    let disk = image(&d, "root.img", 8, 0);
    let cfg = config_file(&d, "probe.tests=boot probe.exit=hang", &disk);
    let sock = d.join("fc.sock");
    let mut s = Served::start_with(
        &fc,
        &[
            "--api-sock",
            sock.to_str().expect("utf-8"),
            "--id",
            "vm-under-test",
            "--config-file",
            cfg.to_str().expect("utf-8"),
        ],
        &d,
        &sock,
    );
    let a = call(&s, &spec, "GET", "/", None);
    assert_eq!(a.json()["app_name"], "Firecracker");
    assert_eq!(a.json()["id"], "vm-under-test");
    assert_eq!(a.json()["state"], "Running");
    let a = call(&s, &spec, "GET", "/version", None);
    assert!(a.json()["firecracker_version"].is_string(), "{}", a.body);
    wait_for_text(&s.stdout, "probe: waiting", Duration::from_secs(60));
    action(&s, &spec, "SendCtrlAltDel");
    let end = s.wait(Duration::from_secs(30));
    assert_eq!(end.status, Some(0), "{}", end.stderr);
    assert!(!sock.exists(), "the API socket was left behind");
}

#[test]
fn metrics_are_written_every_minute_without_being_asked() {
    // Firecracker's period is 60 s; this test waits it out (beside the other tests of this
    // file, which run in parallel with it).
    let d = scratch("api-metrics-period");
    let metrics = d.join("metrics.json");
    let s = Served::serve(&d, &["--metrics-path", metrics.to_str().expect("utf-8")]);
    assert_eq!(s.call("GET", "/", None).status, 200);
    let start = Instant::now();
    let text = wait_for_text(&metrics, "utc_timestamp_ms", Duration::from_secs(75));
    let took = start.elapsed();
    assert!(
        took > Duration::from_secs(50),
        "a line came after {took:?}, before the period"
    );
    let line: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a line")).expect("a JSON line");
    assert!(
        line["api_server"]["get_requests"].as_u64().unwrap_or(0) >= 1,
        "{line}"
    );
}
