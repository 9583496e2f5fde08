//! The mechanics under [`super::LocalCluster`]: finding PostgreSQL's programs, running
//! them (as the `postgres` user when we are root), and the configuration files a node
//! gets. Nothing here knows about clusters or replicas.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::{geteuid, User};
use tracing::debug;

use super::*;

/// Returns the first directory holding the PostgreSQL programs, looking in the `PATH`
/// entries, then `pg_config --bindir`, then `/usr/lib/postgresql/*/bin` (highest version
/// first). Symlinks are resolved, so `/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin`
/// yields the real directory, which must also hold `postgres`, `pg_basebackup` and `psql`.
pub fn find_bindir() -> Result<PathBuf, DemoError> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    candidates.extend(pg_config_bindir());
    candidates.extend(versioned_bindirs());
    candidates
        .iter()
        .find_map(|dir| usable_bindir(dir))
        .ok_or(DemoError::BinariesNotFound)
}

pub(super) fn usable_bindir(dir: &Path) -> Option<PathBuf> {
    if !dir.join("initdb").is_file() || !dir.join("pg_ctl").is_file() {
        return None;
    }
    let real = fs::canonicalize(dir.join("initdb"))
        .ok()?
        .parent()?
        .to_path_buf();
    REQUIRED_PROGRAMS
        .iter()
        .all(|program| real.join(program).is_file())
        .then_some(real)
}

pub(super) fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8(output.stdout).ok()?;
    let dir = dir.trim();
    (output.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `/usr/lib/postgresql/<version>/bin` directories (the Debian layout), newest first.
pub(super) fn versioned_bindirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// Launches PostgreSQL programs: from which bindir, as which OS user, in which directory.
#[derive(Debug, Clone)]
pub(super) struct Runner {
    pub(super) bindir: PathBuf,
    /// Set when we are root: programs then run through `runuser`, and every file or
    /// directory we create is handed to this user so the server can use it.
    pub(super) run_as: Option<User>,
    /// Working directory for every program: the `postgres` user may not be able to enter
    /// our own working directory (e.g. /root), which makes `initdb` and `pg_ctl` fail.
    pub(super) cwd: PathBuf,
}

impl Runner {
    pub(super) fn command(&self, program: &str) -> Command {
        let exe = self.bindir.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new(runuser_path());
                cmd.arg("-u").arg(&user.name).arg("--").arg(exe);
                cmd
            }
            None => Command::new(exe),
        };
        cmd.current_dir(&self.cwd).stdin(Stdio::null());
        // A developer's PGHOST, PGPORT, PGDATA or PGUSER must not redirect our programs.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// Runs `cmd` to completion; returns its stdout, or its stderr in the error.
    pub(super) fn run(&self, cmd: &mut Command) -> Result<String, DemoError> {
        let command = describe(cmd);
        debug!(%command, "running");
        let output = cmd.output().map_err(|source| DemoError::Spawn {
            command: command.clone(),
            source,
        })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        Err(DemoError::CommandFailed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }

    /// Gives `path` to the run-as user; a no-op when we are not root.
    pub(super) fn hand_over(&self, path: &Path) -> Result<(), DemoError> {
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .map_err(io_error("handing to the run-as user:", path))
    }

    /// A shell command line that runs `program` as [`Runner::command`] would (for
    /// scripts such as failover hooks). Paths are single-quoted.
    pub(super) fn shell_command(&self, program: &str) -> String {
        let exe = shell_quote(&self.bindir.join(program).to_string_lossy());
        match &self.run_as {
            Some(user) => format!(
                "{} -u {} -- {exe}",
                shell_quote(&runuser_path().to_string_lossy()),
                user.name
            ),
            None => exe,
        }
    }

    pub(super) fn write_file(&self, path: &Path, contents: &str) -> Result<(), DemoError> {
        fs::write(path, contents).map_err(io_error("writing", path))?;
        self.hand_over(path)
    }
}

pub(super) fn run_as_user() -> Result<Option<User>, DemoError> {
    if !geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name(RUN_AS_USER) {
        Ok(Some(user)) => Ok(Some(user)),
        Ok(None) => Err(DemoError::NoRunAsUser(RUN_AS_USER)),
        Err(source) => Err(DemoError::UserLookup {
            user: RUN_AS_USER,
            source,
        }),
    }
}

pub(super) fn runuser_path() -> PathBuf {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .map(Path::new)
        .find(|path| path.is_file())
        .map_or_else(|| PathBuf::from("runuser"), Path::to_path_buf)
}

/// How a command is shown in logs and errors.
pub(super) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| redact_password(&part.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Cuts the literal off `... PASSWORD '...'`: it is a SCRAM secret or an md5 hash, and
/// an md5 hash logs in as well as the password does.
pub(super) fn redact_password(arg: &str) -> String {
    match arg.find(" PASSWORD '") {
        Some(at) => format!("{} PASSWORD '<redacted>'", &arg[..at]),
        None => arg.to_owned(),
    }
}

pub(super) fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DemoError {
    let path = path.to_path_buf();
    move |source| DemoError::Io {
        action,
        path,
        source,
    }
}

pub(super) fn free_port() -> Result<u16, DemoError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(DemoError::FreePort)?;
    let addr = listener.local_addr().map_err(DemoError::FreePort)?;
    Ok(addr.port())
}

/// The last lines the server logged since byte `offset` of its log file.
pub(super) fn log_tail(path: &Path, offset: u64) -> String {
    let Ok(bytes) = fs::read(path) else {
        return "(no log file)".to_owned();
    };
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

pub(super) fn hba_conf(host_auth: &str) -> String {
    format!(
        "# Written by pgrelay's local cluster launcher.\n\
         local all all trust\n\
         host all {SUPERUSER} 127.0.0.1/32 trust\n\
         host all {SUPERUSER} ::1/128 trust\n\
         host replication all 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 {host_auth}\n\
         host all all ::1/128 {host_auth}\n"
    )
}

/// Settings appended to `postgresql.conf`: durability is traded for speed, because
/// these clusters are thrown away, and memory is kept small for 2-core CI machines.
pub(super) fn server_conf(socket_dir: &Path, extra_conf: &[String]) -> String {
    let socket_dir = socket_dir.display().to_string().replace('\'', "''");
    let mut conf = format!(
        "\n# Added by pgrelay's local cluster launcher.\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{socket_dir}'\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         shared_buffers = 16MB\n\
         max_connections = 200\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         hot_standby = on\n\
         wal_keep_size = 64MB\n\
         log_min_messages = warning\n"
    );
    for line in extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    conf
}

/// `conf` with every `port = ...` line dropped and `port = <port>` appended, so a
/// replica cloned from the primary does not keep the primary's port.
pub(super) fn with_port(conf: &str, port: u16) -> String {
    let mut out: String = conf
        .lines()
        .filter(|line| !is_port_setting(line))
        .flat_map(|line| [line, "\n"])
        .collect();
    out.push_str(&format!("port = {port}\n"));
    out
}

pub(super) fn is_port_setting(line: &str) -> bool {
    line.trim_start()
        .strip_prefix("port")
        .is_some_and(|rest| rest.trim_start().starts_with('='))
}

pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(super) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// What PostgreSQL stores for a password: kept as given when already an md5 or SCRAM
/// secret, else hashed the way `password_encryption` would.
pub(super) fn stored_password(role: &str, password: &str, md5: bool) -> String {
    if password.starts_with("md5") && password.len() == 35 || password.starts_with("SCRAM-SHA-256$")
    {
        return password.to_owned();
    }
    if md5 {
        let hash = crate::auth::md5::stored_hash(role, password.as_bytes());
        return format!(
            "md5{}",
            hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// Single-quotes `text` for `sh`.
pub(super) fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}
