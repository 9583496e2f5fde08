//! A fleet's share of server connections: with `pool.max_fleet_server_connections`
//! set, every `FLEET_PERIOD` this instance counts the live instances of its fleet (the
//! addresses of `peers_dns`, else itself and the `[[peers]]` that accept a connection)
//! and allows itself that many's share of the maximum on each node, over all its pools
//! ([`super::limit::LimitMap::set_node_max`]). Fifty sidecars with a maximum of 300 open
//! at most 6 server connections each to a primary, instead of fifty times their pool
//! size; when instances go, the others' shares grow at the next count.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Pools;
use crate::config::Config;

/// How often the fleet is counted.
pub const FLEET_PERIOD: Duration = Duration::from_secs(2);

/// How long a peer has to accept a connection to count as live.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// Counts the fleet and sets this instance's share, until shutdown.
pub async fn watch(
    config: Arc<ArcSwap<Config>>,
    pools: Arc<Pools>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let config = config.load_full();
        let max = config.pool.max_fleet_server_connections as usize;
        let (instances, share) = if max == 0 {
            (1, 0)
        } else {
            let instances = live_instances(&config).await;
            (instances, (max / instances).max(1))
        };
        pools.fleet_instances.store(instances, Ordering::Relaxed);
        if share != pools.limits().node_max() {
            tracing::info!(
                instances,
                share,
                max,
                "this instance's share of the fleet's server connections per node"
            );
            pools.limits().set_node_max(share);
        }
        tokio::select! {
            () = tokio::time::sleep(FLEET_PERIOD) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The live instances of the fleet, this one included: the addresses `peers_dns` has
/// (it names this instance too), else one more than the `[[peers]]` that accept a
/// connection within [`PEER_TIMEOUT`]. At least 1.
async fn live_instances(config: &Config) -> usize {
    if let Some(dns) = config.peers_dns.as_deref() {
        match tokio::net::lookup_host(dns).await {
            Ok(addrs) => return addrs.collect::<HashSet<_>>().len().max(1),
            Err(err) => {
                tracing::warn!(peers_dns = dns, %err, "could not count the fleet's instances")
            }
        }
    }
    let probes = config.peers.iter().map(|peer| async move {
        let connect = TcpStream::connect((peer.host.as_str(), peer.port));
        matches!(tokio::time::timeout(PEER_TIMEOUT, connect).await, Ok(Ok(_)))
    });
    1 + futures_util::future::join_all(probes)
        .await
        .into_iter()
        .filter(|&live| live)
        .count()
}
