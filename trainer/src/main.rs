use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use starling_trainer::bench::{self, CodecBench, ConvergenceBench};
use starling_trainer::codec::ValueBits;
use starling_trainer::data::Tokenizer;
use starling_trainer::device::{DeviceArgs, DeviceChoice, Use};
use starling_trainer::env;
use starling_trainer::exchange::server::{Exchange, ExchangeOptions, ServeError};
use starling_trainer::exchange::storage::{Credentials, StorageSource};
use starling_trainer::exchange::tls::{TlsArgs, pem};
use starling_trainer::exchange::{Settings, Tokens};
use starling_trainer::hub;
use starling_trainer::model::{Llama, ModelConfig, load_checkpoint, save_checkpoint};
use starling_trainer::outer::Round;
use starling_trainer::roles::evaluate::{self, EvaluatorOptions};
use starling_trainer::roles::metrics;
use starling_trainer::roles::train::{self, PeerOptions};
use starling_trainer::run::{Run, RunConfig};

/// Starling trainer: runs in every trainer pod (and as each run's exchange).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train as one peer of a run, through the run's exchange.
    Train(TrainArgs),
    /// Score every peer's update of every round, as one of the run's evaluators.
    Evaluate(EvaluateArgs),
    /// Serve a run's exchange: rounds, membership, the global state and checkpoints.
    Exchange(ExchangeArgs),
    /// Write a freshly initialised model as a checkpoint (round 0 of a run).
    Init(InitArgs),
    /// Generate text from a checkpoint.
    Sample(SampleArgs),
    /// Publish a checkpoint directory to the Hugging Face Hub as one commit.
    Publish(hub::PublishArgs),
    /// Benchmarks; each prints a table, or JSON lines with --json.
    #[command(subcommand)]
    Bench(Bench),
    /// Simulate runs too large for this machine: where a round's time goes, link by link.
    Simulate(starling_trainer::simulate::SimulateArgs),
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    run: RunConfig,
    #[command(flatten)]
    device: DeviceArgs,
    /// The exchange's URL, e.g. `http://run-exchange:7070`.
    #[arg(long, env = env::EXCHANGE)]
    exchange: String,
    /// This peer's bearer token (it also says which peer this is).
    #[arg(long, env = env::TOKEN, hide_env_values = true)]
    token: String,
    /// Cap upload and download at this many megabits per second (home links).
    #[arg(long, env = env::BANDWIDTH_MBPS)]
    bandwidth_mbps: Option<f64>,
    /// Seconds to keep retrying an unreachable exchange before giving up.
    #[arg(long, env = env::RETRY_FOR, default_value_t = 300)]
    retry_for: u64,
    /// Where the token shards are built (once).
    #[arg(long, env = env::DATA_DIR, default_value = ".starling/data")]
    data_dir: PathBuf,
    /// Write this peer's final parameters here, in the Hugging Face layout.
    #[arg(long, env = env::CHECKPOINT_DIR)]
    checkpoint_dir: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    /// A testing aid: cheat, to see scoring catch it. noise, scale:F, signflip, zero,
    /// copy:PEER, replay, stale, offslice or frozen; or PEER=KIND[,PEER=KIND…] to cheat
    /// only as the peers named.
    #[arg(long, env = env::ADVERSARY)]
    adversary: Option<starling_trainer::scoring::adversary::Adversaries>,
    /// The round the adversary starts cheating in.
    #[arg(long, env = env::ADVERSARY_FROM, default_value_t = 0)]
    adversary_from: u32,
    /// Serve Prometheus `/metrics` on this address (e.g. `0.0.0.0:9090`).
    #[arg(long, env = env::METRICS_LISTEN)]
    metrics_listen: Option<std::net::SocketAddr>,
}

impl TrainArgs {
    /// The loaded run and how this peer reaches the exchange.
    fn into_options(self) -> anyhow::Result<(Run, PeerOptions)> {
        let mut run = self.run.load(&self.data_dir)?;
        run.placement = self.device.open(Use::Train)?;
        let opts = PeerOptions {
            exchange: self.exchange,
            token: self.token,
            bandwidth_mbps: self.bandwidth_mbps,
            retry_for: Duration::from_secs(self.retry_for),
            heartbeat: Duration::from_secs(1),
            checkpoint_dir: self.checkpoint_dir,
            tls: self.tls.load().map_err(anyhow::Error::msg)?,
            adversary: (self.adversary).map(|a| (a, Round(self.adversary_from))),
            metrics_listen: self.metrics_listen,
        };
        Ok((run, opts))
    }

    fn run(self) -> anyhow::Result<()> {
        let (run, opts) = self.into_options()?;
        let report = train::train(&run, opts)?;
        println!(
            "{} finished: {} rounds trained, {} updates accepted, {} resyncs, {} bytes sent",
            report.peer,
            report.rounds_trained,
            report.updates_accepted,
            report.resyncs,
            report.bytes_sent
        );
        Ok(())
    }
}

#[derive(Args)]
struct EvaluateArgs {
    #[command(flatten)]
    run: RunConfig,
    #[command(flatten)]
    device: DeviceArgs,
    /// The exchange's URL, e.g. `http://run-exchange:7070`.
    #[arg(long, env = env::EXCHANGE)]
    exchange: String,
    /// This evaluator's bearer token (it also says which evaluator this is).
    #[arg(long, env = env::TOKEN, hide_env_values = true)]
    token: String,
    /// The run's scoring key (hex), the secret of the evaluators' random slices.
    #[arg(long, env = env::SCORING_KEY, hide_env_values = true)]
    scoring_key: String,
    /// The run's uid.
    #[arg(long, env = env::RUN_UID, default_value = "")]
    run_uid: String,
    /// Sequences per scored update: half random, half the peer's own.
    #[arg(long, env = env::EVAL_BATCHES, default_value_t = 16)]
    eval_batches: u32,
    /// Updates scored per round at most.
    #[arg(long, env = env::MAX_EVALUATED, default_value_t = 32)]
    max_evaluated: u32,
    /// Seconds to keep retrying an unreachable exchange before giving up.
    #[arg(long, env = env::RETRY_FOR, default_value_t = 300)]
    retry_for: u64,
    /// Where the token shards are built (once).
    #[arg(long, env = env::DATA_DIR, default_value = ".starling/data")]
    data_dir: PathBuf,
    #[command(flatten)]
    tls: TlsArgs,
}

impl EvaluateArgs {
    fn run(self) -> anyhow::Result<()> {
        let mut run = self.run.load(&self.data_dir)?;
        run.placement = self.device.open(Use::Measure)?;
        let secret = hex_bytes(&self.scoring_key)
            .ok_or_else(|| anyhow::anyhow!("--scoring-key must be hex, at least 16 bytes"))?;
        let opts = EvaluatorOptions {
            exchange: self.exchange,
            token: self.token,
            retry_for: Duration::from_secs(self.retry_for),
            tls: self.tls.load().map_err(anyhow::Error::msg)?,
            secret,
            run_uid: self.run_uid,
            eval_batches: self.eval_batches,
            max_evaluated: self.max_evaluated,
        };
        let summary = evaluate::evaluate(&run, opts)?;
        println!(
            "{} finished: {} rounds measured, {} reports refused",
            summary.name, summary.rounds_measured, summary.reports_refused
        );
        Ok(())
    }
}

/// Hex of at least 16 bytes.
fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    let bytes = starling_trainer::scoring::ledger::unhex(&text.trim().to_ascii_lowercase())?;
    (bytes.len() >= 16).then_some(bytes)
}

#[derive(Args)]
struct ExchangeArgs {
    #[command(flatten)]
    run: RunConfig,
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long, env = env::LISTEN, default_value = "0.0.0.0:7070")]
    listen: std::net::SocketAddr,
    /// File of `<identity> <token>` lines: `p0 <token>`, ..., `operator <token>`.
    #[arg(long, env = env::TOKENS_FILE, required_unless_present = "tokens")]
    tokens_file: Option<PathBuf>,
    /// The same lines given directly (the operator passes them from a Secret).
    #[arg(
        long,
        env = env::TOKENS,
        hide_env_values = true,
        conflicts_with = "tokens_file"
    )]
    tokens: Option<String>,
    #[command(flatten)]
    settings: Settings,
    /// Ignore the settings above and admit no peer until the operator sends them
    /// (`Configure`), so that changing them never needs a new pod.
    #[arg(long, env = env::AWAIT_SETTINGS)]
    await_settings: bool,
    /// Seconds without a heartbeat after which a peer is not waited for.
    #[arg(long, env = env::LIVENESS, default_value_t = 15.0)]
    liveness: f64,
    /// Largest update accepted, in bytes (default: the model's dense fp32 size plus
    /// 64 KiB for the container's names and shapes, so dense DiLoCo and DDP updates fit).
    #[arg(long, env = env::MAX_UPDATE_BYTES)]
    max_update_bytes: Option<u64>,
    /// Closed rounds kept for fetching, at most: the newest two always, older ones
    /// while all kept hold no more than the state (a peer further behind fetches that).
    #[arg(long, env = env::KEEP_ROUNDS, default_value_t = 4)]
    keep_rounds: usize,
    #[arg(long, env = env::DATA_DIR, default_value = ".starling/data")]
    data_dir: PathBuf,
    /// Where the global state is kept across restarts, without --storage.
    #[arg(long, env = env::STATE_DIR)]
    state_dir: Option<PathBuf>,
    /// Object storage for the rounds' payloads and the global state (`s3://bucket/prefix`,
    /// `gs://…`, `az://…`): peers put and get payloads there on URLs the exchange signs.
    /// Credentials from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, …).
    #[arg(long, env = env::STORAGE)]
    storage: Option<String>,
    /// The S3-compatible server to use for --storage (MinIO, R2, moto).
    #[arg(long, env = env::STORAGE_ENDPOINT, requires = "storage")]
    storage_endpoint: Option<String>,
    /// A directory of files named by the storage settings they hold (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, …; a mounted Secret), read again whenever the exchange
    /// retries its storage; without it, the environment's.
    #[arg(long, env = env::STORAGE_CREDENTIALS, requires = "storage")]
    storage_credentials: Option<PathBuf>,
    /// Where checkpoints are written (`round-NNNNNN/`).
    #[arg(long, env = env::CHECKPOINT_DIR)]
    checkpoint_dir: Option<PathBuf>,
    /// Held-out sequences the validation loss is measured on after each round.
    #[arg(long, env = env::EVAL_ROWS, default_value_t = 16)]
    eval_rows: u32,
    #[arg(long, env = env::RUN, default_value = "local")]
    run_name: String,
    /// Serve TLS with this certificate chain (PEM, or a file holding it); needs
    /// --tls-key.
    #[arg(long, env = env::TLS_CERT, requires = "tls_key")]
    tls_cert: Option<String>,
    /// The certificate's private key (PEM, or a file holding it).
    #[arg(long, env = env::TLS_KEY, requires = "tls_cert", hide_env_values = true)]
    tls_key: Option<String>,
    /// Serve Prometheus `/metrics` on this address, in plain HTTP.
    #[arg(long, env = env::METRICS_LISTEN)]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// The exit status of an exchange that could not advance the global state past a closed
/// round (`EX_SOFTWARE`): a bug or a full disk, not a configuration mistake.
const EXIT_ADVANCE: u8 = 70;

impl ExchangeArgs {
    /// The loaded run and how the exchange serves it.
    fn into_options(self) -> anyhow::Result<(Run, ExchangeOptions)> {
        let mut run = self.run.load(&self.data_dir)?;
        run.placement = self.device.open(Use::Measure)?;
        let tokens = match (self.tokens, self.tokens_file) {
            (Some(text), _) => Tokens::parse(&text),
            (None, Some(path)) => Tokens::read(&path),
            (None, None) => unreachable!("clap requires one of them"),
        }
        .map_err(anyhow::Error::msg)?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some((
                pem(&cert).map_err(|e| anyhow::anyhow!("--tls-cert: {e}"))?,
                pem(&key).map_err(|e| anyhow::anyhow!("--tls-key: {e}"))?,
            )),
            _ => None,
        };
        let settings = if self.await_settings {
            None
        } else {
            self.settings.validate().map_err(anyhow::Error::msg)?;
            Some(self.settings)
        };
        let storage = self.storage.map(|url| StorageSource {
            url,
            endpoint: self.storage_endpoint,
            credentials: match self.storage_credentials {
                Some(dir) => Credentials::Dir(dir),
                None => Credentials::Environment,
            },
        });
        let opts = ExchangeOptions {
            storage,
            tokens,
            settings,
            liveness: Duration::from_secs_f64(self.liveness),
            max_update_bytes: self.max_update_bytes,
            keep_rounds: self.keep_rounds,
            state_dir: self.state_dir,
            checkpoint_dir: self.checkpoint_dir,
            eval_rows: self.eval_rows,
            run_name: self.run_name,
            tls,
        };
        Ok((run, opts))
    }

    /// Serves until interrupted; a round that cannot be applied ends the process with
    /// [`EXIT_ADVANCE`].
    fn run(self) -> anyhow::Result<ExitCode> {
        let listen = self.listen;
        let metrics_listen = self.metrics_listen;
        let (run, opts) = self.into_options()?;
        let exchange = Exchange::new(run, opts)?;
        let served = tokio::runtime::Runtime::new()?.block_on(async move {
            if let Some(addr) = metrics_listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let exchange = exchange.clone();
                let text = move || exchange.metrics_text();
                tokio::spawn(metrics::serve(listener, metrics::PROMETHEUS_TEXT, text));
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            // Tests and scripts read the port from this line.
            println!("exchange listening on {}", listener.local_addr()?);
            std::io::stdout().flush()?;
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            anyhow::Ok(exchange.serve(listener, shutdown).await)
        })?;
        match served {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e @ ServeError::Advance { .. }) => {
                eprintln!("Error: {e}");
                Ok(ExitCode::from(EXIT_ADVANCE))
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[derive(Args)]
struct InitArgs {
    /// Model architecture: a Hugging Face `config.json` for LlamaForCausalLM.
    #[arg(long, env = env::MODEL_CONFIG)]
    config: PathBuf,
    /// Initialisation seed (the run's seed: every peer derives the same weights).
    #[arg(long, env = env::SEED, default_value_t = 0)]
    seed: u64,
    /// Checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
}

impl InitArgs {
    fn run(self) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.config)
            .with_context(|| format!("reading {}", self.config.display()))?;
        let config = ModelConfig::from_hf_json(&text)
            .with_context(|| format!("{} is not a model config", self.config.display()))?;
        let model = Llama::new(config, self.seed, &Device::Cpu)?;
        let meta = serde_json::json!({"round": 0, "seed": self.seed, "tokenizer": "bytes"});
        save_checkpoint(&self.out, &model, &meta, &Tokenizer::Bytes)?;
        println!(
            "wrote {} ({} parameters)",
            self.out.display(),
            model.parameter_count()
        );
        Ok(())
    }
}

#[derive(Args)]
struct SampleArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long, env = env::CHECKPOINT)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 300)]
    tokens: usize,
    /// Sampling temperature; 0 picks the likeliest token every time.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SampleArgs {
    fn run(self) -> anyhow::Result<()> {
        let placement = self.device.open(Use::Measure)?;
        let (model, _) = load_checkpoint(&self.checkpoint, &placement.device)?;
        let model = model.with_precision(placement.precision);
        let tokenizer = Tokenizer::of_checkpoint(&self.checkpoint)?;
        let prompt = tokenizer.encode(&self.prompt)?;
        let out = model.generate(&prompt, self.tokens, self.temperature, self.seed)?;
        println!("{}{}", self.prompt, tokenizer.decode(&out));
        Ok(())
    }
}

#[derive(Subcommand)]
enum Bench {
    /// SparseLoCo codec: compression ratio and throughput against memcpy.
    Codec(CodecArgs),
    /// Train the same model on the same tokens with DDP, dense DiLoCo and SparseLoCo,
    /// each as an exchange plus peers on loopback; compare loss and bytes sent.
    Convergence {
        #[command(flatten)]
        bench: ConvergenceBench,
        /// One JSON object per algorithm instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Training tokens/s and model FLOPs utilisation per preset, batch shape and thread
    /// count, against this machine's f32 matmul peak measured in the same run.
    Throughput {
        #[command(flatten)]
        bench: bench::ThroughputBench,
        /// One JSON object per row instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One model's loss on one batch on the CPU in f32 and on --device in f32 and bf16:
    /// whether a GPU computes what the CPU does, to its precision's tolerance.
    Agreement {
        #[command(flatten)]
        bench: bench::AgreementBench,
        /// One JSON object per device and precision instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A scored federation with four honest peers and one adversary of each kind in
    /// turn: when scoring excluded it, and its cost to the model.
    Adversaries {
        #[command(flatten)]
        bench: starling_trainer::scoring::bench::AdversaryBench,
        /// One JSON object per kind instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct CodecArgs {
    /// Tensor sizes in parameters (K, M, G suffixes).
    #[arg(long, value_delimiter = ',', value_parser = bench::parse_size, default_value = "16M,256M")]
    params: Vec<usize>,
    #[arg(long, default_value_t = 4096)]
    chunk: u32,
    /// Entries kept per chunk.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    k: Vec<u32>,
    /// Bits per value: 2, 4 or 8.
    #[arg(long, default_value_t = 2)]
    bits: u8,
    /// Timed repetitions per measurement (the best is kept).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where the compressed tensors live: on a GPU the copy to the host is measured too.
    #[arg(long, env = starling_trainer::env::DEVICE, default_value = "cpu")]
    device: DeviceChoice,
    /// One JSON object per configuration instead of a table.
    #[arg(long)]
    json: bool,
}

impl CodecArgs {
    fn into_bench(self) -> anyhow::Result<CodecBench> {
        Ok(CodecBench {
            params: self.params,
            chunk: self.chunk,
            ks: self.k,
            bits: ValueBits::try_from(self.bits)?,
            repeats: self.repeats,
            device: self.device.open()?,
        })
    }
}

impl Bench {
    fn run(self) -> anyhow::Result<()> {
        match self {
            Bench::Convergence { mut bench, json } => {
                bench.binary = std::env::current_exe()?;
                let header = bench::convergence_table_header();
                bench.run(bench::printer(json, header, bench::convergence_table_row))?;
            }
            Bench::Throughput { mut bench, json } => {
                bench.binary = std::env::current_exe()?;
                let header = bench::throughput_table_header();
                bench.run(bench::printer(json, header, bench::throughput_table_row))?;
            }
            Bench::Agreement { bench, json } => {
                let header = bench::agreement_table_header();
                bench.run(bench::printer(json, header, bench::agreement_table_row))?;
            }
            Bench::Adversaries { bench, json } => {
                use starling_trainer::scoring::bench::{
                    adversary_table_header, adversary_table_row,
                };
                bench.run(bench::printer(
                    json,
                    adversary_table_header(),
                    adversary_table_row,
                ))?;
            }
            Bench::Codec(args) => {
                let json = args.json;
                let bench = args.into_bench()?;
                let header = bench::codec_table_header();
                bench.run(bench::printer(json, header, bench::codec_table_row))?;
            }
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<ExitCode> {
    // Parsing starts no thread and reads no variable `init` writes, so the role is known
    // before rayon's threads start in `init`: glibc fixes its heap limit once threads
    // have made their own heaps.
    let command = Cli::parse().command;
    if matches!(command, Command::Exchange(_) | Command::Evaluate(_)) {
        starling_trainer::cpu::few_heaps();
    }
    starling_trainer::cpu::init();
    let service = match command {
        Command::Exchange(_) => "starling-exchange",
        Command::Evaluate(_) => "starling-evaluator",
        _ => "starling-trainer",
    };
    let _tracing = starling_trainer::trace::init(service, "info,h2=warn,tower=warn,hyper=warn");
    match command {
        Command::Train(args) => args.run()?,
        Command::Evaluate(args) => args.run()?,
        Command::Exchange(args) => return args.run(),
        Command::Init(args) => args.run()?,
        Command::Sample(args) => args.run()?,
        Command::Publish(args) => args.run()?,
        Command::Bench(bench) => bench.run()?,
        Command::Simulate(args) => args.run()?,
    }
    Ok(ExitCode::SUCCESS)
}
