//! The one walker of HTTP/2 frames as they pass on a connection's read side (RFC 9113 4.1: a
//! 9-byte frame header, then `length` bytes of payload), for the two places that watch a peer's
//! frames without decoding them: the listener's header-block timeout (`proxy::h2::HeaderWatch`)
//! and the upstream pool's reading of the peer's stream limit (`upstream::pool::PeerSettings`).
//!
//! Reads arrive cut anywhere, a frame header included; [`Frames::feed`] keeps the part of a header
//! that has come and hands a [`FrameSink`] each frame's header once whole, the bytes of its payload
//! (in as many pieces as they came), and its end. The payload is only looked at by a sink that
//! asks for it, so a walk costs a few instructions per frame and per read.

/// One frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHead {
    /// Payload length in bytes.
    pub(crate) len: u32,
    pub(crate) kind: u8,
    pub(crate) flags: u8,
}

impl FrameHead {
    pub(crate) const HEADERS: u8 = 0x1;
    pub(crate) const SETTINGS: u8 = 0x4;
    pub(crate) const PUSH_PROMISE: u8 = 0x5;
    pub(crate) const CONTINUATION: u8 = 0x9;
    /// SETTINGS flag: an acknowledgement, with no payload.
    pub(crate) const ACK: u8 = 0x1;
    /// HEADERS, PUSH_PROMISE and CONTINUATION flag: the header block ends with this frame.
    pub(crate) const END_HEADERS: u8 = 0x4;
}

/// What a watcher does with the frames [`Frames::feed`] finds.
pub(crate) trait FrameSink {
    /// A frame's header has come whole. Returns whether the sink wants the payload's bytes.
    fn head(&mut self, head: FrameHead) -> bool;
    /// Some of the current frame's payload, if [`FrameSink::head`] asked for it.
    fn payload(&mut self, _bytes: &[u8]) {}
    /// The current frame has ended (right after its header when its payload is empty).
    fn end(&mut self) {}
}

/// Where a walk is between reads.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    /// Bytes to pass before the first frame (a client's connection preface).
    skip: u32,
    /// The frame header being read, and how much of it has come.
    head: [u8; 9],
    have: u8,
    /// Payload bytes of the current frame still to come.
    left: u32,
    /// The sink wants the current frame's payload.
    wanted: bool,
}

impl Frames {
    /// A walk whose first `skip` bytes are not frames (the 24-byte client preface, RFC 9113 3.4).
    pub(crate) fn after(skip: u32) -> Self {
        Frames {
            skip,
            ..Frames::default()
        }
    }

    /// Whether the bytes so far end inside a frame header.
    pub(crate) fn mid_head(&self) -> bool {
        self.have > 0
    }

    /// Walks `data`, the next bytes read, telling `sink` what they hold.
    pub(crate) fn feed(&mut self, mut data: &[u8], sink: &mut impl FrameSink) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = data.len().min(self.skip as usize);
                self.skip -= n as u32;
                data = &data[n..];
            } else if self.left > 0 {
                let n = data.len().min(self.left as usize);
                if self.wanted {
                    sink.payload(&data[..n]);
                }
                self.left -= n as u32;
                data = &data[n..];
                if self.left == 0 {
                    sink.end();
                }
            } else {
                let at = usize::from(self.have);
                let n = data.len().min(9 - at);
                self.head[at..at + n].copy_from_slice(&data[..n]);
                self.have += n as u8;
                data = &data[n..];
                if self.have == 9 {
                    self.have = 0;
                    let h = self.head;
                    let head = FrameHead {
                        len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
                        kind: h[3],
                        flags: h[4],
                    };
                    self.wanted = sink.head(head);
                    self.left = head.len;
                    if self.left == 0 {
                        sink.end();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what a walk reports, payload bytes of every frame included.
    #[derive(Default)]
    struct Log {
        frames: Vec<(FrameHead, Vec<u8>, bool)>,
    }

    impl FrameSink for Log {
        fn head(&mut self, head: FrameHead) -> bool {
            self.frames.push((head, Vec::new(), false));
            head.kind != 0 // DATA's payload is not wanted
        }
        fn payload(&mut self, bytes: &[u8]) {
            self.frames.last_mut().unwrap().1.extend_from_slice(bytes);
        }
        fn end(&mut self) {
            let last = self.frames.last_mut().unwrap();
            assert!(!last.2, "a frame ended twice");
            last.2 = true;
        }
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_cut_at_every_point_are_reported_whole_and_in_order() {
        let mut conn = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        conn.extend(frame(0x4, 0, &[0, 3, 0, 0, 0, 9])); // SETTINGS
        conn.extend(frame(0x4, 0x1, &[])); // SETTINGS ACK: ends with its header
        conn.extend(frame(0x0, 0, &frame(0x1, 0, b"looks like a frame"))); // DATA
        conn.extend(frame(0x1, 0x4, &[0x82; 300])); // HEADERS
        let head = |kind, flags, len| FrameHead { len, kind, flags };
        let expected = vec![
            (head(0x4, 0, 6), vec![0, 3, 0, 0, 0, 9], true),
            (head(0x4, 0x1, 0), vec![], true),
            (head(0x0, 0, 27), vec![], true),
            (head(0x1, 0x4, 300), vec![0x82; 300], true),
        ];
        for step in 1..=conn.len() {
            let mut walk = Frames::after(24);
            let mut log = Log::default();
            for piece in conn.chunks(step) {
                walk.feed(piece, &mut log);
            }
            assert_eq!(log.frames, expected, "cut every {step} bytes");
        }
        // Two cuts at any two points.
        for a in 0..conn.len() {
            for b in a..conn.len() {
                let mut walk = Frames::after(24);
                let mut log = Log::default();
                for piece in [&conn[..a], &conn[a..b], &conn[b..]] {
                    walk.feed(piece, &mut log);
                }
                assert_eq!(log.frames, expected, "cut at {a} and {b}");
            }
        }
    }
}
