//! The container image, the Kubernetes manifests and the systemd unit under `conf/`,
//! checked offline.
//! The Dockerfile must stay a multi-stage build of a non-root image whose command the
//! real binary accepts, stopped with SIGTERM; every kustomization under
//! `conf/kubernetes/` must render, validate against the Kubernetes API's schemas and
//! agree with itself and with the pgrelay.toml it ships (`tests/drivers/deploy.py`,
//! in the virtual environment the README's test command creates). Building and running
//! the image needs a container engine: `conf/docker/smoke.sh`, not this test.

#[allow(dead_code)]
#[path = "support/needs.rs"]
mod needs;

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pgrelay");

fn conf(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conf")
        .join(path)
}

/// The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined
/// and comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(conf("docker/Dockerfile")).expect("read the Dockerfile");
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(line);
                let (keyword, args) = pending.split_once(' ').unwrap_or((&pending, ""));
                instructions.push((keyword.to_uppercase(), args.trim().to_owned()));
                pending.clear();
            }
        }
    }
    instructions
}

/// The arguments of the one `keyword` instruction of the final stage (or the stage it
/// builds on), the last one winning as in Docker.
fn last(instructions: &[(String, String)], keyword: &str) -> String {
    instructions
        .iter()
        .rev()
        .find(|(k, _)| k == keyword)
        .map(|(_, args)| args.clone())
        .unwrap_or_else(|| panic!("the Dockerfile has no {keyword}"))
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not an exec-form array: {args}: {e}"))
}

/// The image's numeric user, which the manifests' runAsUser must be.
fn image_user(instructions: &[(String, String)]) -> u32 {
    let user = last(instructions, "USER");
    let uid = user.split(':').next().unwrap_or_default();
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("USER {user} is not numeric (runAsNonRoot needs a uid)"));
    assert_ne!(uid, 0, "the image runs as root");
    uid
}

/// "1.89" or "1.88.0" as comparable numbers.
fn version(text: &str) -> Vec<u32> {
    let mut numbers: Vec<u32> = text
        .split('.')
        .map(|n| n.parse().unwrap_or_else(|_| panic!("version {text}")))
        .collect();
    numbers.resize(3, 0);
    numbers
}

/// The newest `rust-version` among what a build of the pgrelay binary compiles: its
/// own (Cargo.toml) and those of its locked normal and build dependencies on this
/// platform, with the package that sets it. Cargo refuses an older toolchain.
fn minimum_rust() -> (Vec<u32>, String) {
    let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &platform])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata");
    let nodes = metadata["resolve"]["nodes"].as_array().expect("resolve");
    let packages = metadata["packages"].as_array().expect("packages");
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![metadata["resolve"]["root"].as_str().expect("root")];
    let mut newest = (vec![0, 0, 0], String::new());
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        let package = packages.iter().find(|p| p["id"] == id).expect("package");
        if let Some(rust) = package["rust_version"].as_str() {
            if version(rust) > newest.0 {
                let (name, number) = (&package["name"], &package["version"]);
                let name = format!(
                    "{} {}",
                    name.as_str().unwrap_or("?"),
                    number.as_str().unwrap_or("?")
                );
                newest = (version(rust), name);
            }
        }
        let node = nodes.iter().find(|n| n["id"] == id).expect("node");
        for dep in node["deps"].as_array().into_iter().flatten() {
            let mut kinds = dep["dep_kinds"].as_array().into_iter().flatten();
            if kinds.any(|k| k["kind"] != "dev") {
                todo.push(dep["pkg"].as_str().expect("pkg"));
            }
        }
    }
    newest
}

#[test]
fn dockerfile_builds_a_non_root_image_the_binary_runs_in() {
    let instructions = dockerfile();
    let stages: Vec<&str> = instructions
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, args)| args.as_str())
        .collect();
    assert!(stages.len() >= 2, "not a multi-stage build: {stages:?}");
    assert!(
        stages.iter().any(|s| s.ends_with(" AS build")),
        "no build stage: {stages:?}"
    );
    assert!(
        stages.last().is_some_and(|s| s.ends_with(" AS runtime")),
        "the default (last) stage is not the runtime: {stages:?}"
    );
    let runs: Vec<&str> = instructions
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, args)| args.as_str())
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "the build stage does not run cargo build --release --locked"
    );
    let image_rust = instructions
        .iter()
        .filter(|(k, _)| k == "ARG")
        .find_map(|(_, args)| args.split_once("rust:")?.1.strip_suffix("-bookworm"))
        .expect("ARG RUST_IMAGE=...rust:<version>-bookworm");
    let (needed, by) = minimum_rust();
    assert!(
        version(image_rust) >= needed,
        "the build stage's rust:{image_rust} is older than {by} needs"
    );
    image_user(&instructions);
    assert_eq!(last(&instructions, "STOPSIGNAL"), "SIGTERM");
    let exposed = last(&instructions, "EXPOSE");
    assert!(
        exposed.split_whitespace().eq(["6432", "9930"]),
        "EXPOSE {exposed}"
    );

    // ENTRYPOINT + CMD is `pgrelay run --config FILE`, and the binary takes these flags
    // (the same ones with `check`, on the file the Kubernetes manifests ship).
    let mut command = exec_form(&last(&instructions, "ENTRYPOINT"));
    command.extend(exec_form(&last(&instructions, "CMD")));
    assert_eq!(
        command,
        [
            "/usr/local/bin/pgrelay",
            "run",
            "--config",
            "/etc/pgrelay/pgrelay.toml"
        ]
    );
    let help = Command::new(BIN)
        .args(["run", "--help"])
        .output()
        .expect("run pgrelay run --help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config <FILE>"));
    let shipped = conf("kubernetes/patroni-service/pgrelay.toml");
    let mut check: Vec<String> = command[1..].to_vec();
    check[0] = "check".into();
    *check.last_mut().expect("a file") = shipped.display().to_string();
    let out = Command::new(BIN)
        .args(&check)
        .output()
        .expect("run pgrelay check");
    assert!(
        out.status.success(),
        "{check:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dockerignore_lets_in_what_the_build_copies() {
    let ignore = std::fs::read_to_string(conf("docker/Dockerfile.dockerignore"))
        .expect("read Dockerfile.dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|line| line.trim().strip_prefix('!'))
        .collect();
    assert!(
        ignore.lines().any(|line| line.trim() == "*"),
        "the ignore file does not start from nothing (target/ alone is gigabytes)"
    );
    for (keyword, args) in dockerfile() {
        if keyword != "COPY" || args.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for source in &words[..words.len() - 1] {
            if source.starts_with("${") {
                continue; // the prebuilt binary, let in as target/*/pgrelay
            }
            assert!(
                allowed.contains(source),
                "COPY {source}: not let in by Dockerfile.dockerignore"
            );
        }
    }
}

/// Every directory under conf/kubernetes/ that holds a kustomization.
fn kustomizations() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(conf("kubernetes"))
        .expect("read conf/kubernetes")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|dir| dir.join("kustomization.yaml").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn shipped_kubernetes_configs_pass_check() {
    let dirs = kustomizations();
    assert!(dirs.len() >= 2, "kustomizations: {dirs:?}");
    for dir in dirs {
        let file = dir.join("pgrelay.toml");
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .expect("run pgrelay check");
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kubernetes_manifests_validate_offline() {
    let python = needs::kubernetes_python();
    let user = image_user(&dockerfile());
    let dirs = kustomizations();
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/deploy.py"))
        .arg(BIN)
        .arg(user.to_string())
        .args(&dirs)
        .output()
        .expect("run tests/drivers/deploy.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tests/drivers/deploy.py: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for dir in &dirs {
        let checked = format!("{}: ", dir.display());
        assert!(
            stdout
                .lines()
                .any(|line| line.starts_with(&checked) && line.contains("objects ok")),
            "{} was not checked: {stdout}",
            dir.display()
        );
    }
    print!("{stdout}");
}

/// `conf/systemd/pgrelay.service` passes `systemd-analyze verify` (with ExecStart
/// pointed at the binary cargo built), is a notify service that lets the process
/// that takes over report itself, and starts what the binary accepts.
#[test]
fn systemd_unit_verifies_and_allows_a_takeover() {
    let analyze = needs::program("systemd-analyze");
    let text = std::fs::read_to_string(conf("systemd/pgrelay.service")).expect("the unit");
    for line in [
        "Type=notify",
        "NotifyAccess=all",
        "KillMode=mixed",
        "RuntimeDirectoryPreserve=yes",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args[..3], ["/usr/bin/pgrelay", "run", "-c"], "{exec}");
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("pgrelay.service");
    std::fs::write(&unit, text.replace("/usr/bin/pgrelay", BIN)).expect("write the unit");
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
