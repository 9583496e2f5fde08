//! Client-facing TLS: pgrelay as the TLS server.
