use super::*;
use crate::codec::ValueBits;

const N: u32 = 4;
const PARAMS: f64 = 1e6;
/// fp32 bytes of the model, what the codec reads and writes.
const DENSE: f64 = PARAMS * 4.0;
/// One bit per parameter.
const U: f64 = PARAMS / 8.0;
const RTT: f64 = 0.01;

fn codec() -> Codec {
    Codec {
        bits_per_param: 1.0,
        aggregate_bits_per_param: 2.5,
        compress_per_core: Bandwidth::bytes(1e9),
        decode_per_core: Bandwidth::bytes(2e9),
        check_per_core: Bandwidth::bytes(1e8),
    }
}

/// `N` identical peers (no spread, no power cuts) and an exchange whose ingress is the
/// bottleneck for uploads: every time in a round has a closed form.
fn identical(payloads: Payloads, download: Download) -> Scenario {
    Scenario {
        name: "closed-form".into(),
        params: PARAMS,
        inner_steps: 2,
        tokens_per_step: 1000.0,
        codec: CodecConfig::new(4096, 64, ValueBits::Two).unwrap(),
        groups: vec![PeerGroup {
            count: N,
            link: Link {
                up: Bandwidth::bytes(1e6),
                down: Bandwidth::bytes(4e6),
                rtt_s: RTT,
            },
            hardware: Hardware {
                gpus: 1,
                peak_flops: 1e12,
                mfu: 0.5,
                cores: 2,
            },
            compute_spread: 0.0,
            power_cuts: None,
        }],
        exchange: Link {
            up: Bandwidth::bytes(4e6),
            down: Bandwidth::bytes(2e6),
            rtt_s: RTT,
        },
        exchange_cores: 1,
        heartbeat_timeout_s: 1.0,
        payloads,
        download,
        closing: Closing::AllIn,
        rounds: 5,
        seed: 7,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The parts of a round every mode shares: inner steps, compressing, and the exchange
/// checking then applying `N` updates one after another.
fn shared_parts() -> (f64, f64, f64) {
    let compute = 6.0 * PARAMS * 1000.0 * 2.0 / (1e12 * 0.5);
    let compress = DENSE / (1e9 * 2.0);
    let exchange = f64::from(N) * (U / 1e8 + DENSE / 2e9);
    (compute, compress, exchange)
}

#[test]
fn a_round_through_the_exchange_takes_its_closed_form_time() {
    let row = identical(Payloads::Exchange, Download::All).simulate(&codec());
    let (compute, compress, exchange) = shared_parts();
    // Four uploads share 2 MB/s of ingress; each download (3 updates) is capped by the
    // peer's 4 MB/s link but four share 4 MB/s of egress.
    let upload = U / (2e6 / 4.0);
    let download = 3.0 * U / (4e6 / 4.0);
    let decode = 3.0 * DENSE / (2e9 * 2.0);
    let round = compute + compress + RTT + upload + exchange + RTT + download + decode;
    assert!(close(row.round_s, round), "{} vs {round}", row.round_s);
    assert!(close(row.compute_s, compute));
    assert!(close(row.upload_s, upload));
    assert!(close(row.download_s, download));
    assert!(close(row.codec_s, compress + decode));
    assert!(close(row.wait_s, 2.0 * RTT + exchange), "{}", row.wait_s);
    assert!(close(row.publish_s, f64::from(N) * DENSE / 2e9));
    assert!(close(row.utilisation, compute / round));
    assert!(close(row.exchange_ingress_bytes, 4.0 * U));
    assert!(close(row.exchange_egress_bytes, 4.0 * 3.0 * U));
    assert_eq!(row.storage_egress_bytes, 0.0);
    assert_eq!((row.accepted, row.aggregated, row.lost), (4.0, 4.0, 0.0));
}

#[test]
fn with_object_storage_only_the_peers_own_links_limit_their_transfers() {
    let row = identical(Payloads::Storage, Download::All).simulate(&codec());
    let (compute, compress, exchange) = shared_parts();
    let upload = U / 1e6;
    // The exchange fetches the four updates at once through its 2 MB/s ingress.
    let fetch = U / (2e6 / 4.0);
    let download = 3.0 * U / 4e6;
    let decode = 3.0 * DENSE / (2e9 * 2.0);
    let round = compute + compress + RTT + upload + fetch + exchange + RTT + download + decode;
    assert!(close(row.round_s, round), "{} vs {round}", row.round_s);
    assert!(close(row.download_s, download));
    assert_eq!(row.exchange_egress_bytes, 0.0);
    assert!(close(row.exchange_ingress_bytes, 4.0 * U));
    assert!(close(row.storage_ingress_bytes, 4.0 * U));
    // Each update leaves storage once for the exchange and three times for peers.
    assert!(close(row.storage_egress_bytes, 4.0 * U + 4.0 * 3.0 * U));
}

#[test]
fn gathering_bounds_each_peers_download_and_the_aggregate_makes_it_one_object() {
    let mut gather = identical(Payloads::Storage, Download::Gather(2));
    gather.groups[0].count = 8;
    let row = gather.simulate(&codec());
    // The two peers in the aggregate set fetch the other one; the six others fetch two.
    assert!(close(
        row.download_per_peer_bytes,
        (2.0 * 1.0 + 6.0 * 2.0) / 8.0 * U
    ));
    assert_eq!((row.accepted, row.aggregated), (8.0, 2.0));

    let mut aggregate = identical(Payloads::Storage, Download::Aggregate);
    aggregate.groups[0].count = 8;
    let row = aggregate.simulate(&codec());
    // One aggregate of 2.5 bits per parameter, whatever the number of peers.
    assert!(close(row.download_per_peer_bytes, 2.5 * U));
    assert_eq!(row.aggregated, 8.0);
    // The exchange uploads the aggregate once; nothing else leaves it.
    assert!(close(row.exchange_egress_bytes, 2.5 * U));
}

#[test]
fn a_deadline_closes_the_round_without_the_peers_that_miss_it() {
    let mut s = identical(Payloads::Exchange, Download::All);
    let mut slow = s.groups[0].clone();
    slow.count = 2;
    slow.hardware.mfu = 0.005; // 100× slower: 2.4 s of inner steps
    s.groups.push(slow);
    s.closing = Closing::Fixed { deadline_s: 1.0 };
    s.rounds = 6;
    let row = s.simulate(&codec());
    // One second after each round's first update, the fast peers' round trip around it.
    assert!((1.0..2.4).contains(&row.round_s), "{}", row.round_s);
    assert_eq!(row.closed_deadline, 1.0);
    assert_eq!(row.accepted, 4.0);
    // Each slow peer's update spans more than one round and is refused at the end.
    assert!((0.5..=2.0).contains(&row.lost), "{}", row.lost);
}

#[test]
fn a_peer_that_loses_power_is_dropped_and_the_run_goes_on() {
    let mut s = identical(Payloads::Exchange, Download::All);
    let mut home = s.groups[0].clone();
    home.count = 1;
    // A cut every 2 s on average, lasting 1 s: most rounds lose the home's update.
    home.power_cuts = Some(PowerCuts {
        per_hour: 1800.0,
        mean_s: 1.0,
    });
    s.groups.push(home);
    s.rounds = 40;
    let row = s.simulate(&codec());
    assert!(row.round_s.is_finite());
    assert!(
        row.accepted < 5.0 && row.accepted >= 4.0,
        "{}",
        row.accepted
    );
    assert!(row.lost > 0.0);
    // Rejoining costs a fetch of the fp32 state through the exchange.
    let steady = identical(Payloads::Exchange, Download::All).simulate(&codec());
    assert!(row.exchange_egress_bytes > steady.exchange_egress_bytes);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let mut s = identical(Payloads::Exchange, Download::All);
    s.groups[0].compute_spread = 0.2;
    let a = s.simulate(&codec());
    let b = s.simulate(&codec());
    assert_eq!(a.round_s, b.round_s);
    s.seed += 1;
    assert_ne!(s.simulate(&codec()).round_s, a.round_s);
}

#[test]
fn every_named_scenario_exists_and_an_unknown_name_lists_them() {
    for name in SCENARIOS {
        assert!(!scenario(name).expect(name).is_empty());
    }
    let err = scenario("covenant").unwrap_err();
    assert!(err.contains("covenant-72b-aggregate"), "{err}");
}

#[test]
fn sizes_print_as_people_read_them() {
    assert_eq!(si(72e9, ""), "72G");
    assert_eq!(si(1.4e9, "B"), "1.4GB");
    assert_eq!(si(562e9, "B"), "562GB");
    assert_eq!(si(0.0, "B"), "0B");
}

#[test]
fn paced_adaptively_a_round_closes_at_the_quorum_without_a_peer_that_is_always_late() {
    let mut s = identical(Payloads::Exchange, Download::All);
    s.groups[0].count = 10;
    let mut slow = s.groups[0].clone();
    slow.count = 1;
    slow.hardware.mfu = 0.005; // 100× slower: 2.4 s of inner steps
    s.groups.push(slow);
    s.closing = Closing::Adaptive {
        floor_s: 0.5,
        ceiling_s: 100.0,
        quorum: 0.75,
    };
    s.rounds = 30;
    // An exchange fast enough that the peers' own links set the pace.
    s.exchange.up = Bandwidth::bytes(1e9);
    s.exchange.down = Bandwidth::bytes(1e9);
    let row = s.simulate(&codec());
    // Once the slow peer's lateness is known the fast ten mostly stop waiting for it
    // (when its own schedule brings it in before the deadline, the deadline closes).
    assert!(row.closed_quorum > 0.6, "{row:?}");
    assert!(row.round_s < 1.0, "{}", row.round_s);
    assert_eq!(row.accepted, 10.0 + row.closed_all_in);

    // Waiting for everyone instead makes every round as slow as the slow peer.
    s.closing = Closing::AllIn;
    let all_in = s.simulate(&codec());
    assert_eq!(all_in.closed_all_in, 1.0);
    assert!(all_in.round_s > 2.4, "{}", all_in.round_s);
}
