//! What the benchmark programs share: a scratch directory and building the probe guest.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A benchmark's error: a sentence for the user.
pub type Result<T> = std::result::Result<T, String>;

/// A directory removed (best effort) when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory `<parent>/cgvm-<name>.<pid>`.
    pub fn new(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(format!("cgvm-{name}.{}", std::process::id()));
        fs::create_dir_all(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds the probe guest into `dir` with resources/probe-guest/build.sh and returns the
/// ELF's path; `who` names the benchmark in the message.
pub fn build_probe_guest(dir: &Path, who: &str) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/probe-guest/build.sh");
    if !script.is_file() {
        return Err(format!(
            "{} does not exist: pass the guest with --kernel PATH",
            script.display()
        ));
    }
    let elf = dir.join("probe.elf");
    eprintln!("{who}: building the probe guest with {}", script.display());
    let status = Command::new(&script)
        .arg(&elf)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} failed ({status})", script.display()));
    }
    if !elf.is_file() {
        return Err(format!("{} made no {}", script.display(), elf.display()));
    }
    Ok(elf)
}

/// Parses the number given to `option`.
pub fn parse_number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| format!("{option} wants a number, not {value:?}"))
}
