//! The event loop: peers' state machines, the exchange's rounds, and the transfers between
//! them. Time advances to the next timer or flow completion, whichever is first.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::fluid::{Shared, Transfers};
use super::{Bandwidth, Codec, Download, Link, Payloads, PowerCuts, Row, Scenario};
use crate::exchange::pacing::{Close, History};

mod churn;
mod exchange;
mod report;

type PeerId = usize;
type Round = u32;

/// Bytes of the model state a returning peer fetches (fp32 weights).
const STATE_BYTES_PER_PARAM: f64 = 4.0;
/// fp32 bytes the codec reads or writes per parameter.
const DENSE_BYTES_PER_PARAM: f64 = 4.0;
/// Stops a scenario that cannot make progress (every peer cut for good, say).
const MAX_EVENTS: usize = 50_000_000;

/// What a transfer is; its completion is handled by kind.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Transfer {
    Upload {
        peer: PeerId,
        epoch: u32,
        round: Round,
    },
    /// The exchange fetches an update from storage to validate it.
    Fetch { peer: PeerId, round: Round },
    Download {
        peer: PeerId,
        epoch: u32,
        round: Round,
        updates: u32,
    },
    /// The exchange puts the round's compressed aggregate on storage.
    PutAggregate { round: Round },
    State {
        peer: PeerId,
        epoch: u32,
        round: Round,
    },
}

impl Transfer {
    /// The round whose traffic this is.
    fn round(self) -> Round {
        match self {
            Transfer::Upload { round, .. }
            | Transfer::Fetch { round, .. }
            | Transfer::Download { round, .. }
            | Transfer::PutAggregate { round }
            | Transfer::State { round, .. } => round,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Begin(Transfer),
    Computed {
        peer: PeerId,
        epoch: u32,
    },
    Compressed {
        peer: PeerId,
        epoch: u32,
    },
    Decoded {
        peer: PeerId,
        epoch: u32,
    },
    Validated {
        peer: PeerId,
        round: Round,
    },
    Deadline {
        round: Round,
    },
    ResultsReady {
        round: Round,
    },
    PowerCut {
        peer: PeerId,
        epoch: u32,
    },
    PowerBack {
        peer: PeerId,
    },
    /// The exchange's heartbeat timeout expired for a peer that lost power.
    Noticed {
        peer: PeerId,
        epoch: u32,
    },
}

struct Timer {
    at: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    /// Earliest first in a max-heap; ties in the order they were set.
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.total_cmp(&self.at).then(other.seq.cmp(&self.seq))
    }
}

/// Where a peer's time goes within one of its rounds.
#[derive(Clone, Copy, Default)]
struct Breakdown {
    compute: f64,
    codec: f64,
    upload: f64,
    download: f64,
}

impl Breakdown {
    fn add(&mut self, other: &Breakdown) {
        self.compute += other.compute;
        self.codec += other.codec;
        self.upload += other.upload;
        self.download += other.download;
    }

    fn busy(&self) -> f64 {
        self.compute + self.codec + self.upload + self.download
    }
}

struct Peer {
    link: Link,
    compute_s: f64,
    compress_s: f64,
    decode_s: f64,
    power_cuts: Option<PowerCuts>,
    /// Bumped when the peer loses power, so that its pending events are ignored.
    epoch: u32,
    online: bool,
    round: Round,
    started: f64,
    phase_since: f64,
    spent: Breakdown,
}

/// Everything about one round: its updates, how and when it closed, and what crossed
/// which link for it.
#[derive(Clone, Default)]
struct RoundRecord {
    /// Accepted updates, in arrival order.
    accepted: Vec<PeerId>,
    /// When its first update was accepted: its deadline and late updates are timed from it.
    first_at: Option<f64>,
    closed_at: Option<f64>,
    exchange_in: f64,
    exchange_out: f64,
    storage_in: f64,
    storage_out: f64,
    peer_download: f64,
    peer_downloads: u32,
    lost: u32,
    /// From the round's close until its results could be fetched.
    publish_s: f64,
    closed_by: Option<Close>,
}

struct Totals {
    spent: Breakdown,
    online: f64,
    peer_rounds: u32,
}

struct Sim<'a> {
    s: &'a Scenario,
    now: f64,
    seq: u64,
    timers: BinaryHeap<Timer>,
    transfers: Transfers<Transfer>,
    rng: StdRng,
    peers: Vec<Peer>,
    update_bytes: f64,
    /// Bytes of the exchange's compressed aggregate.
    aggregate_bytes: f64,
    /// The exchange's check of one update on arrival (parse, checksum, layout).
    check_s: f64,
    /// The exchange's decode of one accepted update into the global state at close.
    apply_s: f64,
    /// The exchange's compression of the round's aggregate.
    aggregate_s: f64,
    // The exchange.
    open: Round,
    members: BTreeSet<PeerId>,
    expected: BTreeSet<PeerId>,
    busy_until: f64,
    /// Accepted updates of each closed round, in arrival order.
    ready: Option<Round>,
    waiting: BTreeSet<(Round, PeerId)>,
    /// The open round's deadline after its first update.
    deadline: f64,
    pacing: History<PeerId>,
    /// Indexed by round; the open one is `rounds[open]`.
    rounds: Vec<RoundRecord>,
    totals: Totals,
}

pub(super) fn run(s: &Scenario, codec: &Codec) -> Row {
    let mut sim = Sim::new(s, codec);
    sim.start();
    let mut events = 0;
    while sim.open <= s.rounds && events < MAX_EVENTS {
        if !sim.step() {
            break;
        }
        events += 1;
    }
    sim.row()
}

/// A standard normal deviate (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let (u, v) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

impl<'a> Sim<'a> {
    fn new(s: &'a Scenario, codec: &Codec) -> Self {
        let mut rng = StdRng::seed_from_u64(s.seed);
        let dense = s.params * DENSE_BYTES_PER_PARAM;
        let flops = 6.0 * s.params * s.tokens_per_step * f64::from(s.inner_steps);
        let mut peers = vec![];
        for g in &s.groups {
            let hw = g.hardware;
            let cores = f64::from(hw.cores);
            for _ in 0..g.count {
                let speed = (g.compute_spread * normal(&mut rng)).exp();
                peers.push(Peer {
                    link: g.link,
                    compute_s: flops / (f64::from(hw.gpus) * hw.peak_flops * hw.mfu * speed),
                    compress_s: codec.compress_per_core.seconds(dense) / cores,
                    decode_s: codec.decode_per_core.seconds(dense) / cores,
                    power_cuts: g.power_cuts,
                    epoch: 0,
                    online: true,
                    round: 0,
                    started: 0.0,
                    phase_since: 0.0,
                    spent: Breakdown::default(),
                });
            }
        }
        let exchange_cores = f64::from(s.exchange_cores.max(1));
        let update_bytes = s.params * codec.bits_per_param / 8.0;
        let aggregate_bytes = s.params * codec.aggregate_bits_per_param / 8.0;
        Self {
            s,
            now: 0.0,
            seq: 0,
            timers: BinaryHeap::new(),
            transfers: Transfers::new(s.exchange.down, s.exchange.up),
            rng,
            update_bytes,
            aggregate_bytes,
            check_s: codec.check_per_core.seconds(update_bytes) / exchange_cores,
            apply_s: codec.decode_per_core.seconds(dense) / exchange_cores,
            aggregate_s: codec.compress_per_core.seconds(dense) / exchange_cores,
            members: (0..peers.len()).collect(),
            expected: (0..peers.len()).collect(),
            peers,
            open: 0,
            busy_until: 0.0,
            ready: None,
            waiting: BTreeSet::new(),
            deadline: f64::INFINITY,
            pacing: History::default(),
            rounds: vec![RoundRecord::default(); s.rounds as usize + 2],
            totals: Totals {
                spent: Breakdown::default(),
                online: 0.0,
                peer_rounds: 0,
            },
        }
    }

    fn at(&mut self, delay: f64, event: Event) {
        self.seq += 1;
        self.timers.push(Timer {
            at: self.now + delay,
            seq: self.seq,
            event,
        });
    }

    fn start(&mut self) {
        for peer in 0..self.peers.len() {
            self.schedule_cut(peer);
            self.begin_round(peer, 0);
        }
    }

    /// Advances to the next event and handles it; false when nothing is left to happen.
    fn step(&mut self) -> bool {
        let timer_at = self.timers.peek().map(|t| t.at);
        let flow_at = self.transfers.next_completion().map(|dt| self.now + dt);
        match (timer_at, flow_at) {
            (None, None) => false,
            (Some(t), f) if f.is_none_or(|f| t <= f) => {
                let timer = self.timers.pop().expect("peeked");
                let done = self.transfers.advance(timer.at - self.now);
                self.now = timer.at;
                self.finished(done);
                self.handle(timer.event);
                true
            }
            (_, Some(f)) => {
                let done = self.transfers.advance(f - self.now);
                self.now = f;
                self.finished(done);
                true
            }
            (Some(_), None) => unreachable!("the guard takes a timer when no flow moves"),
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Begin(t) if self.current(t) => self.begin_transfer(t),
            Event::Begin(_) => {}
            Event::Computed { peer, epoch } if self.is(peer, epoch) => {
                self.phase_done(peer, |b, d| b.compute += d);
                let compress = self.peers[peer].compress_s;
                self.at(compress, Event::Compressed { peer, epoch });
            }
            Event::Compressed { peer, epoch } if self.is(peer, epoch) => {
                self.phase_done(peer, |b, d| b.codec += d);
                self.submit(peer);
            }
            Event::Decoded { peer, epoch } if self.is(peer, epoch) => {
                self.phase_done(peer, |b, d| b.codec += d);
                self.end_round(peer);
                let round = self.open;
                self.begin_round(peer, round);
            }
            Event::Validated { peer, round } => self.validated(peer, round),
            Event::Deadline { round } if round == self.open => self.close(Close::Deadline),
            Event::ResultsReady { round } => self.results_ready(round),
            Event::PowerCut { peer, epoch } if self.is(peer, epoch) => self.power_cut(peer),
            Event::PowerBack { peer } => self.power_back(peer),
            Event::Noticed { peer, epoch } if self.peers[peer].epoch == epoch => {
                self.members.remove(&peer);
                self.expected.remove(&peer);
                self.close_if_due();
            }
            _ => {}
        }
    }

    fn is(&self, peer: PeerId, epoch: u32) -> bool {
        self.peers[peer].online && self.peers[peer].epoch == epoch
    }

    /// Whether a delayed transfer is still wanted (its peer did not lose power meanwhile).
    fn current(&self, t: Transfer) -> bool {
        match t {
            Transfer::Upload { peer, epoch, .. }
            | Transfer::Download { peer, epoch, .. }
            | Transfer::State { peer, epoch, .. } => self.is(peer, epoch),
            Transfer::Fetch { .. } | Transfer::PutAggregate { .. } => true,
        }
    }

    /// Adds the time since the peer's phase began to one of its buckets.
    fn phase_done(&mut self, peer: PeerId, add: impl FnOnce(&mut Breakdown, f64)) {
        let p = &mut self.peers[peer];
        add(&mut p.spent, self.now - p.phase_since);
        p.phase_since = self.now;
    }

    fn begin_round(&mut self, peer: PeerId, round: Round) {
        let now = self.now;
        let p = &mut self.peers[peer];
        p.round = round;
        p.phase_since = now;
        let (compute, epoch) = (p.compute_s, p.epoch);
        self.at(compute, Event::Computed { peer, epoch });
    }

    fn end_round(&mut self, peer: PeerId) {
        let p = &mut self.peers[peer];
        let t = &mut self.totals;
        t.spent.add(&p.spent);
        t.online += self.now - p.started;
        t.peer_rounds += 1;
        p.spent = Breakdown::default();
        p.started = self.now;
    }

    /// The peer's update is compressed: upload it if its round is still open, else it is
    /// lost and the peer waits for that round's results.
    fn submit(&mut self, peer: PeerId) {
        let (round, epoch) = (self.peers[peer].round, self.peers[peer].epoch);
        if round == self.open {
            let rtt = self.peers[peer].link.rtt_s;
            self.at(rtt, Event::Begin(Transfer::Upload { peer, epoch, round }));
        } else {
            self.rounds[round as usize].lost += 1;
            self.late(peer, round);
            self.await_results(peer, round);
        }
    }

    fn begin_transfer(&mut self, t: Transfer) {
        let u = self.update_bytes;
        let storage = self.s.payloads == Payloads::Storage;
        let (bytes, cap, via) = match t {
            Transfer::Upload { peer, .. } => {
                let via = (!storage).then_some(Shared::Ingress);
                (u, self.peers[peer].link.up, via)
            }
            Transfer::Fetch { .. } => (u, Bandwidth::UNLIMITED, Some(Shared::Ingress)),
            Transfer::Download { peer, updates, .. } => {
                let via = (!storage).then_some(Shared::Egress);
                let each = match self.s.download {
                    Download::Aggregate => self.aggregate_bytes,
                    Download::All | Download::Gather(_) => u,
                };
                (each * f64::from(updates), self.peers[peer].link.down, via)
            }
            Transfer::PutAggregate { .. } => {
                let a = self.aggregate_bytes;
                (a, Bandwidth::UNLIMITED, Some(Shared::Egress))
            }
            Transfer::State { peer, .. } => {
                let via = (!storage).then_some(Shared::Egress);
                let bytes = self.s.params * STATE_BYTES_PER_PARAM;
                (bytes, self.peers[peer].link.down, via)
            }
        };
        if let Transfer::Upload { peer, .. }
        | Transfer::Download { peer, .. }
        | Transfer::State { peer, .. } = t
        {
            // Until now the peer was waiting (for the round, or a round trip).
            self.peers[peer].phase_since = self.now;
        }
        self.count(t, bytes);
        self.transfers.start(bytes, cap, via, t);
    }

    /// Books `bytes` of transfer `t` on the links it crosses, in its round (negative when
    /// cancelled).
    fn count(&mut self, t: Transfer, bytes: f64) {
        let storage = self.s.payloads == Payloads::Storage;
        let b = &mut self.rounds[(t.round() as usize).min(self.s.rounds as usize + 1)];
        match t {
            Transfer::Upload { .. } if storage => b.storage_in += bytes,
            Transfer::Upload { .. } => b.exchange_in += bytes,
            Transfer::Fetch { .. } => {
                b.storage_out += bytes;
                b.exchange_in += bytes;
            }
            Transfer::PutAggregate { .. } => {
                b.exchange_out += bytes;
                b.storage_in += bytes;
            }
            Transfer::Download { .. } | Transfer::State { .. } => {
                if storage {
                    b.storage_out += bytes;
                } else {
                    b.exchange_out += bytes;
                }
                if let Transfer::Download { .. } = t {
                    b.peer_download += bytes;
                }
            }
        }
    }

    fn finished(&mut self, done: Vec<Transfer>) {
        for t in done {
            match t {
                Transfer::Upload { peer, round, .. } => {
                    self.phase_done(peer, |b, d| b.upload += d);
                    self.await_results(peer, round);
                    if self.s.payloads == Payloads::Storage {
                        self.begin_transfer(Transfer::Fetch { peer, round });
                    } else {
                        self.validate(peer, round);
                    }
                }
                Transfer::Fetch { peer, round } => self.validate(peer, round),
                Transfer::Download {
                    peer,
                    updates,
                    epoch,
                    ..
                } => {
                    self.phase_done(peer, |b, d| b.download += d);
                    let decode = self.peers[peer].decode_s * f64::from(updates);
                    self.at(decode, Event::Decoded { peer, epoch });
                }
                Transfer::PutAggregate { round } => self.at(0.0, Event::ResultsReady { round }),
                Transfer::State { peer, .. } => {
                    self.phase_done(peer, |b, d| b.download += d);
                    self.members.insert(peer);
                    let round = self.open;
                    self.begin_round(peer, round);
                }
            }
        }
    }

    /// Fetches what `peer` needs of `round`'s results (nothing: straight to decoding).
    fn download(&mut self, peer: PeerId, round: Round) {
        let updates = self.updates_to_fetch(peer, round);
        let epoch = self.peers[peer].epoch;
        self.rounds[round as usize].peer_downloads += 1;
        if updates == 0 {
            self.peers[peer].phase_since = self.now;
            self.at(0.0, Event::Decoded { peer, epoch });
            return;
        }
        let t = Transfer::Download {
            peer,
            epoch,
            round,
            updates,
        };
        let rtt = self.peers[peer].link.rtt_s;
        self.at(rtt, Event::Begin(t));
    }
}
