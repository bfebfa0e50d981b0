//! `starling-e2e bench operator`: the hub operator at fleet scale, with no kubelets or
//! trainers. A hub API test server, M MemberClusters kept fresh by heartbeats, N tiny
//! TrainingRuns; measured: create-to-placed latency, re-placement after a member goes
//! dark, the operator's API requests per second once nothing changes, and its peak RSS.

mod fleet;
mod stats;
mod tracker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::api::{Api, PostParams};
use serde::Serialize;
use serde_json::json;
use starling_operator::api::{MemberCluster, TrainingRun};
use tokio::process::Child;

use fleet::{Dark, Hub, OPERATOR_USER};
pub use stats::{millis, percentile, percentile_ms};
use tracker::{PeerKey, Shared, Tracker};

/// Peers each benchmark run asks for (at most one per member).
const PEERS: usize = 3;
/// Where the runs live.
const NAMESPACE: &str = "default";

#[derive(Clone, Debug, clap::Args)]
pub struct BenchOptions {
    /// TrainingRuns to create.
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
    /// MemberClusters (every fourth at home, five regions in turn); at least 4.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Print one JSON object instead of progress and a summary.
    #[arg(long)]
    pub json: bool,
    /// Runs being created at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Runs created per second, as a fleet receives them; 0 creates them as fast as
    /// `--concurrency` allows (a burst, which measures throughput rather than latency).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Each member's `maxTrainers`; unset is twice an even share of the peers (at least
    /// 3), so runs spread over the fleet and capacity never blocks placement.
    #[arg(long)]
    pub max_trainers: Option<u32>,
    /// Seconds between members' heartbeats.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_seconds: u64,
    /// The operator's `--heartbeat-grace`.
    #[arg(long, default_value_t = 6)]
    pub heartbeat_grace: u64,
    /// Seconds to wait after the last placement before measuring the steady state.
    #[arg(long, default_value_t = 5)]
    pub settle_seconds: u64,
    /// Seconds over which steady-state requests are counted.
    #[arg(long, default_value_t = 20)]
    pub window_seconds: u64,
    /// Longest any one phase may take before the benchmark fails.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
    /// The operator binary; default: `starling-operator` next to this executable.
    #[arg(long)]
    pub operator: Option<PathBuf>,
    /// Where the operator's kubeconfig and log go; default: a new temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl BenchOptions {
    /// Defaults, as the command line has them, for `runs` × `members`.
    pub fn new(runs: usize, members: usize) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            opts: BenchOptions,
        }
        let mut opts = Cli::parse_from(["bench"]).opts;
        opts.runs = runs;
        opts.members = members;
        opts
    }

    fn max_trainers(&self) -> u32 {
        self.max_trainers.unwrap_or_else(|| {
            let share = (2 * self.runs * PEERS).div_ceil(self.members.max(1));
            share.max(PEERS) as u32
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }

    fn say(&self, line: &str) {
        if !self.json {
            eprintln!("{line}");
        }
    }
}

/// What one benchmark measured. Durations in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub runs: usize,
    pub members: usize,
    pub max_trainers: u32,
    pub peers_per_run: usize,
    pub concurrency: usize,
    /// Runs created per second; 0 for a burst.
    pub rate: f64,
    pub heartbeat_seconds: u64,
    pub heartbeat_grace_seconds: u64,
    /// Seconds to send every create.
    pub create_s: f64,
    /// From a run's create request to all its peers being in TrainerGroups (watched).
    pub place_p50_ms: f64,
    pub place_p99_ms: f64,
    pub place_max_ms: f64,
    /// Operator requests from the first create until every run was placed.
    pub placement_requests: u64,
    /// The same, per run and by `VERB resource`.
    pub placement_requests_per_run: BTreeMap<String, f64>,
    pub steady_window_s: u64,
    /// Operator requests per second once everything is placed and nothing changes
    /// (heartbeats go on).
    pub steady_requests_per_s: f64,
    /// The same, by `VERB resource`.
    pub steady_by_request: BTreeMap<String, f64>,
    /// The member whose heartbeats stopped: the one hosting the most peers.
    pub dark_member: String,
    /// Runs that had a peer on it (one peer each).
    pub replaced_runs: usize,
    /// From heartbeats stopping to the member's `Ready=False` (seen by polling it).
    pub not_ready_ms: f64,
    /// From heartbeats stopping to the peer being in a TrainerGroup on another member.
    pub replace_p50_ms: Option<f64>,
    pub replace_p99_ms: Option<f64>,
    pub replace_max_ms: Option<f64>,
    /// The same, from `Ready=False` being seen.
    pub replace_from_not_ready_p50_ms: Option<f64>,
    pub replace_from_not_ready_p99_ms: Option<f64>,
    /// The operator's peak resident memory (VmHWM) and resident memory at the end.
    pub operator_rss_mb: f64,
    pub operator_rss_end_mb: f64,
    pub operator_log: PathBuf,
}

/// Background tasks, stopped when dropped.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The operator process, with where its log is for error messages.
struct Operator {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Operator {
    /// An error if the operator has exited.
    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the operator exited ({status}); see {}", self.log.display());
        }
        Ok(())
    }
}

/// A phase's time limit.
struct Deadline {
    at: Instant,
    what: &'static str,
    seconds: u64,
}

impl Deadline {
    fn new(what: &'static str, opts: &BenchOptions) -> Self {
        Self {
            at: Instant::now() + opts.timeout(),
            what,
            seconds: opts.timeout_seconds,
        }
    }

    /// An error (saying `detail`) once past the deadline or if the operator has exited.
    fn check(
        &self,
        operator: &mut Operator,
        detail: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        operator.check()?;
        anyhow::ensure!(
            Instant::now() < self.at,
            "timed out after {}s waiting for {}: {}; see {}",
            self.seconds,
            self.what,
            detail(),
            operator.log.display()
        );
        Ok(())
    }
}

/// Runs the benchmark; `exe_dir` is where to look for `starling-operator`.
pub async fn operator(opts: &BenchOptions, exe_dir: &Path) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.members > PEERS,
        "--members must be at least {}: each run spreads {PEERS} peers one per member, and \
         one member goes dark",
        PEERS + 1
    );
    anyhow::ensure!(opts.runs > 0, "--runs must be at least 1");
    let binary = opts.operator.clone().unwrap_or_else(|| {
        crate::harness::starling_images(exe_dir)
            .into_iter()
            .find(|(p, _)| p.contains("operator"))
            .map(|(_, b)| b)
            .expect("an operator image")
    });
    anyhow::ensure!(
        binary.exists(),
        "{} not found: build it first (cargo build --release -p starling-operator)",
        binary.display()
    );
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("starling-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;

    let hub = Hub::start(&dir).await?;
    hub.register_members(opts.members, opts.max_trainers())
        .await?;
    let dark: Dark = Default::default();
    fleet::beat(&hub.client, opts.members, &dark).await?;
    let tracker = Tracker::new(PEERS);
    let period = Duration::from_secs(opts.heartbeat_seconds);
    let _tasks = Tasks(vec![
        tokio::spawn(fleet::heartbeats(
            hub.client.clone(),
            opts.members,
            dark.clone(),
            period,
        )),
        tokio::spawn(fleet::load_balancer(hub.client.clone())),
        tokio::spawn(tracker::watch_groups(hub.client.clone(), tracker.clone())),
    ]);
    let child = fleet::start_operator(&binary, &hub, &dir, opts.heartbeat_grace)?;
    let mut operator = Operator {
        pid: child.id().context("the operator's pid")?,
        child,
        log: dir.join("operator.log"),
    };
    let result = measure(opts, &hub, &tracker, &dark, &mut operator).await;
    let _ = operator.child.kill().await;
    result
}

/// Everything measured, once the operator is started.
async fn measure(
    opts: &BenchOptions,
    hub: &Hub,
    tracker: &Shared,
    dark: &Dark,
    operator: &mut Operator,
) -> anyhow::Result<Report> {
    opts.say(&format!(
        "hub {}; operator pid {} (log {}); {} members, maxTrainers {}",
        hub.running.url,
        operator.pid,
        operator.log.display(),
        opts.members,
        opts.max_trainers()
    ));
    wait_members_ready(opts, hub, operator).await?;
    let placement = place_runs(opts, hub, tracker, operator).await?;
    opts.say(&format!(
        "placed {} runs: p50 {:.0} ms, p99 {:.0} ms; settling {}s",
        opts.runs, placement.p50_ms, placement.p99_ms, opts.settle_seconds
    ));
    tokio::time::sleep(Duration::from_secs(opts.settle_seconds)).await;
    operator.check()?;
    opts.say(&format!(
        "counting the operator's requests for {}s",
        opts.window_seconds
    ));
    let (steady_rate, steady_by_request) = steady_requests(hub, opts.window_seconds).await;
    let replace = go_dark(opts, hub, tracker, dark, operator).await?;
    let (peak, end) = fleet::memory_mb(operator.pid).context("reading the operator's memory")?;
    Ok(Report {
        runs: opts.runs,
        members: opts.members,
        max_trainers: opts.max_trainers(),
        peers_per_run: PEERS,
        concurrency: opts.concurrency,
        rate: opts.rate,
        heartbeat_seconds: opts.heartbeat_seconds,
        heartbeat_grace_seconds: opts.heartbeat_grace,
        create_s: placement.create_s,
        place_p50_ms: placement.p50_ms,
        place_p99_ms: placement.p99_ms,
        place_max_ms: placement.max_ms,
        placement_requests: placement.requests.values().sum(),
        placement_requests_per_run: per(&placement.requests, opts.runs as f64),
        steady_window_s: opts.window_seconds,
        steady_requests_per_s: steady_rate,
        steady_by_request,
        dark_member: replace.member,
        replaced_runs: replace.from_stop.len(),
        not_ready_ms: millis(replace.not_ready),
        replace_p50_ms: percentile_ms(&replace.from_stop, 50.0),
        replace_p99_ms: percentile_ms(&replace.from_stop, 99.0),
        replace_max_ms: percentile_ms(&replace.from_stop, 100.0),
        replace_from_not_ready_p50_ms: percentile_ms(&replace.from_not_ready, 50.0),
        replace_from_not_ready_p99_ms: percentile_ms(&replace.from_not_ready, 99.0),
        operator_rss_mb: peak,
        operator_rss_end_mb: end,
        operator_log: operator.log.clone(),
    })
}

fn is_ready(member: &MemberCluster) -> bool {
    member.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Waits for the operator to lead and mark every member Ready.
async fn wait_members_ready(
    opts: &BenchOptions,
    hub: &Hub,
    operator: &mut Operator,
) -> anyhow::Result<()> {
    let api: Api<MemberCluster> = Api::all(hub.client.clone());
    let deadline = Deadline::new("every member to be Ready", opts);
    let started = Instant::now();
    loop {
        let members = api.list(&Default::default()).await?.items;
        let ready = members.iter().filter(|m| is_ready(m)).count();
        if ready == opts.members {
            opts.say(&format!(
                "all {ready} members Ready after {:.1}s",
                started.elapsed().as_secs_f64()
            ));
            return Ok(());
        }
        deadline.check(operator, || format!("{ready} of {} Ready", opts.members))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A tiny run: peers min 1 max 3, one per member.
fn training_run(name: &str) -> anyhow::Result<TrainingRun> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "starling.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"preset": "tiny"},
            "data": {"corpus": {"builtin": "shakespeare"}, "sequenceLength": 64},
            "schedule": {"outerRounds": 2, "innerSteps": 10, "batchSize": 4,
                "innerOptimizer": {"lr": 0.003, "warmupSteps": 5}},
            "peers": {"min": 1, "max": PEERS},
            "placement": {"maxPeersPerMember": 1},
        },
    }))?)
}

struct Placement {
    create_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    requests: BTreeMap<String, u64>,
}

/// Creates every run, `concurrency` at a time, in the background.
fn create_runs(
    opts: &BenchOptions,
    hub: &Hub,
    tracker: &Shared,
    created: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<anyhow::Result<f64>> {
    let api: Api<TrainingRun> = Api::namespaced(hub.client.clone(), NAMESPACE);
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let (runs, rate, tracker) = (opts.runs, opts.rate, tracker.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        let mut creates = tokio::task::JoinSet::new();
        for i in 0..runs {
            if rate > 0.0 {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let permit = limit.clone().acquire_owned().await?;
            let (api, tracker, created) = (api.clone(), tracker.clone(), created.clone());
            creates.spawn(async move {
                let name = format!("run-{i:04}");
                let run = training_run(&name)?;
                let now = Instant::now();
                tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .created(&name, now);
                api.create(&PostParams::default(), &run)
                    .await
                    .with_context(|| format!("creating {name}"))?;
                created.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                anyhow::Ok(())
            });
            while let Some(done) = creates.try_join_next() {
                done??;
            }
        }
        while let Some(done) = creates.join_next().await {
            done??;
        }
        Ok(started.elapsed().as_secs_f64())
    })
}

/// Creates the runs and waits for every one to be placed, printing progress.
async fn place_runs(
    opts: &BenchOptions,
    hub: &Hub,
    tracker: &Shared,
    operator: &mut Operator,
) -> anyhow::Result<Placement> {
    let requests_before = operator_requests(hub);
    let created = Arc::new(AtomicUsize::new(0));
    let mut creating = create_runs(opts, hub, tracker, created.clone());
    let mut create_s = None;
    let deadline = Deadline::new("every run to be placed", opts);
    let mut last_progress = Instant::now();
    loop {
        if create_s.is_none() && creating.is_finished() {
            create_s = Some((&mut creating).await??);
        }
        let placed = tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .placed_count();
        if create_s.is_some() && placed >= opts.runs {
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(2) {
            last_progress = Instant::now();
            let n = created.load(Ordering::Relaxed);
            opts.say(&format!("  created {n}/{}, placed {placed}", opts.runs));
        }
        deadline.check(operator, || {
            let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
            let unplaced = t.unplaced();
            let shown = unplaced.iter().take(5).copied().collect::<Vec<_>>();
            format!("{} runs unplaced, e.g. {shown:?}", unplaced.len())
        })?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let times = tracker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .placement_times();
    let p = |q| percentile_ms(&times, q).unwrap_or_default();
    Ok(Placement {
        create_s: (create_s.unwrap_or_default() * 100.0).round() / 100.0,
        p50_ms: p(50.0),
        p99_ms: p(99.0),
        max_ms: p(100.0),
        requests: since(&requests_before, &operator_requests(hub)),
    })
}

/// The operator's requests so far, by `VERB resource`.
fn operator_requests(hub: &Hub) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    for (k, n) in hub.running.server.request_counts() {
        if k.user == OPERATOR_USER {
            *by.entry(format!("{} {}", k.verb, k.resource)).or_default() += n;
        }
    }
    by
}

/// Requests made between two counts, leaving out kinds that saw none.
fn since(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or_default()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Each count divided by `by`, to two decimals.
fn per(counts: &BTreeMap<String, u64>, by: f64) -> BTreeMap<String, f64> {
    counts
        .iter()
        .map(|(k, n)| (k.clone(), (*n as f64 / by * 100.0).round() / 100.0))
        .collect()
}

/// The operator's requests per second over `seconds`, in all and by `VERB resource`.
async fn steady_requests(hub: &Hub, seconds: u64) -> (f64, BTreeMap<String, f64>) {
    let before = operator_requests(hub);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let made = since(&before, &operator_requests(hub));
    let elapsed = started.elapsed().as_secs_f64();
    let total = made.values().sum::<u64>() as f64;
    (
        (total / elapsed * 100.0).round() / 100.0,
        per(&made, elapsed),
    )
}

struct Replacement {
    member: String,
    not_ready: Duration,
    from_stop: Vec<Duration>,
    from_not_ready: Vec<Duration>,
}

/// Stops the heartbeats of the member hosting the most peers and waits for it to be
/// `Ready=False` and for each of its peers to be in a TrainerGroup elsewhere.
async fn go_dark(
    opts: &BenchOptions,
    hub: &Hub,
    tracker: &Shared,
    dark: &Dark,
    operator: &mut Operator,
) -> anyhow::Result<Replacement> {
    let (member, affected): (String, Vec<PeerKey>) = {
        let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
        let load = t.load();
        let (member, _) = load
            .iter()
            .max_by_key(|(m, n)| (**n, std::cmp::Reverse(**m)))
            .context("no peers placed")?;
        (member.to_string(), t.peers_on(member))
    };
    opts.say(&format!(
        "stopping {member}'s heartbeats ({} peers there)",
        affected.len()
    ));
    dark.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(member.clone());
    let stopped = Instant::now();
    let api: Api<MemberCluster> = Api::all(hub.client.clone());
    let deadline = Deadline::new("the dark member's peers to be re-placed", opts);
    let mut not_ready = None;
    loop {
        if not_ready.is_none() && !is_ready(&api.get(&member).await?) {
            not_ready = Some(Instant::now());
        }
        let moved: Vec<Instant> = {
            let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
            affected
                .iter()
                .filter_map(|peer| t.peer(peer))
                .filter(|(m, since)| *m != member && *since > stopped)
                .map(|(_, since)| *since)
                .collect()
        };
        if let (Some(not_ready), true) = (not_ready, moved.len() == affected.len()) {
            return Ok(Replacement {
                member,
                not_ready: not_ready - stopped,
                from_stop: moved.iter().map(|t| *t - stopped).collect(),
                from_not_ready: moved
                    .iter()
                    .map(|t| t.saturating_duration_since(not_ready))
                    .collect(),
            });
        }
        deadline.check(operator, || {
            format!(
                "{} of {} peers moved; Ready=False seen: {}",
                moved.len(),
                affected.len(),
                not_ready.is_some()
            )
        })?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The report as lines for people.
pub fn summary(r: &Report) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} ms"));
    let mut out = format!(
        "operator benchmark: {} runs x {} members ({} peers each, maxTrainers {})\n\
         created in           {:.2} s ({} at a time, {})\n\
         create -> placed     p50 {:.0} ms   p99 {:.0} ms   max {:.0} ms\n\
         placement requests   {} ({:.1} per run)\n\
         steady requests/s    {:.2} (over {} s; heartbeats every {} s go on)\n",
        r.runs,
        r.members,
        r.peers_per_run,
        r.max_trainers,
        r.create_s,
        r.concurrency,
        if r.rate > 0.0 {
            format!("{} runs/s", r.rate)
        } else {
            "a burst".into()
        },
        r.place_p50_ms,
        r.place_p99_ms,
        r.place_max_ms,
        r.placement_requests,
        r.placement_requests as f64 / r.runs as f64,
        r.steady_requests_per_s,
        r.steady_window_s,
        r.heartbeat_seconds,
    );
    for (request, rate) in &r.steady_by_request {
        out += &format!("    {rate:>9.2}/s  {request}\n");
    }
    out += "placement requests, per run:\n";
    for (request, n) in &r.placement_requests_per_run {
        out += &format!("    {n:>9.2}    {request}\n");
    }
    out += &format!(
        "member {} dark     Ready=False after {:.0} ms (grace {} s); {} runs had a peer there\n\
         re-placed            from heartbeats stopping: p50 {}  p99 {}  max {}\n\
         \x20                    from Ready=False seen:    p50 {}  p99 {}\n\
         operator RSS         peak {:.1} MB, at end {:.1} MB\n\
         operator log         {}\n",
        r.dark_member,
        r.not_ready_ms,
        r.heartbeat_grace_seconds,
        r.replaced_runs,
        ms(r.replace_p50_ms),
        ms(r.replace_p99_ms),
        ms(r.replace_max_ms),
        ms(r.replace_from_not_ready_p50_ms),
        ms(r.replace_from_not_ready_p99_ms),
        r.operator_rss_mb,
        r.operator_rss_end_mb,
        r.operator_log.display(),
    );
    out
}
