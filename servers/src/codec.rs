//! The framing codec: a 4-byte big-endian length, then that many payload bytes.
//!
//! The decoder is incremental and owns no buffer: it tells the caller which
//! bytes of its input belong to a header and which to a body, so any split of
//! the byte stream (a header cut at every position included) decodes alike.

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// What the decoder found at the front of the input it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Header bytes were consumed and the header is still incomplete; the
    /// input is exhausted.
    HeaderPart,
    /// The header completed, announcing a body of `len` bytes (which may be 0:
    /// an empty frame is complete at this point).
    Header {
        /// The announced body length.
        len: u32,
    },
    /// Body bytes of the current frame; `done` when they end the frame.
    Body {
        /// The body bytes, borrowed from the input.
        bytes: &'a [u8],
        /// Whether these bytes complete the frame.
        done: bool,
    },
    /// The header announced more than `max_frame`; the decoder stays stuck
    /// here (a protocol violation ends the connection).
    TooLarge {
        /// The announced body length.
        len: u32,
    },
}

/// Incremental decoder for one connection's input stream.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// Largest body accepted; a larger announced length is a violation.
    max_frame: u32,
    /// Header bytes seen so far; only the first `header_have` are valid.
    header: [u8; HEADER_LEN],
    /// How many header bytes of the current frame were consumed (0..=4).
    header_have: u8,
    /// Body bytes still owed for the current frame once the header is complete.
    body_left: u32,
    /// Set once a too-large header was seen; the decoder refuses more input.
    violated: bool,
}

impl Decoder {
    /// A decoder that accepts bodies of up to `max_frame` bytes.
    pub fn new(max_frame: u32) -> Self {
        Decoder { max_frame, header: [0; HEADER_LEN], header_have: 0, body_left: 0, violated: false }
    }

    /// Whether some bytes of a frame were consumed and the frame is incomplete.
    pub fn in_frame(&self) -> bool {
        self.header_have > 0 && !self.violated
    }

    /// Whether the current frame's header is complete and its body is not.
    pub fn header_complete(&self) -> bool {
        self.header_have as usize == HEADER_LEN && !self.violated
    }

    /// The current frame's header bytes (valid once the header is complete).
    pub fn header(&self) -> [u8; HEADER_LEN] {
        self.header
    }

    /// Forgets the frame in progress (the connection discards it).
    pub fn reset(&mut self) {
        self.header_have = 0;
        self.body_left = 0;
    }

    /// Decodes from the front of `input`; returns the bytes consumed and what
    /// they were. `input` must not be empty.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> (usize, Decoded<'a>) {
        debug_assert!(!input.is_empty(), "decode needs input");
        if self.violated {
            return (0, Decoded::TooLarge { len: u32::from_be_bytes(self.header) });
        }
        let have = self.header_have as usize;
        if have < HEADER_LEN {
            let take = (HEADER_LEN - have).min(input.len());
            self.header[have..have + take].copy_from_slice(&input[..take]);
            self.header_have += take as u8;
            if (self.header_have as usize) < HEADER_LEN {
                return (take, Decoded::HeaderPart);
            }
            let len = u32::from_be_bytes(self.header);
            if len > self.max_frame {
                self.violated = true;
                return (take, Decoded::TooLarge { len });
            }
            self.body_left = len;
            if len == 0 {
                self.header_have = 0;
            }
            return (take, Decoded::Header { len });
        }
        let take = (self.body_left as usize).min(input.len());
        self.body_left -= take as u32;
        let done = self.body_left == 0;
        if done {
            self.header_have = 0;
        }
        (take, Decoded::Body { bytes: &input[..take], done })
    }
}

/// The header announcing a body of `len` bytes.
pub fn header(len: u32) -> [u8; HEADER_LEN] {
    len.to_be_bytes()
}

/// One whole frame (header and payload) in a new buffer: for clients and tests.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("payload longer than u32::MAX");
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&header(len));
    frame.extend_from_slice(payload);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `stream` fed in the given pieces; returns the whole frames seen
    /// and whether a violation was met.
    fn decode_pieces(max: u32, pieces: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
        let mut d = Decoder::new(max);
        let mut frames = Vec::new();
        let mut body = Vec::new();
        for piece in pieces {
            let mut rest = *piece;
            while !rest.is_empty() {
                let (n, what) = d.decode(rest);
                match what {
                    Decoded::HeaderPart => assert_eq!(n, rest.len()),
                    Decoded::Header { len: 0 } => frames.push(Vec::new()),
                    Decoded::Header { .. } => {}
                    Decoded::Body { bytes, done } => {
                        body.extend_from_slice(bytes);
                        if done {
                            frames.push(std::mem::take(&mut body));
                        }
                    }
                    Decoded::TooLarge { .. } => return (frames, true),
                }
                rest = &rest[n..];
            }
        }
        (frames, false)
    }

    fn sample_stream() -> (Vec<u8>, Vec<Vec<u8>>) {
        let payloads: Vec<Vec<u8>> = vec![b"hello".to_vec(), vec![], vec![7; 300], b"x".to_vec(), vec![]];
        let stream = payloads.iter().flat_map(|p| encode(p)).collect();
        (stream, payloads)
    }

    #[test]
    fn every_two_way_split_decodes_the_same() {
        let (stream, payloads) = sample_stream();
        for cut in 0..=stream.len() {
            let (frames, bad) = decode_pieces(1024, &[&stream[..cut], &stream[cut..]]);
            assert!(!bad);
            assert_eq!(frames, payloads, "split at {cut}");
        }
    }

    #[test]
    fn byte_at_a_time_decodes_the_same() {
        let (stream, payloads) = sample_stream();
        let pieces: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode_pieces(1024, &pieces), (payloads, false));
    }

    #[test]
    fn header_cut_at_every_position_with_three_pieces() {
        let frame = encode(b"abcdefgh");
        for a in 0..=HEADER_LEN {
            for b in a..=frame.len() {
                let (frames, _) = decode_pieces(64, &[&frame[..a], &frame[a..b], &frame[b..]]);
                assert_eq!(frames, vec![b"abcdefgh".to_vec()], "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn max_frame_is_accepted_and_one_more_is_a_violation() {
        assert_eq!(decode_pieces(8, &[&encode(&[1; 8])]), (vec![vec![1; 8]], false));
        let mut stream = encode(b"ok");
        stream.extend_from_slice(&header(9));
        stream.extend_from_slice(&[0; 9]);
        assert_eq!(decode_pieces(8, &[&stream]), (vec![b"ok".to_vec()], true));
    }

    #[test]
    fn violation_is_sticky_and_consumes_nothing_more() {
        let mut d = Decoder::new(1);
        assert_eq!(d.decode(&header(2)), (4, Decoded::TooLarge { len: 2 }));
        assert_eq!(d.decode(b"zz"), (0, Decoded::TooLarge { len: 2 }));
        assert!(!d.in_frame());
    }

    #[test]
    fn in_frame_tracks_partial_frames() {
        let mut d = Decoder::new(16);
        assert!(!d.in_frame());
        d.decode(&[0, 0]);
        assert!(d.in_frame() && !d.header_complete());
        d.decode(&[0, 2]);
        assert!(d.in_frame() && d.header_complete());
        d.decode(b"a");
        assert!(d.in_frame());
        let (_, got) = d.decode(b"bc");
        assert_eq!(got, Decoded::Body { bytes: b"b", done: true });
        assert!(!d.in_frame());
        d.decode(&[0, 0, 0]);
        d.reset();
        assert!(!d.in_frame());
    }
}
