use clap::Parser;

/// Starling trainer: runs in every trainer pod (and as each run's exchange).
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    Cli::parse();
}
