use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: ConvergenceBench,
}

fn bench(args: &[&str]) -> ConvergenceBench {
    Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
        .unwrap()
        .bench
}

#[test]
fn without_a_sweep_each_algorithm_runs_once_on_the_same_tokens() {
    let flags = ["--rounds", "12", "--inner-steps", "20"];
    let runs = bench(&[&flags[..], &["--algorithms", "sparseloco,ddp"]].concat())
        .runs()
        .unwrap();
    let shape: Vec<_> = (runs.iter())
        .map(|(a, s)| (*a, s.inner_steps, s.rounds, s.outer_lr))
        .collect();
    assert_eq!(
        shape,
        [
            (Algorithm::Ddp, 1, 240, 1.0),
            (Algorithm::SparseLoCo, 20, 12, 2.0)
        ]
    );
    assert_eq!(runs[1].1.outer_momentum, None, "SparseLoCo has no momentum");
}

#[test]
fn a_grid_runs_every_combination_and_each_run_once() {
    let b = bench(&[
        "--rounds",
        "12",
        "--inner-steps",
        "20",
        "--sweep",
        "inner-steps=10,20",
        "--sweep",
        "outer-momentum=0,0.9",
    ]);
    let runs = b.runs().unwrap();
    let count = |a| runs.iter().filter(|(x, _)| *x == a).count();
    // DDP uses neither setting; SparseLoCo not the momentum; DiLoCo both.
    assert_eq!(count(Algorithm::Ddp), 1);
    assert_eq!(count(Algorithm::SparseLoCo), 2);
    assert_eq!(count(Algorithm::DiLoCo), 4);
    for (_, s) in &runs {
        assert_eq!(s.inner_steps * s.rounds, 240, "{s:?} trains other tokens");
    }
    let lrs = bench(&["--sweep", "lr=1e-3,3e-3", "--algorithms", "ddp"]).runs();
    assert_eq!(lrs.unwrap().len(), 2, "DDP runs once per learning rate");
}

#[test]
fn sweep_values_that_break_the_token_budget_or_do_not_parse_are_refused() {
    let err = bench(&["--rounds", "24", "--sweep", "inner-steps=7"])
        .runs()
        .unwrap_err();
    assert!(
        err.contains("does not divide the token budget's 240 steps"),
        "{err}"
    );
    for bad in ["lr", "lr=fast", "momentum=0.9"] {
        let err = Cli::try_parse_from(["bench", "--sweep", bad])
            .err()
            .unwrap();
        assert!(err.to_string().contains("--sweep"), "{bad}: {err}");
    }
}
