//! The checks a parsed config must pass ([`Config::validate`]): values and their
//! combinations, each error naming the first bad key.

use super::*;

impl Config {
    /// Checks the values and their combinations; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_listeners()?;
        self.validate_peers()?;
        self.pool.validate()?;
        self.routing.validate()?;
        self.health_check.validate()?;
        self.failover.validate()?;
        self.tls.validate()?;
        self.validate_backends()?;
        self.validate_databases()?;
        self.validate_users()?;
        self.validate_cert_auth()?;
        self.validate_hba()?;
        self.validate_auth_user()?;
        self.validate_console_users("admin_users", &self.admin_users)?;
        self.validate_console_users("stats_users", &self.stats_users)
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid("listen", "at least one address is required"));
        }
        if self.worker_threads == 0 || self.worker_threads > 1024 {
            return Err(invalid("worker_threads", "must be between 1 and 1024"));
        }
        // Port 0 picks a free port for each entry: two of them never collide.
        let bound = |l: &&super::Listen| l.tcp().is_none_or(|addr| addr.port() != 0);
        if let Some((i, first)) = first_duplicate(self.listen.iter().filter(bound).map(|l| &l.addr))
        {
            return Err(invalid(
                format!("listen[{i}]"),
                format!(
                    "{} is listed twice (also listen[{first}])",
                    self.listen[i].addr
                ),
            ));
        }
        match self.metrics_listen {
            // Port 0 picks a free port for each, so they never collide.
            Some(addr) if addr.port() != 0 && self.listen.iter().any(|l| l.tcp() == Some(addr)) => {
                Err(invalid(
                    "metrics_listen",
                    format!("{addr} is also in listen"),
                ))
            }
            _ => Ok(()),
        }
    }

    fn validate_peers(&self) -> Result<(), ConfigError> {
        let max = super::schema::MAX_INSTANCE_ID;
        if self.instance_id.is_some_and(|id| id > max) {
            return Err(invalid(
                "instance_id",
                format!("must be between 0 and {max}"),
            ));
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if peer.id > max {
                return Err(invalid(
                    format!("peers[{i}].id"),
                    format!("must be between 0 and {max}"),
                ));
            }
            if Some(peer.id) == self.instance_id {
                return Err(invalid(
                    format!("peers[{i}].id"),
                    "is this instance's own instance_id",
                ));
            }
            if peer.host.trim().is_empty() {
                return Err(invalid(format!("peers[{i}].host"), "must not be empty"));
            }
        }
        if let Some((i, first)) = first_duplicate(self.peers.iter().map(|p| p.id)) {
            return Err(invalid(
                format!("peers[{i}].id"),
                format!("{} is listed twice (also peers[{first}])", self.peers[i].id),
            ));
        }
        if let Some(dns) = &self.peers_dns {
            let port = dns
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(port))) if !host.is_empty() && port > 0) {
                return Err(invalid(
                    "peers_dns",
                    format!("{dns:?} is not host:port, e.g. \"pgrelay-peers.default.svc:6432\""),
                ));
            }
        }
        if !self.peers.is_empty() && self.instance_id.is_none() {
            return Err(invalid(
                "instance_id",
                "is required with [[peers]]: they forward this instance's cancels by it",
            ));
        }
        Ok(())
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        // With Patroni the members come from /cluster; [[backends]] only add weights
        // and data directories.
        if self.backends.is_empty() && self.failover.topology != TopologySource::Patroni {
            return Err(invalid(
                "backends",
                "at least one [[backends]] entry is required (or failover.topology = \"patroni\")",
            ));
        }
        for (i, backend) in self.backends.iter().enumerate() {
            backend.validate(i)?;
        }
        let endpoints = self.backends.iter().map(|b| (b.host.as_str(), b.port));
        match first_duplicate(endpoints) {
            Some((i, first)) => Err(invalid(
                format!("backends[{i}]"),
                format!("same host and port as backends[{first}]"),
            )),
            None => Ok(()),
        }
    }

    fn validate_databases(&self) -> Result<(), ConfigError> {
        for (i, db) in self.databases.iter().enumerate() {
            let key = format!("databases[{i}]");
            require_name(&key, &db.name)?;
            if is_admin_database(&db.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("\"{}\" is reserved for the admin console", db.name),
                ));
            }
            if db.dbname.as_deref() == Some("") {
                return Err(invalid(
                    format!("{key}.dbname"),
                    "must not be empty (omit it to use name)",
                ));
            }
            self.pool.check_override(&key, db.pool_size)?;
        }
        match first_duplicate(self.databases.iter().map(|db| db.name.as_str())) {
            Some((i, first)) => Err(invalid(
                format!("databases[{i}].name"),
                format!(
                    "duplicate database name {:?} (also databases[{first}])",
                    self.databases[i].name
                ),
            )),
            None => Ok(()),
        }
    }

    fn validate_users(&self) -> Result<(), ConfigError> {
        for (i, user) in self.users.iter().enumerate() {
            let key = format!("users[{i}]");
            require_name(&key, &user.name)?;
            let auth_type = user.auth_type_or(self.auth_type);
            if auth_type == AuthType::ScramSha256 && matches!(user.password, Secret::Md5(_)) {
                return Err(invalid(
                    format!("{key}.password"),
                    "an md5 hash cannot serve auth_type = \"scram-sha-256\": give the \
                     plaintext or a SCRAM-SHA-256 secret",
                ));
            }
            self.pool.check_override(&key, user.pool_size)?;
        }
        match first_duplicate(self.users.iter().map(|user| user.name.as_str())) {
            Some((i, first)) => Err(invalid(
                format!("users[{i}].name"),
                format!(
                    "duplicate user name {:?} (also users[{first}])",
                    self.users[i].name
                ),
            )),
            None => Ok(()),
        }
    }

    /// `cert` needs TLS towards clients and a CA to verify their certificates with.
    fn validate_cert_auth(&self) -> Result<(), ConfigError> {
        let key = if self.auth_type == AuthType::Cert {
            "auth_type".to_owned()
        } else {
            match self
                .users
                .iter()
                .position(|user| user.auth_type == Some(AuthType::Cert))
            {
                Some(i) => format!("users[{i}].auth_type"),
                None => return Ok(()),
            }
        };
        if self.tls.client_mode == TlsMode::Disable || self.tls.client_ca.is_empty() {
            return Err(invalid(
                key,
                "\"cert\" needs tls.client_mode other than \"disable\" and a tls.client_ca \
                 to verify client certificates with",
            ));
        }
        Ok(())
    }

    /// Each `[[hba]]` rule on its own, and `cert` and `hostssl` against `[tls]`.
    fn validate_hba(&self) -> Result<(), ConfigError> {
        for (i, rule) in self.hba.iter().enumerate() {
            let key = |field: &str| format!("hba[{i}].{field}");
            let kind = spelled(&rule.kind);
            match (rule.kind, rule.address) {
                (HbaType::Local, Some(_)) => {
                    return Err(invalid(
                        key("address"),
                        "type = \"local\" (a Unix socket) takes no address",
                    ))
                }
                (HbaType::Host | HbaType::Hostssl | HbaType::Hostnossl, None) => {
                    return Err(invalid(
                        key("address"),
                        format!("type = {kind:?} needs an address: a CIDR such as \"10.0.0.0/8\", or \"all\""),
                    ))
                }
                _ => {}
            }
            for (field, list, is_user) in [
                ("database", &rule.database, false),
                ("user", &rule.user, true),
            ] {
                if let Some(why) = list.unsupported(is_user) {
                    return Err(invalid(key(field), why));
                }
            }
            let tls_off = self.tls.client_mode == TlsMode::Disable;
            if rule.kind == HbaType::Hostssl && tls_off {
                return Err(invalid(
                    key("type"),
                    "a hostssl rule cannot match while tls.client_mode = \"disable\"",
                ));
            }
            if rule.method == HbaMethod::Cert {
                if rule.kind != HbaType::Hostssl {
                    return Err(invalid(
                        key("method"),
                        "\"cert\" is only supported on hostssl rules, as in PostgreSQL",
                    ));
                }
                if self.tls.client_ca.is_empty() {
                    return Err(invalid(
                        key("method"),
                        "\"cert\" needs a tls.client_ca to verify client certificates with",
                    ));
                }
            }
        }
        Ok(())
    }

    /// `auth_user` logs in to servers with its `[[users]]` password.
    fn validate_auth_user(&self) -> Result<(), ConfigError> {
        match &self.auth_user {
            Some(name) if self.user(name).is_none() => Err(invalid(
                "auth_user",
                format!("user {name:?} is not defined in [[users]]"),
            )),
            _ => Ok(()),
        }
    }

    fn validate_console_users(&self, list: &str, names: &[String]) -> Result<(), ConfigError> {
        match names.iter().position(|name| self.user(name).is_none()) {
            Some(i) => Err(invalid(
                format!("{list}[{i}]"),
                format!("user {:?} is not defined in [[users]]", names[i]),
            )),
            None => Ok(()),
        }
    }
}

/// The index of the first repeated item and of its earlier occurrence.
fn first_duplicate<T: Eq + std::hash::Hash>(
    items: impl Iterator<Item = T>,
) -> Option<(usize, usize)> {
    let mut seen = HashMap::new();
    for (i, item) in items.enumerate() {
        if let Some(&first) = seen.get(&item) {
            return Some((i, first));
        }
        seen.insert(item, i);
    }
    None
}

fn require_name(entry: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(format!("{entry}.name"), "must not be empty"));
    }
    Ok(())
}

fn require_positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(())
}

impl PoolConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.default_pool_size == 0 {
            return Err(invalid("pool.default_pool_size", "must be at least 1"));
        }
        if self.min_pool_size > self.default_pool_size {
            return Err(invalid(
                "pool.min_pool_size",
                format!(
                    "{} is above pool.default_pool_size ({})",
                    self.min_pool_size, self.default_pool_size
                ),
            ));
        }
        if self.max_client_conn == 0 {
            return Err(invalid("pool.max_client_conn", "must be at least 1"));
        }
        require_positive("pool.query_wait_timeout", self.query_wait_timeout)?;
        require_positive("pool.client_login_timeout", self.client_login_timeout)?;
        require_positive("pool.server_connect_timeout", self.server_connect_timeout)
    }

    /// A `pool_size` override in `[[databases]]` or `[[users]]` entry `entry`.
    fn check_override(&self, entry: &str, pool_size: Option<u32>) -> Result<(), ConfigError> {
        match pool_size {
            Some(0) => Err(invalid(format!("{entry}.pool_size"), "must be at least 1")),
            Some(size) if size < self.min_pool_size => Err(invalid(
                format!("{entry}.pool_size"),
                format!(
                    "{size} is below pool.min_pool_size ({})",
                    self.min_pool_size
                ),
            )),
            _ => Ok(()),
        }
    }
}

impl RoutingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.max_lag_seconds.is_finite() || self.max_lag_seconds < 0.0 {
            return Err(invalid(
                "routing.max_lag_seconds",
                "must be a finite number >= 0",
            ));
        }
        require_positive("routing.lag_check_period", self.lag_check_period)
    }
}

impl HealthCheckConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        require_positive("health_check.period", self.period)?;
        require_positive("health_check.timeout", self.timeout)?;
        if self.up_after == 0 {
            return Err(invalid("health_check.up_after", "must be at least 1"));
        }
        if self.user.is_empty() {
            return Err(invalid("health_check.user", "must not be empty"));
        }
        if self.database.is_empty() {
            return Err(invalid("health_check.database", "must not be empty"));
        }
        Ok(())
    }
}

impl FailoverConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.topology == TopologySource::Patroni && self.patroni_urls.is_empty() {
            return Err(invalid(
                "failover.patroni_urls",
                "topology = \"patroni\" needs at least one URL",
            ));
        }
        require_positive("failover.patroni_period", self.patroni_period)?;
        require_positive("failover.command_timeout", self.command_timeout)?;
        self.validate_lease()?;
        let bad = self
            .patroni_urls
            .iter()
            .position(|url| PatroniEndpoint::parse(url).is_err());
        match bad {
            Some(i) => {
                let url = &self.patroni_urls[i];
                let why = PatroniEndpoint::parse(url).err().unwrap_or_default();
                Err(invalid(format!("failover.patroni_urls[{i}]"), why))
            }
            None => Ok(()),
        }
    }
}

impl FailoverConfig {
    fn validate_lease(&self) -> Result<(), ConfigError> {
        match self.lease {
            LeaseKind::None => return Ok(()),
            LeaseKind::Etcd => {}
            LeaseKind::Kubernetes => {
                return Err(invalid(
                    "failover.lease",
                    "\"kubernetes\" is not implemented; only \"etcd\" (or \"none\") is supported",
                ))
            }
        }
        if self.lease_endpoints.is_empty() {
            return Err(invalid(
                "failover.lease_endpoints",
                "lease = \"etcd\" needs at least one URL",
            ));
        }
        for (i, url) in self.lease_endpoints.iter().enumerate() {
            if let Err(why) = PatroniEndpoint::parse_with_port(url, ETCD_PORT) {
                return Err(invalid(format!("failover.lease_endpoints[{i}]"), why));
            }
        }
        if !self.lease_key.starts_with('/') || self.lease_key.ends_with('/') {
            return Err(invalid(
                "failover.lease_key",
                "must start with '/' and not end with one",
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err(invalid("failover.lease_ttl", "must be at least 2s"));
        }
        Ok(())
    }
}

impl TlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mode = self.client_mode;
        // allow and prefer offer TLS too: they need a certificate as much as require.
        let offers_tls = mode != TlsMode::Disable;
        let needed = [
            ("tls.client_cert", &self.client_cert, offers_tls),
            ("tls.client_key", &self.client_key, offers_tls),
            ("tls.client_ca", &self.client_ca, mode.verifies_peer()),
        ];
        for (key, value, required) in needed {
            if required && value.is_empty() {
                let why = format!("required by tls.client_mode = {:?}", mode.as_str());
                return Err(invalid(key, why));
            }
        }
        if self.server_mode.verifies_peer() && self.server_ca.is_empty() {
            let why = format!(
                "required by tls.server_mode = {:?}",
                self.server_mode.as_str()
            );
            return Err(invalid("tls.server_ca", why));
        }
        Ok(())
    }
}

impl BackendConfig {
    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let key = |field: &str| format!("backends[{index}].{field}");
        if self.host.is_empty() {
            return Err(invalid(key("host"), "must not be empty"));
        }
        if self.port == 0 {
            return Err(invalid(key("port"), "must be between 1 and 65535"));
        }
        if !self.weight.is_finite() || self.weight < 0.0 {
            return Err(invalid(key("weight"), "must be a finite number >= 0"));
        }
        Ok(())
    }
}
