//! Whole runs on loopback, every peer and the exchange a separate `starling-trainer`
//! process: training together, a peer killed mid-round, a peer joining late, and the
//! exchange restarted under the peers.

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

mod common;

use std::path::Path;
use std::time::Duration;

use common::{python_check, trainer};

use starling_trainer::exchange::proto::RunState;
use starling_trainer::exchange::storage::s3_server::S3Server;
use starling_trainer::local::LocalFederation;

/// How long a peer may take to finish its run, or a condition to come true: far beyond
/// what a run takes on a loaded machine, so reaching it means something hangs.
const PEER_TIMEOUT: Duration = Duration::from_secs(600);

/// A federation of up to three peers on the tiny model: `rounds` rounds of 4 inner steps
/// over 4 × 64 tokens.
struct Federation {
    local: LocalFederation,
    /// The run's length, given to the exchange (peers learn it from there).
    rounds: String,
    _dir: tempfile::TempDir,
}

impl Federation {
    fn new(rounds: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-config.json");
        let rounds = rounds.to_string();
        let args = [
            "--model-config",
            model.to_str().unwrap(),
            "--max-peers",
            "3",
            "--inner-steps",
            "4",
            "--batch",
            "4",
            "--micro-batch",
            "4",
            "--sequence-length",
            "64",
            "--warmup-steps",
            "4",
            "--lr",
            "5e-3",
        ];
        let bin = Path::new(env!("CARGO_BIN_EXE_starling-trainer"));
        let args = args.map(String::from).to_vec();
        let local = LocalFederation::new(bin, dir.path(), 3, args).unwrap();
        Self {
            local,
            rounds,
            _dir: dir,
        }
    }

    fn start_exchange(&mut self, extra: &[&str]) {
        let rounds = self.rounds.clone();
        let args: Vec<&str> = ["--rounds", &rounds]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        self.local.start_exchange(&args).unwrap();
    }

    fn start_peers(&self, peers: std::ops::Range<u32>) -> Vec<(u32, std::process::Child)> {
        peers
            .map(|p| (p, self.local.start_peer(p).unwrap()))
            .collect()
    }

    /// Waits for the peers to exit successfully; returns their output. A peer that has
    /// not finished within [`PEER_TIMEOUT`] fails the test with its log (and the peers
    /// after it are killed), instead of hanging it.
    fn finish(&self, peers: Vec<(u32, std::process::Child)>) -> Vec<String> {
        let mut peers = peers.into_iter();
        let mut outputs = Vec::new();
        while let Some((p, child)) = peers.next() {
            match self.local.finish_within(p, child, PEER_TIMEOUT) {
                Ok(out) => outputs.push(out),
                Err(e) => {
                    for (_, mut rest) in peers {
                        let _ = rest.kill();
                        let _ = rest.wait();
                    }
                    panic!("{e}");
                }
            }
        }
        outputs
    }

    fn wait_for(&self, what: &str, done: impl Fn(&RunState) -> bool) -> RunState {
        self.local.wait_for(what, PEER_TIMEOUT, done).unwrap()
    }

    fn run_state(&self) -> RunState {
        self.local.run_state().unwrap()
    }

    /// Every named peer ends with exactly the exchange's final parameters.
    fn assert_identical(&self, peers: &[u32], rounds: u32) {
        let weights = |checkpoint: String| {
            std::fs::read(self.local.path(&checkpoint).join("model.safetensors"))
                .unwrap_or_else(|e| panic!("{checkpoint}: {e}"))
        };
        let global = weights(format!("exchange/round-{rounds:06}"));
        for p in peers {
            assert!(
                weights(format!("peer{p}")) == global,
                "p{p} ended with different parameters from the exchange"
            );
        }
    }
}

#[test]
fn three_peers_train_tiny_together_and_end_bit_identical() {
    let rounds = 5;
    let mut f = Federation::new(rounds);
    f.start_exchange(&["--min-peers", "3", "--round-deadline", "60"]);
    let outputs = f.finish(f.start_peers(0..3));
    for out in outputs {
        assert!(out.contains(&format!("{rounds} updates accepted")), "{out}");
    }
    let state = f.run_state();
    assert!(state.done);
    let last = state.recent.last().unwrap();
    eprintln!(
        "validation loss {:.3} -> {:.3}; {} bytes received for {} dense bytes per update",
        state.initial_validation_loss,
        last.validation_loss,
        state.bytes_received,
        state.dense_update_bytes
    );
    assert!(
        last.validation_loss < state.initial_validation_loss - 1.0,
        "validation loss {} -> {}",
        state.initial_validation_loss,
        last.validation_loss
    );
    for summary in &state.recent {
        assert_eq!(summary.contributors, ["p0", "p1", "p2"], "{summary:?}");
        // Every peer sent, so no round waited for its deadline.
        assert!(!summary.closed_at_deadline, "{summary:?}");
    }
    let dense = 3 * u64::from(rounds) * state.dense_update_bytes;
    assert!(dense > 100 * state.bytes_received, "{state:?}");
    f.assert_identical(&[0, 1, 2], rounds);

    // The trained checkpoint is what Hugging Face tooling reads, and it writes.
    let checkpoint = f.local.path(&format!("exchange/round-{rounds:06}"));
    if let Some(report) = python_check(&checkpoint) {
        assert!(report.contains("LlamaForCausalLM layout OK"), "{report}");
    }
    let sample = trainer(&[
        "sample".as_ref(),
        "--prompt".as_ref(),
        "ROMEO:".as_ref(),
        "--tokens".as_ref(),
        "40".as_ref(),
        "--checkpoint".as_ref(),
        checkpoint.as_os_str(),
    ]);
    let text = String::from_utf8_lossy(&sample);
    eprintln!("sample: {text}");
    assert!(text.starts_with("ROMEO:") && text.len() > 40, "{text}");
}

#[test]
fn a_peer_killed_mid_round_is_dropped_at_the_deadline_and_the_run_goes_on() {
    let rounds = 4;
    let mut f = Federation::new(rounds);
    // Peers stay "alive" for ten minutes, so only the deadline can close a round
    // without p2. It is long enough that p0 and p1 both make every round even on a
    // loaded machine; each round after p2's death waits for it in full.
    f.start_exchange(&[
        "--min-peers",
        "3",
        "--round-deadline",
        "10",
        "--liveness",
        "600",
    ]);
    let mut peers = f.start_peers(0..3);
    f.wait_for("round 0 to close", |s| s.open_round >= 1);
    let (_, mut p2) = peers.pop().unwrap();
    p2.kill().unwrap();
    p2.wait().unwrap();
    f.finish(peers);
    let state = f.run_state();
    assert!(state.done, "{state:?}");
    let last = state.recent.last().unwrap();
    assert_eq!(last.contributors, ["p0", "p1"]);
    assert!(last.closed_at_deadline, "{last:?}");
    f.assert_identical(&[0, 1], rounds);
}

#[test]
fn a_peer_joining_at_round_3_syncs_and_matches_the_others() {
    let rounds = 6;
    let mut f = Federation::new(rounds);
    f.start_exchange(&["--min-peers", "2", "--round-deadline", "60"]);
    let early = f.start_peers(0..2);
    f.wait_for("round 3 to open", |s| s.open_round >= 3);
    let late = f.finish(f.start_peers(2..3));
    assert!(late[0].contains("1 resyncs"), "{}", late[0]);
    f.finish(early);
    let state = f.run_state();
    assert!(
        state.recent.iter().any(|s| s.contributors.len() == 3),
        "p2 never contributed: {state:?}"
    );
    f.assert_identical(&[0, 1, 2], rounds);
}

#[test]
fn peers_reconnect_to_a_restarted_exchange_and_continue() {
    let rounds = 6;
    let mut f = Federation::new(rounds);
    let state_dir = f.local.path("state");
    let args = [
        "--min-peers",
        "3",
        "--round-deadline",
        "60",
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    f.start_exchange(&args);
    let peers = f.start_peers(0..3);
    // Killed once every peer has been served every closed round: none of them needs a
    // round the restarted exchange no longer has.
    f.wait_for("round 2 to open and reach every peer", |s| {
        let closed: u64 = s.recent.iter().map(|r| r.download_bytes).sum();
        s.open_round >= 2 && s.bytes_sent >= 3 * closed
    });
    f.local.kill_exchange().unwrap();
    let saved = saved_round(&state_dir.join("state.safetensors"));
    assert!(saved >= 2, "the state was saved at round {saved}");
    f.start_exchange(&args);
    let log = f.local.log("exchange");
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed the run's state"))
        .unwrap_or_else(|| panic!("the exchange did not resume:\n{log}"));
    assert!(resumed.contains(&format!("round={saved} ")), "{resumed}");
    for out in f.finish(peers) {
        assert!(out.contains(&format!("{rounds} updates accepted")), "{out}");
        assert!(out.contains(", 0 resyncs,"), "a peer had to resync: {out}");
    }
    let state = f.run_state();
    assert!(state.done);
    // The restarted exchange closed exactly the rounds from the saved one on.
    let closed: Vec<u32> = state.recent.iter().map(|r| r.round).collect();
    assert_eq!(closed, (saved..rounds).collect::<Vec<_>>(), "{state:?}");
    for summary in &state.recent {
        assert_eq!(summary.contributors, ["p0", "p1", "p2"], "{summary:?}");
    }
    f.assert_identical(&[0, 1, 2], rounds);
}

#[test]
fn with_payloads_in_a_bucket_peers_train_through_an_exchange_restarted_on_a_fresh_disk() {
    // A real S3 server on loopback; its access key goes to the exchange alone, as files
    // (a mounted Secret).
    let Some(server) = S3Server::start() else {
        return;
    };
    server.create_bucket("federation");
    let rounds = 6;
    let mut f = Federation::new(rounds);
    let secret = f.local.path("storage-secret");
    server.write_credentials(&secret);
    let endpoint = server.endpoint();
    let args = [
        "--min-peers",
        "3",
        "--round-deadline",
        "60",
        "--storage",
        "s3://federation/run",
        "--storage-endpoint",
        &endpoint,
        "--storage-credentials",
        secret.to_str().unwrap(),
    ];
    f.start_exchange(&args);
    let peers = f.start_peers(0..3);
    f.wait_for("round 2 to open", |s| s.open_round >= 2);
    // No state directory: what the new process knows comes from the bucket.
    f.local.kill_exchange().unwrap();
    f.start_exchange(&args);
    let log = f.local.log("exchange");
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed the run's state"))
        .unwrap_or_else(|| panic!("the exchange did not resume:\n{log}"));
    assert!(resumed.contains("s3://federation/run"), "{resumed}");
    let outputs = f.finish(peers);
    for out in &outputs {
        assert!(out.contains(&format!("{rounds} updates accepted")), "{out}");
    }
    let state = f.run_state();
    assert!(state.done);
    for summary in &state.recent {
        assert_eq!(summary.contributors, ["p0", "p1", "p2"], "{summary:?}");
    }
    // The restarted exchange sent no payload itself: only a state for each resync of a
    // peer that missed a round while it was down, all of one size.
    let resyncs: u64 = (outputs.iter())
        .filter_map(|o| {
            o.split(" resyncs")
                .next()?
                .rsplit(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    eprintln!(
        "the restarted exchange sent {} bytes ({resyncs} resyncs); received {}",
        state.bytes_sent, state.bytes_received
    );
    match resyncs {
        0 => assert_eq!(state.bytes_sent, 0),
        n => assert!(
            state.bytes_sent > 0 && state.bytes_sent.is_multiple_of(n),
            "{state:?}"
        ),
    }
    f.assert_identical(&[0, 1, 2], rounds);
}

/// The round an exchange's persisted state belongs to.
fn saved_round(path: &Path) -> u32 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().as_ref().unwrap()["round"].parse().unwrap()
}

#[test]
fn the_convergence_sweep_trains_each_point_on_equal_tokens_and_compares_it_with_ddp() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("bench");
    let flags = [
        "bench",
        "convergence",
        "--json",
        "--algorithms",
        "sparseloco,ddp",
        "--peers",
        "2",
        "--rounds",
        "2",
        "--inner-steps",
        "2",
        "--batch",
        "2",
        "--sequence-length",
        "32",
        "--warmup-steps",
        "1",
        "--eval-rows",
        "4",
        "--sweep",
        "outer-lr=1,2",
        "--work-dir",
        work.to_str().unwrap(),
    ];
    let rows = json_rows(&flags);
    let field = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    // DDP once (the outer learning rate is not its), first; SparseLoCo at each value.
    let shape: Vec<(&str, f64)> = (rows.iter())
        .map(|r| (r["algorithm"].as_str().unwrap(), field(r, "outer_lr")))
        .collect();
    assert_eq!(
        shape,
        [("ddp", 1.0), ("sparseloco", 1.0), ("sparseloco", 2.0)],
        "{rows:?}"
    );
    let ddp = field(&rows[0], "final_validation_loss");
    assert!(rows[0]["vs_ddp"].is_null());
    for row in &rows[1..] {
        assert_eq!(row["tokens"], rows[0]["tokens"], "unequal tokens: {row}");
        assert_eq!(
            (field(row, "rounds"), field(row, "inner_steps")),
            (2.0, 2.0)
        );
        let gap = field(row, "final_validation_loss") / ddp - 1.0;
        assert!((field(row, "vs_ddp") - gap).abs() < 1e-6, "{row}");
    }
    // The two SparseLoCo points really trained differently.
    assert_ne!(
        rows[1]["final_validation_loss"],
        rows[2]["final_validation_loss"]
    );
}

#[test]
fn the_simulator_prints_one_json_object_per_scenario_with_its_round_time_and_egress() {
    let flags = [
        "simulate",
        "--json",
        "--scenario",
        "covenant-72b",
        "--scenario",
        "covenant-72b-aggregate",
        "--rounds",
        "3",
        "--codec-params",
        "1M",
    ];
    let rows = json_rows(&flags);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let field = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    for r in &rows {
        assert_eq!(field(r, "peers"), 20.0);
        assert_eq!(field(r, "model_params"), 72e9);
        assert!(field(r, "round_s") > field(r, "compute_s"));
        assert!((0.0..1.0).contains(&field(r, "utilisation")));
        assert!(r["exchange_egress_bytes"].is_number() && r["storage_egress_bytes"].is_number());
    }
    // The compressed aggregate is one object per peer instead of nineteen updates: at
    // three times the peers' k it is two to three updates' bytes (measured in the run).
    let (all, aggregate) = (&rows[0], &rows[1]);
    let update = field(all, "update_bytes");
    assert!((field(all, "download_per_peer_bytes") / update - 19.0).abs() < 1e-6);
    let aggregated = field(aggregate, "download_per_peer_bytes") / update;
    assert!((1.0..3.0).contains(&aggregated), "{aggregated} updates");
    assert!(field(aggregate, "round_s") < field(all, "round_s"));
}

/// Runs the trainer with `flags` (a `--json` command) and parses each line it prints.
fn json_rows(flags: &[&str]) -> Vec<serde_json::Value> {
    let args: Vec<&std::ffi::OsStr> = flags.iter().map(|s| s.as_ref()).collect();
    let stdout = String::from_utf8(trainer(&args)).unwrap();
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
