//! A single-member etcd (Debian's `etcd-server`) on free loopback ports, its data and
//! log in a directory the caller gives; killed when dropped.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

pub struct Etcd {
    child: Child,
    /// The client port (`http://127.0.0.1:<port>`).
    pub port: u16,
    /// Its stderr, where etcd logs.
    pub log: PathBuf,
}

impl Etcd {
    /// Starts etcd with its data in `dir/etcd` and its log in `dir/etcd.log`, and waits
    /// (up to 20 s) until it takes connections.
    pub fn start_in(dir: &Path) -> Etcd {
        let (client, peer) = (free_port(), free_port());
        let log = dir.join("etcd.log");
        let etcd_log = std::fs::File::create(&log).expect("etcd log");
        let child = Command::new(super::needs::program("etcd"))
            .args(["--name", "e1", "--data-dir"])
            .arg(dir.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=e1=http://127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(etcd_log)
            .spawn()
            .expect("start etcd");
        let mut etcd = Etcd {
            child,
            port: client,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            if Instant::now() > deadline || !matches!(etcd.child.try_wait(), Ok(None)) {
                let text = std::fs::read_to_string(&etcd.log).unwrap_or_default();
                panic!("etcd did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
