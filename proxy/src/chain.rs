//! The sans-IO core of one direction of one connection: chunks in, stamped
//! with when they were read; the direction's toxics as stages in insertion
//! order; bytes to write, the next deadline and connection-level actions
//! out. It knows no socket and reads no clock: every call takes `now`.
//!
//! Items flow from stage to stage in one pass of [`Chain::advance`]; a stage
//! keeps what it holds in its own queue, so removing a toxic hands its queue
//! to the stage after it, behind that stage's (older) items: nothing is lost
//! or reordered that a toxic did not mean to drop.

use std::collections::VecDeque;
use std::mem;
use std::time::{Duration, Instant};

use crate::rng::{self, Rng};
use crate::toxic::{Entry, ToxicKind};

/// The longest wait a toxic is taken to mean; longer ones are this long.
/// `Instant` + this cannot overflow on a monotonic clock.
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A bandwidth toxic passes this fraction of a second's worth of bytes per
/// piece: small enough to keep the rate smooth, big enough to keep the
/// number of writes low.
const PIECES_PER_SECOND: u64 = 20;

/// What flows through a chain, oldest first.
#[derive(Debug, PartialEq)]
pub(crate) enum Item {
    /// Bytes from one read of the source (never empty).
    Data {
        /// The bytes.
        bytes: Vec<u8>,
        /// When the proxy read them: latency is measured from here.
        arrival: Instant,
    },
    /// The source ended: pass the half-close on once everything before it
    /// is written.
    Eof,
    /// `limit_data` cut the direction: end the connection (FIN to both
    /// sides) once everything before it is written.
    End,
}

impl Item {
    /// Bytes the item carries.
    fn len(&self) -> usize {
        match self {
            Item::Data { bytes, .. } => bytes.len(),
            Item::Eof | Item::End => 0,
        }
    }
}

/// What a toxic's timer does to the whole connection, whatever the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// RST to both sides (`reset_peer`).
    Reset,
    /// FIN to both sides, held data dropped (`timeout` with a timeout).
    End,
}

/// What the writer does next, in order.
#[derive(Debug, PartialEq)]
pub(crate) enum Next<'a> {
    /// Write these bytes (the unwritten rest of the front item).
    Write(&'a [u8]),
    /// Everything is written and the source ended: half-close the destination.
    Eof,
    /// Everything `limit_data` let through is written: end the connection.
    End,
}

/// What [`Chain::advance`] found.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Step {
    /// A connection-level action due now (a reset wins over an end).
    pub action: Option<Action>,
    /// When a stage next has something to do, if it waits for time.
    pub deadline: Option<Instant>,
}

impl Step {
    /// Takes in a stage's action and deadline.
    fn merge(&mut self, action: Option<Action>, deadline: Option<Instant>) {
        self.action = match (self.action, action) {
            (Some(Action::Reset), _) | (_, Some(Action::Reset)) => Some(Action::Reset),
            (a, b) => a.or(b),
        };
        self.deadline = match (self.deadline, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// One direction of one connection.
#[derive(Debug)]
pub(crate) struct Chain {
    /// The proxy's seed, for keying new stages.
    seed: u64,
    /// The connection's number in accept order, from 0.
    conn: u64,
    /// Items pushed since the last advance, oldest first.
    inbox: Vec<Item>,
    /// Scratch space for items moving between stages; empty between calls.
    carry: Vec<Item>,
    /// The direction's toxics in insertion order (ids increasing).
    stages: Vec<Stage>,
    /// Items through every stage, for the writer; oldest first.
    out: VecDeque<Item>,
    /// Bytes of `out`'s front item already written.
    written: usize,
    /// Bytes pushed and neither written nor dropped by a toxic.
    held: usize,
}

impl Chain {
    /// An empty chain for connection number `conn` of a proxy seeded `seed`.
    pub(crate) fn new(seed: u64, conn: u64) -> Self {
        Chain {
            seed,
            conn,
            inbox: Vec::new(),
            carry: Vec::new(),
            stages: Vec::new(),
            out: VecDeque::new(),
            written: 0,
            held: 0,
        }
    }

    /// Bytes read and neither written nor dropped.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// No toxic and nothing held: bytes read may be written straight on.
    pub(crate) fn passthrough(&self) -> bool {
        self.stages.is_empty() && self.held == 0
    }

    /// Takes an item from the source; the next [`Chain::advance`] moves it.
    pub(crate) fn push(&mut self, item: Item) {
        self.held += item.len();
        self.inbox.push(item);
    }

    /// Makes the stages match `live`, this direction's toxics in insertion
    /// order: a toxic no longer there hands what it holds to the stage after
    /// it (or the writer) at once; a new one meets the connection `now` and
    /// joins at the end.
    pub(crate) fn sync(&mut self, live: &[&Entry], now: Instant) {
        let mut i = 0;
        while i < self.stages.len() {
            if live.iter().any(|e| e.id == self.stages[i].id) {
                i += 1;
                continue;
            }
            let released = self.stages.remove(i).release();
            match self.stages.get_mut(i) {
                Some(next) => released.for_each(|item| next.accept(item, now)),
                None => self.out.extend(released),
            }
        }
        for entry in live {
            if !self.stages.iter().any(|s| s.id == entry.id) {
                self.stages.push(Stage::new(entry, rng::key(self.seed, &entry.toxic.name, self.conn), now));
            }
        }
    }

    /// Moves every item as far as the stages let it at `now`.
    pub(crate) fn advance(&mut self, now: Instant) -> Step {
        let mut step = Step::default();
        let mut dropped = 0;
        let mut items = mem::take(&mut self.inbox);
        let mut next = mem::take(&mut self.carry);
        for stage in &mut self.stages {
            items.drain(..).for_each(|item| stage.accept(item, now));
            let (action, deadline) = stage.run(now, &mut next, &mut dropped);
            step.merge(action, deadline);
            mem::swap(&mut items, &mut next);
        }
        self.out.extend(items.drain(..));
        self.held -= dropped;
        (self.inbox, self.carry) = (items, next);
        step
    }

    /// What the writer does next, if anything is ready.
    pub(crate) fn next(&self) -> Option<Next<'_>> {
        Some(match self.out.front()? {
            Item::Data { bytes, .. } => Next::Write(&bytes[self.written..]),
            Item::Eof => Next::Eof,
            Item::End => Next::End,
        })
    }

    /// Records that `n` bytes of [`Next::Write`] were written.
    pub(crate) fn wrote(&mut self, n: usize) {
        self.written += n;
        self.held -= n;
        if self.out.front().is_some_and(|front| self.written >= front.len()) {
            self.out.pop_front();
            self.written = 0;
        }
    }
}

/// A toxic on one connection's direction.
#[derive(Debug)]
struct Stage {
    /// The toxic's [`Entry::id`]: a toxic removed and added again under the
    /// same name is a new stage.
    id: u64,
    /// Items accepted and not yet passed on, oldest first, each with the
    /// time it may leave (set on entry; what it means depends on `kind`).
    queue: VecDeque<(Item, Instant)>,
    /// What the stage does, with its state.
    kind: Kind,
    /// Jitter and slice sizes; keyed like the toxicity roll.
    rng: Rng,
}

/// A stage's behaviour and state.
#[derive(Debug)]
enum Kind {
    /// The toxicity roll spared this connection: items pass unchanged.
    Pass,
    /// Each data item leaves at its arrival + its own jittered delay, in order.
    Latency {
        /// The mean delay.
        latency: Duration,
        /// The largest deviation, either way.
        jitter: Duration,
    },
    /// A link of `rate` bytes/s: each piece leaves when it would have been
    /// carried, starting when the previous one was. Times are computed from
    /// the start of the busy period, so rounding does not add up.
    Bandwidth {
        /// Bytes per second, at least 1.
        rate: u64,
        /// When the link last went from idle to busy.
        since: Instant,
        /// Bytes carried since `since`; the link is free at
        /// `since + carried / rate`.
        carried: u64,
        /// The front piece's size and leaving time, once scheduled.
        piece: Option<(usize, Instant)>,
    },
    /// Slices of `average ± variation` bytes, `delay` apart.
    Slicer {
        /// The mean slice size, at least 1.
        average: usize,
        /// The largest deviation, below `average`.
        variation: usize,
        /// The pause after each slice.
        delay: Duration,
        /// When the next slice may leave.
        next: Instant,
    },
    /// Passes `left` more bytes, then an [`Item::End`]; drops the rest.
    LimitData {
        /// Bytes still to pass.
        left: u64,
        /// The End has been sent; everything after is dropped.
        done: bool,
    },
    /// Passes everything; resets the connection at `at`.
    ResetPeer {
        /// When the toxic met the connection, plus its timeout.
        at: Instant,
    },
    /// Holds everything; ends the connection at `at`, if set.
    Timeout {
        /// When the toxic met the connection, plus its timeout; `None`: never.
        at: Option<Instant>,
    },
    /// Passes data; an EOF or End leaves `delay` after it came.
    SlowClose {
        /// How long the EOF is held.
        delay: Duration,
    },
}

impl Stage {
    /// The stage for `entry` on a connection it meets `now`; `key` decides
    /// the toxicity roll and seeds the stage's generator.
    fn new(entry: &Entry, key: u64, now: Instant) -> Self {
        let affected = rng::unit(key) < entry.toxic.toxicity;
        let kind = match entry.toxic.kind {
            _ if !affected => Kind::Pass,
            ToxicKind::Latency { latency, jitter } => Kind::Latency { latency, jitter },
            ToxicKind::Bandwidth { rate_kib } => Kind::Bandwidth {
                rate: rate_kib.saturating_mul(1024).max(1),
                since: now,
                carried: 0,
                piece: None,
            },
            ToxicKind::Slicer { average_size, size_variation, delay } => Kind::Slicer {
                average: average_size.max(1),
                variation: size_variation.min(average_size.saturating_sub(1)),
                delay,
                next: now,
            },
            ToxicKind::LimitData { bytes } => Kind::LimitData { left: bytes, done: false },
            ToxicKind::ResetPeer { timeout } => Kind::ResetPeer { at: later(now, timeout) },
            ToxicKind::Timeout { timeout } => {
                Kind::Timeout { at: (!timeout.is_zero()).then(|| later(now, timeout)) }
            }
            ToxicKind::SlowClose { delay } => Kind::SlowClose { delay },
        };
        Stage { id: entry.id, queue: VecDeque::new(), kind, rng: Rng::new(key) }
    }

    /// Queues an item that reached the stage at `now`.
    fn accept(&mut self, item: Item, now: Instant) {
        let due = match (&mut self.kind, &item) {
            (Kind::Latency { latency, jitter }, Item::Data { arrival, .. }) => {
                later(*arrival, jittered(*latency, *jitter, &mut self.rng))
            }
            (Kind::Bandwidth { rate, since, carried, .. }, Item::Data { .. }) => {
                // An idle link does not save up time for a later burst.
                if self.queue.is_empty() && later(*since, carry_time(*carried, *rate)) < now {
                    (*since, *carried) = (now, 0);
                }
                now
            }
            (Kind::SlowClose { delay }, Item::Eof | Item::End) => later(now, *delay),
            _ => now,
        };
        self.queue.push_back((item, due));
    }

    /// Passes on into `out` what may leave at `now`; adds dropped bytes to
    /// `dropped`. Returns a connection-level action due now, and when the
    /// stage next has something to do.
    fn run(
        &mut self,
        now: Instant,
        out: &mut Vec<Item>,
        dropped: &mut usize,
    ) -> (Option<Action>, Option<Instant>) {
        let queue = &mut self.queue;
        match &mut self.kind {
            Kind::Pass => {
                out.extend(queue.drain(..).map(|(item, _)| item));
                (None, None)
            }
            Kind::ResetPeer { at } => {
                out.extend(queue.drain(..).map(|(item, _)| item));
                if now >= *at {
                    (Some(Action::Reset), None)
                } else {
                    (None, Some(*at))
                }
            }
            Kind::Timeout { at: Some(at) } if now >= *at => (Some(Action::End), None),
            Kind::Timeout { at } => (None, *at),
            Kind::Latency { .. } | Kind::SlowClose { .. } => {
                while let Some(&(_, due)) = queue.front() {
                    if due > now {
                        return (None, Some(due));
                    }
                    out.extend(queue.pop_front().map(|(item, _)| item));
                }
                (None, None)
            }
            Kind::LimitData { left, done } => {
                for (item, _) in queue.drain(..) {
                    if *done {
                        *dropped += item.len();
                        continue;
                    }
                    match item {
                        Item::Data { mut bytes, arrival } => {
                            let pass = bytes.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                            *dropped += bytes.len() - pass;
                            bytes.truncate(pass);
                            *left -= pass as u64;
                            if pass > 0 {
                                out.push(Item::Data { bytes, arrival });
                            }
                        }
                        Item::Eof if *left > 0 => out.push(Item::Eof),
                        Item::Eof | Item::End => *left = 0,
                    }
                    if *left == 0 {
                        out.push(Item::End);
                        *done = true;
                    }
                }
                (None, None)
            }
            Kind::Bandwidth { rate, since, carried, piece } => loop {
                let Some((front, _)) = queue.front_mut() else {
                    return (None, None);
                };
                let Item::Data { bytes, arrival } = front else {
                    out.extend(queue.pop_front().map(|(item, _)| item));
                    continue;
                };
                let (len, at) = *piece.get_or_insert_with(|| {
                    let len = bytes
                        .len()
                        .min(usize::try_from(*rate / PIECES_PER_SECOND).unwrap_or(usize::MAX).max(1));
                    (len, later(*since, carry_time(*carried + len as u64, *rate)))
                });
                if at > now {
                    return (None, Some(at));
                }
                *carried += len as u64;
                *piece = None;
                out.push(Item::Data { bytes: split_front(bytes, len), arrival: *arrival });
                if bytes.is_empty() {
                    queue.pop_front();
                }
            },
            Kind::Slicer { average, variation, delay, next } => loop {
                let Some((front, _)) = queue.front_mut() else {
                    return (None, None);
                };
                if *next > now {
                    return (None, Some(*next));
                }
                *next = later(now, *delay);
                let Item::Data { bytes, arrival } = front else {
                    out.extend(queue.pop_front().map(|(item, _)| item));
                    continue;
                };
                let span = (*variation as u64).saturating_mul(2).saturating_add(1);
                let mut size = (*average - *variation).saturating_add(self.rng.below(span) as usize);
                if delay.is_zero() {
                    // No pause between slices: cut the whole chunk now, each slice copied
                    // out of it, so 1-byte slices of 32 KiB cost O(chunk) and not the
                    // O(chunk²) of a `split_off` per slice (half a second per chunk).
                    let mut at = 0;
                    while at < bytes.len() {
                        let end = bytes.len().min(at.saturating_add(size));
                        out.push(Item::Data { bytes: bytes[at..end].to_vec(), arrival: *arrival });
                        at = end;
                        size = (*average - *variation).saturating_add(self.rng.below(span) as usize);
                    }
                    bytes.clear();
                } else {
                    out.push(Item::Data { bytes: split_front(bytes, size), arrival: *arrival });
                }
                if bytes.is_empty() {
                    queue.pop_front();
                }
            },
        }
    }

    /// What the stage holds, oldest first, to pass on when its toxic goes:
    /// a latency's chunks without their remaining delay, a bandwidth's or
    /// slicer's rest of a chunk in one piece, a timeout's held data and EOF.
    fn release(self) -> impl Iterator<Item = Item> {
        self.queue.into_iter().map(|(item, _)| item)
    }
}

/// `t + d`, with `d` capped at [`FOREVER`].
fn later(t: Instant, d: Duration) -> Instant {
    // Unreachable fallback: a monotonic clock plus ten years fits an Instant.
    t.checked_add(d.min(FOREVER)).unwrap_or(t)
}

/// `latency` plus a uniform draw in `[-jitter, +jitter]`, at least zero.
fn jittered(latency: Duration, jitter: Duration, rng: &mut Rng) -> Duration {
    if jitter.is_zero() {
        return latency;
    }
    let jitter = jitter.min(FOREVER).as_nanos() as i128;
    let offset = i128::from(rng.below(2 * jitter as u64 + 1)) - jitter;
    let nanos = (latency.min(FOREVER).as_nanos() as i128 + offset).max(0);
    Duration::from_nanos(nanos as u64)
}

/// The time a link of `rate` bytes/s takes to carry `len` bytes.
fn carry_time(len: u64, rate: u64) -> Duration {
    let nanos = u128::from(len) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Takes the first `n` bytes off `bytes` (all of them if `n` is not less).
fn split_front(bytes: &mut Vec<u8>, n: usize) -> Vec<u8> {
    if n >= bytes.len() {
        return mem::take(bytes);
    }
    let rest = bytes.split_off(n);
    mem::replace(bytes, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toxic::{Stream, Toxic};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn entry(id: u64, kind: ToxicKind) -> Entry {
        Entry { id, toxic: Toxic { name: format!("t{id}"), kind, stream: Stream::Downstream, toxicity: 1.0 } }
    }

    fn data(bytes: &[u8], arrival: Instant) -> Item {
        Item::Data { bytes: bytes.to_vec(), arrival }
    }

    /// Everything the writer may take now, written at once.
    fn drain(chain: &mut Chain) -> Vec<Vec<u8>> {
        let mut writes = Vec::new();
        while let Some(Next::Write(bytes)) = chain.next() {
            let n = bytes.len();
            writes.push(bytes.to_vec());
            chain.wrote(n);
        }
        writes
    }

    #[test]
    fn latency_is_measured_from_arrival_and_overlaps() {
        let t0 = Instant::now();
        let mut chain = Chain::new(1, 0);
        chain.sync(&[&entry(1, ToxicKind::Latency { latency: ms(50), jitter: ms(0) })], t0);
        chain.push(data(b"a", t0));
        chain.push(data(b"b", t0 + ms(10)));
        assert_eq!(chain.advance(t0 + ms(20)).deadline, Some(t0 + ms(50)));
        assert!(drain(&mut chain).is_empty());
        assert_eq!(chain.held(), 2);
        assert_eq!(chain.advance(t0 + ms(50)).deadline, Some(t0 + ms(60)));
        assert_eq!(drain(&mut chain), [b"a"]);
        chain.push(Item::Eof);
        assert_eq!(chain.advance(t0 + ms(60)), Step::default());
        assert_eq!(drain(&mut chain), [b"b"]);
        assert_eq!(chain.next(), Some(Next::Eof));
        assert_eq!(chain.held(), 0);
    }

    #[test]
    fn bandwidth_carries_at_the_rate() {
        let t0 = Instant::now();
        let mut chain = Chain::new(1, 0);
        // 1 KiB/s: pieces of 51 bytes, each 51/1024 s.
        chain.sync(&[&entry(1, ToxicKind::Bandwidth { rate_kib: 1 })], t0);
        chain.push(data(&[7; 1024], t0));
        let mut now = t0;
        let mut got = 0;
        while got < 1024 {
            now = chain.advance(now).deadline.unwrap_or(now);
            got += drain(&mut chain).iter().map(|w| w.len()).sum::<usize>();
        }
        assert_eq!(now - t0, Duration::from_secs(1));
    }

    #[test]
    fn slicer_slices_within_bounds_with_delays() {
        let t0 = Instant::now();
        let mut chain = Chain::new(1, 0);
        let kind = ToxicKind::Slicer { average_size: 10, size_variation: 3, delay: ms(5) };
        chain.sync(&[&entry(1, kind)], t0);
        let input: Vec<u8> = (0..200).collect();
        chain.push(data(&input, t0));
        let (mut now, mut slices) = (t0, Vec::new());
        while slices.iter().map(Vec::len).sum::<usize>() < input.len() {
            let step = chain.advance(now);
            slices.extend(drain(&mut chain));
            now = step.deadline.unwrap_or(now);
        }
        // The last slice is what is left.
        let (last, whole) = slices.split_last().unwrap();
        assert!(whole.iter().all(|s| (7..=13).contains(&s.len())) && last.len() <= 13, "{slices:?}");
        assert!(slices.iter().any(|s| s.len() != 10));
        assert_eq!(slices.concat(), input);
        assert_eq!(now - t0, ms(5) * (slices.len() as u32 - 1));
    }

    #[test]
    fn limit_data_cuts_then_ends() {
        let t0 = Instant::now();
        let mut chain = Chain::new(1, 0);
        chain.sync(&[&entry(1, ToxicKind::LimitData { bytes: 5 })], t0);
        chain.push(data(b"abc", t0));
        chain.push(data(b"defg", t0));
        chain.push(data(b"hij", t0));
        chain.advance(t0);
        assert_eq!(drain(&mut chain), [&b"abc"[..], b"de"]);
        assert_eq!(chain.next(), Some(Next::End));
        assert_eq!(chain.held(), 0);
    }

    #[test]
    fn timers_act_on_the_connection() {
        let t0 = Instant::now();
        let mut chain = Chain::new(1, 0);
        chain.sync(&[&entry(1, ToxicKind::ResetPeer { timeout: ms(30) })], t0);
        chain.push(data(b"a", t0));
        assert_eq!(chain.advance(t0), Step { action: None, deadline: Some(t0 + ms(30)) });
        assert_eq!(drain(&mut chain), [b"a"]);
        chain.sync(&[&entry(2, ToxicKind::Timeout { timeout: ms(20) })], t0 + ms(1));
        assert_eq!(chain.advance(t0 + ms(10)).deadline, Some(t0 + ms(21)));
        assert_eq!(chain.advance(t0 + ms(21)).action, Some(Action::End));
    }

    #[test]
    fn removing_a_toxic_releases_in_order() {
        let t0 = Instant::now();
        let mut chain = Chain::new(1, 0);
        let hold = entry(1, ToxicKind::Timeout { timeout: Duration::ZERO });
        let slow = entry(2, ToxicKind::Latency { latency: ms(100), jitter: ms(0) });
        chain.sync(&[&hold], t0);
        chain.push(data(b"a", t0));
        chain.push(Item::Eof);
        assert_eq!(chain.advance(t0), Step::default());
        // Added behind the timeout, the latency sees its data when released.
        chain.sync(&[&hold, &slow], t0);
        chain.sync(&[&slow], t0 + ms(10));
        assert_eq!(chain.advance(t0 + ms(10)).deadline, Some(t0 + ms(100)));
        assert!(drain(&mut chain).is_empty());
        // Removing the latency sends what it holds at once.
        chain.sync(&[], t0 + ms(20));
        chain.advance(t0 + ms(20));
        assert_eq!(drain(&mut chain), [b"a"]);
        assert_eq!(chain.next(), Some(Next::Eof));
    }

    #[test]
    fn toxicity_decides_per_connection_from_the_key() {
        let t0 = Instant::now();
        let mut e = entry(1, ToxicKind::Timeout { timeout: Duration::ZERO });
        let held = |e: &Entry, seed, conn| {
            let mut chain = Chain::new(seed, conn);
            chain.sync(&[e], t0);
            chain.push(data(b"a", t0));
            chain.advance(t0);
            chain.next().is_none()
        };
        e.toxic.toxicity = 0.0;
        assert!((0..50).all(|c| !held(&e, 7, c)));
        e.toxic.toxicity = 1.0;
        assert!((0..50).all(|c| held(&e, 7, c)));
        e.toxic.toxicity = 0.5;
        let set = |seed| (0..50).map(|c| held(&e, seed, c)).collect::<Vec<_>>();
        assert_eq!(set(7), set(7));
        assert_ne!(set(7), set(8));
        let n = set(7).iter().filter(|&&h| h).count();
        assert!((10..40).contains(&n), "{n} of 50 affected at 0.5");
    }
}
