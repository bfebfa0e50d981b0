//! `starling-operator ledger verify` as a user runs it on a checkpoint directory.

use std::collections::BTreeMap;
use std::process::Command;

use starling_operator::api::{PeerId, ScoringSpec};
use starling_trainer::outer::Round;
use starling_trainer::scoring::ledger::{Draft, EvaluatorReport, Signer};
use starling_trainer::scoring::rules::{Evaluation, Measured, Scoring};

fn verify(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_starling-operator"))
        .args(["ledger", "verify"])
        .args(args)
        .output()
        .expect("the operator binary runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn ledger_verify_checks_a_checkpoint_directory_and_names_the_bad_record() {
    let signer = Signer::from_pkcs8(&Signer::generate().unwrap()).unwrap();
    let constants = ScoringSpec::default();
    let (mut lines, mut state) = (Vec::<String>::new(), Scoring::default());
    for r in 0..3 {
        let measured: BTreeMap<PeerId, Measured> = (0..3)
            .map(|i| {
                let score = 0.01 * f64::from(i + 1);
                let e = Evaluation {
                    score,
                    own_score: score * 2.0,
                    sync_distance: 0.1,
                    copy: None,
                };
                (PeerId::new(i), Measured::Evaluated(e))
            })
            .collect();
        let draft = Draft {
            run: "default/demo",
            round: Round(r),
            theta: "00",
            constants: &constants,
            evaluators: vec![EvaluatorReport {
                evaluator: "e0".into(),
                round: Round(r),
                theta: String::new(),
                seed: "ab".into(),
                measured,
                public_key: String::new(),
                signature: String::new(),
            }],
        };
        let (record, after) = draft.record(lines.last().map(|l| (l.as_str(), &state)));
        lines.push(signer.sign(&record));
        state = after;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("round-000003");
    std::fs::create_dir(&checkpoint).unwrap();
    std::fs::write(checkpoint.join("ledger.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::write(checkpoint.join("ledger.pub"), signer.public_key() + "\n").unwrap();
    let path = checkpoint.to_str().unwrap();

    let (ok, text) = verify(&[path]);
    assert!(ok, "{text}");
    assert!(
        text.contains("3 records, rounds 0 to 2, every one signed, chained and replayed"),
        "{text}"
    );
    let head = text.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(verify(&[path, "--head", &head]).0);
    let (ok, text) = verify(&[path, "--head", &"0".repeat(64)]);
    assert!(!ok && text.contains("records are missing"), "{text}");

    lines[1] = lines[1].replacen("\"score\":0.02", "\"score\":0.03", 1);
    std::fs::write(checkpoint.join("ledger.jsonl"), lines.join("\n")).unwrap();
    let (ok, text) = verify(&[path]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("record 2 (round 1)") && text.contains("signature does not verify"),
        "{text}"
    );
    let (ok, text) = verify(&[dir.path().join("nowhere").to_str().unwrap()]);
    assert!(!ok && text.contains("reading"), "{text}");
}
