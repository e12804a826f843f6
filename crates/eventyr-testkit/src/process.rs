//! Running helper commands, and supervising a server so that it stops with us.

use std::fs::File;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::{TestkitError, io};

/// The shell script of the supervisor: start the server in the background (writing its
/// pid to a file, if one is named), wait until our end of the pipe closes, then
/// interrupt the server (a fast, clean shutdown for PostgreSQL, NATS and Redis alike),
/// wait for it and remove its directory (if one is named). It ignores SIGINT itself so
/// that Ctrl-C in a terminal reaches the server directly and the script still reaps it
/// and cleans up.
const SUPERVISOR: &str = r#"trap '' INT; dir=$1; pidfile=$2; shift 2; "$@" & pid=$!; [ -n "$pidfile" ] && echo "$pid" > "$pidfile"; read _; kill -INT "$pid" 2>/dev/null; wait "$pid"; [ -n "$dir" ] && rm -rf "$dir""#;

/// A server process under a supervisor. Dropping it stops the server and waits.
#[derive(Debug)]
pub struct Supervised {
    supervisor: Child,
    stdin: Option<ChildStdin>,
}

impl Supervised {
    /// Starts `program args..` under the supervisor, its output written to `log`;
    /// `dir` is removed once the server has stopped.
    pub fn start(program: &[String], log: &Path, dir: &Path) -> Result<Self, TestkitError> {
        Self::start_with(program, log, Some(dir), None)
    }

    /// Like [`Supervised::start`]; removes `dir` only if given, and writes the
    /// server's pid to `pid_file` if given (to signal it directly).
    pub fn start_with(
        program: &[String],
        log: &Path,
        dir: Option<&Path>,
        pid_file: Option<&Path>,
    ) -> Result<Self, TestkitError> {
        let out = File::create(log).map_err(io("creating the server log"))?;
        let err = out.try_clone().map_err(io("creating the server log"))?;
        let mut supervisor = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("sh")
            .arg(dir.map(Path::as_os_str).unwrap_or_default())
            .arg(pid_file.map(Path::as_os_str).unwrap_or_default())
            .args(program)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io("starting the server supervisor"))?;
        let stdin = supervisor.stdin.take();
        Ok(Self { supervisor, stdin })
    }

    /// Waits until the server's `log` holds `line` (it is ready), at most `within`.
    /// Errors: the server ended first, or took too long (with its log).
    pub fn wait_for_line(
        &mut self,
        log: &Path,
        line: &str,
        what: &'static str,
        within: std::time::Duration,
    ) -> Result<(), TestkitError> {
        let started = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains(line) {
                return Ok(());
            }
            if self.has_exited() || started.elapsed() > within {
                return Err(TestkitError::NotReady {
                    what,
                    seconds: within.as_secs(),
                    log: text,
                });
            }
            // Polling a log file for a line: there is nothing to wait on.
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Whether the supervisor (and so the server) has already exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.supervisor.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.supervisor.wait();
    }
}

/// Runs a command to completion; its output becomes the error message on failure.
pub fn run(program: &[String]) -> Result<String, TestkitError> {
    let (first, rest) = program.split_first().ok_or_else(|| TestkitError::Command {
        command: String::new(),
        message: "empty command".into(),
    })?;
    let output = Command::new(first)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::Command {
            command: program.join(" "),
            message: e.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(TestkitError::Command {
            command: program.join(" "),
            message: text,
        })
    }
}

/// A free TCP port on 127.0.0.1, chosen by the kernel.
pub fn free_port() -> Result<u16, TestkitError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port();
    Ok(port)
}

/// Whether this process runs as root (servers like PostgreSQL refuse to).
pub fn is_root() -> bool {
    run(&["id".into(), "-u".into()]).is_ok_and(|uid| uid.trim() == "0")
}
