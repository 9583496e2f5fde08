//! Entry points for the criterion benchmarks in `benches/` that drive pgrelay's real
//! login, session and pool without sockets: clients and servers sit on in-memory pipes
//! ([`Stream::Memory`]), and a benchmark's fake server answers the pool's pipes.
//!
//! Nothing in pgrelay uses this module, and a running pgrelay never dials in memory:
//! only [`in_memory`] makes pools that do. It runs no background task of its own (no
//! listener, health, lag or maintenance loop).

use std::sync::Arc;

use tokio::io::DuplexStream;
use tokio::sync::mpsc;

use crate::cluster::{Role, Status};
use crate::config::Config;
use crate::pool::server::Dial;
use crate::pool::Pools;
use crate::session;
use crate::stream::Stream;
use crate::Shared;

/// The shared state of a pgrelay without listeners, whose pools reach their servers
/// through in-memory pipes. The far end of each pipe a pool opens arrives on the
/// receiver, for the benchmark's fake server to log in and answer.
///
/// The first backend of `config` is taken for an up primary, as its first health probe
/// would find (no probe runs). Needs a Tokio runtime.
pub fn in_memory(config: Config) -> (Arc<Shared>, mpsc::UnboundedReceiver<DuplexStream>) {
    let (dial, servers) = mpsc::unbounded_channel();
    let mut shared = Shared::new(config);
    shared.pools = Arc::new(Pools::dialing(Dial::Memory(dial)));
    shared.cluster.update(|topology| {
        if let Some(node) = topology.nodes.first_mut() {
            node.role = Role::Primary;
            node.status = Status::Up;
            node.pg_up = true;
            node.readable = true;
            topology.primary = Some(0);
        }
    });
    (Arc::new(shared), servers)
}

/// Serves one in-memory client as the listener serves an accepted one: its login, then
/// its session, to its end. (The admin console is not served here.)
pub async fn serve_client(shared: Arc<Shared>, client: DuplexStream) {
    let login = session::log_in_over(Stream::Memory(client), (None, None), &shared, false);
    let Some(logged_in) = Box::pin(login).await else {
        return;
    };
    session::serve(shared, Box::new(logged_in)).await
}
