//! TLS for both sides, built from the `[tls]` section with rustls: [`accept`] holds the
//! acceptor clients are served with (pgrelay as the TLS server), [`connect`] the
//! connector pgrelay reaches PostgreSQL servers with. Each is reloadable: a RELOAD or
//! SIGHUP swaps in new certificates for new connections, and one that fails to load
//! leaves the old in place.

pub mod accept;
pub mod connect;
