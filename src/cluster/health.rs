//! The per-node probe: connect with the `[health_check]` credentials, ask
//! `pg_is_in_recovery()`, and publish the roles into the [`Topology`]. One pass at
//! start-up (so the first client finds a primary), then one every
//! `health_check.period`.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Role, Topology};
use crate::auth::ServerCredentials;
use crate::config::Config;
use crate::pool::server::{Server, ServerError, ServerTarget};
use crate::Shared;

/// Probes every node once (concurrently) and stores the roles.
pub async fn probe_all(shared: &Shared) {
    let config = shared.config.load_full();
    let probes = (0..config.backends.len()).map(|node| probe(&config, shared, node));
    let roles = futures_util::future::join_all(probes).await;
    shared.cluster.update(|topology| {
        if topology.nodes.len() != config.backends.len() {
            *topology = Topology::from_config(&config);
        }
        for (node, role) in topology.nodes.iter_mut().zip(roles) {
            node.up = role.is_some();
            node.role = role.unwrap_or(Role::Unknown);
            if node.role != Role::Replica {
                node.lag = None;
            }
        }
        topology.choose_primary(&config);
        topology.update_read_set(&config);
    });
}

/// Opens a connection to `node` with the health-check credentials.
pub async fn connect_check(
    config: &Config,
    shared: &Shared,
    node: usize,
) -> Result<Server, ServerError> {
    let check = &config.health_check;
    let backend = config
        .backends
        .get(node)
        .ok_or_else(|| ServerError::Connect {
            addr: format!("backend {node}"),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    let target = ServerTarget {
        host: backend.host.clone(),
        port: backend.port,
        dbname: check.database.clone(),
        user: check.user.clone(),
    };
    let credentials = if !check.password.is_empty() {
        ServerCredentials::Password(check.password.as_bytes().to_vec())
    } else if let Some(user) = config.user(&check.user) {
        shared.credentials.for_server(user)
    } else {
        ServerCredentials::Password(Vec::new())
    };
    Server::connect(&target, &credentials, check.timeout).await
}

async fn probe(config: &Config, shared: &Shared, node: usize) -> Option<Role> {
    let backend = config.backends.get(node)?;
    let attempt = async {
        let mut server = connect_check(config, shared, node).await?;
        let value = server
            .query_value("SELECT pg_catalog.pg_is_in_recovery()")
            .await?;
        server.terminate().await;
        Ok::<_, ServerError>(value)
    };
    match tokio::time::timeout(config.health_check.timeout, attempt).await {
        Ok(Ok(Some(v))) if v == "f" => Some(Role::Primary),
        Ok(Ok(Some(_))) => Some(Role::Replica),
        Ok(Ok(None)) => None,
        Ok(Err(err)) => {
            tracing::warn!(node, host = %backend.host, port = backend.port, %err, "health check failed");
            None
        }
        Err(_) => {
            tracing::warn!(node, host = %backend.host, port = backend.port, "health check timed out");
            None
        }
    }
}

/// Re-probes every `health_check.period` until shutdown.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let period = shared.config.load().health_check.period;
        tokio::select! {
            _ = tokio::time::sleep(period) => probe_all(&shared).await,
            _ = shutdown.changed() => return,
        }
    }
}
