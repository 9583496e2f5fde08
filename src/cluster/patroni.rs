//! Patroni as the topology source (`failover.topology = "patroni"`): every
//! `failover.patroni_period`, `GET /cluster` from the first of `patroni_urls` that
//! answers. Its members become nodes (those pgrelay did not know are added), only its
//! leader may be primary, and members it does not list as running take nothing.
//! Health checks still confirm every claim: a leader is the primary once its own probe
//! says it is out of recovery. If no URL answers, the last view stands and the probes
//! alone decide.
//!
//! The HTTP client is the smallest that serves: HTTP/1.1 `GET`, `Connection: close`,
//! a body read by `Content-Length`, chunks, or to the end, at most 1 MiB.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{same_host, Monitor};
use crate::config::PatroniEndpoint;

/// Why Patroni could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PatroniError {
    #[error("{0}")]
    Url(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0:?}")]
    Status(String),
    #[error("malformed HTTP response: {0}")]
    Http(&'static str),
    #[error("bad /cluster answer: {0}")]
    Json(#[from] serde_json::Error),
    /// Every URL failed: each with its reason.
    #[error("no URL answered: {}", describe(.0))]
    NoneAnswered(Vec<(String, PatroniError)>),
}

fn describe(failures: &[(String, PatroniError)]) -> String {
    let each: Vec<String> = failures
        .iter()
        .map(|(url, e)| format!("{url}: {e}"))
        .collect();
    each.join("; ")
}

/// The largest `/cluster` answer read.
const MAX_RESPONSE: u64 = 1 << 20;

/// One member of `/cluster`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Member {
    pub name: String,
    /// `leader`, `standby_leader`, `replica`, `sync_standby`, ...
    pub role: String,
    /// `running`, `streaming`, `stopped`, `starting`, ...
    #[serde(default)]
    pub state: String,
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub timeline: Option<u32>,
}

impl Member {
    /// Patroni says it serves: running (or streaming, Patroni 3.1+).
    pub fn serves(&self) -> bool {
        matches!(self.state.as_str(), "running" | "streaming")
    }

    fn is_leader(&self) -> bool {
        self.role == "leader"
    }
}

/// What `/cluster` said.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct View {
    pub members: Vec<Member>,
}

impl View {
    pub fn parse(json: &[u8]) -> Result<View, PatroniError> {
        Ok(serde_json::from_slice(json)?)
    }

    pub fn member(&self, host: &str, port: u16) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.port == port && same_host(&m.host, host))
    }

    /// Whether Patroni names `host:port` its running leader.
    pub fn is_leader(&self, host: &str, port: u16) -> bool {
        self.member(host, port)
            .is_some_and(|m| m.is_leader() && m.serves())
    }
}

/// `GET /cluster` from one endpoint.
pub async fn fetch(endpoint: &PatroniEndpoint, timeout: Duration) -> Result<View, PatroniError> {
    let work = async {
        let mut tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        let request = format!(
            "GET /cluster HTTP/1.1\r\nHost: {}:{}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
            endpoint.host, endpoint.port
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        tcp.take(MAX_RESPONSE).read_to_end(&mut raw).await?;
        View::parse(&http_body(&raw)?)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| PatroniError::Timeout(timeout))?
}

/// The body of a `200` response (chunked or not).
fn http_body(raw: &[u8]) -> Result<Vec<u8>, PatroniError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(PatroniError::Http("incomplete"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(PatroniError::Status(status.to_owned()));
    }
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    if chunked {
        return dechunk(body);
    }
    Ok(match length {
        Some(n) => body
            .get(..n)
            .ok_or(PatroniError::Http("truncated body"))?
            .to_vec(),
        None => body.to_vec(),
    })
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, PatroniError> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(PatroniError::Http("bad chunk"))?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| PatroniError::Http("bad chunk size"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let truncated = || PatroniError::Http("truncated chunk");
        out.extend_from_slice(body.get(..size).ok_or_else(truncated)?);
        body = body.get(size + 2..).ok_or_else(truncated)?;
    }
}

/// Reads `/cluster` every `patroni_period` until shutdown (only with
/// `topology = "patroni"`), and once at start-up before the first probes.
pub async fn run(monitor: Monitor, mut shutdown: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        let config = monitor.config.load_full();
        if config.failover.topology != crate::config::TopologySource::Patroni {
            return;
        }
        match poll_once(&monitor).await {
            Ok(()) => failing = false,
            Err(err) if !failing => {
                tracing::warn!(%err, "Patroni could not be read; keeping its last view, health checks decide meanwhile");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(config.failover.patroni_period) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One reading: the first endpoint that answers is believed; what its view changed
/// is reported.
pub async fn poll_once(monitor: &Monitor) -> Result<(), PatroniError> {
    let config = monitor.config.load_full();
    let timeout = config.health_check.timeout;
    let mut errors = Vec::new();
    for url in &config.failover.patroni_urls {
        let result = match PatroniEndpoint::parse(url) {
            Ok(endpoint) => fetch(&endpoint, timeout).await,
            Err(err) => Err(PatroniError::Url(err)),
        };
        match result {
            Ok(view) => {
                let transitions = monitor.cluster.patroni_view(view, &config);
                monitor.findings.report(&config, &transitions);
                return Ok(());
            }
            Err(err) => errors.push((url.clone(), err)),
        }
    }
    Err(PatroniError::NoneAnswered(errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/cluster` as Patroni 3.0 answers it, during a switchover's aftermath: the new
    /// leader, a running replica, and a stopped member.
    const RECORDED: &str = r#"{"members": [
        {"name": "pg1", "role": "replica", "state": "running", "api_url": "http://127.0.0.1:8009/patroni",
         "host": "127.0.0.1", "port": 5433, "timeline": 2, "lag": 0},
        {"name": "pg2", "role": "leader", "state": "running", "api_url": "http://127.0.0.1:8010/patroni",
         "host": "127.0.0.1", "port": 5434, "timeline": 2},
        {"name": "pg3", "role": "replica", "state": "stopped", "api_url": "http://127.0.0.1:8011/patroni",
         "host": "127.0.0.1", "port": 5435, "lag": "unknown"}
    ], "scope": "demo"}"#;

    #[test]
    fn reads_recorded_cluster_answers() {
        let view = View::parse(RECORDED.as_bytes()).expect("parses");
        assert_eq!(view.members.len(), 3);
        assert!(view.is_leader("127.0.0.1", 5434));
        assert!(
            view.is_leader("localhost", 5434),
            "loopback spellings match"
        );
        assert!(!view.is_leader("127.0.0.1", 5433));
        assert!(view.member("127.0.0.1", 5433).is_some_and(Member::serves));
        assert!(!view.member("127.0.0.1", 5435).is_some_and(Member::serves));
        assert_eq!(
            view.member("127.0.0.1", 5434).and_then(|m| m.timeline),
            Some(2)
        );
        // Patroni 3.1+ says "streaming" for replicas; a leader that is not running
        // is no leader.
        let newer = RECORDED
            .replace(
                r#""state": "running", "api_url": "http://127.0.0.1:8009"#,
                r#""state": "streaming", "api_url": "http://127.0.0.1:8009"#,
            )
            .replace(
                r#""role": "leader", "state": "running""#,
                r#""role": "leader", "state": "starting""#,
            );
        let view = View::parse(newer.as_bytes()).expect("parses");
        assert!(view.member("127.0.0.1", 5433).is_some_and(Member::serves));
        assert!(!view.is_leader("127.0.0.1", 5434));
        assert!(View::parse(b"{\"members\": 3}").is_err());
        assert!(View::parse(b"<html>").is_err());
    }

    #[test]
    fn http_bodies_plain_sized_and_chunked() {
        let plain = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"members\": []}";
        assert_eq!(http_body(plain).expect("body"), b"{\"members\": []}");
        let sized = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra";
        assert_eq!(http_body(sized).expect("body"), b"{}");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"me\r\nb;x=1\r\nmbers\": []}\r\n0\r\n\r\n";
        assert_eq!(http_body(chunked).expect("body"), b"{\"members\": []}");
        assert!(http_body(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }

    #[tokio::test]
    async fn fetches_over_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 1024];
            let n = socket.read(&mut request).await.expect("read");
            assert!(request[..n].starts_with(b"GET /cluster HTTP/1.1\r\n"));
            let reply =
                format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{RECORDED}");
            socket.write_all(reply.as_bytes()).await.expect("write");
        });
        let endpoint = PatroniEndpoint {
            host: "127.0.0.1".into(),
            port,
        };
        let view = fetch(&endpoint, Duration::from_secs(5))
            .await
            .expect("view");
        assert!(view.is_leader("127.0.0.1", 5434));
    }
}
