//! The dashboard and the alert rules shipped in `conf/` (issue 16): Prometheus's own
//! `promtool` checks the rules and runs their unit tests
//! (`conf/prometheus/pgrelay-alerts.test.yml`), and every metric the Grafana dashboard
//! (`conf/grafana/pgrelay.json`) and the rules name is one a running pgrelay really
//! serves on `/metrics`, with the labels they group by.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn conf(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conf")
        .join(path)
}

/// Runs promtool with `args` in `conf/prometheus`; panics with its output on failure.
fn promtool(args: &[&str]) -> String {
    let out = Command::new(needs::program("promtool"))
        .args(args)
        .current_dir(conf("prometheus"))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_and_tests_the_alert_rules() {
    let checked = promtool(&["check", "rules", "pgrelay-alerts.yml"]);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "pgrelay-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The `pgrelay_*` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pgrelay_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The expressions of every panel of the dashboard.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(conf("grafana/pgrelay.json")).expect("read dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 15, "{} panels", panels.len());
    panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().expect("an expr").to_owned())
        .collect()
}

/// The families `/metrics` declares (`# TYPE name kind`), with their kinds.
fn served_families(metrics: &str) -> Vec<(String, String)> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_use_is_served() {
    let env = start(EnvOptions {
        metrics: true,
        replicas: 1,
        ..Default::default()
    })
    .await;
    // Traffic that makes every labelled family appear: transactions (latency by
    // pool), a pin (LISTEN in transaction mode), a client error.
    let client = env.client().await;
    for _ in 0..5 {
        simple_value(&client, "SELECT 1").await;
    }
    client
        .batch_execute("LISTEN observed")
        .await
        .expect("LISTEN");
    let _ = client.simple_query("SELECT 1/0").await;
    let addr = env.relay.metrics_addr.expect("metrics listener");
    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let families = served_families(&metrics);
    let served = |name: &str| {
        families.iter().any(|(family, kind)| {
            family == name
                || (kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| format!("{family}{suffix}") == name))
        })
    };

    let rules = std::fs::read_to_string(conf("prometheus/pgrelay-alerts.yml")).expect("rules");
    let exprs = dashboard_exprs();
    let mut used = metric_names(&rules);
    for expr in &exprs {
        used.extend(metric_names(expr));
    }
    assert!(used.len() >= 15, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|name| !served(name)).collect();
    assert!(missing.is_empty(), "not served: {missing:?}\n{metrics}");

    // The labels they group by are on the series.
    for (series, labels) in [
        (
            "pgrelay_transaction_duration_seconds_bucket{",
            &["database=", "user=", "le="][..],
        ),
        (
            "pgrelay_pool_server_connections{",
            &["node=", "database=", "user=", "state="],
        ),
        ("pgrelay_pool_size{", &["node=", "database=", "user="]),
        ("pgrelay_hooks_total{", &["hook=", "outcome="]),
        ("pgrelay_node_lag_seconds{", &["node="]),
        ("pgrelay_client_connections{", &["state=\"waiting\""]),
        ("pgrelay_pins_total{", &["reason="]),
    ] {
        let line = metrics
            .lines()
            .find(|line| line.starts_with(series))
            .unwrap_or_else(|| panic!("no {series} series"));
        for label in labels {
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with(series) && l.contains(label)),
                "{series} has no {label}: {line}"
            );
        }
    }
}
