//! Starting the workspace's binaries as child processes.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Printed on stdout by every Ferrymesh binary once its ports are bound.
pub const LISTENING_PREFIX: &str = "FERRYMESH_LISTENING ";

/// The folder of the workspace's binaries (`target/<profile>`), found from the running test
/// (`target/<profile>/deps/<test>`) or binary (`target/<profile>/<bin>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary has a path");
    let dir = exe.parent().expect("a binary lives in a folder");
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_owned()
    } else {
        dir.to_owned()
    }
}

/// The path of a workspace binary.
///
/// # Panics
/// When it was not built: run `cargo build --workspace --bins` first (`make test` does).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        path.display()
    );
    path
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Spawned {
    /// A name for messages.
    pub name: String,
    child: Option<Child>,
    /// The JSON of its `FERRYMESH_LISTENING` line.
    pub listening: serde_json::Value,
    /// Where its stderr goes.
    pub log: PathBuf,
    lines: mpsc::Receiver<String>,
}

impl Spawned {
    /// Starts `cmd` (stderr to `log`) and waits up to 30s for its `FERRYMESH_LISTENING` line.
    ///
    /// # Errors
    /// It cannot start, exits first, or prints no such line in time.
    pub fn start(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Spawned> {
        let log_file = std::fs::File::create(log)?;
        cmd.stdout(Stdio::piped())
            .stderr(log_file)
            .stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut spawned = Spawned {
            name: name.to_owned(),
            child: Some(child),
            listening: serde_json::Value::Null,
            log: log.to_owned(),
            lines: rx,
        };
        spawned.listening = spawned.wait_for_line(LISTENING_PREFIX, Duration::from_secs(30))?;
        Ok(spawned)
    }

    /// Waits for a stdout line starting with `prefix` and parses the rest as JSON.
    ///
    /// # Errors
    /// No such line in time, or the process ended.
    pub fn wait_for_line(
        &mut self,
        prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(json) = line.strip_prefix(prefix) {
                        return Ok(serde_json::from_str(json)?);
                    }
                }
                Err(_) => bail!(
                    "{}: no {prefix:?} line within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                ),
            }
        }
    }

    /// Every stdout line printed so far and not yet read.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// The stderr log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An address from the listening line, e.g. `addr("outbound")`.
    pub fn addr(&self, key: &str) -> std::net::SocketAddr {
        self.listening[key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no {key:?} in {}", self.name, self.listening))
            .parse()
            .expect("listening addresses are ip:port")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    ///
    /// # Errors
    /// It did not exit in time (it is then killed).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}
