use clap::{Parser, Subcommand};

/// Starling's local control plane and demo: a whole federation on one machine.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub and three member clusters locally and train the Shakespeare sample.
    Demo,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Command::Demo => {
            eprintln!(
                "starling-e2e demo: not yet available. The local control plane, trainer and \
                 operator it needs are being built; see README.md for what works today."
            );
            std::process::ExitCode::from(2)
        }
    }
}
