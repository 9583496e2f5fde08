//! pgrelay under a service manager: systemd's notify protocol (`Type=notify`) and
//! upgrades the service starts with a signal.
//!
//! When `NOTIFY_SOCKET` is set, pgrelay says when it serves (`READY=1` with its pid)
//! and when it stops (`STOPPING=1`); a process that took over says it is the
//! service's main process now (`MAINPID=`), so that systemd follows the upgrade
//! rather than seeing its main process exit (the unit needs `NotifyAccess=all`).
//! Without `NOTIFY_SOCKET` nothing is sent.
//!
//! SIGUSR2 starts a successor: the binary this process was started from (after a
//! package upgrade, the new one at the same path), as `run --takeover -c CONFIG`,
//! in the service's own process group and cgroup (conf/systemd/pgrelay.service).

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// Sends `state` to the service manager, if there is one.
fn notify(state: &str) {
    let Some(socket_path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(err) = send(&socket_path, state) {
        tracing::warn!(%err, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}

fn send(socket_path: &OsString, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = socket_path.as_bytes();
    match bytes.strip_prefix(b"@") {
        // An abstract socket, as systemd names it.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(state.as_bytes(), Path::new(socket_path))?;
        }
    }
    Ok(())
}

/// This process serves its sockets (at start, or after taking over): it is the
/// service's main process.
pub fn ready() {
    notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
}

/// This process is shutting down.
pub fn stopping() {
    notify("STOPPING=1");
}

/// Where to start a successor from, and with which config.
#[derive(Debug, Clone)]
pub struct Relaunch {
    /// The binary's path as this process was started from it, read at start: after
    /// a package upgrade it holds the new binary (this process's own is deleted).
    pub exe: PathBuf,
    pub config: PathBuf,
}

impl Relaunch {
    /// The running binary's path and `config`, read now.
    pub fn new(config: &Path) -> std::io::Result<Relaunch> {
        Ok(Relaunch {
            exe: std::env::current_exe()?,
            config: config.to_owned(),
        })
    }

    /// Starts `EXE run --takeover -c CONFIG` (its output where this process's goes)
    /// and logs how it ends if it ends while this process runs.
    pub fn start(&self) -> std::io::Result<u32> {
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("run")
            .arg("--takeover")
            .arg("-c")
            .arg(&self.config)
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let pid = child.id().unwrap_or(0);
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) if status.success() => {
                    tracing::info!(pid, %status, "the successor exited")
                }
                Ok(status) => tracing::warn!(pid, %status, "the successor failed"),
                Err(err) => tracing::warn!(pid, %err, "could not wait for the successor"),
            }
        });
        Ok(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(&path.clone().into_os_string(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("pgrelay-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(&OsString::from(format!("@{name}")), "STOPPING=1").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
