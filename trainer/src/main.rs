use std::io::Write;

use clap::{Parser, Subcommand};
use starling_trainer::bench::{self, CodecBench};
use starling_trainer::codec::ValueBits;

/// Starling trainer: runs in every trainer pod (and as each run's exchange).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
