//! The admin console: the virtual database `pgrelay` (and `pgbouncer`, so PgBouncer's
//! tooling connects as it is), over the normal listener, for `admin_users` (every
//! command) and `stats_users` (`SHOW` only). Simple queries only, as in PgBouncer;
//! several commands may share one query string, separated by `;`.
//!
//! Commands: Pgpool-II's `SHOW POOL_NODES`, `SHOW POOL_HEALTH_CHECK_STATS`,
//! `SHOW POOL_BACKEND_STATS`; PgBouncer's `SHOW POOLS|STATS|CLIENTS|SERVERS|DATABASES|
//! USERS|CONFIG|VERSION|HELP`, `RELOAD`, `PAUSE [db]`, `RESUME [db]`, `KILL db`,
//! `SHUTDOWN`, `WAIT_CLOSE [db]`; pgrelay's `SHOW LEASE` (the fleet's failover
//! lease); and the node operations `DETACH NODE n`,
//! `ATTACH NODE n`, `PROMOTE NODE n [SWITCHOVER]`.

pub mod nodes;
pub mod show;

use std::sync::Arc;

use crate::auth::ClientLogin;
use crate::cluster::events::Operation;
use crate::error::{sqlstate, ClientError, ErrorKind};
use crate::protocol::{backend, frontend, MAX_MESSAGE_LEN};
use crate::registry::ClientHandle;
use crate::stream::{Conn, Stream};
use crate::Shared;

/// One console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(show::Show),
    Reload,
    Pause(Option<String>),
    Resume(Option<String>),
    Kill(String),
    Shutdown,
    WaitClose(Option<String>),
    Node(Operation),
}

impl Command {
    /// Whether a `stats_users` member may run it.
    pub fn read_only(&self) -> bool {
        matches!(self, Command::Show(_))
    }

    /// The CommandComplete tag.
    fn tag(&self) -> &'static str {
        match self {
            Command::Show(_) => "SHOW",
            Command::Reload => "RELOAD",
            Command::Pause(_) => "PAUSE",
            Command::Resume(_) => "RESUME",
            Command::Kill(_) => "KILL",
            Command::Shutdown => "SHUTDOWN",
            Command::WaitClose(_) => "WAIT_CLOSE",
            Command::Node(Operation::Detach(_)) => "DETACH NODE",
            Command::Node(Operation::Attach(_)) => "ATTACH NODE",
            Command::Node(Operation::Promote { .. }) => "PROMOTE NODE",
        }
    }
}

fn syntax(message: impl Into<String>) -> ClientError {
    ClientError::error(ErrorKind::Admin, sqlstate::SYNTAX_ERROR, message)
}

/// Parses one command (case-insensitive; a database name keeps its case; double
/// quotes around it are dropped).
pub fn parse(text: &str) -> Result<Command, ClientError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
    let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
    let database = |i: usize| words.get(i).map(|w| w.trim_matches('"').to_owned());
    let node = |word: Option<&&str>| -> Result<usize, ClientError> {
        word.and_then(|w| w.parse().ok())
            .ok_or_else(|| syntax("expected a node id, e.g. DETACH NODE 1"))
    };
    let command = match lower.as_slice() {
        ["show", what] => Command::Show(show::Show::parse(what).ok_or_else(|| {
            syntax(format!(
                "unknown SHOW {what:?}; SHOW HELP lists the commands"
            ))
        })?),
        ["reload"] => Command::Reload,
        ["pause"] | ["pause", _] => Command::Pause(database(1)),
        ["resume"] | ["resume", _] => Command::Resume(database(1)),
        ["kill", _] => Command::Kill(database(1).unwrap_or_default()),
        ["shutdown"] => Command::Shutdown,
        ["wait_close"] | ["wait_close", _] => Command::WaitClose(database(1)),
        ["detach", "node", n] => Command::Node(Operation::Detach(node(Some(n))?)),
        ["attach", "node", n] => Command::Node(Operation::Attach(node(Some(n))?)),
        ["promote", "node", n] => Command::Node(Operation::Promote {
            node: node(Some(n))?,
            switchover: false,
        }),
        ["promote", "node", n, "switchover"] => Command::Node(Operation::Promote {
            node: node(Some(n))?,
            switchover: true,
        }),
        [] => return Err(syntax("empty command")),
        _ => {
            return Err(syntax(format!(
                "unknown admin command {:?}; SHOW HELP lists the commands",
                text.trim()
            )))
        }
    };
    Ok(command)
}

/// Serves one console session to its end.
pub async fn serve(
    shared: Arc<Shared>,
    mut client: Conn<Stream>,
    login: ClientLogin,
    handle: ClientHandle,
) {
    let config = shared.config.load_full();
    let admin = config.admin_users.contains(&login.user);
    let buf = client.wbuf();
    crate::auth::auth_ok(buf);
    for (name, value) in [
        (
            "server_version",
            concat!("15.0 (pgrelay ", env!("CARGO_PKG_VERSION"), ")"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ] {
        backend::parameter_status_msg(buf, name, value);
    }
    backend::backend_key_data(buf, 0, &[0; 4]);
    backend::ready_for_query(buf, backend::TxStatus::Idle);
    if client.flush().await.is_err() {
        return;
    }
    tracing::info!(user = %login.user, admin, "admin console session");
    loop {
        let frame = tokio::select! {
            frame = client.read_frame(MAX_MESSAGE_LEN) => frame,
            () = handle.entry.killed() => return,
            () = handle.entry.shutting_down() => {
                // Between commands: a console holds nothing, and must not keep a
                // shutdown (or a takeover) waiting for shutdown_timeout.
                ClientError::shutting_down().encode(client.wbuf());
                let _ = client.flush().await;
                return;
            }
        };
        let Ok(frame) = frame else {
            return;
        };
        match frame.tag() {
            frontend::QUERY => {
                let text = frontend::query_text(frame.body())
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default();
                let shut_down = run_query(&shared, &text, admin, &mut client).await;
                backend::ready_for_query(client.wbuf(), backend::TxStatus::Idle);
                if client.flush().await.is_err() || shut_down {
                    return;
                }
            }
            frontend::TERMINATE => return,
            frontend::SYNC => {
                backend::ready_for_query(client.wbuf(), backend::TxStatus::Idle);
                if client.flush().await.is_err() {
                    return;
                }
            }
            frontend::PARSE => {
                let err = ClientError::error(
                    ErrorKind::Admin,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the admin console takes simple queries only",
                );
                err.encode(client.wbuf());
            }
            // The rest of an extended request: skipped up to its Sync.
            _ => {}
        }
    }
}

/// Runs every command of one query string; returns true after `SHUTDOWN`.
async fn run_query(shared: &Shared, text: &str, admin: bool, client: &mut Conn<Stream>) -> bool {
    let commands: Vec<&str> = text.split(';').filter(|c| !c.trim().is_empty()).collect();
    if commands.is_empty() {
        crate::protocol::backend::empty_query(client.wbuf());
        return false;
    }
    for command in commands {
        let result = match parse(command) {
            Ok(command) if !admin && !command.read_only() => Err(ClientError::error(
                ErrorKind::Admin,
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "permission denied: stats_users may only run SHOW commands",
            )),
            Ok(command) => execute(shared, &command, client).await.map(|()| command),
            Err(err) => Err(err),
        };
        match result {
            Ok(command) => {
                backend::command_complete(client.wbuf(), command.tag());
                if command == Command::Shutdown {
                    return true;
                }
            }
            Err(err) => {
                shared.metrics.error(err.kind);
                err.encode(client.wbuf());
                // PostgreSQL skips the rest of a failed query string.
                return false;
            }
        }
    }
    false
}

async fn execute(
    shared: &Shared,
    command: &Command,
    client: &mut Conn<Stream>,
) -> Result<(), ClientError> {
    let failed = |message: String| {
        ClientError::error(
            ErrorKind::Admin,
            sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            message,
        )
    };
    match command {
        Command::Show(what) => {
            show::show(shared, *what).encode(client.wbuf());
            Ok(())
        }
        Command::Reload => shared.reload().map_err(|err| failed(err.to_string())),
        Command::Pause(database) => {
            shared.pause(database.as_deref()).await;
            Ok(())
        }
        Command::Resume(database) => match shared.resume(database.as_deref()) {
            true => Ok(()),
            false => Err(failed("nothing is paused".to_owned())),
        },
        Command::Kill(database) => {
            shared.kill(database);
            Ok(())
        }
        Command::Shutdown => {
            tracing::warn!("SHUTDOWN from the admin console");
            shared.request_shutdown();
            Ok(())
        }
        Command::WaitClose(database) => {
            shared.wait_close(database.as_deref()).await;
            Ok(())
        }
        Command::Node(op) => shared.operate(*op).map_err(|err| failed(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use show::Show;

    #[test]
    fn parses_commands() {
        let ok = |text: &str| parse(text).expect(text);
        assert_eq!(ok("SHOW POOL_NODES"), Command::Show(Show::PoolNodes));
        assert_eq!(ok("  show   pools  "), Command::Show(Show::Pools));
        assert_eq!(ok("pause"), Command::Pause(None));
        assert_eq!(ok("PAUSE \"App\""), Command::Pause(Some("App".into())));
        assert_eq!(ok("kill app"), Command::Kill("app".into()));
        assert_eq!(ok("wait_close"), Command::WaitClose(None));
        assert_eq!(
            ok("promote node 2 switchover"),
            Command::Node(Operation::Promote {
                node: 2,
                switchover: true
            })
        );
        assert_eq!(ok("DETACH NODE 0"), Command::Node(Operation::Detach(0)));
        assert!(ok("SHOW STATS").read_only());
        assert!(ok("show lease").read_only());
        assert!(!ok("RELOAD").read_only());
        for bad in [
            "",
            "SHOW",
            "SHOW FOO",
            "SELECT 1",
            "KILL",
            "DETACH NODE x",
            "PAUSE a b",
        ] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.code, "42601", "{bad}");
        }
    }
}
