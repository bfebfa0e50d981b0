//! Publishing, case by case: which publisher Job exists, what the status records of each
//! commit, and when the run is `Publishing` rather than `Succeeded`.

use super::*;

/// The sample run publishing to `acme/tiny`, with `every`.
fn publishing_run(every: u32) -> TrainingRun {
    let mut run = run();
    run.spec.publish = Some(
        serde_json::from_value(json!({"repo": "acme/tiny",
            "tokenSecretRef": {"name": "hf"}, "every": every}))
        .unwrap(),
    );
    run
}

fn reported(round: u32, error: &str, failures: u32) -> proto::Publication {
    let ok = error.is_empty();
    proto::Publication {
        round,
        repo: if ok {
            "acme/tiny".into()
        } else {
            String::new()
        },
        revision: if ok {
            format!("round-{round}")
        } else {
            String::new()
        },
        commit: if ok {
            "c0ffee".repeat(7)[..40].into()
        } else {
            String::new()
        },
        url: if ok {
            format!("https://huggingface.co/acme/tiny/tree/round-{round}")
        } else {
            String::new()
        },
        at_ms: 1_800_000_000_000,
        error: error.into(),
        failures,
    }
}

fn done_case(publications: Vec<proto::Publication>) -> Case {
    let mut case = Case::new(publishing_run(0));
    case.groups = placed(&case.run, &case.members);
    let mut s = state(12, true);
    s.publications = publications;
    case.exchange = exchange(Some(s));
    case
}

fn job_round(d: &Decision) -> Option<String> {
    d.children.publisher.as_ref().map(|j| j.name_any())
}

#[test]
fn a_run_without_publish_succeeds_with_no_publisher() {
    let mut case = Case::new(run());
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(12, true)));
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Succeeded));
    assert!(d.children.publisher.is_none());
    assert!(d.status.conditions.iter().all(|c| c.type_ != "Published"));
}

#[test]
fn mid_run_nothing_is_published_by_default_and_training_never_waits() {
    let mut case = Case::new(publishing_run(0));
    case.groups = placed(&case.run, &case.members);
    case.exchange = exchange(Some(state(8, false)));
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(job_round(&d), None, "only the final checkpoint, by default");
}

#[test]
fn every_nth_checkpoint_gets_a_publisher_job_while_training_goes_on() {
    let mut case = Case::new(publishing_run(1));
    case.groups = placed(&case.run, &case.members);
    let mut s = state(8, false);
    s.publications = vec![reported(4, "", 0)];
    case.exchange = exchange(Some(s));
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(job_round(&d).as_deref(), Some("shakespeare-publish-8"));
    let job = d.children.publisher.as_ref().unwrap();
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    let env = pod.containers[0].env.as_ref().unwrap();
    let var = |name: &str| env.iter().find(|e| e.name == name).unwrap();
    assert_eq!(
        var("STARLING_CHECKPOINT").value.as_deref(),
        Some("https://10.0.0.1:7070/checkpoints/round-000008")
    );
    // It verifies the exchange with the run's CA, by the name its certificate carries.
    let ca = var("STARLING_TLS_CA")
        .value_from
        .clone()
        .unwrap()
        .secret_key_ref
        .unwrap();
    assert_eq!(
        (ca.name.as_str(), ca.key.as_str()),
        ("shakespeare-credentials", "ca.crt")
    );
    assert_eq!(
        var("STARLING_TLS_SERVER_NAME").value.as_deref(),
        Some("exchange.starling.internal")
    );
    let hub_token = var("HF_TOKEN").value_from.as_ref().unwrap();
    assert_eq!(hub_token.secret_key_ref.as_ref().unwrap().name, "hf");
    let exchange_token = var("STARLING_TOKEN").value_from.as_ref().unwrap();
    assert_eq!(
        exchange_token.secret_key_ref.as_ref().unwrap().key,
        "publisher"
    );
    // Round 4's checkpoint was published already: its record says where.
    let record = d.status.checkpoints.iter().find(|c| c.round == 4).unwrap();
    assert_eq!(record.published.as_ref().unwrap().revision, "round-4");
}

#[test]
fn the_final_checkpoint_is_published_before_the_run_succeeds() {
    let mut case = done_case(vec![]);
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Publishing));
    assert_eq!(job_round(&d).as_deref(), Some("shakespeare-publish-12"));
    assert_eq!(condition(&d, "Ready").1, "Publishing");
    assert_eq!(condition(&d, "Published").0, "False");

    case.exchange.state.as_mut().unwrap().publications = vec![reported(12, "", 0)];
    let d = again(&mut case, &d);
    assert_eq!(d.status.phase, Some(Phase::Succeeded));
    let published = d
        .status
        .checkpoints
        .last()
        .unwrap()
        .published
        .as_ref()
        .unwrap();
    assert_eq!(
        (published.repo.as_str(), published.revision.as_str()),
        ("acme/tiny", "round-12")
    );
    assert_eq!(
        d.status.last_published.as_deref(),
        Some("acme/tiny@round-12")
    );
    let (ok, reason, message) = condition(&d, "Published");
    assert_eq!((ok, reason), ("True", "Published"));
    assert!(message.contains("acme/tiny@round-12"), "{message}");
    assert!(reasons(&d).contains(&"CheckpointPublished"));
    assert!(d.children.publisher.is_none());
}

#[test]
fn a_failing_publication_says_the_hubs_message_once_and_is_given_up_after_its_attempts() {
    let error =
        "creating the repo: the Hub answered 401: Invalid credentials in Authorization header";
    let mut case = done_case(vec![reported(12, error, 1)]);
    let first = case.decide();
    assert_eq!(first.status.phase, Some(Phase::Publishing));
    let (ok, reason, message) = condition(&first, "Published");
    assert_eq!((ok, reason), ("False", "PublishFailed"));
    assert!(message.contains("Invalid credentials"), "{message}");
    assert!(reasons(&first).contains(&"PublishFailed"));
    let second = again(&mut case, &first);
    assert!(!reasons(&second).contains(&"PublishFailed"), "said once");

    case.exchange.state.as_mut().unwrap().publications = vec![reported(12, error, 4)];
    let d = again(&mut case, &second);
    assert_eq!(d.status.phase, Some(Phase::Succeeded), "training succeeded");
    assert_eq!(condition(&d, "Published").0, "False");
    assert!(condition(&d, "Published").2.contains("gave up"));
    assert!(d.children.publisher.is_none());
}

#[test]
fn a_checkpoint_given_up_on_is_superseded_once_a_newer_one_is_published() {
    let error = "the Hub answered 401: Invalid credentials in Authorization header";
    let mut case = Case::new(publishing_run(1));
    case.groups = placed(&case.run, &case.members);
    let mut s = state(12, true);
    s.publications = vec![reported(4, error, 4), reported(8, "", 0)];
    case.exchange = exchange(Some(s));
    let d = case.decide();
    assert_eq!(d.status.phase, Some(Phase::Publishing));
    assert_eq!(job_round(&d).as_deref(), Some("shakespeare-publish-12"));
    let (ok, reason, _) = condition(&d, "Published");
    assert_eq!((ok, reason), ("True", "Published"), "round 8 is out there");

    case.exchange.state.as_mut().unwrap().publications = vec![
        reported(4, error, 4),
        reported(8, "", 0),
        reported(12, "", 0),
    ];
    let d = again(&mut case, &d);
    assert_eq!(d.status.phase, Some(Phase::Succeeded));
    let (ok, _, message) = condition(&d, "Published");
    assert_eq!(ok, "True");
    assert!(message.contains("acme/tiny@round-12"), "{message}");
}
