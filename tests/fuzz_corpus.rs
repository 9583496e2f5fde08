//! Replays the fuzz corpora (`fuzz/corpus/<target>/*`) through the same entry points
//! the cargo-fuzz targets use, on stable Rust, plus random inputs via proptest. A
//! decoder that panics on any of them fails this test.

use std::path::Path;

use pgrelay::fuzzing;
use proptest::prelude::*;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("corpus entry").path();
        if path.is_file() {
            let data = std::fs::read(&path).expect("corpus file");
            run(&data);
            // Every prefix too: truncated input is the common real-world case.
            for end in 0..data.len().min(64) {
                run(&data[..end]);
            }
            count += 1;
        }
    }
    count
}

/// Stack for the replay: sqlparser's depth limit (50) bounds its recursion, but debug
/// builds' frames are many times release's, and the corpora hold inputs at that limit
/// (a release build needs about 1 MiB for them, inside tokio's 2 MiB workers).
const REPLAY_STACK: usize = 32 << 20;

#[test]
fn corpora_replay_without_panics() {
    std::thread::Builder::new()
        .stack_size(REPLAY_STACK)
        .spawn(replay_all)
        .expect("replay thread")
        .join()
        .expect("no corpus input panics");
}

fn replay_all() {
    for (target, run) in [
        ("frame", fuzzing::frame as fn(&[u8])),
        ("startup", fuzzing::startup),
        ("scanner", fuzzing::scanner),
        ("classify", fuzzing::classify),
        ("messages", fuzzing::messages),
        ("scram", fuzzing::scram),
        ("admin", fuzzing::admin),
        ("config", fuzzing::config),
        ("hba", fuzzing::hba),
    ] {
        assert!(replay(target, run) > 0, "corpus for {target} is empty");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::frame(&data);
        fuzzing::startup(&data);
        fuzzing::scanner(&data);
        fuzzing::classify(&data);
        fuzzing::messages(&data);
        fuzzing::scram(&data);
        fuzzing::admin(&data);
        fuzzing::hba(&data);
    }

    #[test]
    fn random_text_never_panics(text in "\\PC{0,256}") {
        fuzzing::admin(text.as_bytes());
        fuzzing::config(text.as_bytes());
        fuzzing::hba(text.as_bytes());
    }
}
