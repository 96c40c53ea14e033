//! `cgvm seccomp-report`: every thread kind with the system calls its filter allows, by name,
//! for users who audit what a confined cgvm may do.

use devices::seccomp::Policy;

/// Every thread kind's policy, in the order the report prints them, each with a line on
/// what the thread does.
pub(crate) fn all_policies() -> Vec<(Policy, &'static str)> {
    let mut v = vec![
        (
            vmm::seccomp::vmm_policy(),
            "the VMM thread: event loop, device start, API actions, shutdown; device threads \
             start under it, so it holds every device kind's list",
        ),
        (
            api::seccomp::policy(),
            "the API thread: HTTP on the Unix socket",
        ),
        (
            vmm::seccomp::vcpu_policy(),
            "each vCPU thread: KVM_RUN and the device registers it reaches",
        ),
        (
            vmm::seccomp::passt_log_policy(),
            "logs passt's messages (--net user)",
        ),
    ];
    for kind in devices::virtio::device_kinds() {
        v.push((kind.policy(), "a device thread"));
    }
    v
}

/// Firecracker's counts for its three kinds, as its documentation gives them.
fn firecracker_count(kind: &str) -> Option<&'static str> {
    match kind {
        "vmm" => Some("about 50"),
        "api" => Some("31"),
        "vcpu" => Some("27"),
        _ => None,
    }
}

/// The whole report.
pub(crate) fn render() -> String {
    use std::fmt::Write;
    let all = all_policies();
    let mut out = String::new();
    let _ = writeln!(out, "cgvm seccomp report (x86_64)");
    let _ = writeln!(
        out,
        "A call outside its thread's list kills the process (with --seccomp-log, after a line \
         naming the kind and the call).\n"
    );
    let _ = writeln!(
        out,
        "{:<20} {:>8}  {:>11}",
        "thread kind", "syscalls", "Firecracker"
    );
    for (p, _) in &all {
        let _ = writeln!(
            out,
            "{:<20} {:>8}  {:>11}",
            p.kind,
            p.syscall_count(),
            firecracker_count(p.kind).unwrap_or("-")
        );
    }
    let own = vmm::seccomp::vmm_own_policy();
    let spawn = own.clone().merge(&devices::seccomp::spawn_and_confine());
    let full = vmm::seccomp::vmm_policy().syscall_count();
    let _ = writeln!(
        out,
        "\nvmm: {} of its own, {} more to start and confine device threads, {} more that only \
         device threads make (they run under the vmm filter too)",
        own.syscall_count(),
        spawn.syscall_count() - own.syscall_count(),
        full - spawn.syscall_count()
    );
    for (p, what) in &all {
        let _ = writeln!(
            out,
            "\n[{}] {} system calls: {what}",
            p.kind,
            p.syscall_count()
        );
        for line in p.describe() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// The vmm, api and vcpu policies in Firecracker's JSON filter format, the starting point
/// of a `--seccomp-filter` file.
pub(crate) fn firecracker_json() -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (p, _) in all_policies() {
        if !devices::seccomp::OVERRIDABLE_KINDS.contains(&p.kind) {
            continue;
        }
        let mut rules = Vec::new();
        for (nr, only) in p.rules() {
            let name = devices::seccomp::syscall_name(nr).unwrap_or("unknown");
            match only {
                None => rules.push(serde_json::json!({ "syscall": name })),
                Some((arg, values)) => {
                    for &(val, what) in values {
                        rules.push(serde_json::json!({
                            "syscall": name,
                            "args": [{
                                "index": arg,
                                "type": "dword",
                                "op": "eq",
                                "val": val,
                                "comment": what,
                            }],
                        }));
                    }
                }
            }
        }
        out.insert(
            p.kind.to_string(),
            serde_json::json!({
                "default_action": "kill_process",
                "filter_action": "allow",
                "filter": rules,
            }),
        );
    }
    serde_json::Value::Object(out)
}

pub(crate) fn run(firecracker_json: bool) -> i32 {
    use std::io::Write;
    let text = if firecracker_json {
        match serde_json::to_string_pretty(&self::firecracker_json()) {
            Ok(t) => t + "\n",
            Err(e) => {
                eprintln!("cgvm: error: {e}");
                return vmm::outcome::EXIT_VMM_ERROR;
            }
        }
    } else {
        render()
    };
    // A reader that stops early (`| head`) is not an error.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    0
}
