//! Network interfaces and vsock through the API of the real binary: the probe guest booted
//! through the API alone with a tap (in a network namespace the test creates, whose kernel
//! answers the guest's ARP) and a vsock (a host client echoing bytes through the guest), rate
//! limiters changed while it runs, each bad input named, and a Firecracker config file with
//! both. Every body received is checked against api/openapi.yaml.

mod common;

#[path = "../api/tests/support/openapi.rs"]
mod openapi;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::*;
use common::netns::NetNs;
use common::vsock::echo;
use common::*;

const GUEST_MAC: &str = "02:00:00:00:00:07";

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

/// Sends a request; the answer must have `status` and, for an error, a fault_message with
/// each of `words`.
fn expect(
    s: &Served,
    spec: &openapi::Spec,
    method: &str,
    path: &str,
    body: &str,
    status: u16,
    words: &[&str],
) -> Answer {
    let body = (!body.is_empty()).then_some(body);
    let a = call(s, spec, method, path, body);
    assert_eq!(a.status, status, "{method} {path} {body:?}: {}", a.body);
    if status >= 400 {
        let f = a.fault();
        for w in words {
            assert!(f.contains(w), "{method} {path}: {f:?} does not name {w:?}");
        }
    }
    a
}

fn action(s: &Served, spec: &openapi::Spec, action_type: &str, status: u16, words: &[&str]) {
    let body = format!(r#"{{"action_type": "{action_type}"}}"#);
    expect(s, spec, "PUT", "/actions", &body, status, words);
}

fn iface(id: &str, tap: &str, mac: Option<&str>) -> String {
    let mut v = serde_json::json!({"iface_id": id, "host_dev_name": tap});
    if let Some(m) = mac {
        v["guest_mac"] = m.into();
    }
    v.to_string()
}

fn vsock(cid: u32, uds: &Path) -> String {
    serde_json::json!({"guest_cid": cid, "uds_path": uds}).to_string()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn the_probe_boots_through_the_api_with_a_tap_and_a_vsock_and_limits_change_while_it_runs() {
    let spec = spec();
    let d = scratch("api-net-vsock");
    let ns = NetNs::new();
    ns.tap("tapa", Some("10.0.2.2/24"), &[]);
    let tap_mac = ns.mac_of("tapa");
    let console = d.join("console.txt");
    let metrics = d.join("metrics.json");
    let uds = d.join("v.sock");
    let mut s = Served::serve_in_netns(&ns.name, &d, &[]);
    let s = &mut s;

    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "probe.tests=boot,net,vsock probe.net=arp probe.exit=hang \
                      probe.vsock_conns=1",
    });
    for (method, path, body) in [
        ("PUT", "/boot-source", boot.to_string()),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#.to_string(),
        ),
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
        ("PUT", "/vsock", vsock(3, &uds)),
        // A tap that does not exist is only found at InstanceStart.
        (
            "PUT",
            "/network-interfaces/eth0",
            iface("eth0", "cgvm-nosuch", Some(GUEST_MAC)),
        ),
    ] {
        expect(s, &spec, method, path, &body, 204, &[]);
    }

    // Bad input, each named; nothing refused is kept.
    let n = "/network-interfaces/eth1";
    for (body, words) in [
        (
            iface("eth1", "cgvm-nosuch", None),
            &[
                "network interface eth1",
                "host_dev_name cgvm-nosuch",
                "eth0",
            ][..],
        ),
        (
            iface("eth1", "tapx", Some("02:00:00:00:00:07")),
            &["guest_mac 02:00:00:00:00:07", "network interface eth0"],
        ),
        (
            iface("eth1", "tapx", Some("02:00:00:00:00:0g")),
            &["guest_mac", "'02:00:00:00:00:0g'"],
        ),
        (
            iface("eth1", "name-too-long-xx", None),
            &["host_dev_name 'name-too-long-xx'"],
        ),
    ] {
        expect(s, &spec, "PUT", n, &body, 400, words);
    }
    expect(
        s,
        &spec,
        "PUT",
        "/vsock",
        &vsock(2, &uds),
        400,
        &["guest_cid 2"],
    );
    let patch =
        r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#;
    expect(
        s,
        &spec,
        "PATCH",
        "/network-interfaces/eth0",
        patch,
        400,
        &["before starting"],
    );

    // The missing tap fails the start, naming it; the machine is still configurable.
    action(
        s,
        &spec,
        "InstanceStart",
        400,
        &[
            "Cannot start microvm",
            "network interface eth0",
            "cgvm-nosuch",
        ],
    );
    assert_eq!(
        call(s, &spec, "GET", "/", None).json()["state"],
        "Not started"
    );
    assert!(
        !uds.exists(),
        "the failed start left the vsock socket behind"
    );
    assert_eq!(read(&console), "", "the guest ran");

    // vsock problems found at the start: a missing directory, a path in use.
    let missing = d.join("no-such-dir").join("v.sock");
    expect(s, &spec, "PUT", "/vsock", &vsock(3, &missing), 204, &[]);
    expect(
        s,
        &spec,
        "PUT",
        "/network-interfaces/eth0",
        &iface("eth0", "tapa", Some(GUEST_MAC)),
        204,
        &[],
    );
    action(
        s,
        &spec,
        "InstanceStart",
        400,
        &["Cannot start microvm", "no-such-dir", "does not exist"],
    );
    let in_use = d.join("in-use.sock");
    std::fs::write(&in_use, b"something else").expect("write");
    expect(s, &spec, "PUT", "/vsock", &vsock(3, &in_use), 204, &[]);
    action(
        s,
        &spec,
        "InstanceStart",
        400,
        &["Cannot start microvm", "in-use.sock", "already in use"],
    );
    assert_eq!(std::fs::read(&in_use).expect("read"), b"something else");
    assert_eq!(
        call(s, &spec, "GET", "/", None).json()["state"],
        "Not started"
    );

    // Fixed: what GET /vm/config reports is Firecracker's shape.
    expect(s, &spec, "PUT", "/vsock", &vsock(3, &uds), 204, &[]);
    let a = call(s, &spec, "GET", "/vm/config", None);
    let v = a.json();
    assert_eq!(
        v["network-interfaces"],
        serde_json::json!([{"iface_id": "eth0", "host_dev_name": "tapa", "guest_mac": GUEST_MAC}]),
        "{}",
        a.body
    );
    assert_eq!(
        v["vsock"],
        serde_json::json!({"guest_cid": 3, "uds_path": uds}),
        "{}",
        a.body
    );

    action(s, &spec, "InstanceStart", 204, &[]);
    assert_eq!(call(s, &spec, "GET", "/", None).json()["state"], "Running");
    // The net check runs first, then the vsock echo server waits for one connection.
    wait_for_text(&console, "probe: net ok", Duration::from_secs(60));
    let mut conn = common::vsock::connect(&uds, 52);
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    echo(&mut conn, &payload);
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let text = wait_for_text(&console, "probe: waiting", Duration::from_secs(60));
    assert!(
        text.contains(&format!(
            "probe: net ok (mac {GUEST_MAC}, arp reply: 10.0.2.2 is at {tap_mac}, virtio-mmio at 0x"
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "probe: vsock ok (cid 3, echoed 10000 bytes over 1 connections, virtio-mmio at 0x"
        ),
        "{text}"
    );
    assert!(text.contains("probe: 3 passed, 0 failed"), "{text}");
    drop(conn);

    // Rate limiters change while it runs; GET /vm/config reports what the device has.
    let p = "/network-interfaces/eth0";
    let both = r#"{"iface_id": "eth0",
        "rx_rate_limiter": {"bandwidth": {"size": 100000, "refill_time": 100}},
        "tx_rate_limiter": {"ops": {"size": 50, "refill_time": 1000, "one_time_burst": 10}}}"#;
    expect(s, &spec, "PATCH", p, both, 204, &[]);
    let v = call(s, &spec, "GET", "/vm/config", None).json();
    let net = &v["network-interfaces"][0];
    assert_eq!(
        net["rx_rate_limiter"],
        serde_json::json!({"bandwidth": {"size": 100000, "refill_time": 100}}),
        "{v}"
    );
    assert_eq!(
        net["tx_rate_limiter"],
        serde_json::json!({"ops": {"size": 50, "refill_time": 1000, "one_time_burst": 10}}),
        "{v}"
    );
    // Only rx changes: its bandwidth limit is removed, tx stays.
    let remove =
        r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#;
    expect(s, &spec, "PATCH", p, remove, 204, &[]);
    let v = call(s, &spec, "GET", "/vm/config", None).json();
    let net = &v["network-interfaces"][0];
    assert!(net.get("rx_rate_limiter").is_none(), "{v}");
    assert_eq!(net["tx_rate_limiter"]["ops"]["size"], 50, "{v}");
    for (path, body, words) in [
        (
            "/network-interfaces/wan",
            r#"{"iface_id": "wan", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
            &["network interface wan", "no such network interface"][..],
        ),
        (
            p,
            r#"{"iface_id": "eth0"}"#,
            &["rx_rate_limiter", "tx_rate_limiter"],
        ),
        (
            p,
            r#"{"iface_id": "eth9", "rx_rate_limiter": {}}"#,
            &["[eth0]", "[eth9]"],
        ),
        (
            p,
            r#"{"iface_id": "eth0", "guest_mac": "02:00:00:00:00:08"}"#,
            &["guest_mac"],
        ),
    ] {
        expect(s, &spec, "PATCH", path, body, 400, words);
    }
    let after = &["not supported after starting the microVM"][..];
    expect(s, &spec, "PUT", n, &iface("eth1", "tapx", None), 400, after);
    expect(s, &spec, "PUT", "/vsock", &vsock(4, &uds), 400, after);

    // The metrics line has the interface's counters: the ARP request out, the reply in.
    action(s, &spec, "FlushMetrics", 204, &[]);
    let m = read(&metrics);
    let last: serde_json::Value =
        serde_json::from_str(m.lines().last().expect("a metrics line")).expect("JSON line");
    let net = &last["net_eth0"];
    assert!(net["tx_packets_count"].as_u64().unwrap_or(0) >= 1, "{last}");
    assert!(net["tx_bytes_count"].as_u64().unwrap_or(0) >= 42, "{last}");
    assert!(net["rx_packets_count"].as_u64().unwrap_or(0) >= 1, "{last}");
    assert!(net["rx_bytes_count"].as_u64().unwrap_or(0) >= 42, "{last}");

    action(s, &spec, "SendCtrlAltDel", 204, &[]);
    let end = s.wait(Duration::from_secs(30));
    assert_eq!(end.status, Some(0), "{}", end.stderr);
    assert!(!uds.exists(), "the vsock socket was left behind");
    assert!(!s.sock.exists(), "the API socket was left behind");
}

fn config_file(d: &Path, uds: &Path) -> PathBuf {
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe_elf(),
            "boot_args": "probe.tests=net,vsock probe.vsock_conns=0 probe.exit=hang",
        },
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "network-interfaces": [{
            "iface_id": "net1",
            "host_dev_name": "tapc",
            "guest_mac": "02:00:00:00:00:0C",
            "rx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}},
            "tx_rate_limiter": null
        }],
        "vsock": {"vsock_id": "vsock0", "guest_cid": 9, "uds_path": uds},
        "balloon": null,
        "logger": null,
        "metrics": null,
        "mmds-config": null
    });
    let p = d.join("vm_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).expect("write");
    p
}

#[test]
fn a_config_file_with_a_network_interface_and_a_vsock_boots_and_reports_them() {
    let spec = spec();
    let d = scratch("api-net-vsock-config");
    let ns = NetNs::new();
    ns.tap("tapc", Some("10.0.2.2/24"), &[]);
    let uds = d.join("v.sock");
    let cfg = config_file(&d, &uds);
    let mut s = Served::serve_in_netns(
        &ns.name,
        &d,
        &["--config-file", cfg.to_str().expect("utf-8")],
    );
    assert_eq!(call(&s, &spec, "GET", "/", None).json()["state"], "Running");
    let a = call(&s, &spec, "GET", "/vm/config", None);
    let v = a.json();
    assert_eq!(
        v["network-interfaces"],
        serde_json::json!([{
            "iface_id": "net1",
            "host_dev_name": "tapc",
            "guest_mac": "02:00:00:00:00:0c",
            "rx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}}
        }]),
        "{}",
        a.body
    );
    assert_eq!(
        v["vsock"],
        serde_json::json!({"guest_cid": 9, "uds_path": uds}),
        "{}",
        a.body
    );
    let text = wait_for_text(&s.stdout, "probe: waiting", Duration::from_secs(60));
    assert!(
        text.contains("probe: net ok (mac 02:00:00:00:00:0c, arp reply: 10.0.2.2 is at"),
        "{text}"
    );
    assert!(text.contains("probe: vsock ok (cid 9"), "{text}");
    assert!(uds.exists(), "no vsock socket");
    action(&s, &spec, "SendCtrlAltDel", 204, &[]);
    let end = s.wait(Duration::from_secs(30));
    assert_eq!(end.status, Some(0), "{}", end.stderr);
    assert!(!uds.exists(), "the vsock socket was left behind");
}
