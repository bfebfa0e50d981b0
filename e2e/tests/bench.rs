//! The operator benchmark, small: a few runs over a few members, checking that what it
//! reports is sane (the numbers themselves are for people, not assertions).

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

use std::path::PathBuf;

use starling_e2e::bench::{BenchOptions, operator};

fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_operator_reports_sane_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = BenchOptions::new(3, 4);
    opts.json = true;
    opts.heartbeat_seconds = 1;
    opts.heartbeat_grace = 3;
    opts.settle_seconds = 1;
    opts.window_seconds = 3;
    opts.timeout_seconds = 45;
    opts.dir = Some(dir.path().to_path_buf());
    let report = operator(&opts, &exe_dir()).await.unwrap();

    assert_eq!(
        (report.runs, report.members, report.peers_per_run),
        (3, 4, 3)
    );
    assert!(report.place_p50_ms > 0.0, "{report:?}");
    assert!(report.place_p50_ms <= report.place_p99_ms, "{report:?}");
    assert!(report.place_p99_ms <= report.place_max_ms, "{report:?}");
    assert!(report.placement_requests > 0, "{report:?}");
    assert!(report.steady_requests_per_s >= 0.0, "{report:?}");
    let by_request: f64 = report.steady_by_request.values().sum();
    assert!(
        (by_request - report.steady_requests_per_s).abs() < 0.1,
        "{report:?}"
    );
    // A fleet at rest costs the leader's Lease and nothing per run.
    assert!(
        report
            .steady_by_request
            .keys()
            .all(|k| k.ends_with(" leases")),
        "{report:?}"
    );
    let per_run: f64 = report.placement_requests_per_run.values().sum();
    assert!(
        (per_run * 3.0 - report.placement_requests as f64).abs() < 0.1,
        "{report:?}"
    );
    // Every run spreads 3 peers over 4 members, so the busiest member hosts them all.
    assert_eq!(report.replaced_runs, 3, "{report:?}");
    let (p50, p99) = (
        report.replace_p50_ms.unwrap(),
        report.replace_p99_ms.unwrap(),
    );
    assert!(p50 <= p99, "{report:?}");
    // Re-placement waits for the grace to pass without a heartbeat.
    assert!(report.not_ready_ms >= 1000.0, "{report:?}");
    assert!(p99 >= report.not_ready_ms - 1000.0, "{report:?}");
    assert!(
        report.replace_from_not_ready_p99_ms.unwrap() <= p99,
        "{report:?}"
    );
    assert!(
        report.operator_rss_mb > 1.0 && report.operator_rss_mb < 4096.0,
        "{report:?}"
    );
    assert!(
        report.operator_rss_end_mb <= report.operator_rss_mb,
        "{report:?}"
    );
    let json = serde_json::to_value(&report).unwrap();
    for field in [
        "runs",
        "members",
        "place_p50_ms",
        "place_p99_ms",
        "replace_p99_ms",
        "steady_requests_per_s",
        "operator_rss_mb",
    ] {
        assert!(json.get(field).is_some(), "{field} missing from {json}");
    }
}
