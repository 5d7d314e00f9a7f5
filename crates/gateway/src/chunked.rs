//! The one decoder of HTTP/1.1 chunked bodies (RFC 9112 7.1), for request bodies from clients
//! (`proxy::h1`) and response bodies from upstreams (`upstream::h1`).
//!
//! Why one strict byte state machine and not `httparse::parse_chunk_size`: chunked framing is a
//! smuggling surface. Whenever two peers on a connection can disagree on where a body ends, bytes of
//! one message are read as another (a desync). httparse is lenient where that matters: it reads an
//! empty size line as size 0 (the last chunk), accepts any byte but CR in a chunk extension (a bare
//! LF there ends the line for some peers and not for others), and ends trailer lines at a bare LF.
//! Two decoders meant two places to guard by hand, and the guards drifted apart. Here every line
//! of the framing (size lines, the CRLF after data, trailer lines, the final empty line) ends with
//! CRLF and nothing else: a bare LF anywhere, or a CR not followed by LF, is an error.
//!
//! How it works: [`Decoder::decode`] reads the framing byte by byte from the front of the read
//! buffer and splits chunk data off it without copying (`BytesMut::split_to`). A byte is only
//! consumed once it is accepted, so an error found after a piece of data is reported on the next
//! call (with the same bytes still there), after the data. After a piece of data the framing that
//! follows it in the buffer is read too, so that the end of the body is known with its last data
//! ([`Decoder::is_end`]: the listener ends its response, and an upstream connection goes back to
//! its pool, without another poll). The trailer section stays in the buffer until its final CRLF
//! is seen (at most [`MAX_TRAILERS`] bytes), then it is parsed into a `HeaderMap` (fields through
//! `httparse::parse_headers`, on lines already known to end in CRLF) or dropped, as the caller
//! chose ([`Trailers`]).

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The most chunk data one [`Decoder::decode`] call joins from several chunks.
pub(crate) const COALESCE: usize = 64 * 1024;

/// The data one [`Decoder::decode`] call gathers: none, one chunk's (split off the buffer, no
/// copy), or several chunks' joined.
enum Data {
    None,
    One(BytesMut),
    Joined(BytesMut),
}

impl Data {
    fn is_none(&self) -> bool {
        matches!(self, Data::None)
    }

    fn len(&self) -> usize {
        match self {
            Data::None => 0,
            Data::One(b) | Data::Joined(b) => b.len(),
        }
    }

    fn push(&mut self, piece: BytesMut) {
        *self = match std::mem::replace(self, Data::None) {
            Data::None => Data::One(piece),
            Data::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + piece.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&piece);
                Data::Joined(joined)
            }
            Data::Joined(mut joined) => {
                joined.extend_from_slice(&piece);
                Data::Joined(joined)
            }
        };
    }

    fn into_bytes(self) -> Option<Bytes> {
        match self {
            Data::None => None,
            Data::One(b) | Data::Joined(b) => Some(b.freeze()),
        }
    }
}

/// Most bytes on a chunk-size line after the size (whitespace and extensions, which are ignored).
/// Real extensions are rare and short; 4 KiB is what both decoders allowed before.
pub(crate) const MAX_CHUNK_EXT: usize = 4 * 1024;

/// Most bytes of a trailer section (its lines with their CRLFs, and the final CRLF). Trailers are a
/// few checksum or status fields; 16 KiB is what both decoders allowed before.
pub(crate) const MAX_TRAILERS: usize = 16 * 1024;

/// Most fields in a kept trailer section (more is malformed).
pub(crate) const MAX_TRAILER_FIELDS: usize = 32;

/// What to do with a trailer section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trailers {
    /// Parse it and hand it on as [`Item::Trailers`] (upstream responses, forwarded to clients).
    Keep,
    /// Check its line framing only, and drop it (client requests: the upstream request is sent
    /// with a `content-length` or re-chunked without them).
    Discard,
}

/// What decoding a body produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Item {
    /// Body data (a chunk, or part of one); never empty.
    Data(Bytes),
    /// The trailer fields (only with [`Trailers::Keep`], and only when there is at least one).
    Trailers(HeaderMap),
    /// The body ended.
    End,
}

/// Why a chunked body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Error {
    /// The connection ended before the body did (in any state before the final CRLF).
    Eof,
    /// The framing is malformed or over a limit (what was wrong, for the log).
    Invalid(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    Size,
    /// Whitespace after the size.
    SizeWs,
    /// A chunk extension (ignored) up to the line's CR.
    Ext,
    /// The LF ending a size line.
    SizeLf,
    /// Chunk data (`size` bytes left).
    Data,
    /// The CRLF after chunk data.
    DataCr,
    DataLf,
    /// The start of a trailer line, or the final CRLF.
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// The LF ending a trailer line.
    TrailerLf,
    /// The LF of the final CRLF.
    EndLf,
    /// The body ended (the trailers, if kept, may still be to hand on).
    Done,
}

impl State {
    /// States whose bytes belong to the trailer section (held in the buffer, not consumed).
    fn in_trailers(self) -> bool {
        matches!(
            self,
            State::TrailerStart | State::Trailer | State::TrailerLf | State::EndLf
        )
    }
}

/// An incremental decoder of one chunked body over a connection's read buffer.
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    state: State,
    /// The chunk size being read, then the bytes of its data left.
    size: u64,
    /// Hex digits of the size read so far.
    digits: u8,
    /// Bytes of the size line after the digits.
    ext: usize,
    /// Bytes of the trailer section looked at so far (still at the front of the buffer).
    held: usize,
    trailers: Trailers,
    /// Kept trailers not yet handed on (boxed: rare, and it keeps the decoder small where it is
    /// moved around inside a response body).
    ready: Option<Box<HeaderMap>>,
}

impl Decoder {
    /// A decoder at the start of a chunked body.
    pub(crate) fn new(trailers: Trailers) -> Self {
        Decoder {
            state: State::Size,
            size: 0,
            digits: 0,
            ext: 0,
            held: 0,
            trailers,
            ready: None,
        }
    }

    /// Whether the body has ended and everything of it was handed on (the next call returns
    /// [`Item::End`]).
    pub(crate) fn is_end(&self) -> bool {
        self.state == State::Done && self.ready.is_none()
    }

    /// How many bytes at the front of `buf` the rest of the body takes, its end included, if it
    /// ends there (a valid body); judged on copies, nothing is consumed.
    pub(crate) fn rest_length(&self, buf: &[u8]) -> Option<usize> {
        let mut probe = self.clone();
        let mut copy = BytesMut::from(buf);
        loop {
            match probe.decode(&mut copy, false) {
                Ok(Some(Item::End)) => return Some(buf.len() - copy.len()),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Whether `buf` holds exactly the rest of the body, its end included and nothing after it.
    pub(crate) fn rest_is_exactly(&self, buf: &[u8]) -> bool {
        self.rest_length(buf) == Some(buf.len())
    }

    /// Inside chunk data: the bytes of the current chunk still to come (a hint for the read size).
    pub(crate) fn data_left(&self) -> Option<u64> {
        (self.state == State::Data).then_some(self.size)
    }

    /// Decodes the next item from the front of `buf`, consuming what it used (`eof`: the connection
    /// has ended and `buf` holds all there is). `Ok(None)`: more bytes are needed. Data is split off
    /// `buf` as soon as any is there; [`Item::End`] is returned again on every call after the end.
    /// The data of several chunks already in `buf` comes as one item (up to [`COALESCE`] bytes):
    /// a sender writing many small chunks (a row per chunk) must not become as many HTTP/2 DATA
    /// frames or writes on the other side, which HTTP/2 peers take for a flood. A single chunk's
    /// data is split off `buf` without a copy.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Option<Item>, Error> {
        let mut data = Data::None;
        loop {
            match self.state {
                State::Done => {
                    if !data.is_none() {
                        break;
                    }
                    return Ok(Some(
                        self.ready.take().map_or(Item::End, |t| Item::Trailers(*t)),
                    ));
                }
                State::Data => {
                    if buf.is_empty() || data.len() >= COALESCE {
                        break;
                    }
                    let n = usize::try_from(self.size).map_or(buf.len(), |s| s.min(buf.len()));
                    // A large piece after small ones comes as an item of its own, uncopied.
                    if !data.is_none() && n >= COALESCE / 8 {
                        break;
                    }
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    data.push(buf.split_to(n));
                    continue;
                }
                _ => {}
            }
            let held = self.state.in_trailers();
            let at = if held { self.held } else { 0 };
            let Some(&b) = buf.get(at) else {
                break;
            };
            match self.step(b, &buf[..=at]) {
                Ok(next) => {
                    if held {
                        self.held += 1;
                    } else {
                        buf.advance(1);
                    }
                    if next == State::Done {
                        buf.advance(self.held);
                        self.held = 0;
                    }
                    self.state = next;
                }
                // Left unconsumed: reported on the next call, after this data.
                Err(_) if !data.is_none() => break,
                Err(e) => return Err(e),
            }
        }
        match data.into_bytes() {
            Some(d) => Ok(Some(Item::Data(d))),
            None if eof => Err(Error::Eof),
            None => Ok(None),
        }
    }

    /// The state after byte `b` (the last of `seen`, which in the trailer section is the whole
    /// section so far). Changes nothing but counters, and those only when `b` is accepted.
    fn step(&mut self, b: u8, seen: &[u8]) -> Result<State, Error> {
        use State::*;
        const BAD_LINE: Error = Error::Invalid("bad chunk size line");
        Ok(match (self.state, b) {
            (Size, _) if hex(b).is_some() => {
                // 16 hex digits fill a u64: a 17th (leading zeros too) would overflow.
                if self.digits == 16 {
                    return Err(Error::Invalid("chunk size too large"));
                }
                self.digits += 1;
                self.size = self.size << 4 | u64::from(hex(b).unwrap_or(0));
                Size
            }
            // No digits (an empty line, or an extension alone) is no size: some peers read it
            // as 0, the last chunk, others as an error.
            (Size, _) if self.digits == 0 => return Err(BAD_LINE),
            (Size | SizeWs | Ext, _) if b != b'\r' && self.ext == MAX_CHUNK_EXT => {
                return Err(Error::Invalid("chunk extensions too long"))
            }
            (Size | SizeWs, b' ' | b'\t') => {
                self.ext += 1;
                SizeWs
            }
            (Size | SizeWs, b';') => {
                self.ext += 1;
                Ext
            }
            (Size | SizeWs | Ext, b'\r') => SizeLf,
            // A bare LF (or another control character) in an extension: a peer that ends the line
            // at the LF would read the chunk's data from elsewhere (a desync).
            (Ext, _) if (b < b' ' && b != b'\t') || b == 0x7f => return Err(BAD_LINE),
            (Ext, _) => {
                self.ext += 1;
                Ext
            }
            (SizeLf, b'\n') => {
                self.digits = 0;
                self.ext = 0;
                if self.size == 0 {
                    TrailerStart
                } else {
                    Data
                }
            }
            (Size | SizeWs | SizeLf, _) => return Err(BAD_LINE),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size,
            (DataCr | DataLf, _) => return Err(Error::Invalid("missing CRLF after chunk data")),
            (TrailerStart | Trailer | TrailerLf | EndLf, _) if self.held == MAX_TRAILERS => {
                return Err(Error::Invalid("trailers too large"))
            }
            (TrailerStart, b'\r') => EndLf,
            // Trailer lines end with CRLF too: a peer that takes `0\r\n\n` for the end of the
            // body would read what follows as a message of its own, which we would swallow.
            (TrailerStart | Trailer, b'\n') => return Err(Error::Invalid("bare LF in trailers")),
            (Trailer, b'\r') => TrailerLf,
            (TrailerStart | Trailer, _) => Trailer,
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => {
                if self.trailers == Trailers::Keep && seen.len() > 2 {
                    self.ready = Some(Box::new(parse_trailers(seen)?));
                }
                Done
            }
            (TrailerLf | EndLf, _) => return Err(Error::Invalid("CR without LF in trailers")),
            (Data | Done, _) => return Err(Error::Invalid("chunked decoder state")),
        })
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Parses a whole trailer section (at least one line, every line ending in CRLF, the final CRLF
/// included) into its fields.
fn parse_trailers(section: &[u8]) -> Result<HeaderMap, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((n, fields))) if n == section.len() => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields.iter() {
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| Error::Invalid("bad trailer name"))?;
                let value = HeaderValue::from_bytes(f.value)
                    .map_err(|_| Error::Invalid("bad trailer value"))?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(Error::Invalid("malformed trailers")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `wire` to a decoder in pieces cut at `cuts` (then `eof`); the data joined, the
    /// trailers, how it ended, and the bytes it did not consume.
    fn decode_in_pieces(
        mode: Trailers,
        wire: &[u8],
        cuts: &[usize],
        eof: bool,
    ) -> (Vec<u8>, Option<HeaderMap>, Result<(), Error>, BytesMut) {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(wire.len())).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let mut d = Decoder::new(mode);
        let (mut buf, mut data, mut trailers, mut at) = (BytesMut::new(), Vec::new(), None, 0);
        for (i, &cut) in cuts.iter().enumerate() {
            buf.extend_from_slice(&wire[at..cut]);
            at = cut;
            let last = eof && i + 1 == cuts.len();
            loop {
                match d.decode(&mut buf, last) {
                    Ok(Some(Item::Data(b))) => {
                        assert!(!b.is_empty());
                        data.extend_from_slice(&b);
                    }
                    Ok(Some(Item::Trailers(t))) => {
                        assert!(trailers.replace(t).is_none());
                    }
                    Ok(Some(Item::End)) => {
                        assert!(d.is_end());
                        // Stays ended.
                        assert_eq!(d.decode(&mut buf, last), Ok(Some(Item::End)));
                        buf.extend_from_slice(&wire[at..]);
                        return (data, trailers, Ok(()), buf);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        buf.extend_from_slice(&wire[at..]);
                        return (data, trailers, Err(e), buf);
                    }
                }
            }
        }
        (data, trailers, Err(Error::Eof), buf)
    }

    /// The first error decoding `wire` whole, data skipped (`Ok` if it decodes).
    fn error_of(mode: Trailers, wire: &[u8]) -> Result<(), Error> {
        decode_in_pieces(mode, wire, &[], false).2
    }

    fn encode(pieces: &[Vec<u8>], ext: &str, trailers: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces.iter().filter(|p| !p.is_empty()) {
            out.extend_from_slice(format!("{:X}{ext}\r\n", p.len()).as_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        out.extend_from_slice(trailers.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }

    const MODES: [Trailers; 2] = [Trailers::Keep, Trailers::Discard];

    /// `wire` is malformed framing in both modes.
    fn assert_invalid(wire: &[u8]) {
        for mode in MODES {
            let r = error_of(mode, wire);
            assert!(
                matches!(r, Err(Error::Invalid(_))),
                "{mode:?} {:?}: {r:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    proptest! {
        // From the client side's decoder: chunks up to 300 bytes, extensions, trailers dropped.
        #[test]
        fn any_split_of_a_chunked_body_decodes_the_same(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..8),
            cuts in prop::collection::vec(0usize..3000, 0..30),
            ext in any::<bool>(),
            trailers in any::<bool>(),
        ) {
            let ext = if ext { " ;name=\"v\"" } else { "" };
            let tr = if trailers { "x-sum: 1\r\nx-other: 2\r\n" } else { "" };
            let mut wire = encode(&chunks, ext, tr);
            wire.extend_from_slice(b"NEXT");
            let (data, t, end, rest) = decode_in_pieces(Trailers::Discard, &wire, &cuts, false);
            prop_assert_eq!(end, Ok(()));
            prop_assert!(t.is_none());
            prop_assert_eq!(data, chunks.concat());
            prop_assert_eq!(&rest[..], b"NEXT");
        }

        // From the upstream side's decoder: empty pieces, trailers kept.
        #[test]
        fn a_chunked_body_decodes_the_same_however_it_is_split(
            pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..6),
            with_trailers in any::<bool>(),
            cuts in prop::collection::vec(0usize..400, 0..10),
        ) {
            let tr = if with_trailers { "x-checksum: abc\r\nx-n: 2\r\n" } else { "" };
            let mut wire = encode(&pieces, ";ext=1", tr);
            wire.extend_from_slice(b"NEXT");
            let (data, trailers, end, rest) = decode_in_pieces(Trailers::Keep, &wire, &cuts, false);
            prop_assert_eq!(end, Ok(()));
            prop_assert_eq!(data, pieces.concat());
            prop_assert_eq!(trailers.is_some(), with_trailers);
            if let Some(t) = trailers {
                prop_assert_eq!(t.get("x-checksum").unwrap(), "abc");
                prop_assert_eq!(t.get("x-n").unwrap(), "2");
            }
            prop_assert_eq!(&rest[..], b"NEXT");
        }

        #[test]
        fn any_split_of_any_input_gives_the_same_outcome(
            input in prop::collection::vec(
                prop::sample::select(b"0123456789aAfF \t;=\"xz:\r\n\x00".to_vec()), 0..200),
            cuts in prop::collection::vec(0usize..200, 0..10),
            eof in any::<bool>(),
        ) {
            for mode in MODES {
                let whole = decode_in_pieces(mode, &input, &[], eof);
                let split = decode_in_pieces(mode, &input, &cuts, eof);
                prop_assert_eq!(whole, split);
            }
        }

        #[test]
        fn garbage_never_panics_the_decoder(input in prop::collection::vec(any::<u8>(), 0..600)) {
            for mode in MODES {
                let _ = decode_in_pieces(mode, &input, &[7, 100], true);
            }
        }
    }

    #[test]
    fn data_is_split_off_the_read_buffer_without_a_copy() {
        let mut buf = BytesMut::from(&b"5\r\nhello\r\n"[..]);
        let at = buf.as_ptr() as usize + 3;
        let mut d = Decoder::new(Trailers::Keep);
        let Ok(Some(Item::Data(b))) = d.decode(&mut buf, false) else {
            panic!("no data");
        };
        assert_eq!((&b[..], b.as_ptr() as usize), (&b"hello"[..], at));
    }

    #[test]
    fn small_chunks_already_read_come_as_one_item_up_to_the_cap() {
        let mut wire = Vec::new();
        for _ in 0..10_000 {
            wire.extend_from_slice(b"10\r\n0123456789abcdef\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let mut buf = BytesMut::from(&wire[..]);
        let mut d = Decoder::new(Trailers::Discard);
        let mut sizes = Vec::new();
        loop {
            match d.decode(&mut buf, false) {
                Ok(Some(Item::Data(b))) => sizes.push(b.len()),
                Ok(Some(Item::End)) => break,
                other => panic!("{other:?}"),
            }
        }
        // 160,000 bytes: two full items (the cap, reached at a chunk's end) and the rest.
        assert_eq!(sizes, [COALESCE, COALESCE, 160_000 - 2 * COALESCE]);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_large_chunk_after_small_ones_comes_on_its_own_without_a_copy() {
        let mut wire = b"3\r\nabc\r\n3\r\ndef\r\n4000\r\n".to_vec();
        let big_at = wire.len();
        wire.extend(std::iter::repeat_n(b'x', 0x4000));
        wire.extend_from_slice(b"\r\n0\r\n\r\n");
        let mut buf = BytesMut::from(&wire[..]);
        let big_ptr = buf.as_ptr() as usize + big_at;
        let mut d = Decoder::new(Trailers::Discard);
        let Ok(Some(Item::Data(small))) = d.decode(&mut buf, false) else {
            panic!("no data");
        };
        assert_eq!(&small[..], b"abcdef");
        let Ok(Some(Item::Data(big))) = d.decode(&mut buf, false) else {
            panic!("no data");
        };
        assert_eq!((big.len(), big.as_ptr() as usize), (0x4000, big_ptr));
        assert_eq!(d.decode(&mut buf, false), Ok(Some(Item::End)));
    }

    #[test]
    fn chunk_extensions_are_ignored() {
        for wire in [
            &b"3;a\r\nabc\r\n0\r\n\r\n"[..],
            b"3;a=b;c=\"d;e\\\"f\"\r\nabc\r\n0;last\r\n\r\n",
            b"3 ;a=\"b c\"\t\r\nabc\r\n0\r\n\r\n",
            b"3\t \t;\r\nabc\r\n0\r\n\r\n",
            b"3 \r\nabc\r\n0\r\n\r\n",
            b"3;\x80\xff\r\nabc\r\n0\r\n\r\n",
        ] {
            for mode in MODES {
                let (data, t, end, rest) = decode_in_pieces(mode, wire, &[], false);
                assert_eq!(end, Ok(()), "{wire:?}");
                assert_eq!((&data[..], &rest[..], t), (&b"abc"[..], &b""[..], None));
            }
        }
    }

    #[test]
    fn extensions_up_to_the_limit_pass() {
        let line = |n: usize| {
            let mut w = b"3;".to_vec();
            w.resize(1 + n, b'x');
            w.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
            w
        };
        assert_eq!(error_of(Trailers::Keep, &line(MAX_CHUNK_EXT)), Ok(()));
        assert_eq!(
            error_of(Trailers::Keep, &line(MAX_CHUNK_EXT + 1)),
            Err(Error::Invalid("chunk extensions too long"))
        );
    }

    #[test]
    fn trailers_are_kept_or_dropped() {
        let wire = b"3\r\nabc\r\n0\r\nx-a: 1\r\nX-A: 2\r\nx-b:\t v w \r\n\r\nNEXT";
        let (data, t, end, rest) = decode_in_pieces(Trailers::Keep, wire, &[], false);
        assert_eq!(
            (end, &data[..], &rest[..]),
            (Ok(()), &b"abc"[..], &b"NEXT"[..])
        );
        let t = t.unwrap();
        let a: Vec<_> = t.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(t.get("x-b").unwrap(), "v w");
        let (data, t, end, rest) = decode_in_pieces(Trailers::Discard, wire, &[], false);
        assert_eq!(
            (end, &data[..], &rest[..]),
            (Ok(()), &b"abc"[..], &b"NEXT"[..])
        );
        assert!(t.is_none());
        // An empty trailer section gives no trailers.
        let (_, t, end, _) = decode_in_pieces(Trailers::Keep, b"0\r\n\r\n", &[], false);
        assert_eq!((end, t), (Ok(()), None));
    }

    #[test]
    fn the_end_is_known_with_the_last_data() {
        let mut d = Decoder::new(Trailers::Keep);
        let mut buf = BytesMut::from(&b"5\r\nhello\r\n0\r\n\r\n"[..]);
        assert_eq!(
            d.decode(&mut buf, false),
            Ok(Some(Item::Data(Bytes::from_static(b"hello"))))
        );
        assert!(d.is_end() && buf.is_empty());
        // With trailers: the data, then the trailers, then the end.
        let mut d = Decoder::new(Trailers::Keep);
        let mut buf = BytesMut::from(&b"5\r\nhello\r\n0\r\nx: 1\r\n\r\n"[..]);
        assert!(matches!(d.decode(&mut buf, false), Ok(Some(Item::Data(_)))));
        assert!(!d.is_end() && buf.is_empty());
        assert!(matches!(
            d.decode(&mut buf, false),
            Ok(Some(Item::Trailers(_)))
        ));
        assert!(d.is_end());
        assert_eq!(d.decode(&mut buf, false), Ok(Some(Item::End)));
    }

    #[test]
    fn an_error_after_data_comes_after_it_and_stays() {
        let mut d = Decoder::new(Trailers::Discard);
        let mut buf = BytesMut::from(&b"5\r\nhelloX\r\n"[..]);
        assert!(matches!(d.decode(&mut buf, false), Ok(Some(Item::Data(_)))));
        for _ in 0..2 {
            assert_eq!(
                d.decode(&mut buf, false),
                Err(Error::Invalid("missing CRLF after chunk data"))
            );
        }
        assert_eq!(&buf[..], b"X\r\n");
    }

    #[test]
    fn a_bare_lf_is_an_error_wherever_it_is() {
        for wire in [
            // In the size line, after the size, after whitespace, ending an extension.
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5 \nhello\r\n0\r\n\r\n",
            b"5;a\nxx\r\nhello\r\n0\r\n\r\n",
            b"5;a\n\r\nhello\r\n0\r\n\r\n",
            // After data.
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r0\r\n\r\n",
            // The last chunk's line, the trailer section, a trailer line, the final line.
            b"0\n\r\n",
            b"5\r\nhello\r\n0\r\n\nGET / HTTP/1.1\r\n\r\n",
            b"0\r\nx-t: 1\n\r\n",
            b"0\r\nx-t: 1\nGET / HTTP/1.1\r\n\r\n",
            b"0\r\nx-t: 1\r\n\n",
            // A CR not followed by LF.
            b"5\r\rhello\r\n0\r\n\r\n",
            b"0\r\nx-t: 1\rx\r\n\r\n",
            b"0\r\n\rx",
        ] {
            assert_invalid(wire);
        }
    }

    #[test]
    fn malformed_size_lines_are_errors() {
        for wire in [
            // No size: an empty line is not the last chunk.
            &b"\r\n\r\n"[..],
            b"3\r\nabc\r\n\r\n\r\n",
            b";ext\r\n\r\n",
            b" 0\r\n\r\n",
            b"\t5\r\nhello\r\n0\r\n\r\n",
            // Not hex, digits after whitespace, control characters in an extension.
            b"x\r\n",
            b"5x\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"3 3\r\nabc\r\n0\r\n\r\n",
            b"3;a\x00b\r\nabc\r\n0\r\n\r\n",
            b"3;a\x7fb\r\nabc\r\n0\r\n\r\n",
            b"3;a\x01\r\nabc\r\n0\r\n\r\n",
            // More data than the size said.
            b"3\r\nabcd\r\n0\r\n\r\n",
        ] {
            assert_invalid(wire);
        }
    }

    #[test]
    fn a_size_over_64_bits_is_an_error() {
        for wire in [
            &b"11111111111111111\r\n"[..],
            b"00000000000000001\r\n",
            b"10000000000000000\r\n",
        ] {
            assert_eq!(
                error_of(Trailers::Keep, wire),
                Err(Error::Invalid("chunk size too large")),
                "{wire:?}"
            );
        }
        // 16 digits fit.
        let mut d = Decoder::new(Trailers::Keep);
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\n"[..]);
        assert_eq!(d.decode(&mut buf, false), Ok(None));
        assert_eq!(d.data_left(), Some(u64::MAX));
    }

    #[test]
    fn the_end_of_the_connection_in_any_state_is_eof() {
        // Cut in each state: size, whitespace, extension, size LF, data, data CR and LF, trailer
        // start, trailer line, trailer LF, final LF.
        for (wire, data) in [
            (&b""[..], &b""[..]),
            (b"5", b""),
            (b"5 ", b""),
            (b"5;a", b""),
            (b"5\r", b""),
            (b"5\r\n", b""),
            (b"5\r\nhe", b"he"),
            (b"5\r\nhello", b"hello"),
            (b"5\r\nhello\r", b"hello"),
            (b"5\r\nhello\r\n", b"hello"),
            (b"0\r\n", b""),
            (b"0\r\nx: 1", b""),
            (b"0\r\nx: 1\r", b""),
            (b"0\r\nx: 1\r\n", b""),
            (b"0\r\n\r", b""),
        ] {
            for mode in MODES {
                let (got, t, end, _) = decode_in_pieces(mode, wire, &[], true);
                assert_eq!(
                    (end, &got[..], t),
                    (Err(Error::Eof), data, None),
                    "{wire:?}"
                );
            }
        }
        // A body that ended is not cut by the end of the connection.
        let (_, _, end, _) = decode_in_pieces(Trailers::Keep, b"0\r\n\r\n", &[], true);
        assert_eq!(end, Ok(()));
    }

    #[test]
    fn a_buffered_rest_is_judged_without_consuming_it() {
        let d = Decoder::new(Trailers::Discard);
        assert!(d.rest_is_exactly(b"5\r\nhello\r\n0\r\n\r\n"));
        assert!(d.rest_is_exactly(b"5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"));
        // Not all there, something after it (a pipelined request), or malformed.
        assert!(!d.rest_is_exactly(b"5\r\nhello\r\n0\r\n"));
        assert!(!d.rest_is_exactly(b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n"));
        assert!(!d.rest_is_exactly(b"5\r\nhelloXX0\r\n\r\n"));
        assert!(!d.rest_is_exactly(b""));
        // From the middle of a body: the decoder's own state counts, and it is left as it was.
        let mut d = Decoder::new(Trailers::Discard);
        let mut buf = BytesMut::from(&b"3\r\nab"[..]);
        assert!(matches!(d.decode(&mut buf, false), Ok(Some(Item::Data(_)))));
        assert!(d.rest_is_exactly(b"c\r\n0\r\n\r\n"));
        assert!(!d.rest_is_exactly(b"0\r\n\r\n"));
        assert_eq!(d.data_left(), Some(1));
    }

    #[test]
    fn trailer_limits() {
        // Size: the section counts with its CRLFs.
        let section = |n: usize| {
            let mut w = b"0\r\nx: ".to_vec();
            w.resize(3 + n - 4, b'v');
            w.extend_from_slice(b"\r\n\r\n");
            w
        };
        for mode in MODES {
            assert_eq!(error_of(mode, &section(MAX_TRAILERS)), Ok(()));
            assert_eq!(
                error_of(mode, &section(MAX_TRAILERS + 1)),
                Err(Error::Invalid("trailers too large"))
            );
        }
        // Fields: at most MAX_TRAILER_FIELDS kept; dropped ones are not counted.
        let fields = |n: usize| {
            let mut w = b"0\r\n".to_vec();
            for i in 0..n {
                w.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
            }
            w.extend_from_slice(b"\r\n");
            w
        };
        assert_eq!(
            error_of(Trailers::Keep, &fields(MAX_TRAILER_FIELDS)),
            Ok(())
        );
        assert_eq!(
            error_of(Trailers::Keep, &fields(MAX_TRAILER_FIELDS + 1)),
            Err(Error::Invalid("malformed trailers"))
        );
        assert_eq!(error_of(Trailers::Discard, &fields(100)), Ok(()));
    }

    #[test]
    fn kept_trailers_must_be_fields() {
        for wire in [
            &b"0\r\nno colon\r\n\r\n"[..],
            b"0\r\nx y: 1\r\n\r\n",
            b"0\r\nx : 1\r\n\r\n",
            b"0\r\n folded: 1\r\n\r\n",
            b"0\r\nx: a\x00b\r\n\r\n",
        ] {
            assert!(
                matches!(error_of(Trailers::Keep, wire), Err(Error::Invalid(_))),
                "{wire:?}"
            );
            // Dropped ones only need their line framing.
            assert_eq!(error_of(Trailers::Discard, wire), Ok(()), "{wire:?}");
        }
    }
}
