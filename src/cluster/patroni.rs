//! Patroni as the topology source (`failover.topology = "patroni"`): every
//! `failover.patroni_period`, `GET /cluster` from the first of `patroni_urls` that
//! answers. Its members become nodes (those pgrelay did not know are added), only its
//! leader may be primary, and members it does not list as running take nothing.
//! Health checks still confirm every claim: a leader is the primary once its own probe
//! says it is out of recovery. If no URL answers, the last view stands and the probes
//! alone decide.
//!
//! The HTTP client is [`super::http`], shared with the etcd lease.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use super::{http, same_host, Monitor};
use crate::config::PatroniEndpoint;

/// Why Patroni could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PatroniError {
    #[error("{0}")]
    Url(String),
    #[error(transparent)]
    Http(#[from] http::HttpError),
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
    View::parse(&http::get(endpoint, "/cluster", timeout).await?)
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
