//! The process's logger (the `log` facade): `cgvm: LEVEL: message` lines on stderr until a
//! log file is configured (`--log-path`, `PUT /logger`); then lines go to that file (or
//! named pipe) as `<unix time> [<instance id>:<thread>] [LEVEL] [file:line] message`, the
//! level and origin parts when asked for.

use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::resources::{LogLevel, LoggerConfig};

struct State {
    file: Option<std::fs::File>,
    instance_id: String,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

struct Logger {
    state: Mutex<State>,
}

static LOGGER: Logger = Logger {
    state: Mutex::new(State {
        file: None,
        instance_id: String::new(),
        show_level: false,
        show_origin: false,
        module: None,
    }),
};

fn state() -> MutexGuard<'static, State> {
    LOGGER.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut st = state();
        if let (Some(module), Some(path)) = (&st.module, r.module_path()) {
            if !path.starts_with(module.as_str()) {
                return;
            }
        }
        if st.file.is_none() {
            drop(st);
            eprintln!("cgvm: {}: {}", r.level().as_str().to_lowercase(), r.args());
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let thread = std::thread::current();
        let mut line = format!(
            "{}.{:06} [{}:{}]",
            now.as_secs(),
            now.subsec_micros(),
            st.instance_id,
            thread.name().unwrap_or("?")
        );
        if st.show_level {
            line.push_str(&format!(" [{}]", r.level()));
        }
        if st.show_origin {
            line.push_str(&format!(
                " [{}:{}]",
                r.file().unwrap_or("?"),
                r.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!(" {}\n", r.args()));
        if let Some(f) = st.file.as_mut() {
            // A log line that cannot be written has nowhere better to go.
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger with `level` as the most verbose level printed (on stderr).
pub fn init(level: log::LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Sets the instance id written on log-file lines.
pub fn set_instance_id(id: &str) {
    state().instance_id = id.to_string();
}

/// Applies a logger configuration (`--log-path` and friends, `PUT /logger`): opens the file
/// (appending; a named pipe works too) before changing anything, so a bad path leaves the
/// logger as it was.
pub fn configure(c: &LoggerConfig) -> Result<(), String> {
    let file = match &c.log_path {
        Some(p) => Some(open(p)?),
        None => None,
    };
    let mut st = state();
    if file.is_some() {
        st.file = file;
    }
    if let Some(v) = c.show_level {
        st.show_level = v;
    }
    if let Some(v) = c.show_log_origin {
        st.show_origin = v;
    }
    if c.module.is_some() {
        st.module = c.module.clone().filter(|m| !m.is_empty());
    }
    drop(st);
    if let Some(level) = c.level {
        log::set_max_level(level.filter());
    } else if c.log_path.is_some() {
        // Firecracker's default level once a logger is configured.
        log::set_max_level(LogLevel::default().filter());
    }
    Ok(())
}

fn open(p: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| format!("log_path: cannot open {}: {e}", p.display()))
}
