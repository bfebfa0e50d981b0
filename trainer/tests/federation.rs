//! Whole runs on loopback, every peer and the exchange a separate `starling-trainer`
//! process: training together, a peer killed mid-round, a peer joining late, and the
//! exchange restarted under the peers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use starling_trainer::exchange::client::{ClientOptions, ExchangeClient};
use starling_trainer::exchange::proto::RunState;

const BIN: &str = env!("CARGO_BIN_EXE_starling-trainer");
const OPERATOR: &str = "operator-token-0000";

fn token(peer: u32) -> String {
    format!("peer-token-{peer:08}")
}

/// An exchange and its peers under one temporary directory.
struct Federation {
    dir: tempfile::TempDir,
    run_args: Vec<String>,
    exchange: Option<Child>,
    port: u16,
    rt: tokio::runtime::Runtime,
}

impl Federation {
    /// A run of the tiny model: `rounds` rounds of 4 inner steps over 4 × 64 tokens.
    fn new(rounds: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokens: String = (0..3)
            .map(|p| format!("p{p} {}\n", token(p)))
            .chain([format!("operator {OPERATOR}\n")])
            .collect();
        std::fs::write(dir.path().join("tokens"), tokens).unwrap();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-config.json");
        let run_args = [
            "--model-config",
            model.to_str().unwrap(),
            "--max-peers",
            "3",
            "--rounds",
            &rounds.to_string(),
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
        ]
        .map(String::from)
        .to_vec();
        Self {
            dir,
            run_args,
            exchange: None,
            port: 0,
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, role: &str, name: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg(role)
            .args(&self.run_args)
            .arg("--data-dir")
            .arg(self.path(&format!("data-{name}")))
            // One thread per process: three peers and an exchange share a small machine.
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(self.path(&format!("{name}.log"))).unwrap());
        cmd
    }

    /// Starts (or restarts, on the same port) the exchange.
    fn start_exchange(&mut self, extra: &[&str]) {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut child = self
            .command("exchange", "exchange")
            .args(["--listen", &listen, "--tokens-file"])
            .arg(self.path("tokens"))
            .arg("--checkpoint-dir")
            .arg(self.path("exchange"))
            .args(["--checkpoint-every", "1000", "--eval-rows", "16"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("exchange listening on ")
            .unwrap_or_else(|| panic!("exchange said {line:?}; log:\n{}", self.log("exchange")));
        self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
        self.exchange = Some(child);
    }

    fn kill_exchange(&mut self) {
        let mut child = self.exchange.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn start_peer(&self, p: u32) -> Child {
        self.command("train", &format!("p{p}"))
            .args(["--exchange", &format!("http://127.0.0.1:{}", self.port)])
            .args(["--token", &token(p)])
            .arg("--checkpoint-dir")
            .arg(self.path(&format!("peer{p}")))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits for a peer to finish successfully; returns its last line.
    fn finish(&self, p: u32, child: Child) -> String {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "p{p} failed ({}):\n{stdout}\n{}",
            out.status,
            self.log(&format!("p{p}"))
        );
        stdout
    }

    fn run_state(&self) -> RunState {
        let opts = ClientOptions {
            url: format!("http://127.0.0.1:{}", self.port),
            token: OPERATOR.into(),
            fingerprint: String::new(),
            bandwidth_mbps: None,
            retry_for: Duration::from_secs(30),
        };
        self.rt
            .block_on(async { ExchangeClient::new(opts).unwrap().run_state().await })
            .unwrap()
    }

    fn wait_for(&self, what: &str, done: impl Fn(&RunState) -> bool) -> RunState {
        let start = Instant::now();
        loop {
            let state = self.run_state();
            if done(&state) {
                return state;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "timed out waiting for {what}: {state:?}\n{}",
                self.log("exchange")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn weights(&self, checkpoint: &str) -> Vec<u8> {
        std::fs::read(self.path(checkpoint).join("model.safetensors"))
            .unwrap_or_else(|e| panic!("{checkpoint}: {e}"))
    }

    /// Every named peer ends with exactly the exchange's final parameters.
    fn assert_identical(&self, peers: &[u32], rounds: u32) {
        let global = self.weights(&format!("exchange/round-{rounds:06}"));
        for p in peers {
            assert!(
                self.weights(&format!("peer{p}")) == global,
                "p{p} ended with different parameters from the exchange"
            );
        }
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        if let Some(mut child) = self.exchange.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn three_peers_train_tiny_together_and_end_bit_identical() {
    let rounds = 5;
    let mut f = Federation::new(rounds);
    f.start_exchange(&["--min-peers", "3", "--round-deadline", "60"]);
    let peers: Vec<_> = (0..3).map(|p| f.start_peer(p)).collect();
    for (p, child) in peers.into_iter().enumerate() {
        let out = f.finish(p as u32, child);
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
    }
    let dense = 3 * u64::from(rounds) * state.dense_update_bytes;
    assert!(dense > 100 * state.bytes_received, "{state:?}");
    f.assert_identical(&[0, 1, 2], rounds);
}

#[test]
fn a_peer_killed_mid_round_is_dropped_at_the_deadline_and_the_run_goes_on() {
    let rounds = 4;
    let mut f = Federation::new(rounds);
    // Peers stay "alive" for a minute, so only the deadline can close a round without p2.
    f.start_exchange(&[
        "--min-peers",
        "3",
        "--round-deadline",
        "3",
        "--liveness",
        "60",
    ]);
    let mut peers: Vec<_> = (0..3).map(|p| f.start_peer(p)).collect();
    f.wait_for("round 0 to close", |s| s.open_round >= 1);
    let mut p2 = peers.pop().unwrap();
    p2.kill().unwrap();
    p2.wait().unwrap();
    for (p, child) in peers.into_iter().enumerate() {
        f.finish(p as u32, child);
    }
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
    let early: Vec<_> = (0..2).map(|p| f.start_peer(p)).collect();
    f.wait_for("round 3 to open", |s| s.open_round >= 3);
    let late = f.start_peer(2);
    let out = f.finish(2, late);
    assert!(out.contains("1 resyncs"), "{out}");
    for (p, child) in early.into_iter().enumerate() {
        f.finish(p as u32, child);
    }
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
    let state_dir = f.path("state");
    let args = [
        "--min-peers",
        "3",
        "--round-deadline",
        "60",
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    f.start_exchange(&args);
    let peers: Vec<_> = (0..3).map(|p| f.start_peer(p)).collect();
    f.wait_for("round 2 to open", |s| s.open_round >= 2);
    f.kill_exchange();
    std::thread::sleep(Duration::from_millis(500));
    f.start_exchange(&args);
    assert!(
        f.log("exchange").contains("resumed the run's state"),
        "{}",
        f.log("exchange")
    );
    for (p, child) in peers.into_iter().enumerate() {
        f.finish(p as u32, child);
    }
    assert!(f.run_state().done);
    f.assert_identical(&[0, 1, 2], rounds);
}
