//! Where a request goes.
//!
//! A client's request (everything up to its Sync or Query, read while the client holds
//! no server) is planned once, at the start of each transaction. The scan that reads it
//! understands each Query and Parse text in one pass ([`classify::Classifier::understand`])
//! and adds it to the request's [`Plan`] ([`Plan::text`]); [`plan_request`] then adds
//! the statements the request uses but does not parse, wherever they live; the session then
//! applies its read-after-write policy and [`pick`] chooses among the nodes that may
//! take the read. Inside a transaction nothing is classified: the whole transaction
//! runs where it started, and its state comes from ReadyForQuery, not from SQL.

pub mod classify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use dashmap::DashMap;

use crate::cluster::Topology;
use crate::config::{Config, LoadBalance};
use crate::protocol::frontend;
use classify::{Classifier, Command, Meaning, Reason, Target};

/// Shared routing state: the classifier and what has been learned about functions.
pub struct Router {
    classifier: ArcSwap<Classifier>,
    /// Database → function → whether some function of that name is volatile. Nested
    /// so that a lookup borrows the names instead of allocating a key.
    volatile: DashMap<Box<str>, HashMap<Box<str>, bool>>,
    /// The round-robin position.
    turn: AtomicUsize,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        Router {
            classifier: ArcSwap::from_pointee(Self::classifier_for(config)),
            volatile: DashMap::new(),
            turn: AtomicUsize::new(0),
        }
    }

    fn classifier_for(config: &Config) -> Classifier {
        Classifier::new(
            &config.routing.write_functions,
            &config.routing.read_only_functions,
        )
    }

    /// Picks up changed function lists after a reload.
    pub fn reconfigure(&self, config: &Config) {
        self.classifier
            .store(std::sync::Arc::new(Self::classifier_for(config)));
        self.volatile.clear();
    }

    /// The classifier, to keep across awaits.
    pub fn classifier_full(&self) -> std::sync::Arc<Classifier> {
        self.classifier.load_full()
    }

    pub fn classifier(&self) -> arc_swap::Guard<std::sync::Arc<Classifier>> {
        self.classifier.load()
    }

    /// What is known of a function's volatility in `database`.
    pub fn volatility(&self, database: &str, function: &str) -> Option<bool> {
        self.volatile
            .get(database)
            .and_then(|functions| functions.get(function).copied())
    }

    pub fn learn_volatility(&self, database: &str, function: &str, volatile: bool) {
        self.volatile
            .entry(database.into())
            .or_default()
            .insert(function.into(), volatile);
    }

    /// The query that tells whether any function called `name` is volatile (unknown
    /// names count as volatile).
    pub fn volatility_query(name: &str) -> String {
        format!(
            "SELECT COALESCE(bool_or(provolatile = 'v'), true) FROM pg_catalog.pg_proc WHERE proname = {}",
            crate::pool::params::literal(name)
        )
    }

    fn next_turn(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Where a statement a request uses but does not parse comes from.
pub enum Located<'a> {
    /// It lives on that node only (session mode: each held server has its own).
    Node(usize),
    /// pgrelay carries it to any server: its text decides the route.
    Text(&'a [u8]),
    Unknown,
}

/// A client's prepared statements, as far as routing is concerned.
pub trait StatementSource {
    fn locate(&self, name: &[u8]) -> Located<'_>;
}

impl StatementSource for StatementNodes {
    fn locate(&self, name: &[u8]) -> Located<'_> {
        self.node_of(name).map_or(Located::Unknown, Located::Node)
    }
}

/// Which node each of a client's prepared statements was parsed on, so that a later
/// Bind or Describe goes where the statement exists.
#[derive(Debug, Default)]
pub struct StatementNodes {
    named: HashMap<Box<[u8]>, usize>,
    unnamed: Option<usize>,
}

impl StatementNodes {
    pub fn parsed(&mut self, name: &[u8], node: usize) {
        if name.is_empty() {
            self.unnamed = Some(node);
        } else if let Some(slot) = self.named.get_mut(name) {
            *slot = node;
        } else {
            self.named.insert(name.into(), node);
        }
    }

    pub fn closed(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed = None;
        } else {
            self.named.remove(name);
        }
    }

    pub fn node_of(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            self.unnamed
        } else {
            self.named.get(name).copied()
        }
    }

    /// Records a Parse or a statement Close seen while relaying on `node`.
    pub fn observe(&mut self, tag: u8, body: &[u8], node: usize) {
        match tag {
            frontend::PARSE => {
                if let Ok(parse) = frontend::parse(body) {
                    self.parsed(parse.name, node);
                }
            }
            frontend::CLOSE => {
                if let Some(name) = frontend::close(body).ok().and_then(|c| c.statement()) {
                    self.closed(name);
                }
            }
            _ => {}
        }
    }
}

/// What a request needs, before the session's policies and the topology are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub target: Target,
    pub reason: Option<Reason>,
    /// Leaves state behind that cannot follow the client to another server.
    pub session_state: bool,
    /// Functions whose volatility decides between replica and primary.
    pub functions: Vec<Box<str>>,
    /// The node holding a statement the request uses but does not parse itself.
    pub node: Option<usize>,
    /// What runs first: a Query, a Bind's statement, or a Parse that the request also
    /// executes (not a bare prepare). Pgpool-II's per-node counters.
    pub command: Option<Command>,
    /// The command of the request's first Parse, which counts if the request executes.
    parse_command: Option<Command>,
}

impl Default for Plan {
    /// A request that may read on a replica until its statements say otherwise.
    fn default() -> Plan {
        Plan {
            target: Target::Replica,
            reason: None,
            session_state: false,
            functions: Vec::new(),
            node: None,
            command: None,
            parse_command: None,
        }
    }
}

impl Plan {
    fn primary(&mut self, reason: Reason) {
        if self.target == Target::Replica {
            self.target = Target::Primary;
            self.reason = Some(reason);
        }
    }

    /// Adds the meaning of a statement text the request runs: a Query's, a Bind's
    /// statement's, or (with `parse`) a Parse's.
    pub fn text(&mut self, parse: bool, meaning: &Meaning) {
        let command = if parse {
            &mut self.parse_command
        } else {
            &mut self.command
        };
        command.get_or_insert(meaning.command);
        let verdict = &meaning.verdict;
        self.session_state |= verdict.session_state;
        if verdict.target == Target::Primary {
            self.primary(verdict.reason.unwrap_or(Reason::Unsure));
        }
        for f in &verdict.functions {
            if !self.functions.contains(f) {
                self.functions.push(f.clone());
            }
        }
    }
}

/// Completes the plan of the request at the front of `request` (whole messages only),
/// whose Query and Parse texts are already in `plan`: the statements it binds,
/// describes or closes but does not parse decide too, by their text or their node.
pub fn plan_request(
    request: &[u8],
    mut plan: Plan,
    classifier: &Classifier,
    statements: &dyn StatementSource,
) -> Plan {
    // Statements parsed earlier in this same request run wherever it goes.
    let mut parsed_here: Vec<&[u8]> = Vec::new();
    let mut executes = false;
    for message in frontend::messages(request).map_while(Result::ok) {
        let (tag, body) = (message.tag, message.body);
        let used = match tag {
            frontend::PARSE => {
                if let Ok(parse) = frontend::parse(body) {
                    parsed_here.push(parse.name);
                }
                None
            }
            frontend::BIND => frontend::bind(body).ok().map(|bind| bind.statement),
            // Closing a statement belongs where the statement lives, too.
            frontend::DESCRIBE => frontend::describe(body).ok().and_then(|t| t.statement()),
            frontend::CLOSE => frontend::close(body).ok().and_then(|t| t.statement()),
            frontend::FUNCTION_CALL => {
                plan.primary(Reason::Function);
                None
            }
            _ => None,
        };
        executes |= tag == frontend::EXECUTE;
        let text = used.and_then(|name| use_statement(&mut plan, name, &parsed_here, statements));
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            plan.text(false, &classifier.understand_prepared(text));
        }
    }
    if plan.command.is_none() && executes {
        plan.command = plan.parse_command;
    }
    plan
}

/// Notes a statement the request uses; returns its text if that decides the route.
fn use_statement<'a>(
    plan: &mut Plan,
    statement: &[u8],
    parsed_here: &[&[u8]],
    statements: &'a dyn StatementSource,
) -> Option<&'a [u8]> {
    if parsed_here.contains(&statement) {
        return None;
    }
    match (statements.locate(statement), plan.node) {
        (Located::Text(text), _) => return Some(text),
        (Located::Node(node), None) => plan.node = Some(node),
        (Located::Node(node), Some(other)) if node == other => {}
        // Unknown, or statements on two different nodes: the primary is the only
        // answer that is never a read on the wrong node.
        _ => plan.primary(Reason::Unsure),
    }
    None
}

/// A small, fast random source for replica choice (xorshift64*), one per session.
#[derive(Debug, Clone)]
pub struct Dice(u64);

impl Dice {
    pub fn new() -> Dice {
        Dice(rand::random::<u64>() | 1)
    }

    #[cfg(test)]
    pub fn seeded(seed: u64) -> Dice {
        Dice(seed | 1)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Dice {
    fn default() -> Self {
        Dice::new()
    }
}

/// How [`pick`] chooses a node for a read.
pub struct Choice<'a> {
    pub load_balance: LoadBalance,
    pub prefer_lower_lag: bool,
    /// Replicas must have replayed up to here (read-your-writes); the primary always has.
    pub fence: Option<u64>,
    /// Busy server connections per node, for `least_connections`.
    pub busy: &'a dyn Fn(usize) -> usize,
    /// Leave the primary out (a `replica` endpoint).
    pub replicas_only: bool,
}

/// Picks the node for a read among those that may take it (up, fresh enough, weight
/// above zero, past the fence). `None` when there is none: the primary takes it.
pub fn pick(
    topology: &Topology,
    choice: &Choice<'_>,
    router: &Router,
    dice: &mut Dice,
) -> Option<usize> {
    let eligible = |i: usize| {
        let node = &topology.nodes[i];
        node.readable
            && node.weight > 0.0
            && !(choice.replicas_only && Some(i) == topology.primary)
            && (Some(i) == topology.primary
                || match (choice.fence, node.lag) {
                    (None, _) => true,
                    (Some(fence), Some(lag)) => lag.replay_lsn >= fence,
                    (Some(_), None) => false,
                })
    };
    let n = topology.nodes.len();
    let mut candidates = [0usize; 64];
    let mut count = 0;
    for i in (0..n).filter(|&i| eligible(i)) {
        if count < candidates.len() {
            candidates[count] = i;
            count += 1;
        }
    }
    let mut candidates = &mut candidates[..count];
    if choice.prefer_lower_lag {
        let kept = keep_least_lagging(topology, candidates);
        candidates = &mut candidates[..kept];
    }
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        _ => Some(balance(topology, candidates, choice, router, dice)),
    }
}

/// Moves the replicas with the least lag (bytes) to the front of `candidates` and
/// returns how many there are; with no replica among them, keeps them all.
fn keep_least_lagging(topology: &Topology, candidates: &mut [usize]) -> usize {
    let replica_lag = |i: usize| {
        (Some(i) != topology.primary)
            .then(|| topology.nodes[i].lag.map(|l| l.bytes))
            .flatten()
    };
    let Some(least) = candidates.iter().filter_map(|&i| replica_lag(i)).min() else {
        return candidates.len();
    };
    let mut kept = 0;
    for k in 0..candidates.len() {
        let i = candidates[k];
        if replica_lag(i) == Some(least) {
            candidates[kept] = i;
            kept += 1;
        }
    }
    kept
}

/// One of two or more candidates, by the configured policy.
fn balance(
    topology: &Topology,
    candidates: &[usize],
    choice: &Choice<'_>,
    router: &Router,
    dice: &mut Dice,
) -> usize {
    match choice.load_balance {
        LoadBalance::WeightedRandom => {
            let total: f64 = candidates.iter().map(|&i| topology.nodes[i].weight).sum();
            let mut point = dice.unit() * total;
            for &i in candidates {
                point -= topology.nodes[i].weight;
                if point < 0.0 {
                    return i;
                }
            }
            candidates[candidates.len() - 1]
        }
        LoadBalance::RoundRobin => candidates[router.next_turn() % candidates.len()],
        LoadBalance::LeastConnections => {
            // Ties go round in turn, so idle nodes share the first reads.
            let start = router.next_turn() % candidates.len();
            (0..candidates.len())
                .map(|k| candidates[(start + k) % candidates.len()])
                .min_by_key(|&i| (choice.busy)(i))
                .unwrap_or(candidates[start])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Lag, Role};
    use crate::config::BackendConfig;
    use bytes::BytesMut;

    fn topology(weights: &[f64]) -> (Topology, Config) {
        let config = Config {
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| BackendConfig {
                    host: "127.0.0.1".into(),
                    port: 5432 + i as u16,
                    weight,
                    data_directory: String::new(),
                    role: None,
                })
                .collect(),
            ..Config::default()
        };
        let mut t = Topology::from_config(&config);
        for (i, node) in t.nodes.iter_mut().enumerate() {
            node.status = crate::cluster::Status::Up;
            node.role = if i == 0 { Role::Primary } else { Role::Replica };
            node.lag = (i > 0).then_some(Lag {
                replay_lsn: 100 * i as u64,
                bytes: 10 * i as u64,
                seconds: 0.0,
            });
        }
        t.primary = Some(0);
        t.update_read_set(&config);
        (t, config)
    }

    fn choice(load_balance: LoadBalance, fence: Option<u64>) -> Choice<'static> {
        Choice {
            load_balance,
            prefer_lower_lag: false,
            fence,
            busy: &|_| 0,
            replicas_only: false,
        }
    }

    fn shares(t: &Topology, choice: &Choice<'_>, rounds: usize) -> Vec<usize> {
        let router = Router::new(&Config::default());
        let mut dice = Dice::seeded(7);
        let mut counts = vec![0; t.nodes.len()];
        for _ in 0..rounds {
            if let Some(i) = pick(t, choice, &router, &mut dice) {
                counts[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn weighted_random_follows_weights() {
        let (t, _) = topology(&[0.0, 1.0, 3.0]);
        let counts = shares(&t, &choice(LoadBalance::WeightedRandom, None), 40_000);
        assert_eq!(counts[0], 0, "weight 0 takes no reads");
        let share = counts[2] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn round_robin_takes_turns() {
        let (t, _) = topology(&[1.0, 1.0, 1.0]);
        let counts = shares(&t, &choice(LoadBalance::RoundRobin, None), 300);
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn least_connections_prefers_idle_nodes() {
        let (t, _) = topology(&[1.0, 1.0, 1.0]);
        let busy = |i: usize| [5, 1, 3][i];
        let c = Choice {
            load_balance: LoadBalance::LeastConnections,
            prefer_lower_lag: false,
            fence: None,
            busy: &busy,
            replicas_only: false,
        };
        assert_eq!(shares(&t, &c, 10), [0, 10, 0]);
    }

    #[test]
    fn fence_keeps_reads_off_stale_replicas() {
        let (t, _) = topology(&[1.0, 1.0, 1.0]);
        // Node 1 replayed to 100, node 2 to 200.
        let counts = shares(&t, &choice(LoadBalance::RoundRobin, Some(150)), 100);
        assert_eq!(counts[1], 0);
        assert!(counts[0] > 0 && counts[2] > 0);
        let (t, _) = topology(&[0.0, 1.0, 1.0]);
        let router = Router::new(&Config::default());
        let none = pick(
            &t,
            &choice(LoadBalance::RoundRobin, Some(1000)),
            &router,
            &mut Dice::seeded(1),
        );
        assert_eq!(none, None, "nobody is fresh enough: the primary takes it");
    }

    #[test]
    fn prefer_lower_lag_takes_the_freshest_replica() {
        let (t, _) = topology(&[1.0, 1.0, 1.0]);
        let c = Choice {
            prefer_lower_lag: true,
            ..choice(LoadBalance::WeightedRandom, None)
        };
        assert_eq!(shares(&t, &c, 100), [0, 100, 0]);
    }

    #[test]
    fn unreadable_nodes_take_nothing() {
        let (mut t, config) = topology(&[1.0, 1.0, 1.0]);
        t.nodes[1].status = crate::cluster::Status::Down;
        t.nodes[2].lag = None;
        t.update_read_set(&config);
        assert_eq!(
            shares(&t, &choice(LoadBalance::WeightedRandom, None), 100),
            [100, 0, 0]
        );
    }

    fn request(build: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut buf = BytesMut::new();
        build(&mut buf);
        buf
    }

    fn msg(buf: &mut BytesMut, tag: u8, body: &[u8]) {
        buf.extend_from_slice(&[tag]);
        buf.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        buf.extend_from_slice(body);
    }

    fn parse(buf: &mut BytesMut, name: &str, sql: &str) {
        msg(buf, b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
    }

    fn bind(buf: &mut BytesMut, statement: &str) {
        msg(buf, b'B', format!("\0{statement}\0\0\0\0\0\0\0").as_bytes());
    }

    /// Parse, Bind, Execute and Sync of one unnamed statement.
    fn run_once(sql: &str) -> BytesMut {
        request(|b| {
            parse(b, "", sql);
            bind(b, "");
            msg(b, b'E', b"\0\0\0\0\0");
            msg(b, b'S', b"");
        })
    }

    #[test]
    fn plans_extended_requests() {
        let classifier = Classifier::new(&[], &[]);
        let mut statements = StatementNodes::default();
        let read = run_once("SELECT 1");
        let planned = plan(&read, &classifier, &statements);
        assert_eq!((planned.target, planned.node), (Target::Replica, None));

        let mixed = request(|b| {
            parse(b, "", "SELECT 1");
            parse(b, "w", "INSERT INTO t VALUES (1)");
            msg(b, b'S', b"");
        });
        assert_eq!(
            plan(&mixed, &classifier, &statements).target,
            Target::Primary
        );

        // A statement parsed earlier goes back to its node; an unknown one to the primary.
        statements.parsed(b"s1", 2);
        let later = request(|b| {
            bind(b, "s1");
            msg(b, b'E', b"\0\0\0\0\0");
            msg(b, b'S', b"");
        });
        let planned = plan(&later, &classifier, &statements);
        assert_eq!((planned.target, planned.node), (Target::Replica, Some(2)));
        let close = request(|b| {
            msg(b, b'C', b"Ss1\0");
            msg(b, b'S', b"");
        });
        let planned = plan(&close, &classifier, &statements);
        assert_eq!((planned.target, planned.node), (Target::Replica, Some(2)));
        statements.observe(b'C', b"Ss1\0", 2);
        let planned = plan(&later, &classifier, &statements);
        assert_eq!(
            (planned.target, planned.reason),
            (Target::Primary, Some(Reason::Unsure))
        );

        let call = request(|b| msg(b, b'F', b"\0\0\0\x01"));
        assert_eq!(
            plan(&call, &classifier, &statements).target,
            Target::Primary
        );
    }

    /// The request's texts understood as the scan that reads a request understands
    /// them, then the plan completed.
    fn plan(request: &[u8], classifier: &Classifier, statements: &StatementNodes) -> Plan {
        let mut texts = Plan::default();
        for message in frontend::messages(request).map_while(Result::ok) {
            match message.tag {
                frontend::QUERY => {
                    let text = frontend::query_text(message.body).unwrap();
                    texts.text(false, &classifier.understand(text));
                }
                frontend::PARSE => {
                    let text = frontend::parse(message.body)
                        .and_then(|p| p.text())
                        .unwrap();
                    texts.text(true, &classifier.understand_prepared(text));
                }
                _ => {}
            }
        }
        plan_request(request, texts, classifier, statements)
    }

    #[test]
    fn commands_by_first_keyword() {
        let classifier = Classifier::new(&[], &[]);
        let command = |sql: &str| classifier.understand(sql.as_bytes()).command;
        assert_eq!(command("SELECT 1"), Command::Select);
        assert_eq!(command("  /* x */ -- y\n (select 1)"), Command::Select);
        assert_eq!(command("insert into t values (1)"), Command::Insert);
        assert_eq!(command("UPDATE t SET a = 1"), Command::Update);
        assert_eq!(command("Delete from t"), Command::Delete);
        assert_eq!(command("CREATE TABLE t (a int)"), Command::Ddl);
        assert_eq!(command("TRUNCATE t"), Command::Ddl);
        assert_eq!(command("BEGIN"), Command::Other);
        assert_eq!(command("selective"), Command::Other);
        assert_eq!(command(""), Command::Other);
        // The first statement's command counts.
        assert_eq!(command("DELETE FROM t; SELECT 1"), Command::Delete);
    }

    /// A request executing a Parse it carries counts the Parse's command; a bare
    /// prepare counts none.
    #[test]
    fn commands_of_extended_requests() {
        let classifier = Classifier::new(&[], &[]);
        let statements = StatementNodes::default();
        let run = run_once("INSERT INTO t VALUES (1)");
        let planned = plan(&run, &classifier, &statements);
        assert_eq!(planned.command, Some(Command::Insert));
        let prepare = request(|b| {
            parse(b, "p", "INSERT INTO t VALUES (1)");
            msg(b, b'S', b"");
        });
        assert_eq!(plan(&prepare, &classifier, &statements).command, None);
    }

    #[test]
    fn volatility_query_quotes_names() {
        assert_eq!(
            Router::volatility_query("o'neil"),
            "SELECT COALESCE(bool_or(provolatile = 'v'), true) FROM pg_catalog.pg_proc WHERE proname = E'o\\'neil'"
        );
    }
}
