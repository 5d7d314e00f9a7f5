//! Byte-level mutations of HTTP/1.1 messages, for property tests over the wire.

use proptest::prelude::*;

/// Bytes that matter to an HTTP/1.1 parser (line ends, separators, digits, hex, quotes), picked
/// three times as often as any byte for replacements and insertions.
pub const SPECIAL: &[u8] = b"\r\n :\t\0\x7f\xff019aAfF,;-\"/";

/// One edit; positions are taken modulo the message's length when applied.
#[derive(Debug, Clone)]
pub enum Mutation {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    /// Repeats the line that contains the position.
    DuplicateLine(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<prop::sample::Index>().prop_map(|i| i.index(usize::MAX));
    let byte = prop_oneof![3 => prop::sample::select(SPECIAL), 1 => any::<u8>()];
    prop_oneof![
        4 => (at.clone(), byte.clone()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        3 => (at.clone(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        3 => at.clone().prop_map(Mutation::Delete),
        1 => at.clone().prop_map(Mutation::Truncate),
        2 => at.prop_map(Mutation::DuplicateLine),
    ]
}

/// `base` with `ms` applied in order.
pub fn apply(base: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut v = base.to_vec();
    for m in ms {
        if v.is_empty() {
            break;
        }
        let n = v.len();
        match *m {
            Mutation::Replace(i, b) => v[i % n] = b,
            Mutation::Insert(i, b) => v.insert(i % (n + 1), b),
            Mutation::Delete(i) => {
                v.remove(i % n);
            }
            Mutation::Truncate(i) => v.truncate(i % n),
            Mutation::DuplicateLine(i) => {
                let i = i % n;
                let start = v[..i]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                let end = v[i..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(n, |p| i + p + 1);
                let line = v[start..end].to_vec();
                v.splice(start..start, line);
            }
        }
    }
    v
}

/// One of `bases` with `edits` mutations applied (a range such as `1..4`).
pub fn mutated(
    bases: &'static [&'static [u8]],
    edits: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(bases),
        prop::collection::vec(mutation(), edits),
    )
        .prop_map(|(base, ms)| apply(base, &ms))
}
