//! `kubectl starling status RUN`: the one screen an SRE opens first — the run's phase and
//! progress, its loss curve drawn in the terminal, every peer (member, state, rating,
//! weight, last score), the members' health and the latest checkpoint. A pure function
//! of the objects read and `now`, so it is tested on fixed objects.

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use crate::api::{LossPoint, MemberCluster, TrainingRun, TrainingRunStatus};
use crate::k8s::condition;

/// The loss chart's size in characters.
const CHART_WIDTH: usize = 60;
const CHART_HEIGHT: usize = 10;

/// A serde enum as its wire name (`running`, `excluded`).
fn name_of<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.2} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}

fn ago(then: Timestamp, now: Timestamp) -> String {
    let s = now.duration_since(then).as_secs().max(0);
    match s {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

/// The whole screen.
pub fn render(run: &TrainingRun, members: &[MemberCluster], now: Timestamp) -> String {
    let mut out = String::new();
    let status = run.status.clone().unwrap_or_default();
    header(&mut out, run, &status);
    out.push('\n');
    out.push_str(&chart(&status.loss_history));
    out.push('\n');
    peers(&mut out, &status);
    out.push('\n');
    member_table(&mut out, members, now);
    out
}

fn header(out: &mut String, run: &TrainingRun, status: &TrainingRunStatus) {
    let phase = status
        .phase
        .map_or_else(|| "Pending".to_owned(), |p| p.to_string());
    let _ = writeln!(
        out,
        "{} ({})  {phase}  round {}/{}  loss {}  peers {}/{} running",
        run.name_any(),
        run.namespace().unwrap_or_default(),
        status.round,
        run.spec.schedule.outer_rounds,
        status.loss.as_deref().unwrap_or("-"),
        status.active_peers,
        run.spec.peers.max,
    );
    for c in &status.conditions {
        let _ = writeln!(
            out,
            "  {}={} ({}) {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    if let Some(r) = &status.last_round {
        let _ = writeln!(
            out,
            "  last round {}: closed {} with {} updates after waiting {:.1}s of a {:.1}s deadline",
            r.round, r.closed_by, r.updates, r.waited_seconds, r.deadline_seconds
        );
    }
    let _ = writeln!(
        out,
        "  bytes sent {}, received {}, compression {}",
        bytes(status.bytes_sent),
        bytes(status.bytes_received),
        status
            .compression_ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r}×"))
    );
    match status.checkpoints.last() {
        Some(c) => {
            let published = c.published.as_ref().map_or_else(String::new, |p| {
                format!(", published {}@{}", p.repo, p.revision)
            });
            let _ = writeln!(
                out,
                "  checkpoint round {} at {}{published}",
                c.round, c.location
            );
        }
        None => {
            let _ = writeln!(out, "  no checkpoint yet");
        }
    }
}

/// The loss curve: rounds across, loss up, one mark per column (the mean of the rounds
/// the column covers), the highest and lowest loss labelled.
pub fn chart(points: &[LossPoint]) -> String {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return "Loss: no round has closed yet\n".to_owned();
    };
    let (lo, hi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.loss), hi.max(p.loss))
    });
    let columns = points.len().min(CHART_WIDTH);
    let mut grid = vec![vec![' '; columns]; CHART_HEIGHT];
    for (col, row) in grid_marks(points, columns, lo, hi) {
        grid[row][col] = '●';
    }
    let mut out = format!(
        "Loss by round ({} to {}: {:.4} → {:.4})\n",
        first.round, last.round, first.loss, last.loss
    );
    for (i, line) in grid.iter().enumerate() {
        let label = match i {
            0 => format!("{hi:>8.4}"),
            i if i == CHART_HEIGHT - 1 => format!("{lo:>8.4}"),
            _ => " ".repeat(8),
        };
        let _ = writeln!(out, "{label} ┤{}", line.iter().collect::<String>());
    }
    let _ = writeln!(out, "{} └{}", " ".repeat(8), "─".repeat(columns));
    let first_label = first.round.to_string();
    let pad = (columns + 1).saturating_sub(first_label.len());
    let _ = writeln!(out, "{}  {first_label}{:>pad$}", " ".repeat(8), last.round);
    out
}

/// (column, row) of each column's mark; row 0 is the top (the highest loss).
fn grid_marks(points: &[LossPoint], columns: usize, lo: f64, hi: f64) -> Vec<(usize, usize)> {
    let span = (hi - lo).max(f64::EPSILON);
    (0..columns)
        .map(|col| {
            let start = col * points.len() / columns;
            let end = ((col + 1) * points.len() / columns).max(start + 1);
            let slice = &points[start..end];
            let mean = slice.iter().map(|p| p.loss).sum::<f64>() / slice.len() as f64;
            let height = ((mean - lo) / span * (CHART_HEIGHT - 1) as f64).round() as usize;
            (col, CHART_HEIGHT - 1 - height.min(CHART_HEIGHT - 1))
        })
        .collect()
}

fn peers(out: &mut String, status: &TrainingRunStatus) {
    let _ = writeln!(
        out,
        "{:<5} {:<14} {:<9} {:>7} {:>7} {:>11} {:<9} REASON",
        "PEER", "MEMBER", "STATE", "RATING", "WEIGHT", "LAST SCORE", "STANDING"
    );
    for p in &status.peers {
        let _ = writeln!(
            out,
            "{:<5} {:<14} {:<9} {:>7} {:>7} {:>11} {:<9} {}",
            p.id.to_string(),
            if p.member.is_empty() { "-" } else { &p.member },
            name_of(&p.state),
            or_dash(p.rating.map(|r| format!("{r:.1}"))),
            or_dash(p.weight.map(|w| format!("{w:.3}"))),
            or_dash(p.last_score.map(|s| format!("{s:.4}"))),
            or_dash(p.standing.as_ref().map(name_of)),
            p.reason.as_deref().unwrap_or(""),
        );
    }
}

fn member_table(out: &mut String, members: &[MemberCluster], now: Timestamp) {
    let _ = writeln!(
        out,
        "{:<14} {:<6} {:<8} {:<6} {:<10} {:>5} CREDENTIALS",
        "MEMBER", "TIER", "REGION", "READY", "HEARTBEAT", "GPUS"
    );
    for m in members {
        let status = m.status.clone().unwrap_or_default();
        let holds = |kind: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == kind)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        let ready = holds(condition::READY).map_or_else(|| "-".to_owned(), |(s, _)| s);
        let credentials = match (holds(condition::CREDENTIALS), &status.credentials_expire) {
            (Some((_, reason)), Some(t)) => format!("{reason} (expires {})", t.0),
            (Some((_, reason)), None) => reason,
            (None, _) => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<14} {:<6} {:<8} {:<6} {:<10} {:>5} {credentials}",
            m.name_any(),
            m.spec.tier.to_string(),
            m.spec.region,
            ready,
            status
                .last_heartbeat
                .as_ref()
                .map_or_else(|| "never".to_owned(), |t| ago(t.0, now)),
            format!("{}/{}", status.gpus_in_use, status.gpus_allocatable),
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_765_000_000 + s).unwrap()
    }

    fn run() -> TrainingRun {
        let yaml = include_str!("../../crds/samples/trainingrun-shakespeare.yaml");
        let mut run: TrainingRun = serde_yaml::from_str(yaml).unwrap();
        run.metadata.namespace = Some("default".into());
        run.status = Some(
            serde_json::from_value(json!({
                "phase": "Running", "round": 12, "loss": "2.413", "activePeers": 2,
                "bytesSent": 3_100_000, "bytesReceived": 9_400_000, "compressionRatio": 179.0,
                "lossHistory": (0..=12).map(|r| json!({"round": r, "loss": 5.576 - f64::from(r) * 0.263})).collect::<Vec<_>>(),
                "peers": [
                    {"id": "p0", "member": "cloud-eu", "state": "Running", "rating": 27.31,
                     "weight": 0.5, "lastScore": 0.0123, "standing": "Active"},
                    {"id": "p1", "member": "home-lagos", "state": "Excluded",
                     "standing": "Excluded", "reason": "sign-flipped update"},
                ],
                "checkpoints": [{"round": 12, "location": "exchange:/data/ckpt-12",
                    "time": "2025-12-06T06:00:00Z"}],
            }))
            .unwrap(),
        );
        run
    }

    fn member() -> MemberCluster {
        serde_json::from_value(json!({
            "apiVersion": "starling.dev/v1alpha1", "kind": "MemberCluster",
            "metadata": {"name": "home-lagos"},
            "spec": {"tier": "home", "region": "lagos",
                "bandwidth": {"uploadMbps": 20, "downloadMbps": 20}},
            "status": {"lastHeartbeat": at(-4).to_string(), "gpusAllocatable": 1, "gpusInUse": 1,
                "credentialsExpire": at(86_400).to_string(),
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "HeartbeatReceived",
                     "message": "", "lastTransitionTime": at(-60).to_string()},
                    {"type": "Credentials", "status": "True", "reason": "CredentialsValid",
                     "message": "", "lastTransitionTime": at(-60).to_string()}]},
        }))
        .unwrap()
    }

    #[test]
    fn the_status_screen_shows_progress_the_curve_peers_members_and_the_checkpoint() {
        let screen = render(&run(), &[member()], at(0));
        let lines: Vec<&str> = screen.lines().collect();
        assert!(
            lines[0].starts_with("shakespeare (default)  Running  round 12/"),
            "{screen}"
        );
        assert!(lines[0].contains("loss 2.413  peers 2/"), "{screen}");
        assert!(screen.contains("compression 179×"), "{screen}");
        assert!(
            screen.contains("checkpoint round 12 at exchange:/data/ckpt-12"),
            "{screen}"
        );
        assert!(
            screen.contains("Loss by round (0 to 12: 5.5760 → 2.4200)"),
            "{screen}"
        );
        let peer = lines.iter().find(|l| l.starts_with("p1 ")).unwrap();
        assert!(
            peer.contains("home-lagos") && peer.contains("Excluded"),
            "{peer}"
        );
        assert!(peer.ends_with("sign-flipped update"), "{peer}");
        let member = lines.iter().find(|l| l.starts_with("home-lagos ")).unwrap();
        assert!(member.contains("True") && member.contains("4s ago") && member.contains("1/1"));
        assert!(member.contains("CredentialsValid (expires"), "{member}");
    }

    #[test]
    fn a_falling_loss_is_drawn_from_the_top_left_to_the_bottom_right() {
        let points: Vec<LossPoint> = (0..200)
            .map(|r| LossPoint {
                round: r,
                loss: 6.0 - f64::from(r) / 50.0,
            })
            .collect();
        let chart = chart(&points);
        let rows: Vec<&str> = chart.lines().skip(1).take(CHART_HEIGHT).collect();
        let mark = |row: &str| row.chars().skip(10).position(|c| c == '●');
        assert_eq!(mark(rows[0]), Some(0), "{chart}");
        assert_eq!(
            rows[CHART_HEIGHT - 1]
                .chars()
                .skip(10)
                .collect::<Vec<_>>()
                .last(),
            Some(&'●'),
            "{chart}"
        );
        assert!(rows[0].starts_with("  6.0000 ┤"), "{chart}");
        assert_eq!(
            chart.lines().filter(|l| l.contains('●')).count(),
            CHART_HEIGHT
        );
        assert_eq!(super::chart(&[]), "Loss: no round has closed yet\n");
    }
}
