//! Every endpoint of the real binary, for success and for each class of error: malformed
//! JSON, unknown, missing and mistyped fields, values the VMM refuses, requests in the wrong
//! phase, unsupported features, unknown paths and methods, oversized and malformed HTTP.
//! Every error must name its problem, and every body must match api/openapi.yaml.

mod common;

#[path = "../api/tests/support/openapi.rs"]
mod openapi;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::api::*;
use common::*;

fn spec() -> openapi::Spec {
    openapi::Spec::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("api/openapi.yaml"))
        .expect("load api/openapi.yaml")
}

/// One request and what its answer must be: the status and, for errors, words the
/// fault_message must contain.
struct Case<'a> {
    method: &'a str,
    path: &'a str,
    body: Option<String>,
    status: u16,
    words: &'a [&'a str],
}

fn case<'a>(
    method: &'a str,
    path: &'a str,
    body: Option<&str>,
    status: u16,
    words: &'a [&'a str],
) -> Case<'a> {
    Case {
        method,
        path,
        body: body.map(String::from),
        status,
        words,
    }
}

fn check(s: &Served, spec: &openapi::Spec, c: &Case<'_>) -> Answer {
    let a = s.call(c.method, c.path, c.body.as_deref());
    let what = format!("{} {} {:?}", c.method, c.path, c.body);
    assert_eq!(a.status, c.status, "{what}: {}", a.body);
    spec.validate_response(c.method, c.path, a.status, &a.json())
        .unwrap_or_else(|e| panic!("{what}: {e}\nbody: {}", a.body));
    if a.status >= 400 {
        let msg = a.fault();
        for w in c.words {
            assert!(msg.contains(w), "{what}: {msg:?} does not name {w:?}");
        }
    }
    a
}

/// `PUT /actions` with `action_type` (it must be accepted), then waits for the process to end.
fn act_and_wait(mut s: Served, spec: &openapi::Spec, action_type: &str, limit: Duration) -> Ended {
    let body = format!(r#"{{"action_type": "{action_type}"}}"#);
    check(&s, spec, &case("PUT", "/actions", Some(&body), 204, &[]));
    s.wait(limit)
}

#[test]
fn every_endpoint_answers_success_and_names_each_error_before_the_start() {
    let spec = spec();
    let d = scratch("api-endpoints-preboot");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let log = d.join("cgvm.log");
    let metrics = d.join("metrics.json");
    let console = d.join("console.txt");
    let uds = d.join("v.sock");
    let vsock = format!(
        r#"{{"guest_cid": 7, "uds_path": "{}", "vsock_id": "vsock0"}}"#,
        uds.display()
    );
    let s = Served::serve(&d, &[]);
    let probe = probe_elf().display().to_string();
    let boot = format!(r#"{{"kernel_image_path": "{probe}", "boot_args": "probe.tests=boot"}}"#);
    let drive = |id: &str, root: bool| {
        format!(
            r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": {root}, "is_read_only": false}}"#,
            disk.display()
        )
    };
    let cases = [
        // GET endpoints.
        case("GET", "/", None, 200, &[]),
        case("GET", "/version", None, 200, &[]),
        case("GET", "/machine-config", None, 200, &[]),
        case("GET", "/vm/config", None, 200, &[]),
        // machine-config
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
            204,
            &[],
        ),
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2,"#),
            400,
            &["PUT /machine-config"],
        ),
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 64, "foo": 1}"#),
            400,
            &["foo"],
        ),
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2}"#),
            400,
            &["mem_size_mib"],
        ),
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": "2", "mem_size_mib": 64}"#),
            400,
            &["vcpu_count"],
        ),
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
            400,
            &["vcpu_count"],
        ),
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}"#),
            400,
            &["cpu_template"],
        ),
        case("PUT", "/machine-config", None, 400, &["body"]),
        case(
            "PATCH",
            "/machine-config",
            Some(r#"{"mem_size_mib": 48}"#),
            204,
            &[],
        ),
        case(
            "PATCH",
            "/machine-config",
            Some("{}"),
            400,
            &["changes nothing"],
        ),
        case(
            "PATCH",
            "/machine-config",
            Some(r#"{"vcpus": 1}"#),
            400,
            &["vcpus"],
        ),
        // boot-source
        case("PUT", "/boot-source", Some(&boot), 204, &[]),
        case(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
            400,
            &["kernel_image_path", "/nonexistent/vmlinux"],
        ),
        case(
            "PUT",
            "/boot-source",
            Some(r#"{"boot_args": "x"}"#),
            400,
            &["kernel_image_path"],
        ),
        case(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/k", "kernel_args": "x"}"#),
            400,
            &["kernel_args"],
        ),
        // drives
        case(
            "PUT",
            "/drives/rootfs",
            Some(&drive("rootfs", true)),
            204,
            &[],
        ),
        case(
            "PUT",
            "/drives/data",
            Some(&drive("rootfs", false)),
            400,
            &["data", "rootfs"],
        ),
        case(
            "PUT",
            "/drives/other",
            Some(&drive("other", true)),
            400,
            &["already the root device"],
        ),
        case(
            "PUT",
            "/drives/bad",
            Some(
                r#"{"drive_id": "bad", "path_on_host": "/nonexistent/disk.img", "is_root_device": false}"#,
            ),
            400,
            &["/nonexistent/disk.img"],
        ),
        case(
            "PUT",
            "/drives/bad",
            Some(
                r#"{"drive_id": "bad", "path_on_host": "/d", "is_root_device": false, "is_read_only": "no"}"#,
            ),
            400,
            &["is_read_only"],
        ),
        case(
            "PUT",
            "/drives/bad",
            Some(
                r#"{"drive_id": "bad", "path_on_host": "/d", "is_root_device": false, "socket": "/s"}"#,
            ),
            400,
            &["vhost-user"],
        ),
        case(
            "PUT",
            "/drives/x%20y",
            Some(&drive("x y", false)),
            400,
            &["drive"],
        ),
        case(
            "PATCH",
            "/drives/rootfs",
            Some(r#"{"drive_id": "rootfs"}"#),
            400,
            &["before starting"],
        ),
        // entropy
        case(
            "PUT",
            "/entropy",
            Some(r#"{"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}"#),
            204,
            &[],
        ),
        case(
            "PUT",
            "/entropy",
            Some(r#"{"rate_limiter": {"bandwidth": {"size": 4096}}}"#),
            400,
            &["refill_time"],
        ),
        case("PUT", "/entropy", Some(r#"{"rate": 1}"#), 400, &["rate"]),
        // logger
        case(
            "PUT",
            "/logger",
            Some(&format!(
                r#"{{"log_path": "{}", "level": "Debug", "show_level": true}}"#,
                log.display()
            )),
            204,
            &[],
        ),
        case(
            "PUT",
            "/logger",
            Some(r#"{"level": "Loud"}"#),
            400,
            &["Loud"],
        ),
        case(
            "PUT",
            "/logger",
            Some(r#"{"log_path": "/nonexistent/dir/cgvm.log"}"#),
            400,
            &["/nonexistent/dir/cgvm.log"],
        ),
        // metrics
        case(
            "PUT",
            "/metrics",
            Some(&format!(
                r#"{{"metrics_path": "{}", "emit_id": true}}"#,
                metrics.display()
            )),
            204,
            &[],
        ),
        case(
            "PUT",
            "/metrics",
            Some(&format!(r#"{{"metrics_path": "{}"}}"#, metrics.display())),
            400,
            &["already set"],
        ),
        case("PUT", "/metrics", Some("{}"), 400, &["metrics_path"]),
        // serial
        case(
            "PUT",
            "/serial",
            Some(&format!(
                r#"{{"serial_out_path": "{}"}}"#,
                console.display()
            )),
            204,
            &[],
        ),
        case(
            "PUT",
            "/serial",
            Some(r#"{"serial_out_path": "/nonexistent/dir/console"}"#),
            400,
            &["/nonexistent/dir/console"],
        ),
        case(
            "PUT",
            "/serial",
            Some(r#"{"rate_limiter": {"size": 1, "refill_time": 1}}"#),
            400,
            &["rate_limiter"],
        ),
        // vm and actions, before the start
        case(
            "PATCH",
            "/vm",
            Some(r#"{"state": "Paused"}"#),
            400,
            &["before starting"],
        ),
        case(
            "PATCH",
            "/vm",
            Some(r#"{"state": "Sleeping"}"#),
            400,
            &["Sleeping"],
        ),
        case(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
            400,
            &["before starting"],
        ),
        case(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "Reboot"}"#),
            400,
            &["Reboot"],
        ),
        case(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
            204,
            &[],
        ),
        // Network interfaces: each problem named (the successes, which need a tap, are in
        // tests/api_net_vsock.rs).
        case(
            "PUT",
            "/network-interfaces/eth0",
            Some(
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:zz"}"#,
            ),
            400,
            &["network interface eth0", "guest_mac", "02:00:00:00:00:zz"],
        ),
        case(
            "PUT",
            "/network-interfaces/eth0",
            Some(
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:5e:00:00:01"}"#,
            ),
            400,
            &["guest_mac", "multicast"],
        ),
        case(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "a/b"}"#),
            400,
            &["host_dev_name 'a/b'"],
        ),
        case(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 1500}"#),
            400,
            &["mtu 1500", "VIRTIO_NET_F_MTU"],
        ),
        case(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0"}"#),
            400,
            &["host_dev_name"],
        ),
        case(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#),
            400,
            &["[eth0]", "[eth1]"],
        ),
        case(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "allow_mmds_requests": true}"#),
            400,
            &["allow_mmds_requests"],
        ),
        case(
            "PATCH",
            "/network-interfaces/eth0",
            Some(
                r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
            ),
            400,
            &["before starting"],
        ),
        // vsock
        case(
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#),
            400,
            &["guest_cid 2"],
        ),
        case(
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 3}"#),
            400,
            &["uds_path"],
        ),
        case(
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock", "cid": 3}"#),
            400,
            &["`cid`"],
        ),
        case("PUT", "/vsock", Some(&vsock), 204, &[]),
        // Features cgvm does not have, named.
        case(
            "PUT",
            "/balloon",
            Some(r#"{"amount_mib": 1, "deflate_on_oom": false}"#),
            400,
            &["balloon"],
        ),
        case(
            "PUT",
            "/snapshot/create",
            Some(r#"{"mem_file_path": "/m", "snapshot_path": "/s"}"#),
            400,
            &["snapshot"],
        ),
        case("GET", "/mmds", None, 400, &["MMDS"]),
        case("PUT", "/cpu-config", Some("{}"), 400, &["CPU"]),
        case(
            "PUT",
            "/pmem/p0",
            Some(r#"{"id": "p0", "path_on_host": "/p"}"#),
            400,
            &["pmem"],
        ),
        case("PUT", "/hotplug/memory", Some("{}"), 400, &["hotplug"]),
        // Unknown paths and methods.
        case("GET", "/nonexistent", None, 404, &["/nonexistent"]),
        case("DELETE", "/machine-config", None, 405, &["DELETE"]),
    ];
    for c in &cases {
        check(&s, &spec, c);
    }

    // What was set is what GET reports.
    let a = check(&s, &spec, &case("GET", "/machine-config", None, 200, &[]));
    assert_eq!(a.json()["vcpu_count"], 2);
    assert_eq!(a.json()["mem_size_mib"], 48);
    let a = check(&s, &spec, &case("GET", "/vm/config", None, 200, &[]));
    let v = a.json();
    assert_eq!(v["drives"][0]["drive_id"], "rootfs");
    assert_eq!(v["boot-source"]["kernel_image_path"], probe.as_str());
    assert_eq!(v["entropy"]["rate_limiter"]["bandwidth"]["size"], 4096);
    // Nothing refused was kept; the vsock is reported without the deprecated id.
    assert_eq!(v["network-interfaces"], serde_json::json!([]), "{}", a.body);
    assert_eq!(
        v["vsock"],
        serde_json::json!({"guest_cid": 7, "uds_path": uds.display().to_string()})
    );
    // FlushMetrics wrote a line with the instance id.
    let m = std::fs::read_to_string(&metrics).expect("metrics");
    let line: serde_json::Value =
        serde_json::from_str(m.lines().last().expect("a line")).expect("JSON");
    assert_eq!(line["id"], "anonymous-instance");
    assert!(
        line["api_server"]["put_requests"].as_u64().unwrap_or(0) > 10,
        "{line}"
    );
    assert!(
        line["api_server"]["failed_requests"].as_u64().unwrap_or(0) > 10,
        "{line}"
    );

    // An oversized body is refused naming the limit; that connection is closed, others live.
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "x".repeat(60_000));
    let a = s.call("PUT", "/boot-source", Some(&big));
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.fault().contains("51200"), "{}", a.body);
    // Malformed HTTP: 400, then that connection is closed; the server goes on.
    let mut c = s.client();
    c.stream()
        .write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: zebra\r\n\r\n")
        .expect("write");
    let a = read_answer(c.stream()).expect("an answer to malformed HTTP");
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        read_answer(c.stream()).is_err(),
        "the connection stayed open"
    );
    let mut c = s.client();
    c.stream().write_all(b"GARBAGE\r\n\r\n").expect("write");
    assert_eq!(read_answer(c.stream()).expect("answer").status, 400);
    // A client that leaves mid-request does not disturb the server.
    let mut c = s.client();
    c.stream()
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"vcpu")
        .expect("write");
    drop(c);
    assert_eq!(s.call("GET", "/", None).status, 200);

    // InstanceStart works; the log file then has the start, with levels.
    let end = act_and_wait(s, &spec, "InstanceStart", Duration::from_secs(60));
    assert_eq!(end.status, Some(0), "{}", end.stderr);
    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(
        text.contains("[INFO]") && text.contains("started"),
        "{text}"
    );
    assert!(text.contains("[anonymous-instance:"), "{text}");
    let console_text = std::fs::read_to_string(&console).expect("console");
    assert!(
        console_text.contains("probe: 1 passed, 0 failed"),
        "{console_text}"
    );
    assert!(
        text.contains(&format!(
            "vsock: guest CID 7, host socket {}",
            uds.display()
        )),
        "{text}"
    );
    assert!(!uds.exists(), "the vsock socket was left behind");
}

#[test]
fn after_the_start_pre_boot_requests_are_refused_and_drives_can_change() {
    let spec = spec();
    let d = scratch("api-endpoints-running");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let console = d.join("console.txt");
    let s = Served::serve(&d, &[]);
    let probe = probe_elf().display().to_string();
    let setup = [
        case(
            "PUT",
            "/boot-source",
            Some(&format!(
                r#"{{"kernel_image_path": "{probe}", "boot_args": "probe.tests=boot probe.exit=hang"}}"#
            )),
            204,
            &[],
        ),
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
            204,
            &[],
        ),
        case(
            "PUT",
            "/drives/data",
            Some(&format!(
                r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "io_engine": "Async"}}"#,
                disk.display()
            )),
            204,
            &[],
        ),
        case(
            "PUT",
            "/serial",
            Some(&format!(
                r#"{{"serial_out_path": "{}"}}"#,
                console.display()
            )),
            204,
            &[],
        ),
        case(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            204,
            &[],
        ),
    ];
    for c in &setup {
        check(&s, &spec, c);
    }
    wait_for_text(&console, "probe: waiting", Duration::from_secs(60));
    let after = &["not supported after starting the microVM"];
    let cases = [
        case(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            400,
            after,
        ),
        case(
            "PUT",
            "/boot-source",
            Some(&format!(r#"{{"kernel_image_path": "{probe}"}}"#)),
            400,
            after,
        ),
        case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
            400,
            after,
        ),
        case(
            "PATCH",
            "/machine-config",
            Some(r#"{"vcpu_count": 2}"#),
            400,
            after,
        ),
        case(
            "PUT",
            "/drives/data",
            Some(&format!(
                r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false}}"#,
                disk.display()
            )),
            400,
            after,
        ),
        case("PUT", "/entropy", Some("{}"), 400, after),
        case("PUT", "/serial", Some("{}"), 400, after),
        case(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#),
            400,
            after,
        ),
        case(
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#),
            400,
            after,
        ),
        case(
            "PATCH",
            "/network-interfaces/eth0",
            Some(
                r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
            ),
            400,
            &["network interface eth0", "no such network interface"],
        ),
        case(
            "PATCH",
            "/drives/nosuch",
            Some(r#"{"drive_id": "nosuch", "path_on_host": "/x"}"#),
            400,
            &["nosuch"],
        ),
        case(
            "PATCH",
            "/drives/data",
            Some(r#"{"drive_id": "data"}"#),
            400,
            &["path_on_host", "rate_limiter"],
        ),
        case(
            "PATCH",
            "/drives/data",
            Some(r#"{"drive_id": "data", "read_only": true}"#),
            400,
            &["read_only"],
        ),
        case(
            "PATCH",
            "/drives/data",
            Some(
                r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#,
            ),
            204,
            &[],
        ),
        case("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204, &[]),
        case("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204, &[]),
        case("GET", "/", None, 200, &[]),
        case("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204, &[]),
        case("GET", "/machine-config", None, 200, &[]),
        case(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
            400,
            &["metrics"],
        ),
    ];
    for c in &cases {
        check(&s, &spec, c);
    }
    let a = check(&s, &spec, &case("GET", "/vm/config", None, 200, &[]));
    assert_eq!(
        a.json()["drives"][0]["rate_limiter"]["ops"]["size"],
        100,
        "{}",
        a.body
    );
    let end = act_and_wait(s, &spec, "SendCtrlAltDel", Duration::from_secs(30));
    assert_eq!(end.status, Some(0), "{}", end.stderr);
}

#[test]
fn a_failed_start_names_the_problem_and_the_machine_can_be_fixed_and_started() {
    let spec = spec();
    let d = scratch("api-failed-start");
    let junk = d.join("not-a-kernel");
    std::fs::write(&junk, b"this is not a kernel image").expect("write");
    let s = Served::serve(&d, &[]);
    check(
        &s,
        &spec,
        &case(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            400,
            &["boot source"],
        ),
    );
    let body = format!(r#"{{"kernel_image_path": "{}"}}"#, junk.display());
    check(
        &s,
        &spec,
        &case("PUT", "/boot-source", Some(&body), 204, &[]),
    );
    check(
        &s,
        &spec,
        &case(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            400,
            &["Cannot start microvm", "not-a-kernel"],
        ),
    );
    let a = check(&s, &spec, &case("GET", "/", None, 200, &[]));
    assert_eq!(a.json()["state"], "Not started");
    let body = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.tests=boot probe.exit=9"}}"#,
        probe_elf().display()
    );
    check(
        &s,
        &spec,
        &case("PUT", "/boot-source", Some(&body), 204, &[]),
    );
    check(
        &s,
        &spec,
        &case(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
            204,
            &[],
        ),
    );
    let end = act_and_wait(s, &spec, "InstanceStart", Duration::from_secs(60));
    assert_eq!(end.status, Some(9), "{}", end.stderr);
}
