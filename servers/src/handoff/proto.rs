//! The handoff control protocol, sans IO: the frame codec and the
//! incumbent's side of a session as a state machine that is told each frame
//! and says what to do (quinn-proto's shape: no socket in here).
//!
//! A frame is a 16-byte header and a body of at most [`MAX_BODY`] bytes:
//!
//! ```text
//! 0..4   magic  "CLHO"
//! 4      version (this side speaks VERSION)
//! 5      kind    (Kind)
//! 6..8   body length, u16 big-endian
//! 8..16  handoff id, u64 big-endian (0 in Hello: the incumbent picks it)
//! 16..   body
//! ```
//!
//! A session, successor (S) and incumbent (I):
//!
//! ```text
//! S: Hello{pid}        I: Welcome             (I picks the handoff id)
//! S: Prepare           I: Listener{port}      (+ the listening fd, SCM_RIGHTS)
//!    ... S starts accepting on the fd ...
//! S: Seal              I: Sealed              (I no longer accepts; drain begins)
//! S: Commit            I: Drained{report}     (I's connections are all closed)
//! ```
//!
//! Anything else closes the session with an [`Error`](Kind::Error) frame
//! naming the reason; before Seal the incumbent goes on serving as if the
//! session never happened.

use std::fmt;
use std::time::Duration;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CLHO";
/// The protocol version this side speaks.
pub const VERSION: u8 = 1;
/// Header bytes before the body.
pub const HEADER: usize = 16;
/// The largest body a frame may carry.
pub const MAX_BODY: usize = 1024;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// S → I: I am a successor (body: pid, u32).
    Hello = 1,
    /// I → S: go on; the header carries the handoff id of this session.
    Welcome = 2,
    /// S → I: send me the listening socket.
    Prepare = 3,
    /// I → S: the listening socket (body: port, u16; the fd as ancillary data).
    Listener = 4,
    /// S → I: I accept on it now; stop accepting.
    Seal = 5,
    /// I → S: I no longer accept; my connections drain.
    Sealed = 6,
    /// S → I: done; report when your connections are closed.
    Commit = 7,
    /// I → S: my connections are closed (body: drained, forced, elapsed µs; u64 each).
    Drained = 8,
    /// Either way: the session ends (body: the reason, UTF-8).
    Error = 9,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Prepare,
            4 => Kind::Listener,
            5 => Kind::Seal,
            6 => Kind::Sealed,
            7 => Kind::Commit,
            8 => Kind::Drained,
            9 => Kind::Error,
            _ => return None,
        })
    }

    /// The lower-case name used in reasons.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Welcome => "welcome",
            Kind::Prepare => "prepare",
            Kind::Listener => "listener",
            Kind::Seal => "seal",
            Kind::Sealed => "sealed",
            Kind::Commit => "commit",
            Kind::Drained => "drained",
            Kind::Error => "error",
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// The session's handoff id (0 in Hello).
    pub id: u64,
    /// Its body.
    pub body: Vec<u8>,
}

impl Frame {
    /// A frame of `kind` for session `id` with `body`.
    pub fn new(kind: Kind, id: u64, body: Vec<u8>) -> Frame {
        Frame { kind, id, body }
    }

    /// Its bytes on the wire, in this side's version.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(VERSION)
    }

    /// Its bytes with another version in the header (to test a peer's refusal).
    pub fn encode_as(&self, version: u8) -> Vec<u8> {
        let body = &self.body[..self.body.len().min(MAX_BODY)];
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(&MAGIC);
        out.push(version);
        out.push(self.kind as u8);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// A u64 of the body at word `i`, or None if the body is too short.
    pub fn word(&self, i: usize) -> Option<u64> {
        let bytes = self.body.get(8 * i..8 * i + 8)?;
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// Why a byte stream is not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The magic is wrong: not this protocol.
    Garbage,
    /// A version this side does not speak.
    Version(u8),
    /// A kind byte no version-1 frame has.
    UnknownKind(u8),
    /// A body longer than [`MAX_BODY`].
    TooLong(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Garbage => write!(f, "garbage bytes: not a handoff frame (bad magic)"),
            DecodeError::Version(v) => write!(f, "unknown protocol version {v} (this side speaks {VERSION})"),
            DecodeError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            DecodeError::TooLong(n) => write!(f, "a {n}-byte body (at most {MAX_BODY})"),
        }
    }
}

/// Cuts frames out of a byte stream as it arrives.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether bytes of an unfinished frame are held.
    pub fn in_frame(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next whole frame, if one has arrived. A header is judged as soon
    /// as its first bytes are in, so garbage is refused without waiting for
    /// 16 bytes of it.
    pub fn decode(&mut self) -> Result<Option<Frame>, DecodeError> {
        let have = self.buf.len().min(MAGIC.len());
        if self.buf[..have] != MAGIC[..have] {
            return Err(DecodeError::Garbage);
        }
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        if self.buf[4] != VERSION {
            return Err(DecodeError::Version(self.buf[4]));
        }
        let kind = Kind::from_u8(self.buf[5]).ok_or(DecodeError::UnknownKind(self.buf[5]))?;
        let len = usize::from(u16::from_be_bytes([self.buf[6], self.buf[7]]));
        if len > MAX_BODY {
            return Err(DecodeError::TooLong(len));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let id = u64::from_be_bytes(self.buf[8..16].try_into().expect("8 bytes"));
        let body = self.buf[HEADER..HEADER + len].to_vec();
        self.buf.drain(..HEADER + len);
        Ok(Some(Frame { kind, id, body }))
    }
}

/// Where an incumbent's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for Hello.
    Hello,
    /// Welcomed; waiting for Prepare.
    Prepare,
    /// The listener was sent; waiting for Seal (still accepting).
    Seal,
    /// Sealed: no longer accepting; waiting for Commit.
    Commit,
    /// Committed: the session ends once the drain has.
    Done,
}

impl Phase {
    /// What the incumbent waits for, in words.
    pub fn waiting_for(self) -> &'static str {
        match self {
            Phase::Hello => "hello",
            Phase::Prepare => "prepare",
            Phase::Seal => "seal",
            Phase::Commit => "commit",
            Phase::Done => "nothing",
        }
    }
}

/// What the incumbent does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send Welcome.
    Welcome,
    /// Send Listener with the listening fd.
    SendListener,
    /// Stop accepting, begin the drain, then send Sealed.
    Seal,
    /// Wait for the drain to end, then send Drained and end the session.
    Commit,
}

/// Why the incumbent closes a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<DecodeError> for Violation {
    fn from(e: DecodeError) -> Self {
        Violation(e.to_string())
    }
}

/// The incumbent's side of one control session.
#[derive(Debug)]
pub struct Incumbent {
    id: u64,
    phase: Phase,
    successor_pid: Option<u32>,
}

impl Incumbent {
    /// A session whose handoff id will be `id` (non-zero).
    pub fn new(id: u64) -> Incumbent {
        Incumbent { id, phase: Phase::Hello, successor_pid: None }
    }

    /// The session's handoff id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where the session is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The successor's pid, from its Hello.
    pub fn successor_pid(&self) -> Option<u32> {
        self.successor_pid
    }

    /// Whether the incumbent has stopped accepting (Seal was carried out).
    pub fn sealed(&self) -> bool {
        matches!(self.phase, Phase::Commit | Phase::Done)
    }

    /// Takes one frame from the successor; says what to do, or why the
    /// session must close.
    pub fn on_frame(&mut self, frame: &Frame) -> Result<Step, Violation> {
        let v = |s: String| Err(Violation(s));
        match (frame.kind, self.phase) {
            (Kind::Hello, Phase::Hello) => {
                let pid = frame.body.get(..4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                let Some(pid) = pid else { return v("a hello without the successor's pid".into()) };
                self.successor_pid = Some(pid);
                self.phase = Phase::Prepare;
                Ok(Step::Welcome)
            }
            (Kind::Hello, _) => v("a second hello in one session".into()),
            (_, Phase::Hello) => v(format!("{} before hello", frame.kind.name())),
            (Kind::Error, _) => v(format!("the successor gave up: {}", String::from_utf8_lossy(&frame.body))),
            (Kind::Prepare | Kind::Seal | Kind::Commit, _) if frame.id != self.id => v(format!(
                "{} with a wrong handoff id ({:#x}; this session is {:#x})",
                frame.kind.name(),
                frame.id,
                self.id
            )),
            (Kind::Prepare, Phase::Prepare) => {
                self.phase = Phase::Seal;
                Ok(Step::SendListener)
            }
            (Kind::Seal, Phase::Seal) => {
                self.phase = Phase::Commit;
                Ok(Step::Seal)
            }
            (Kind::Commit, Phase::Commit) => {
                self.phase = Phase::Done;
                Ok(Step::Commit)
            }
            (Kind::Seal, Phase::Prepare) => v("seal before prepare".into()),
            (Kind::Commit, Phase::Prepare | Phase::Seal) => v("commit before seal".into()),
            (Kind::Welcome | Kind::Listener | Kind::Sealed | Kind::Drained, _) => {
                v(format!("{} is the incumbent's frame, not the successor's", frame.kind.name()))
            }
            (kind, phase) => v(format!("{} while waiting for {}", kind.name(), phase.waiting_for())),
        }
    }
}

/// The body of a Drained frame.
pub fn drained_body(drained: u64, forced: u64, elapsed: Duration) -> Vec<u8> {
    [drained, forced, elapsed.as_micros() as u64].iter().flat_map(|w| w.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Frame {
        Frame::new(Kind::Hello, 0, 42u32.to_be_bytes().to_vec())
    }

    fn decode(bytes: &[u8]) -> Result<Option<Frame>, DecodeError> {
        let mut d = Decoder::default();
        d.push(bytes);
        d.decode()
    }

    #[test]
    fn frames_round_trip_in_any_split() {
        let frames =
            [hello(), Frame::new(Kind::Error, 7, b"why".to_vec()), Frame::new(Kind::Seal, 9, vec![])];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        for step in 1..wire.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.push(chunk);
                while let Some(f) = d.decode().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split every {step} bytes");
            assert!(!d.in_frame());
        }
    }

    #[test]
    fn bad_bytes_are_named() {
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(DecodeError::Garbage));
        assert_eq!(decode(b"CX"), Err(DecodeError::Garbage), "judged from the first bytes");
        assert_eq!(decode(&hello().encode_as(2)), Err(DecodeError::Version(2)));
        let mut unknown = hello().encode();
        unknown[5] = 77;
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(77)));
        let mut long = hello().encode();
        long[6..8].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(decode(&long), Err(DecodeError::TooLong(2000)));
    }

    #[test]
    fn the_happy_session_steps_in_order() {
        let mut s = Incumbent::new(5);
        assert_eq!(s.on_frame(&hello()), Ok(Step::Welcome));
        assert_eq!(s.successor_pid(), Some(42));
        assert_eq!(s.on_frame(&Frame::new(Kind::Prepare, 5, vec![])), Ok(Step::SendListener));
        assert!(!s.sealed());
        assert_eq!(s.on_frame(&Frame::new(Kind::Seal, 5, vec![])), Ok(Step::Seal));
        assert!(s.sealed());
        assert_eq!(s.on_frame(&Frame::new(Kind::Commit, 5, vec![])), Ok(Step::Commit));
        assert_eq!(s.phase(), Phase::Done);
    }

    fn after(frames: &[Frame], bad: Frame) -> String {
        let mut s = Incumbent::new(5);
        for f in frames {
            s.on_frame(f).unwrap();
        }
        s.on_frame(&bad).unwrap_err().0
    }

    #[test]
    fn every_out_of_order_or_foreign_frame_is_a_violation_that_says_why() {
        let prepare = Frame::new(Kind::Prepare, 5, vec![]);
        let seal = Frame::new(Kind::Seal, 5, vec![]);
        let at_seal = [hello(), prepare.clone()];
        assert_eq!(after(&at_seal, Frame::new(Kind::Commit, 5, vec![])), "commit before seal");
        assert!(
            after(&at_seal, Frame::new(Kind::Seal, 6, vec![])).starts_with("seal with a wrong handoff id")
        );
        let at_commit = [hello(), prepare.clone(), seal];
        let wrong = after(&at_commit, Frame::new(Kind::Commit, 6, vec![]));
        assert!(wrong.starts_with("commit with a wrong handoff id (0x6"), "{wrong}");
        assert_eq!(after(&[hello()], hello()), "a second hello in one session");
        assert_eq!(after(&[], prepare), "prepare before hello");
        assert_eq!(after(&[hello()], Frame::new(Kind::Seal, 5, vec![])), "seal before prepare");
        assert!(after(&[hello()], Frame::new(Kind::Sealed, 5, vec![])).contains("incumbent's frame"));
        assert_eq!(
            after(&[hello()], Frame::new(Kind::Error, 5, b"no".to_vec())),
            "the successor gave up: no"
        );
        assert_eq!(after(&[], Frame::new(Kind::Hello, 0, vec![1])), "a hello without the successor's pid");
    }
}
