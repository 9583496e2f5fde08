//! Server-facing TLS: pgrelay as the TLS client of PostgreSQL servers.
