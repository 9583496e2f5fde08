//! What some tests need from the machine beyond PostgreSQL: programs and Python modules
//! from Debian packages. A missing one fails the test with a message naming the package
//! and the README's test command, which installs everything the tests need.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The README's test command; it installs what is missing, then runs the tests.
pub const TEST_COMMAND: &str = "bash .ci/test";

/// The Debian package that ships `program`, for the message about a missing one.
fn package_of(program: &str) -> &'static str {
    match program {
        "etcd" => "etcd-server",
        "patroni" | "patronictl" => "patroni",
        "psql" | "pgbench" => "postgresql-client",
        "pgbouncer" => "pgbouncer",
        "promtool" => "prometheus",
        "systemd-analyze" => "systemd",
        _ => "postgresql",
    }
}

/// Where `program` is: the first PATH entry holding it, else /usr/sbin (not on a normal
/// user's PATH). A missing program fails the test, naming its package.
pub fn program(program: &str) -> PathBuf {
    let path: Vec<PathBuf> = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .collect();
    program_in(program, &path)
}

/// [`program`] looking only in `dirs`.
pub fn program_in(program: &str, dirs: &[PathBuf]) -> PathBuf {
    dirs.iter()
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{program}` is not installed (Debian package `{}`); the README's test \
                 command, `{TEST_COMMAND}`, installs it and everything else the tests need",
                package_of(program)
            )
        })
}

/// A python3 that imports every module of `modules` (module, Debian package): the
/// system interpreter first, because Debian's python3-* packages live with it and
/// another python3 on PATH (pyenv, a virtualenv) may shadow it.
pub fn python(modules: &[(&str, &str)]) -> &'static str {
    let imports = modules
        .iter()
        .map(|(module, _)| *module)
        .collect::<Vec<_>>()
        .join(", ");
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|python| {
            Command::new(python)
                .args(["-c", &format!("import {imports}")])
                .output()
                .is_ok_and(|out| out.status.success())
        })
        .unwrap_or_else(|| {
            let packages: Vec<&str> = modules.iter().map(|(_, package)| *package).collect();
            panic!(
                "no python3 imports {imports} (Debian packages {}); the README's test \
                 command, `{TEST_COMMAND}`, installs them and everything else the tests need",
                packages.join(" ")
            )
        })
}

/// Runs `tests/drivers/<script>` with the system interpreter that has psycopg and
/// asyncpg (Debian's packages live with it; another python3 on PATH may shadow it),
/// from inside a multi-thread Tokio test. Returns what it printed on stdout; a script
/// that fails fails the test with all it printed.
pub fn run_driver(script: &str, args: &[&str]) -> String {
    let python = python(&[
        ("psycopg", "python3-psycopg"),
        ("asyncpg", "python3-asyncpg"),
    ]);
    run_script(Path::new(python), script, args)
}

/// The virtual environment's python3 whose psycopg bundles libpq 18 (direct TLS,
/// channel binding, protocol 3.2); the README's test command creates it.
pub fn libpq18_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/libpq18-venv/bin/python");
    let libpq18 = Command::new(&python)
        .args([
            "-c",
            "import psycopg, sys; sys.exit(psycopg.pq.version() < 180000)",
        ])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        libpq18,
        "{} has no psycopg with libpq 18; the README's test command, `{TEST_COMMAND}`, \
         creates that virtual environment",
        python.display()
    );
    python
}

/// The virtual environment's python3 with kubernetes-validate (the Kubernetes API's
/// JSON schemas, offline) and PyYAML, for tests/deploy.rs; the README's test command
/// creates it.
pub fn kubernetes_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kubernetes-venv/bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import kubernetes_validate, yaml"])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        ready,
        "{} has no kubernetes-validate; the README's test command, `{TEST_COMMAND}`, \
         creates that virtual environment",
        python.display()
    );
    python
}

/// [`run_driver`] with [`libpq18_python`]: psycopg on libpq 18.
pub fn run_libpq18_driver(script: &str, args: &[&str]) -> String {
    run_script(&libpq18_python(), script, args)
}

fn run_script(python: &Path, script: &str, args: &[&str]) -> String {
    let path = format!("{}/tests/drivers/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::block_in_place(|| {
        Command::new(python)
            .arg(&path)
            .args(args)
            .output()
            .expect("run python3")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script}: {stdout}{stderr}");
    stdout
}
