//! Builds the probe guest (resources/probe-guest) so that `cgvm doctor` can embed and boot it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let probe = root.join("resources/probe-guest");
    for p in ["src", "Cargo.toml", "build.sh", "link.ld", ".cargo"] {
        println!("cargo:rerun-if-changed={}", probe.join(p).display());
    }
    let elf = out.join("probe.elf");
    // A packager (or a bootstrap without the probe's sources) can hand in a prebuilt probe.
    println!("cargo:rerun-if-env-changed=CGVM_PROBE_ELF");
    if let Some(prebuilt) = std::env::var_os("CGVM_PROBE_ELF") {
        if let Err(e) = std::fs::copy(&prebuilt, &elf) {
            eprintln!("CGVM_PROBE_ELF={}: {e}", PathBuf::from(prebuilt).display());
            std::process::exit(1);
        }
        return;
    }
    let status = Command::new("bash")
        .arg(probe.join("build.sh"))
        .arg(&elf)
        .env("PROBE_TARGET_DIR", out.join("probe-target"))
        .status();
    match status {
        Ok(s) if s.success() && elf.is_file() => {}
        Ok(s) => {
            eprintln!("resources/probe-guest/build.sh failed ({s}); see its output above");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("cannot run resources/probe-guest/build.sh: {e}");
            std::process::exit(1);
        }
    }
}
