use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::{Parser, Subcommand};
use starling_trainer::bench::{self, CodecBench};
use starling_trainer::codec::ValueBits;
use starling_trainer::data::Tokenizer;
use starling_trainer::model::{Llama, ModelConfig, load_checkpoint, save_checkpoint};

/// Starling trainer: runs in every trainer pod (and as each run's exchange).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a freshly initialised model as a checkpoint (round 0 of a run).
    Init {
        /// Model architecture: a Hugging Face `config.json` for LlamaForCausalLM.
        #[arg(long, env = "STARLING_MODEL_CONFIG")]
        config: PathBuf,
        /// Initialisation seed (the run's seed: every peer derives the same weights).
        #[arg(long, env = "STARLING_SEED", default_value_t = 0)]
        seed: u64,
        /// Checkpoint directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text from a checkpoint.
    Sample {
        #[arg(long, env = "STARLING_CHECKPOINT")]
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
    },
    /// Benchmarks; each prints a table, or JSON lines with --json.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Subcommand)]
enum Bench {
    /// SparseLoCo codec: compression ratio and throughput against memcpy.
    Codec {
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
        /// One JSON object per configuration instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Init { config, seed, out } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let config: ModelConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a model config", config.display()))?;
            let model = Llama::new(config, seed, &Device::Cpu)?;
            let meta = serde_json::json!({"round": 0, "seed": seed, "tokenizer": "bytes"});
            save_checkpoint(&out, &model, &meta)?;
            println!(
                "wrote {} ({} parameters)",
                out.display(),
                model.parameter_count()
            );
        }
        Command::Sample {
            checkpoint,
            prompt,
            tokens,
            temperature,
            seed,
        } => {
            let (model, meta) = load_checkpoint(&checkpoint, &Device::Cpu)?;
            let tokenizer = Tokenizer::from_spec(meta["tokenizer"].as_str().unwrap_or("bytes"))?;
            let out = model.generate(&tokenizer.encode(&prompt), tokens, temperature, seed)?;
            println!("{prompt}{}", tokenizer.decode(&out));
        }
        Command::Bench(Bench::Codec {
            params,
            chunk,
            k,
            bits,
            repeats,
            json,
        }) => {
            let bench = CodecBench {
                params,
                chunk,
                ks: k,
                bits: ValueBits::try_from(bits)?,
                repeats,
            };
            let mut stdout = std::io::stdout().lock();
            if !json {
                writeln!(stdout, "{}", bench::codec_table_header())?;
            }
            bench.run(|row| {
                let line = if json {
                    serde_json::to_string(row).expect("rows serialise")
                } else {
                    bench::codec_table_row(row)
                };
                // Printed as each configuration finishes: large ones take a while.
                let _ = writeln!(stdout, "{line}");
                let _ = stdout.flush();
            })?;
        }
    }
    Ok(())
}
