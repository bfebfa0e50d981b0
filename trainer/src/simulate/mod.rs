//! `starling-trainer simulate`: a discrete-event simulation of a federated run at sizes this
//! machine cannot run — tens of peers, billions of parameters, links from data centres to
//! homes — to see where the time of a round goes and which link saturates first.
//!
//! What is modelled, and only that:
//! * each peer computes its inner steps (FLOPs per token × tokens ÷ the GPUs' peak × MFU),
//!   compresses with the codec (its speed measured on this machine in the same run, per
//!   core, times the peer's cores), uploads, waits for the round to close, downloads what
//!   the round's [`Download`] mode asks, decodes and starts the next round — the protocol
//!   the trainer runs, not an idealised one (no overlap of communication with compute);
//! * the exchange checks each update as it arrives (parse and checksum, in arrival order),
//!   closes the round when every expected peer's update is in, at the deadline, or early
//!   at the quorum (paced as the exchange paces them, [`crate::exchange::pacing`]), applies
//!   the accepted ones to its global state (one decode each) before the results can be
//!   fetched, and serves the payloads itself or leaves them on object storage
//!   ([`Payloads`]);
//! * transfers share the exchange's link max-min fairly ([`fluid`]); object storage scales
//!   out, so only each peer's own link limits it;
//! * home peers lose power as a Poisson process, are noticed by the exchange after the
//!   heartbeat timeout, and on return fetch the model state before rejoining.
//!
//! Not modelled: packet loss and TCP slow start (one round trip per transfer stands for
//! them), evaluators, the exchange's validation loss and state snapshot at close, the outer
//! step's own O(parameters) pass, and CPU contention between the codec and the data loader.

mod engine;
mod fluid;
mod scenarios;

pub use scenarios::{SCENARIOS, scenario};

use std::collections::HashMap;

use serde::Serialize;

use crate::codec::CodecConfig;

/// Bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Bandwidth(f64);

impl Bandwidth {
    pub const UNLIMITED: Self = Self(f64::INFINITY);

    pub fn bytes(per_s: f64) -> Self {
        Self(per_s)
    }

    /// Megabits per second, as links are sold.
    pub fn mbit(mbit_per_s: f64) -> Self {
        Self(mbit_per_s * 1e6 / 8.0)
    }

    pub fn gbit(gbit_per_s: f64) -> Self {
        Self::mbit(gbit_per_s * 1e3)
    }

    pub fn bytes_per_s(self) -> f64 {
        self.0
    }

    /// Seconds to move `bytes` at this rate.
    fn seconds(self, bytes: f64) -> f64 {
        bytes / self.0
    }
}

/// A peer's (or the exchange's) connection.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub up: Bandwidth,
    pub down: Bandwidth,
    /// Round-trip time; each transfer pays one before its first byte.
    pub rtt_s: f64,
}

/// What a peer computes with.
#[derive(Clone, Copy, Debug)]
pub struct Hardware {
    pub gpus: u32,
    /// Dense bf16 FLOP/s of one GPU.
    pub peak_flops: f64,
    /// Model FLOPs utilisation of the inner steps, as a fraction.
    pub mfu: f64,
    /// CPU cores the codec runs on (it is parallel over chunks).
    pub cores: u32,
}

/// Homes lose power: cuts arrive as a Poisson process and last an exponentially
/// distributed time.
#[derive(Clone, Copy, Debug)]
pub struct PowerCuts {
    pub per_hour: f64,
    pub mean_s: f64,
}

/// Peers alike in link and hardware.
#[derive(Clone, Debug)]
pub struct PeerGroup {
    pub count: u32,
    pub link: Link,
    pub hardware: Hardware,
    /// Log-normal spread (σ) of each peer's compute speed around the hardware's: no two
    /// machines run at the same speed.
    pub compute_spread: f64,
    pub power_cuts: Option<PowerCuts>,
}

/// Where update payloads travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Payloads {
    /// Through the exchange pod: uploads share its ingress, downloads its egress.
    Exchange,
    /// On object storage: peers upload and download with pre-signed URLs, only their own
    /// links limit them, and the exchange fetches each update once to validate it.
    Storage,
}

/// What each peer downloads once a round closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Download {
    /// Every accepted update but its own.
    All,
    /// The first G accepted updates (the aggregate set) but its own.
    Gather(u32),
    /// One object: the exchange's re-compressed aggregate of every accepted update.
    Aggregate,
}

impl std::fmt::Display for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Download::All => f.write_str("all"),
            Download::Gather(g) => write!(f, "gather-{g}"),
            Download::Aggregate => f.write_str("aggregate"),
        }
    }
}

/// The codec's chunk shape and its speed on this machine.
#[derive(Clone, Copy, Debug)]
pub struct Codec {
    /// Encoded bits per parameter (indices and values), measured at this shape.
    pub bits_per_param: f64,
    /// The same for the exchange's compressed aggregate, measured at its k
    /// ([`crate::run::AGGREGATE_K_FACTOR`] times the peers').
    pub aggregate_bits_per_param: f64,
    /// fp32 bytes compressed per second by one core.
    pub compress_per_core: Bandwidth,
    /// fp32 bytes decoded (and added) per second by one core.
    pub decode_per_core: Bandwidth,
    /// Encoded bytes checked (parsed, checksummed) per second by one core.
    pub check_per_core: Bandwidth,
}

/// When the exchange closes a round before every expected peer has sent.
#[derive(Clone, Copy, Debug)]
pub enum Closing {
    /// Never: it waits for every peer (or for the exchange to notice one is gone).
    AllIn,
    /// At a fixed time after the round's first update.
    Fixed { deadline_s: f64 },
    /// As the exchange does ([`crate::exchange::pacing`]): a deadline that follows recent
    /// rounds within a floor and a ceiling, and an early close at the quorum when the
    /// missing peers are predicted to miss it.
    Adaptive {
        floor_s: f64,
        ceiling_s: f64,
        quorum: f64,
    },
}

impl Closing {
    /// The exchange's defaults under a ceiling.
    pub fn adaptive(ceiling_s: f64) -> Self {
        Closing::Adaptive {
            floor_s: crate::exchange::DEFAULT_DEADLINE_FLOOR,
            ceiling_s,
            quorum: crate::exchange::DEFAULT_QUORUM,
        }
    }
}

/// One run to simulate.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub params: f64,
    pub inner_steps: u32,
    /// Tokens one peer trains on per inner step.
    pub tokens_per_step: f64,
    pub codec: CodecConfig,
    pub groups: Vec<PeerGroup>,
    /// The exchange pod's connection.
    pub exchange: Link,
    /// Cores the exchange validates (decodes) updates with.
    pub exchange_cores: u32,
    pub heartbeat_timeout_s: f64,
    pub payloads: Payloads,
    pub download: Download,
    /// When a round that is not all in closes.
    pub closing: Closing,
    pub rounds: u32,
    pub seed: u64,
}

impl Scenario {
    pub fn peers(&self) -> u32 {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Simulates the run with `codec`'s speed; see the module docs for what is modelled.
    pub fn simulate(&self, codec: &Codec) -> Row {
        engine::run(self, codec)
    }
}

/// One scenario's outcome; times are means per peer and round, bytes means per round.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub peers: u32,
    pub model_params: f64,
    pub payloads: Payloads,
    pub download: String,
    pub update_bytes: f64,
    /// Seconds between two round closes.
    pub round_s: f64,
    pub compute_s: f64,
    /// Compressing the own update and decoding the downloaded ones.
    pub codec_s: f64,
    pub upload_s: f64,
    pub download_s: f64,
    /// Waiting for other peers and for the exchange.
    pub wait_s: f64,
    /// From a round's close until its results can be fetched: the exchange applying the
    /// accepted updates (and compressing the aggregate, in that mode).
    pub publish_s: f64,
    /// Fraction of online time the GPUs spend on inner steps.
    pub utilisation: f64,
    /// Updates accepted per round.
    pub accepted: f64,
    /// Updates in each round's outer step.
    pub aggregated: f64,
    /// How rounds closed: every expected peer in, early at the quorum, at the deadline
    /// (fractions of the rounds).
    pub closed_all_in: f64,
    pub closed_quorum: f64,
    pub closed_deadline: f64,
    /// Updates computed but not accepted (deadline missed, power cut) per round.
    pub lost: f64,
    pub exchange_ingress_bytes: f64,
    pub exchange_egress_bytes: f64,
    pub storage_ingress_bytes: f64,
    pub storage_egress_bytes: f64,
    pub download_per_peer_bytes: f64,
}

pub fn table_header() -> String {
    format!(
        "{:<24} {:>5} {:>6} {:<8} {:<10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>5} {:>5} {:>7} {:>9} {:>9} {:>9}",
        "scenario",
        "peers",
        "params",
        "payloads",
        "download",
        "update",
        "round_s",
        "compute",
        "codec",
        "upload",
        "dnload",
        "wait",
        "publish",
        "util",
        "aggr",
        "lost",
        "q%/dl%",
        "xchg_out",
        "store_out",
        "per_peer"
    )
}

pub fn table_row(r: &Row) -> String {
    let payloads = match r.payloads {
        Payloads::Exchange => "exchange",
        Payloads::Storage => "storage",
    };
    format!(
        "{:<24} {:>5} {:>6} {:<8} {:<10} {:>8} {:>8.1} {:>8.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>5.1}% {:>5.1} {:>5.2} {:>7} {:>9} {:>9} {:>9}",
        r.scenario,
        r.peers,
        si(r.model_params, ""),
        payloads,
        r.download,
        si(r.update_bytes, "B"),
        r.round_s,
        r.compute_s,
        r.codec_s,
        r.upload_s,
        r.download_s,
        r.wait_s.max(0.0),
        r.publish_s,
        r.utilisation * 100.0,
        r.aggregated,
        r.lost,
        format!(
            "{:.0}/{:.0}",
            r.closed_quorum * 100.0,
            r.closed_deadline * 100.0
        ),
        si(r.exchange_egress_bytes, "B"),
        si(r.storage_egress_bytes, "B"),
        si(r.download_per_peer_bytes, "B"),
    )
}

/// `72e9` → `72G`, `1.4e9` bytes → `1.4GB`.
fn si(x: f64, unit: &str) -> String {
    let (value, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")]
        .into_iter()
        .find(|&(scale, _)| x >= scale)
        .map_or((x, ""), |(scale, p)| (x / scale, p));
    if value >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}{prefix}{unit}")
    } else {
        format!("{value:.1}{prefix}{unit}")
    }
}

/// The best of this many timings is the codec's speed: on a shared machine one timing can
/// be several times slower than the codec is.
const CODEC_REPEATS: usize = 15;

/// Measures the codec `config` on this machine: bits per parameter of a `params`-long
/// tensor of gradient-like values (and of the aggregate's), and its compress, decode
/// and check speeds per core.
pub fn measure_codec(config: CodecConfig, params: usize, repeats: usize) -> anyhow::Result<Codec> {
    let aggregate_k = (crate::run::AGGREGATE_K_FACTOR * config.k()).min(config.chunk());
    let bench = crate::bench::CodecBench {
        params: vec![params],
        chunk: config.chunk(),
        ks: vec![config.k(), aggregate_k],
        bits: config.value_bits(),
        repeats,
        device: candle_core::Device::Cpu,
    };
    let rows = bench.run(|_| {})?;
    let (Some(row), Some(aggregate)) = (rows.first(), rows.last()) else {
        anyhow::bail!("the codec bench measured nothing");
    };
    let cores = row.threads.max(1) as f64;
    Ok(Codec {
        bits_per_param: row.bits_per_param,
        aggregate_bits_per_param: aggregate.bits_per_param,
        compress_per_core: Bandwidth::bytes(row.compress_gbps * 1e9 / cores),
        decode_per_core: Bandwidth::bytes(row.decode_add_gbps * 1e9 / cores),
        // Checking is single-threaded (one update per core).
        check_per_core: Bandwidth::bytes(row.check_gbps * 1e9),
    })
}

/// `starling-trainer simulate`.
#[derive(clap::Args)]
pub struct SimulateArgs {
    /// Scenarios to run (repeat the flag); all of them when none is given.
    #[arg(long = "scenario", value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS))]
    scenarios: Vec<String>,
    /// Rounds to simulate in each scenario instead of its own number.
    #[arg(long)]
    rounds: Option<u32>,
    /// Seed of the peers' speeds and the power cuts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Parameters of the tensor the codec is measured on.
    #[arg(long, value_parser = crate::bench::parse_size, default_value = "16M")]
    codec_params: usize,
    /// One JSON object per scenario instead of a table.
    #[arg(long)]
    json: bool,
}

impl SimulateArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let names: Vec<&str> = if self.scenarios.is_empty() {
            SCENARIOS.to_vec()
        } else {
            self.scenarios.iter().map(String::as_str).collect()
        };
        let mut scenarios = vec![];
        for name in names {
            scenarios.extend(scenario(name).map_err(anyhow::Error::msg)?);
        }
        let mut measured: HashMap<CodecConfig, Codec> = HashMap::new();
        let mut print = crate::bench::printer(self.json, table_header(), table_row);
        for mut s in scenarios {
            s.seed = self.seed;
            s.rounds = self.rounds.unwrap_or(s.rounds).max(1);
            let codec = match measured.get(&s.codec) {
                Some(codec) => *codec,
                None => {
                    let codec = measure_codec(s.codec, self.codec_params, CODEC_REPEATS)?;
                    tracing::info!(
                        codec = %s.codec,
                        bits_per_param = codec.bits_per_param,
                        compress_gbps_per_core = codec.compress_per_core.bytes_per_s() / 1e9,
                        decode_gbps_per_core = codec.decode_per_core.bytes_per_s() / 1e9,
                        check_gbps_per_core = codec.check_per_core.bytes_per_s() / 1e9,
                        "codec measured on this machine"
                    );
                    measured.insert(s.codec, codec);
                    codec
                }
            };
            print(&s.simulate(&codec));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
