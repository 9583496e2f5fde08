//! etcd's v3 API through its JSON gateway (`POST /v3/...`, keys and values base64,
//! 64-bit integers as strings), over [`super::http`]: the few calls the failover lease
//! ([`super::lease`]) makes. Each call tries `failover.lease_endpoints` in order and
//! takes the first answer.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::http::{self, HttpError};
use crate::config::{FailoverConfig, PatroniEndpoint as Endpoint, ETCD_PORT};

/// Why etcd could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{0}")]
    Url(String),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("bad etcd answer: {0}")]
    Json(#[from] serde_json::Error),
    #[error("etcd answered without {0}")]
    Missing(&'static str),
    /// Every endpoint failed: each with its reason.
    #[error("no etcd endpoint answered: {}", describe(.0))]
    NoneAnswered(Vec<(String, EtcdError)>),
}

fn describe(failures: &[(String, EtcdError)]) -> String {
    let each: Vec<String> = failures
        .iter()
        .map(|(url, e)| format!("{url}: {e}"))
        .collect();
    each.join("; ")
}

/// What a campaign's transaction found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Won,
    /// Someone holds the key (its value, if it was still there to read).
    Taken(Option<Vec<u8>>),
}

/// etcd's v3 JSON gateway at `lease_endpoints`, tried in order.
pub struct Etcd {
    endpoints: Vec<(String, Endpoint)>,
    timeout: Duration,
}

impl Etcd {
    pub fn new(failover: &FailoverConfig) -> Result<Etcd, EtcdError> {
        let endpoints = failover
            .lease_endpoints
            .iter()
            .map(|url| {
                Endpoint::parse_with_port(url, ETCD_PORT)
                    .map(|endpoint| (url.clone(), endpoint))
                    .map_err(EtcdError::Url)
            })
            .collect::<Result<_, _>>()?;
        // A round fits in a keepalive period, whatever endpoint answers.
        let timeout = (failover.lease_ttl / 4).max(Duration::from_millis(500));
        Ok(Etcd { endpoints, timeout })
    }

    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let body = serde_json::to_vec(body)?;
        let mut failures = Vec::new();
        for (url, endpoint) in &self.endpoints {
            match http::post_json(endpoint, path, &body, self.timeout).await {
                Ok(answer) => return Ok(serde_json::from_slice(&answer)?),
                Err(err) => failures.push((url.clone(), err.into())),
            }
        }
        Err(EtcdError::NoneAnswered(failures))
    }

    /// A new lease: its id and the TTL granted.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let answer = self
            .call(
                "/v3/lease/grant",
                &json!({"TTL": ttl.as_secs().to_string()}),
            )
            .await?;
        let id = int(&answer["ID"]).ok_or(EtcdError::Missing("ID"))?;
        let granted = int(&answer["TTL"]).unwrap_or(0).max(0) as u64;
        Ok((id, Duration::from_secs(granted)))
    }

    /// The TTL left after a keepalive; 0 when etcd no longer knows the lease.
    pub async fn keep_alive(&self, id: i64) -> Result<u64, EtcdError> {
        let answer = self
            .call("/v3/lease/keepalive", &json!({"ID": id.to_string()}))
            .await?;
        Ok(int(&answer["result"]["TTL"]).unwrap_or(0).max(0) as u64)
    }

    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": id.to_string()}))
            .await
            .map(drop)
    }

    pub async fn claim(&self, key: &str, value: &[u8], id: i64) -> Result<Claim, EtcdError> {
        let answer = self.call("/v3/kv/txn", &claim_body(key, value, id)).await?;
        Ok(parse_claim(&answer))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let answer = self
            .call("/v3/kv/range", &json!({"key": BASE64.encode(key)}))
            .await?;
        Ok(first_value(&answer))
    }

    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        let body = json!({"key": BASE64.encode(key), "value": BASE64.encode(value)});
        self.call("/v3/kv/put", &body).await.map(drop)
    }
}

/// etcd's JSON writes 64-bit integers as strings.
pub fn int(value: &Value) -> Option<i64> {
    match value {
        Value::String(text) => text.parse().ok(),
        other => other.as_i64(),
    }
}

/// The campaign's transaction: if `key` was never created (or is gone), put `value`
/// there bound to lease `id`; else read it.
pub fn claim_body(key: &str, value: &[u8], id: i64) -> Value {
    let key = BASE64.encode(key);
    json!({
        "compare": [{"target": "CREATE", "key": key, "createRevision": "0"}],
        "success": [{"requestPut": {"key": key, "value": BASE64.encode(value), "lease": id.to_string()}}],
        "failure": [{"requestRange": {"key": key}}],
    })
}

/// What the transaction's answer says (etcd leaves `succeeded` out when false).
pub fn parse_claim(answer: &Value) -> Claim {
    if answer["succeeded"].as_bool() == Some(true) {
        return Claim::Won;
    }
    let range = &answer["responses"][0]["response_range"];
    Claim::Taken(first_value(range))
}

/// The value of the first key of a range answer.
fn first_value(range: &Value) -> Option<Vec<u8>> {
    let value = range["kvs"][0]["value"].as_str()?;
    BASE64.decode(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transaction as etcd's gateway takes it, and its answers as etcd 3.4 gave
    /// them (recorded with curl).
    #[test]
    fn campaign_transaction_and_its_answers() {
        let body = claim_body("/pgrelay/failover", b"{}", 4111120433133287173);
        assert_eq!(
            body,
            json!({
                "compare": [{"target": "CREATE", "key": "L3BncmVsYXkvZmFpbG92ZXI=", "createRevision": "0"}],
                "success": [{"requestPut": {"key": "L3BncmVsYXkvZmFpbG92ZXI=", "value": "e30=", "lease": "4111120433133287173"}}],
                "failure": [{"requestRange": {"key": "L3BncmVsYXkvZmFpbG92ZXI="}}],
            })
        );
        let won: Value = serde_json::from_str(
            r#"{"header":{"revision":"2","raft_term":"2"},"succeeded":true,
                "responses":[{"response_put":{"header":{"revision":"2"}}}]}"#,
        )
        .expect("json");
        assert_eq!(parse_claim(&won), Claim::Won);
        let taken: Value = serde_json::from_str(
            r#"{"header":{"revision":"2","raft_term":"2"},"responses":[{"response_range":{"header":{"revision":"2"},
                "kvs":[{"key":"L3BncmVsYXkvZmFpbG92ZXI=","create_revision":"2","mod_revision":"2","version":"1",
                "value":"eyJpbnN0YW5jZSI6MX0=","lease":"4111120433133287173"}],"count":"1"}}]}"#,
        )
        .expect("json");
        assert_eq!(
            parse_claim(&taken),
            Claim::Taken(Some(b"{\"instance\":1}".to_vec()))
        );
        let gone: Value =
            serde_json::from_str(r#"{"responses":[{"response_range":{}}]}"#).expect("json");
        assert_eq!(parse_claim(&gone), Claim::Taken(None));
        assert_eq!(
            int(&json!("4111120433133287173")),
            Some(4111120433133287173)
        );
        assert_eq!(int(&json!(5)), Some(5));
        assert_eq!(int(&Value::Null), None);
    }
}
