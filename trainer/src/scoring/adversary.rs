//! Adversaries, a testing aid: what a cheating peer sends instead of its honest work.
//! Every kind still passes the exchange's decoder; scoring has to catch it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::codec::{CodecError, Compressor, EncodedTensor, Finite, Update};
use crate::exchange::PeerId;
use crate::outer::Round;

/// How a peer cheats (`--adversary KIND`).
#[derive(Clone, Debug, PartialEq)]
pub enum Adversary {
    /// A random update of its honest update's norm, at the same positions.
    Noise,
    /// Its honest update multiplied by F.
    Scale(f32),
    /// Its honest update negated.
    SignFlip,
    /// All zeros.
    Zero,
    /// Another peer's previous update, as its own (`copy:PEER`), or with every value
    /// jittered by a few percent so that its bytes differ (`copy:PEER:noisy`).
    Copy(PeerId),
    CopyNoisy(PeerId),
    /// Its own update of two rounds before, again.
    Replay,
    /// Trains from a θ two rounds old.
    Stale,
    /// Trains on data it was not assigned.
    OffSlice,
    /// Never applies the outer step: trains on alone.
    Frozen,
}

impl FromStr for Adversary {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        let bad = || {
            format!(
                "unknown adversary {s:?}: expected noise, scale:F, signflip, zero, copy:PEER, \
                 copy:PEER:noisy, replay, stale, offslice or frozen"
            )
        };
        Ok(match (kind, arg) {
            ("noise", "") => Adversary::Noise,
            ("scale", f) => Adversary::Scale(
                f.parse()
                    .ok()
                    .filter(|f: &f32| f.is_finite())
                    .ok_or_else(bad)?,
            ),
            ("signflip", "") => Adversary::SignFlip,
            ("zero", "") => Adversary::Zero,
            ("copy", arg) => match arg.split_once(':') {
                Some((peer, "noisy")) => Adversary::CopyNoisy(peer.parse()?),
                Some(_) => return Err(bad()),
                None => Adversary::Copy(arg.parse()?),
            },
            ("replay", "") => Adversary::Replay,
            ("stale", "") => Adversary::Stale,
            ("offslice", "") => Adversary::OffSlice,
            ("frozen", "") => Adversary::Frozen,
            _ => return Err(bad()),
        })
    }
}

/// Who cheats how (`--adversary`): one kind for whichever peer is given it (`signflip`),
/// or a kind per peer (`p2=signflip,p3=zero`), so that a whole run can share one setting
/// and each peer pick its own.
#[derive(Clone, Debug, PartialEq)]
pub enum Adversaries {
    Everyone(Adversary),
    Peers(BTreeMap<PeerId, Adversary>),
}

impl Adversaries {
    /// How `peer` cheats, if it does.
    pub fn of(&self, peer: PeerId) -> Option<Adversary> {
        match self {
            Self::Everyone(a) => Some(a.clone()),
            Self::Peers(map) => map.get(&peer).cloned(),
        }
    }
}

impl fmt::Display for Adversaries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Everyone(a) => a.fmt(f),
            Self::Peers(map) => {
                let pairs: Vec<String> = map.iter().map(|(p, a)| format!("{p}={a}")).collect();
                f.write_str(&pairs.join(","))
            }
        }
    }
}

impl FromStr for Adversaries {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if !s.contains('=') {
            return s.parse().map(Self::Everyone);
        }
        let mut map = BTreeMap::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (peer, kind) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: expected PEER=KIND"))?;
            map.insert(peer.trim().parse()?, kind.trim().parse()?);
        }
        Ok(Self::Peers(map))
    }
}

impl fmt::Display for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Adversary::Noise => write!(f, "noise"),
            Adversary::Scale(x) => write!(f, "scale:{x}"),
            Adversary::SignFlip => write!(f, "signflip"),
            Adversary::Zero => write!(f, "zero"),
            Adversary::Copy(p) => write!(f, "copy:{p}"),
            Adversary::CopyNoisy(p) => write!(f, "copy:{p}:noisy"),
            Adversary::Replay => write!(f, "replay"),
            Adversary::Stale => write!(f, "stale"),
            Adversary::OffSlice => write!(f, "offslice"),
            Adversary::Frozen => write!(f, "frozen"),
        }
    }
}

/// When a peer applies the rounds it fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applies {
    /// As they close, as honest peers do.
    AtOnce,
    /// This many rounds after they close: it trains from an old θ.
    Late(usize),
    /// Never: it trains on alone.
    Never,
}

/// What the adversary can draw on besides its honest update.
pub struct Material<'a> {
    /// Its own update of two rounds before, if any.
    pub own_old: Option<&'a [u8]>,
    /// The copied peer's update of the previous round, if any.
    pub copied: Option<&'a [u8]>,
    pub seed: u64,
}

impl Adversary {
    /// Whose data `peer` (of `peers`) trains on.
    pub fn trains_on(&self, peer: PeerId, peers: u32) -> PeerId {
        match self {
            Adversary::OffSlice => PeerId::new((peer.index() + 1) % peers.max(1)),
            _ => peer,
        }
    }

    pub fn applies(&self) -> Applies {
        match self {
            Adversary::Stale => Applies::Late(2),
            Adversary::Frozen => Applies::Never,
            _ => Applies::AtOnce,
        }
    }

    /// The update sent in place of `honest` (the kinds that cheat in how they train send
    /// it unchanged; so do replay and copy before there is anything to replay or copy).
    pub fn tamper(&self, honest: &[u8], m: &Material<'_>) -> Result<Vec<u8>, CodecError> {
        match self {
            Adversary::Copy(_) => return Ok(m.copied.unwrap_or(honest).to_vec()),
            Adversary::CopyNoisy(_) if m.copied.is_none() => return Ok(honest.to_vec()),
            Adversary::Replay => return Ok(m.own_old.unwrap_or(honest).to_vec()),
            Adversary::Stale | Adversary::OffSlice | Adversary::Frozen => {
                return Ok(honest.to_vec());
            }
            _ => {}
        }
        let source = match self {
            Adversary::CopyNoisy(_) => m.copied.unwrap_or(honest),
            _ => honest,
        };
        let update = Update::from_bytes(source)?;
        let mut rng = StdRng::seed_from_u64(m.seed);
        let dense = |f: &mut dyn FnMut(&mut [f32])| reencode(&update, f);
        Ok(match self {
            Adversary::Noise => dense(&mut |d: &mut [f32]| {
                let norm = l2(d);
                for v in d.iter_mut().filter(|v| **v != 0.0) {
                    *v = normal(&mut rng);
                }
                let scale = if l2(d) > 0.0 { norm / l2(d) } else { 0.0 };
                d.iter_mut().for_each(|v| *v *= scale);
            })?,
            Adversary::Scale(x) => dense(&mut |d: &mut [f32]| d.iter_mut().for_each(|v| *v *= x))?,
            Adversary::SignFlip => dense(&mut |d: &mut [f32]| d.iter_mut().for_each(|v| *v = -*v))?,
            Adversary::Zero => dense(&mut |d: &mut [f32]| d.fill(0.0))?,
            Adversary::CopyNoisy(_) => dense(&mut |d: &mut [f32]| {
                for v in d.iter_mut().filter(|v| **v != 0.0) {
                    *v *= 1.0 + 0.05 * normal(&mut rng);
                }
            })?,
            Adversary::Copy(_)
            | Adversary::Replay
            | Adversary::Stale
            | Adversary::OffSlice
            | Adversary::Frozen => update,
        }
        .to_bytes())
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

fn l2(d: &[f32]) -> f32 {
    d.iter().map(|v| v * v).sum::<f32>().sqrt()
}

/// `update` decoded, changed by `f` tensor by tensor, and encoded again (without error
/// feedback: the residual is dropped).
fn reencode(update: &Update, f: &mut dyn FnMut(&mut [f32])) -> Result<Update, CodecError> {
    let compressor = Compressor::new(update.config(), 0.0)?;
    let tensors = (update.tensors().iter())
        .map(|t: &EncodedTensor| {
            let mut dense = vec![0.0; t.numel()];
            t.decode_add(1.0, &mut dense)?;
            f(&mut dense);
            let mut ef = vec![0.0; t.numel()];
            compressor.compress(t.name(), t.shape(), Finite::new(&dense)?, &mut ef)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Update::new(update.config(), tensors)
}

/// A closed round as a peer applies it: each update of its step and its weight, or the
/// exchange's aggregate of them.
pub struct Closed {
    pub updates: Vec<(Vec<u8>, f32)>,
    pub aggregate: Option<Vec<u8>>,
}

/// A cheating peer's plan and what it keeps to carry it out: the train role's and the
/// simulation's one adversary.
pub struct Cheater {
    adversary: Adversary,
    from: Round,
    seed: u64,
    /// Its own last two updates, oldest first.
    sent: VecDeque<Vec<u8>>,
    /// Every peer's update of the last closed round.
    previous: BTreeMap<PeerId, Vec<u8>>,
    /// Closed rounds not applied yet (a stale peer).
    late: VecDeque<Closed>,
}

impl Cheater {
    /// Cheats as `adversary` from round `from`; `seed` makes its noise reproducible.
    pub fn new(adversary: Adversary, from: Round, seed: u64) -> Self {
        Self {
            adversary,
            from,
            seed,
            sent: VecDeque::new(),
            previous: BTreeMap::new(),
            late: VecDeque::new(),
        }
    }

    /// The adversary, if it cheats in `round`.
    fn active(&self, round: Round) -> Option<&Adversary> {
        (round >= self.from).then_some(&self.adversary)
    }

    /// Whose data `peer` (of `peers`) trains on in `round`.
    pub fn trains_on(&self, peer: PeerId, peers: u32, round: Round) -> PeerId {
        self.active(round)
            .map_or(peer, |a| a.trains_on(peer, peers))
    }

    /// What goes out instead of the honest `update` (the honest one, before `from`).
    pub fn tamper(&mut self, round: Round, update: Vec<u8>) -> Vec<u8> {
        let sent = match self.active(round) {
            None => update,
            Some(adversary) => {
                let copied = match adversary {
                    Adversary::Copy(of) | Adversary::CopyNoisy(of) => {
                        self.previous.get(of).map(Vec::as_slice)
                    }
                    _ => None,
                };
                let material = Material {
                    own_old: (self.sent.len() == 2).then(|| self.sent[0].as_slice()),
                    copied,
                    seed: self.seed ^ u64::from(round.0),
                };
                adversary.tamper(&update, &material).unwrap_or_else(|e| {
                    tracing::warn!(%adversary, error = %e, "could not cheat; sending the honest update");
                    update
                })
            }
        };
        self.sent.push_back(sent.clone());
        if self.sent.len() > 2 {
            self.sent.pop_front();
        }
        sent
    }

    /// `round` closed with `entries` (peer, update, weight) and, when the run downloads
    /// one, `aggregate`: the closed rounds to apply now, oldest first (this one, none, or
    /// an older one). Only the updates a peer sees can be copied.
    pub fn due(
        &mut self,
        round: Round,
        entries: Vec<(PeerId, Vec<u8>, f32)>,
        aggregate: Option<Vec<u8>>,
    ) -> Vec<Closed> {
        self.previous = entries.iter().map(|(p, b, _)| (*p, b.clone())).collect();
        self.late.push_back(Closed {
            updates: entries.into_iter().map(|(_, b, w)| (b, w)).collect(),
            aggregate,
        });
        match self
            .active(round)
            .map_or(Applies::AtOnce, Adversary::applies)
        {
            Applies::AtOnce => self.late.drain(..).collect(),
            Applies::Late(lag) => {
                let due = self.late.len().saturating_sub(lag);
                self.late.drain(..due).collect()
            }
            Applies::Never => {
                self.late.clear();
                vec![]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_setting_for_a_whole_run_names_each_cheating_peer() {
        let p = PeerId::new;
        let every: Adversaries = "signflip".parse().unwrap();
        assert_eq!(every.of(p(7)), Some(Adversary::SignFlip));
        let some: Adversaries = "p2=signflip, p3=copy:p0".parse().unwrap();
        assert_eq!(some.of(p(2)), Some(Adversary::SignFlip));
        assert_eq!(some.of(p(3)), Some(Adversary::Copy(p(0))));
        assert_eq!(some.of(p(0)), None);
        assert_eq!(some.to_string(), "p2=signflip,p3=copy:p0");
        assert!("p2=sideways".parse::<Adversaries>().is_err());
        assert!("x2=zero".parse::<Adversaries>().is_err());
    }

    #[test]
    fn kinds_parse_and_print_back() {
        for kind in [
            "noise",
            "scale:20",
            "scale:0.5",
            "signflip",
            "zero",
            "copy:p1",
            "copy:p1:noisy",
            "replay",
            "stale",
            "offslice",
            "frozen",
        ] {
            assert_eq!(kind.parse::<Adversary>().unwrap().to_string(), kind);
        }
        for bad in [
            "scale",
            "scale:x",
            "scale:inf",
            "copy:",
            "copy:1",
            "copy:p1:loud",
            "loud",
            "zero:1",
        ] {
            assert!(bad.parse::<Adversary>().is_err(), "{bad}");
        }
    }

    fn cheater(kind: &str, from: u32) -> Cheater {
        Cheater::new(kind.parse().unwrap(), Round(from), 0)
    }

    fn closed(round: u8) -> Vec<(PeerId, Vec<u8>, f32)> {
        vec![
            (PeerId::new(0), vec![round], 1.0),
            (PeerId::new(1), vec![round, 1], 1.0),
        ]
    }

    #[test]
    fn a_stale_peer_applies_rounds_two_late_and_a_frozen_one_never() {
        let mut stale = cheater("stale", 1);
        let applied: Vec<usize> = (0..5)
            .map(|r| stale.due(Round(r), closed(r as u8), None).len())
            .collect();
        assert_eq!(applied, [1, 0, 0, 1, 1]);
        let mut frozen = cheater("frozen", 2);
        let applied: Vec<usize> = (0..4)
            .map(|r| frozen.due(Round(r), closed(r as u8), None).len())
            .collect();
        assert_eq!(applied, [1, 1, 0, 0]);
        let mut honest_until_late = cheater("signflip", 9);
        assert_eq!(honest_until_late.due(Round(0), closed(0), None).len(), 1);
    }

    #[test]
    fn a_replayer_resends_its_update_of_two_rounds_before_and_a_copier_another_peers() {
        let mut replay = cheater("replay", 2);
        let sent: Vec<Vec<u8>> = (0..4)
            .map(|r| replay.tamper(Round(r), vec![r as u8]))
            .collect();
        assert_eq!(sent, [vec![0], vec![1], vec![0], vec![1]]);
        let mut copy = cheater("copy:p1", 1);
        assert_eq!(copy.tamper(Round(0), vec![9]), [9]);
        copy.due(Round(0), closed(7), None);
        assert_eq!(copy.tamper(Round(1), vec![9]), [7, 1]);
    }

    #[test]
    fn an_offslice_peer_trains_on_the_next_peers_data_once_it_cheats() {
        let offslice = cheater("offslice", 1);
        assert_eq!(
            offslice.trains_on(PeerId::new(2), 3, Round(0)),
            PeerId::new(2)
        );
        assert_eq!(
            offslice.trains_on(PeerId::new(2), 3, Round(1)),
            PeerId::new(0)
        );
        let zero = cheater("zero", 0);
        assert_eq!(zero.trains_on(PeerId::new(2), 3, Round(1)), PeerId::new(2));
    }
}
