//! The answer cache of the UDP path: encoded responses, keyed by the
//! request datagram without its ID, valid while the index serial they were
//! built at holds (CoreDNS's cache plugin keeps packed messages the same
//! way; here a watch event, not a TTL, ends them).
//!
//! Why the request bytes are the key: a response decided without
//! upstreams ([`crate::handler::Decision::Now`]) is a function of the
//! request's bytes and of the index alone. hickory echoes the question
//! section byte for byte and names the answers as asked, so the same bytes
//! (ID aside) get the same response, and the ID is the only thing to
//! patch: the first two bytes. Nothing is parsed here beyond the fixed
//! header, so there is no parser to get wrong: flags, the question's case,
//! EDNS payload size and DO bit are all part of the key. Clients that
//! randomise the question's case (DNS 0x20) get one entry per spelling.
//!
//! Entries are only kept for plain queries ([`key`]); everything else
//! takes hickory's full path every time.

use std::collections::HashMap;

use prometheus_client::metrics::counter::Counter;

/// Length of the DNS header.
const HEADER: usize = 12;
/// The shortest question: the root name (1), type (2), class (2).
const MIN_QUESTION: usize = 5;
/// Requests longer than this are answered but not cached: a plain
/// question with an OPT record without options is at most 12 + 259 + 11.
const MAX_REQUEST: usize = 512;

/// The cache key of `datagram`, everything after the ID, if it is a plain
/// query: a QUERY, not a response, not truncated, one question, no answer
/// or authority records, at most one additional record (EDNS's OPT).
pub fn key(datagram: &[u8]) -> Option<&[u8]> {
    if !(HEADER + MIN_QUESTION..=MAX_REQUEST).contains(&datagram.len()) {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([datagram[i], datagram[i + 1]]);
    // QR (0x80), opcode (0x78), TC (0x02) of the first flags byte.
    let plain = datagram[2] & (0x80 | 0x78 | 0x02) == 0;
    let counts = (count(4), count(6), count(8), count(10));
    (plain && matches!(counts, (1, 0, 0, 0 | 1))).then(|| &datagram[2..])
}

/// A cached response and the request counter it counts as.
pub struct Entry {
    /// The encoded response; its ID is patched per request.
    response: Box<[u8]>,
    /// `riptide_dns_requests_total` for this response's qtype and rcode.
    pub requests: Counter,
}

impl Entry {
    pub fn new(response: &[u8], requests: Counter) -> Self {
        Self { response: response.into(), requests }
    }

    /// The response to a request with ID `id`, into `out`.
    pub fn write(&self, id: [u8; 2], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.response);
        if let Some(head) = out.get_mut(..2) {
            head.copy_from_slice(&id);
        }
    }
}

/// Responses of one index serial; a new serial starts over.
pub struct AnswerCache {
    serial: u32,
    capacity: usize,
    entries: HashMap<Box<[u8]>, Entry>,
}

impl AnswerCache {
    pub fn new(capacity: usize) -> Self {
        Self { serial: 0, capacity, entries: HashMap::new() }
    }

    /// The entry for `key` if it was built at `serial`, the index's
    /// current one.
    pub fn get(&self, key: &[u8], serial: u32) -> Option<&Entry> {
        if serial != self.serial {
            return None;
        }
        self.entries.get(key)
    }

    /// Keeps `entry`, built at `built`, unless the index has moved on
    /// (`current`). A full cache starts over: the simplest bound, and the
    /// capacity is above what a cluster asks between two changes.
    pub fn insert(&mut self, key: &[u8], entry: Entry, built: u32, current: u32) {
        if built != current {
            return;
        }
        if self.serial != current || self.entries.len() >= self.capacity {
            self.entries.clear();
            self.serial = current;
        }
        self.entries.insert(key.into(), entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(flags: [u8; 2], counts: [u16; 4]) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, flags[0], flags[1]];
        for c in counts {
            m.extend_from_slice(&c.to_be_bytes());
        }
        m.extend_from_slice(b"\x01a\x00\x00\x01\x00\x01");
        m
    }

    #[test]
    fn only_plain_queries_have_a_key() {
        let q = query([0x01, 0x00], [1, 0, 0, 0]);
        assert_eq!(key(&q), Some(&q[2..]));
        assert!(key(&query([0x01, 0x00], [1, 0, 0, 1])).is_some(), "EDNS");
        assert!(key(&query([0x81, 0x00], [1, 0, 0, 0])).is_none(), "a response");
        assert!(key(&query([0x29, 0x00], [1, 0, 0, 0])).is_none(), "UPDATE");
        assert!(key(&query([0x03, 0x00], [1, 0, 0, 0])).is_none(), "TC");
        assert!(key(&query([0x01, 0x00], [2, 0, 0, 0])).is_none(), "two questions");
        assert!(key(&query([0x01, 0x00], [1, 1, 0, 0])).is_none(), "an answer record");
        assert!(key(&query([0x01, 0x00], [1, 0, 0, 2])).is_none(), "two additionals");
        assert!(key(&q[..HEADER + MIN_QUESTION - 1]).is_none(), "too short for a question");
        assert!(key(&[0; MAX_REQUEST + 1]).is_none());
    }

    #[test]
    fn entries_live_for_one_serial() {
        let mut c = AnswerCache::new(2);
        let e = || Entry::new(&[0, 0, 0x81, 0x80], Counter::default());
        c.insert(b"k1", e(), 7, 7);
        assert!(c.get(b"k1", 7).is_some());
        assert!(c.get(b"k1", 8).is_none(), "the index changed");
        c.insert(b"k2", e(), 7, 8);
        assert!(c.get(b"k2", 8).is_none(), "built before the change: not kept");
        c.insert(b"k2", e(), 8, 8);
        assert_eq!(c.len(), 1, "the new serial started over");
        c.insert(b"k3", e(), 8, 8);
        c.insert(b"k4", e(), 8, 8);
        assert_eq!(c.len(), 1, "a full cache started over");
        let mut out = Vec::new();
        c.get(b"k4", 8).unwrap().write([0xab, 0xcd], &mut out);
        assert_eq!(out, [0xab, 0xcd, 0x81, 0x80]);
    }
}
