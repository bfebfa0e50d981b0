//! OpenSkill's Plackett–Luce rating update (Weng & Lin 2011, Algorithm 4) for one match
//! between single peers, computed as the `openskill` Python package (6.2.0) computes it,
//! the package Templar's Gauntlet rates miners with.
//!
//! Written here because no Rust crate follows the package where it matters:
//! * τ inflates every σ (`σ² + τ²`) *before* the update, and the μ step uses that σ;
//! * tied peers share a rank (`1 +` the number of strictly higher scores) and are *not*
//!   pulled to the mean μ change of their tie group (the package's averaging is a no-op:
//!   it compares each updated rating with itself).
//!
//! A test checks this against the package on random matches (`tests/openskill_reference.py`).

use serde::{Deserialize, Serialize};

use super::OpenSkillSpec;

/// A peer's skill belief: mean μ and uncertainty σ.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    pub mu: f64,
    pub sigma: f64,
}

impl Rating {
    /// The rating a newcomer starts from.
    pub fn initial(model: &OpenSkillSpec) -> Self {
        Self {
            mu: model.mu,
            sigma: model.sigma,
        }
    }

    /// The conservative skill estimate `μ − 3σ` ranks and weights are built on: a peer
    /// must be both good and known to rank high.
    pub fn ordinal(&self) -> f64 {
        self.mu - 3.0 * self.sigma
    }
}

/// The ratings after one match in which player `i` (rating `players[i].0`) scored
/// `players[i].1` (higher is better; equal scores tie). With fewer than two players
/// nobody is compared, and the ratings come back unchanged.
pub fn rate(model: &OpenSkillSpec, players: &[(Rating, f64)]) -> Vec<Rating> {
    if players.len() < 2 {
        return players.iter().map(|(r, _)| *r).collect();
    }
    let sigma_sq: Vec<f64> = players
        .iter()
        .map(|(r, _)| r.sigma * r.sigma + model.tau * model.tau)
        .collect();
    // rank = number of strictly higher scores (0 = best); ties share a rank.
    let rank: Vec<usize> = players
        .iter()
        .map(|(_, s)| players.iter().filter(|(_, o)| o > s).count())
        .collect();
    let c = sigma_sq
        .iter()
        .map(|s| s + model.beta * model.beta)
        .sum::<f64>()
        .sqrt();
    let strength: Vec<f64> = players.iter().map(|(r, _)| (r.mu / c).exp()).collect();
    // For each q: the total strength of everyone ranked at or below q, and q's tie count.
    let sum_q: Vec<f64> = (0..players.len())
        .map(|q| {
            (0..players.len())
                .filter(|&i| rank[i] >= rank[q])
                .map(|i| strength[i])
                .sum()
        })
        .collect();
    let ties: Vec<f64> = (0..players.len())
        .map(|q| rank.iter().filter(|&&r| r == rank[q]).count() as f64)
        .collect();
    (0..players.len())
        .map(|i| {
            let (mut omega, mut delta) = (0.0, 0.0);
            for q in (0..players.len()).filter(|&q| rank[q] <= rank[i]) {
                let p = strength[i] / sum_q[q];
                delta += p * (1.0 - p) / ties[q];
                omega += (if q == i { 1.0 - p } else { -p }) / ties[q];
            }
            let s2 = sigma_sq[i];
            let gamma = s2.sqrt() / c;
            omega *= s2 / c;
            delta *= s2 / (c * c) * gamma;
            Rating {
                mu: players[i].0.mu + omega,
                sigma: s2.sqrt() * (1.0 - delta).max(model.kappa).sqrt(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> OpenSkillSpec {
        OpenSkillSpec::default()
    }

    fn fresh(n: usize) -> Vec<Rating> {
        vec![Rating::initial(&model()); n]
    }

    #[test]
    fn the_winner_rises_the_loser_falls_and_both_grow_surer() {
        let r = fresh(2);
        let after = rate(&model(), &[(r[0], 1.0), (r[1], 0.0)]);
        assert!(after[0].mu > 25.0 && after[1].mu < 25.0, "{after:?}");
        assert!((after[0].mu - 25.0 + (after[1].mu - 25.0)).abs() < 1e-12);
        assert!(after.iter().all(|a| a.sigma < 25.0 / 3.0));
    }

    #[test]
    fn a_match_of_one_changes_nothing() {
        let r = fresh(1);
        assert_eq!(rate(&model(), &[(r[0], 5.0)]), r);
        assert_eq!(rate(&model(), &[]), vec![]);
    }

    #[test]
    fn tied_equals_stay_equal_and_tied_unequals_are_not_averaged() {
        let r = fresh(3);
        let after = rate(&model(), &[(r[0], 1.0), (r[1], 1.0), (r[2], 0.0)]);
        assert_eq!(after[0], after[1]);
        let strong = Rating {
            mu: 30.0,
            sigma: 5.0,
        };
        let weak = Rating {
            mu: 20.0,
            sigma: 6.0,
        };
        let after = rate(&model(), &[(strong, 1.0), (weak, 1.0), (r[2], 0.5)]);
        // The weak peer gains more from tying the strong one than the strong one does.
        assert!(after[1].mu - 20.0 > after[0].mu - 30.0 + 0.1, "{after:?}");
    }

    /// Runs the `openskill` package (named by `STARLING_PYTHON`; required under `CI`) on
    /// the same random matches, ties and −99s included.
    #[test]
    fn agrees_with_the_openskill_python_package() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let Some(python) = std::env::var_os("STARLING_PYTHON") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set STARLING_PYTHON"
            );
            eprintln!("STARLING_PYTHON not set: skipped the openskill comparison");
            return;
        };
        let mut rng = StdRng::seed_from_u64(7);
        let mut matches = Vec::new();
        for m in 0..300 {
            let mut model = model();
            if m % 3 == 1 {
                model = OpenSkillSpec {
                    beta: 25.0 / 6.0,
                    tau: 25.0 / 300.0,
                    ..model
                };
            }
            let players: Vec<(Rating, f64)> = (0..rng.random_range(2..=12))
                .map(|_| {
                    let r = Rating {
                        mu: rng.random_range(-10.0..60.0),
                        sigma: rng.random_range(0.05..10.0),
                    };
                    let score = match rng.random_range(0..5) {
                        0 => -99.0,
                        1 => f64::from(rng.random_range(0..3u8)) / 100.0, // ties
                        _ => rng.random_range(-0.05..0.1),
                    };
                    (r, score)
                })
                .collect();
            matches.push((model, players));
        }
        let json: Vec<serde_json::Value> = matches
            .iter()
            .map(|(m, players)| {
                let players: Vec<_> = players
                    .iter()
                    .map(|(r, s)| serde_json::json!({"mu": r.mu, "sigma": r.sigma, "score": s}))
                    .collect();
                serde_json::json!({
                    "model": {"mu": m.mu, "sigma": m.sigma, "beta": m.beta, "tau": m.tau, "kappa": m.kappa},
                    "players": players,
                })
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("matches.json");
        std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openskill_reference.py");
        let out = std::process::Command::new(python)
            .arg(script)
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Vec<Vec<(f64, f64)>> = serde_json::from_slice(&out.stdout).unwrap();
        let mut worst = 0.0f64;
        for ((m, players), theirs) in matches.iter().zip(&theirs) {
            let ours = rate(m, players);
            for (o, (mu, sigma)) in ours.iter().zip(theirs) {
                for (a, b) in [(o.mu, *mu), (o.sigma, *sigma)] {
                    let err = (a - b).abs() / b.abs().max(1.0);
                    worst = worst.max(err);
                    assert!(err < 1e-9, "{players:?}: ours {ours:?}, theirs {theirs:?}");
                }
            }
        }
        eprintln!(
            "{} matches agree with openskill 6.2.0; worst relative difference {worst:e}",
            matches.len()
        );
    }

    #[test]
    fn tau_keeps_sigma_from_collapsing_over_many_rounds() {
        let mut r = fresh(4);
        for _ in 0..500 {
            let players: Vec<_> = r.iter().enumerate().map(|(i, r)| (*r, i as f64)).collect();
            r = rate(&model(), &players);
        }
        assert!(
            r.iter().all(|r| r.sigma > 0.05 && r.sigma.is_finite()),
            "{r:?}"
        );
        assert!(r[3].ordinal() > r[0].ordinal());
    }
}
