//! A federation on one machine: an exchange and its peers as child processes of a
//! `starling-trainer` binary on loopback, each with its own data directory and log. The
//! convergence benchmark and the multi-process tests run runs this way.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::exchange::client::{ClientError, ClientOptions, ExchangeClient};
use crate::exchange::proto::RunState;

const OPERATOR: &str = "operator-token-local-0000";

/// The token of peer `p` in a local federation.
pub fn token(p: u32) -> String {
    format!("peer-token-local-{p:08}")
}

/// The token of evaluator `e` in a local federation.
pub fn evaluator_token(e: u32) -> String {
    format!("evaluator-token-local-{e:04}")
}

/// Evaluators a local federation has tokens for.
pub const MAX_EVALUATORS: u32 = 2;

/// The scoring key (hex) of every local federation: what seeds the evaluators' slices.
const SCORING_KEY: &str = "6c6f63616c2d73636f72696e672d6b6579";

pub struct LocalFederation {
    binary: PathBuf,
    dir: PathBuf,
    run_args: Vec<String>,
    exchange: Option<Child>,
    port: u16,
    rt: tokio::runtime::Runtime,
    memory: MemoryWatch,
}

/// The peak resident memory of each process of a federation, by name (`exchange`,
/// `p0`, ...): `VmHWM` read from `/proc` every 50 ms while the process runs (the kernel
/// keeps the peak itself, so only growth in a process's last 50 ms can be missed).
struct MemoryWatch {
    /// (name, pid, peak bytes) of every process started.
    processes: Arc<Mutex<Vec<(String, u32, u64)>>>,
    stop: Arc<AtomicBool>,
}

impl MemoryWatch {
    fn start() -> Self {
        let processes: Arc<Mutex<Vec<(String, u32, u64)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (watched, stopped) = (processes.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(mut list) = watched.lock() {
                    for (_, pid, peak) in list.iter_mut() {
                        *peak = (*peak).max(crate::cpu::peak_rss_bytes(Some(*pid)).unwrap_or(0));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { processes, stop }
    }

    fn watch(&self, name: &str, child: &Child) {
        if let Ok(mut list) = self.processes.lock() {
            list.push((name.to_owned(), child.id(), 0));
        }
    }

    /// The largest peak of each name (a restarted process counts as its name).
    fn peaks(&self) -> BTreeMap<String, u64> {
        let mut peaks = BTreeMap::new();
        if let Ok(list) = self.processes.lock() {
            for (name, _, peak) in list.iter() {
                let p = peaks.entry(name.clone()).or_insert(0);
                *p = (*p).max(*peak);
            }
        }
        peaks
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl LocalFederation {
    /// A federation of up to `max_peers` peers running `binary` with the run flags
    /// `run_args`, working under `dir`.
    pub fn new(
        binary: &Path,
        dir: &Path,
        max_peers: u32,
        run_args: Vec<String>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let tokens: String = (0..max_peers)
            .map(|p| format!("p{p} {}\n", token(p)))
            .chain((0..MAX_EVALUATORS).map(|e| format!("e{e} {}\n", evaluator_token(e))))
            .chain([format!("operator {OPERATOR}\n")])
            .collect();
        std::fs::write(dir.join("tokens"), tokens)?;
        Ok(Self {
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            run_args,
            exchange: None,
            port: 0,
            rt: tokio::runtime::Runtime::new()?,
            memory: MemoryWatch::start(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn command(&self, role: &str, name: &str) -> std::io::Result<Command> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg(role)
            .args(&self.run_args)
            .arg("--data-dir")
            .arg(self.path(&format!("data-{name}")))
            // One thread per process: the peers and the exchange share one machine.
            .env(crate::env::THREADS, "1")
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(self.path(&format!("{name}.log")))?);
        Ok(cmd)
    }

    /// Starts the exchange, or restarts it on the port it had. Its final checkpoint goes
    /// to `exchange/round-<rounds>`.
    pub fn start_exchange(&mut self, extra: &[&str]) -> std::io::Result<()> {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut child = self
            .command("exchange", "exchange")?
            .args(["--listen", &listen, "--tokens-file"])
            .arg(self.path("tokens"))
            .arg("--checkpoint-dir")
            .arg(self.path("exchange"))
            .args(["--checkpoint-every", "1000000"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("exchange listening on ")
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|port| port.parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            return Err(std::io::Error::other(format!(
                "the exchange did not start:\n{}",
                self.log("exchange")
            )));
        };
        self.port = port;
        self.memory.watch("exchange", &child);
        self.exchange = Some(child);
        Ok(())
    }

    /// Kills the exchange as a power cut would.
    pub fn kill_exchange(&mut self) -> std::io::Result<()> {
        if let Some(mut child) = self.exchange.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts peer `p`; its final parameters go to `peer<p>/`.
    pub fn start_peer(&self, p: u32) -> std::io::Result<Child> {
        let child = self
            .command("train", &format!("p{p}"))?
            .args(["--exchange", &format!("http://127.0.0.1:{}", self.port)])
            .args(["--token", &token(p)])
            .arg("--checkpoint-dir")
            .arg(self.path(&format!("peer{p}")))
            .stdout(Stdio::piped())
            .spawn()?;
        self.memory.watch(&format!("p{p}"), &child);
        Ok(child)
    }

    /// Starts evaluator `e` (below [`MAX_EVALUATORS`]): it scores every round's updates
    /// and reports to the exchange until the run ends.
    pub fn start_evaluator(&self, e: u32) -> std::io::Result<Child> {
        let name = format!("e{e}");
        let child = self
            .command("evaluate", &name)?
            .args(["--exchange", &format!("http://127.0.0.1:{}", self.port)])
            .args(["--token", &evaluator_token(e)])
            .args(["--scoring-key", SCORING_KEY])
            .stdout(Stdio::piped())
            .spawn()?;
        self.memory.watch(&name, &child);
        Ok(child)
    }

    /// The peak resident memory of every process started so far, by name (`exchange`,
    /// `p0`, `e0`, ...), bytes.
    pub fn peak_rss(&self) -> BTreeMap<String, u64> {
        self.memory.peaks()
    }

    /// Waits for peer `p` to exit; its output, or its log when it failed.
    pub fn finish(&self, p: u32, child: Child) -> Result<String, String> {
        self.finish_named(&format!("p{p}"), child)
    }

    /// Waits for the process `name` to exit; its output, or its log when it failed.
    fn finish_named(&self, name: &str, child: Child) -> Result<String, String> {
        let Output { status, stdout, .. } = child.wait_with_output().map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&stdout).into_owned();
        if status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{name} failed ({status}):\n{stdout}\n{}",
                self.log(name)
            ))
        }
    }

    /// [`finish`](Self::finish), but a peer still running after `timeout` is killed and
    /// reported with its log, so a hung run fails instead of hanging.
    pub fn finish_within(&self, p: u32, child: Child, timeout: Duration) -> Result<String, String> {
        self.finish_named_within(&format!("p{p}"), child, timeout)
    }

    /// [`finish_within`](Self::finish_within) for evaluator `e`.
    pub fn finish_evaluator_within(
        &self,
        e: u32,
        child: Child,
        timeout: Duration,
    ) -> Result<String, String> {
        self.finish_named_within(&format!("e{e}"), child, timeout)
    }

    fn finish_named_within(
        &self,
        name: &str,
        mut child: Child,
        timeout: Duration,
    ) -> Result<String, String> {
        let start = Instant::now();
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if start.elapsed() > timeout {
                let _ = child.kill();
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                return Err(format!(
                    "{name} still running after {timeout:?}, killed:\n{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    self.log(name)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.finish_named(name, child)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// The exchange's view of the run, as the operator reads it.
    pub fn run_state(&self) -> Result<RunState, ClientError> {
        let opts = ClientOptions {
            url: format!("http://127.0.0.1:{}", self.port),
            token: OPERATOR.into(),
            fingerprint: String::new(),
            bandwidth_mbps: None,
            retry_for: Duration::from_secs(30),
            tls: None,
        };
        self.rt
            .block_on(async { ExchangeClient::new(opts)?.run_state().await })
    }

    /// Polls the run state until `done` holds, for at most `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&RunState) -> bool,
    ) -> Result<RunState, String> {
        let start = Instant::now();
        loop {
            let state = self.run_state().map_err(|e| e.to_string())?;
            if done(&state) {
                return Ok(state);
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "timed out waiting for {what}: {state:?}\n{}",
                    self.log("exchange")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalFederation {
    fn drop(&mut self) {
        let _ = self.kill_exchange();
    }
}
