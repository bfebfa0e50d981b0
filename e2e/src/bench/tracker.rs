//! What the benchmark sees of placements: a TrainerGroup watch folded into where each
//! run's peers are and when that last changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kube::runtime::watcher;
use kube::{Api, Client};
use starling_operator::api::TrainerGroup;
use tokio_stream::StreamExt;

/// A run's peer, as (run name, peer id).
pub type PeerKey = (String, String);

#[derive(Default)]
pub struct Tracker {
    /// Peers each run asks for; a run is placed once it has them all.
    expected: usize,
    /// When each run's create request was sent.
    created: HashMap<String, Instant>,
    /// When each run first had all its peers in TrainerGroups.
    placed: HashMap<String, Instant>,
    /// Where each peer is, and since when.
    peers: BTreeMap<PeerKey, (String, Instant)>,
}

pub type Shared = Arc<Mutex<Tracker>>;

impl Tracker {
    pub fn new(expected: usize) -> Shared {
        Arc::new(Mutex::new(Self {
            expected,
            ..Default::default()
        }))
    }

    pub fn created(&mut self, run: &str, at: Instant) {
        self.created.insert(run.to_owned(), at);
    }

    pub fn placed_count(&self) -> usize {
        self.placed.len()
    }

    /// Create-to-placed times of every placed run.
    pub fn placement_times(&self) -> Vec<std::time::Duration> {
        self.placed
            .iter()
            .filter_map(|(run, at)| Some(at.saturating_duration_since(*self.created.get(run)?)))
            .collect()
    }

    /// Runs not placed yet, for error messages.
    pub fn unplaced(&self) -> Vec<&str> {
        let mut runs: Vec<&str> = self
            .created
            .keys()
            .filter(|r| !self.placed.contains_key(*r))
            .map(String::as_str)
            .collect();
        runs.sort();
        runs
    }

    /// Peers per member.
    pub fn load(&self) -> BTreeMap<&str, usize> {
        let mut load = BTreeMap::new();
        for (member, _) in self.peers.values() {
            *load.entry(member.as_str()).or_default() += 1;
        }
        load
    }

    /// The peers on `member` now.
    pub fn peers_on(&self, member: &str) -> Vec<PeerKey> {
        self.peers
            .iter()
            .filter(|(_, (m, _))| m == member)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Where `peer` is and since when.
    pub fn peer(&self, peer: &PeerKey) -> Option<&(String, Instant)> {
        self.peers.get(peer)
    }

    fn apply(&mut self, group: &TrainerGroup, now: Instant) {
        let run = &group.spec.run_ref.name;
        for peer in &group.spec.peers {
            let key = (run.clone(), peer.to_string());
            let moved = self
                .peers
                .get(&key)
                .is_none_or(|(m, _)| *m != group.spec.member);
            if moved {
                self.peers.insert(key, (group.spec.member.clone(), now));
            }
        }
        if !self.placed.contains_key(run) {
            let have = self.peers.keys().filter(|(r, _)| r == run).count();
            if have >= self.expected {
                self.placed.insert(run.clone(), now);
            }
        }
    }

    fn delete(&mut self, group: &TrainerGroup) {
        let run = &group.spec.run_ref.name;
        for peer in &group.spec.peers {
            let key = (run.clone(), peer.to_string());
            if self
                .peers
                .get(&key)
                .is_some_and(|(m, _)| *m == group.spec.member)
            {
                self.peers.remove(&key);
            }
        }
    }
}

/// Watches every TrainerGroup into `tracker` until aborted.
pub async fn watch_groups(client: Client, tracker: Shared) {
    let api: Api<TrainerGroup> = Api::all(client);
    let stream = watcher(api, watcher::Config::default());
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Ok(watcher::Event::Apply(g) | watcher::Event::InitApply(g)) => t.apply(&g, now),
            Ok(watcher::Event::Delete(g)) => t.delete(&g),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => {
                drop(t);
                eprintln!("bench: watching TrainerGroups: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}
