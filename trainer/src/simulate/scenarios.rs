//! The scenarios `simulate` knows by name. Hardware and links are stated where they are
//! defined, with where each figure comes from.

use super::{
    Bandwidth, Closing, Download, Hardware, Link, Payloads, PeerGroup, PowerCuts, Scenario,
};
use crate::codec::{CodecConfig, ValueBits};

/// Every scenario name, in the order `simulate` runs them by default.
pub const SCENARIOS: &[&str] = &[
    "covenant-72b",
    "covenant-72b-exchange",
    "covenant-72b-70-peers",
    "covenant-72b-aggregate",
    "covenant-72b-fast-links",
    "grid",
    "home-mix",
    "home-mix-all-in",
    "home-mix-deadline",
    "one-home",
];

/// The operator's default ceiling for a round (`spec.placement.roundDeadlineSeconds`).
const DEFAULT_CEILING_S: f64 = 300.0;
/// The ceiling a run whose inner steps take 20–30 minutes would set: above the spread of
/// its peers' arrivals (at 128 peers and 72B, 300 s would drop a tenth of them).
const LONG_ROUND_CEILING_S: f64 = 1800.0;

/// Dense bf16 FLOP/s without sparsity, from the vendors' data sheets.
const B200_FLOPS: f64 = 2.25e15;
const H100_FLOPS: f64 = 989e12;
const RTX_4090_FLOPS: f64 = 165e12;

/// SparseLoCo as Covenant-72B ran it: 64 of every 4096 values (1.56%), 2 bits each.
fn covenant_codec() -> CodecConfig {
    CodecConfig::new(4096, 64, ValueBits::Two).expect("top-64 of 4096 is a valid codec")
}

/// A participant in the published Covenant-72B run: 8×B200 per peer, "500 Mb/s down,
/// 110 Mb/s up" as the run's reports describe a typical participant. The MFU is the one
/// the published figures imply: 94.5% utilisation with 70 s of communication a round
/// leaves about 1200 s of compute for 30 steps × 192 × 2048 tokens of a 72B model, that is
/// 5.1e18 FLOPs ÷ 1200 s ÷ (8 × 2.25e15) ≈ 23.5%.
fn covenant_peer(count: u32) -> PeerGroup {
    PeerGroup {
        count,
        link: Link {
            up: Bandwidth::mbit(110.0),
            down: Bandwidth::mbit(500.0),
            rtt_s: 0.1,
        },
        hardware: Hardware {
            gpus: 8,
            peak_flops: B200_FLOPS,
            mfu: 0.235,
            cores: 64,
        },
        compute_spread: 0.05,
        power_cuts: None,
    }
}

/// An exchange pod on a cloud VM: 10 Gb/s each way.
const CLOUD_EXCHANGE: Link = Link {
    up: Bandwidth(10e9 / 8.0),
    down: Bandwidth(10e9 / 8.0),
    rtt_s: 0.02,
};

fn covenant(name: &str, peers: u32, payloads: Payloads, download: Download) -> Scenario {
    Scenario {
        name: name.to_owned(),
        params: 72e9,
        inner_steps: 30,
        tokens_per_step: 192.0 * 2048.0,
        codec: covenant_codec(),
        groups: vec![covenant_peer(peers)],
        exchange: CLOUD_EXCHANGE,
        exchange_cores: 16,
        heartbeat_timeout_s: 60.0,
        payloads,
        download,
        closing: Closing::adaptive(LONG_ROUND_CEILING_S),
        rounds: 20,
        seed: 0,
    }
}

/// Where a central exchange stops scaling: models of 1B, 8B and 72B parameters, 8 to 128
/// peers on Covenant's links with 8×H100 each at 40% MFU, in each payload mode.
fn grid() -> Vec<Scenario> {
    let mut out = vec![];
    for params in [1e9, 8e9, 72e9] {
        for peers in [8, 32, 128] {
            for (payloads, download) in [
                (Payloads::Exchange, Download::All),
                (Payloads::Storage, Download::All),
                (Payloads::Storage, Download::Gather(20)),
                (Payloads::Storage, Download::Aggregate),
            ] {
                let mut s = covenant("grid", peers, payloads, download);
                s.name = format!("grid-{}", super::si(params, ""));
                s.params = params;
                s.groups[0].hardware = Hardware {
                    gpus: 8,
                    peak_flops: H100_FLOPS,
                    mfu: 0.4,
                    cores: 64,
                };
                s.rounds = 10;
                out.push(s);
            }
        }
    }
    out
}

/// A 1B model on `clouds` cloud peers (one H100, 10 Gb/s) and `homes` homes (one RTX
/// 4090, 100 Mb/s down and 20 up, losing power about once in five hours for 30 minutes on
/// average), rounds closing as `closing` says.
fn home_mix(name: &str, clouds: u32, homes: u32, closing: Closing) -> Scenario {
    let cloud = PeerGroup {
        count: clouds,
        link: Link {
            up: Bandwidth::gbit(10.0),
            down: Bandwidth::gbit(10.0),
            rtt_s: 0.02,
        },
        hardware: Hardware {
            gpus: 1,
            peak_flops: H100_FLOPS,
            mfu: 0.4,
            cores: 16,
        },
        compute_spread: 0.05,
        power_cuts: None,
    };
    let home = PeerGroup {
        count: homes,
        link: Link {
            up: Bandwidth::mbit(20.0),
            down: Bandwidth::mbit(100.0),
            rtt_s: 0.06,
        },
        hardware: Hardware {
            gpus: 1,
            peak_flops: RTX_4090_FLOPS,
            mfu: 0.4,
            cores: 8,
        },
        compute_spread: 0.1,
        power_cuts: Some(PowerCuts {
            per_hour: 0.2,
            mean_s: 1800.0,
        }),
    };
    Scenario {
        name: name.to_owned(),
        params: 1e9,
        inner_steps: 30,
        tokens_per_step: 16.0 * 2048.0,
        codec: covenant_codec(),
        groups: vec![cloud, home],
        exchange: CLOUD_EXCHANGE,
        exchange_cores: 16,
        heartbeat_timeout_s: 60.0,
        payloads: Payloads::Exchange,
        download: Download::All,
        closing,
        rounds: 200,
        seed: 0,
    }
}

/// The scenarios called `name`, or why there are none.
pub fn scenario(name: &str) -> Result<Vec<Scenario>, String> {
    Ok(match name {
        "covenant-72b" => vec![covenant(name, 20, Payloads::Storage, Download::All)],
        "covenant-72b-70-peers" => {
            vec![covenant(name, 70, Payloads::Storage, Download::Gather(20))]
        }
        "covenant-72b-exchange" => vec![covenant(name, 20, Payloads::Exchange, Download::All)],
        "covenant-72b-aggregate" => {
            vec![covenant(name, 20, Payloads::Storage, Download::Aggregate)]
        }
        "covenant-72b-fast-links" => {
            // What the published 70 s of communication needs: 1.4 GB up and 19 × 1.4 GB
            // down in about that time.
            let mut s = covenant(name, 20, Payloads::Storage, Download::All);
            s.groups[0].link.up = Bandwidth::gbit(1.0);
            s.groups[0].link.down = Bandwidth::gbit(10.0);
            vec![s]
        }
        "grid" => grid(),
        "home-mix" => vec![home_mix(name, 12, 4, Closing::adaptive(DEFAULT_CEILING_S))],
        "home-mix-all-in" => vec![home_mix(name, 12, 4, Closing::AllIn)],
        "home-mix-deadline" => vec![home_mix(name, 12, 4, Closing::Fixed { deadline_s: 90.0 })],
        "one-home" => vec![home_mix(name, 15, 1, Closing::adaptive(DEFAULT_CEILING_S))],
        other => {
            return Err(format!(
                "no scenario {other:?}; known: {}",
                SCENARIOS.join(", ")
            ));
        }
    })
}
