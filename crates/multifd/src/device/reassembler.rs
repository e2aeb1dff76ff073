//! One device's out-of-order chunks put back in order: pure bookkeeping, no I/O and no
//! threads, so it is tested (and fuzzed) on its own.

use std::collections::BTreeMap;

/// What a chunk's arrival broke, in one device's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReassemblyError {
    /// This idx was queued or loaded already.
    Duplicate {
        /// The repeated idx.
        idx: u32,
    },
    /// A chunk past the config chunk, which must be the last.
    AfterConfig {
        /// The chunk past the config.
        idx: u32,
        /// The config chunk's idx.
        config_idx: u32,
    },
    /// A second chunk flagged as the config.
    SecondConfig {
        /// The second config chunk.
        idx: u32,
        /// The first one's idx.
        config_idx: u32,
    },
    /// Queuing the chunk would pass the cap.
    QueueFull {
        /// Bytes charged with the chunk.
        queued: u64,
        /// The cap.
        cap: u64,
    },
}

/// What is missing from a device's stream at completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    /// The first idx never received.
    pub idx: u32,
    /// Whether the config chunk was received.
    pub config_received: bool,
}

/// Every queued chunk is charged this much on top of its payload, for its bookkeeping
/// (map entry, buffer header), so a flood of empty chunks also meets the cap.
pub(crate) const CHUNK_OVERHEAD: u64 = 64;

/// One device's out-of-order chunks, released strictly in `idx` order.
///
/// Pure bookkeeping (no I/O, no threads), generic over the buffer so it can be tested
/// on its own: chunks go in with [`Reassembler::insert`] in any order, come out with
/// [`Reassembler::pop`] as `0, 1, 2, …` up to and including the config chunk.
#[derive(Debug)]
pub struct Reassembler<B> {
    /// Received chunks not yet released, by idx: payload and whether it is the config.
    pending: BTreeMap<u32, (B, bool)>,
    /// The next idx to release.
    /// Wider than an idx, so releasing idx `u32::MAX` cannot overflow.
    next: u64,
    /// The config chunk's idx, once it arrived.
    config_idx: Option<u32>,
    /// Whether the config chunk was released: the stream is complete.
    done: bool,
    /// Payload bytes of the pending chunks.
    queued_bytes: u64,
    cap: u64,
}

impl<B: AsRef<[u8]>> Reassembler<B> {
    /// An empty stream whose pending chunks may hold at most `cap` bytes (each charged
    /// its payload plus [`CHUNK_OVERHEAD`]).
    pub fn new(cap: u64) -> Self {
        Self {
            pending: BTreeMap::new(),
            next: 0,
            config_idx: None,
            done: false,
            queued_bytes: 0,
            cap,
        }
    }

    /// Queues chunk `idx`; refuses duplicates, anything past the config chunk and
    /// anything that would pass the cap.
    pub fn insert(&mut self, idx: u32, config: bool, payload: B) -> Result<(), ReassemblyError> {
        if u64::from(idx) < self.next || self.pending.contains_key(&idx) {
            return Err(ReassemblyError::Duplicate { idx });
        }
        if let Some(config_idx) = self.config_idx {
            if idx > config_idx {
                return Err(ReassemblyError::AfterConfig { idx, config_idx });
            }
            if config {
                return Err(ReassemblyError::SecondConfig { idx, config_idx });
            }
        }
        if config {
            if let Some((&last, _)) = self.pending.last_key_value() {
                if last > idx {
                    return Err(ReassemblyError::AfterConfig {
                        idx: last,
                        config_idx: idx,
                    });
                }
            }
        }
        let length = payload.as_ref().len() as u64;
        self.check_room(length + CHUNK_OVERHEAD)?;
        if config {
            self.config_idx = Some(idx);
        }
        self.queued_bytes += length;
        self.pending.insert(idx, (payload, config));
        Ok(())
    }

    /// The next chunk in order, if it arrived: its payload and whether it is the config.
    pub fn pop(&mut self) -> Option<(B, bool)> {
        let (payload, config) = self.pending.remove(&u32::try_from(self.next).ok()?)?;
        self.queued_bytes -= payload.as_ref().len() as u64;
        self.next += 1;
        self.done = config;
        Some((payload, config))
    }

    /// Whether the config chunk was released.
    #[cfg(test)]
    fn is_done(&self) -> bool {
        self.done
    }

    /// Payload bytes queued now.
    #[cfg(test)]
    fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// With no more input to come: what is missing, or `None` if the stream is whole
    /// (every chunk up to the config received, whether released yet or not).
    pub fn missing(&self) -> Option<Missing> {
        let mut expected = self.next;
        for &idx in self.pending.keys() {
            if u64::from(idx) != expected {
                break;
            }
            expected += 1;
        }
        match self.config_idx {
            Some(config_idx) if expected > u64::from(config_idx) => None,
            _ if self.done => None,
            config_idx => Some(Missing {
                idx: u32::try_from(expected).unwrap_or(u32::MAX),
                config_received: config_idx.is_some(),
            }),
        }
    }

    /// Whether `extra` more bytes fit under the cap beside what is queued.
    pub(crate) fn check_room(&self, extra: u64) -> Result<(), ReassemblyError> {
        let charged = self.charged() + extra;
        if charged > self.cap {
            return Err(ReassemblyError::QueueFull {
                queued: charged,
                cap: self.cap,
            });
        }
        Ok(())
    }

    fn charged(&self) -> u64 {
        self.queued_bytes + self.pending.len() as u64 * CHUNK_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn chunk(idx: u32) -> Vec<u8> {
        vec![idx as u8; 1 + (idx as usize % 5)]
    }

    #[test]
    fn releases_in_order_whatever_the_arrival_order() {
        let mut chunks = Reassembler::new(1 << 20);
        chunks.insert(2, true, chunk(2)).expect("config");
        assert_eq!(chunks.pop(), None);
        chunks.insert(0, false, chunk(0)).expect("first");
        assert_eq!(chunks.pop(), Some((chunk(0), false)));
        assert_eq!(
            chunks.missing(),
            Some(Missing {
                idx: 1,
                config_received: true
            })
        );
        chunks.insert(1, false, chunk(1)).expect("second");
        assert_eq!(chunks.missing(), None);
        assert_eq!(chunks.pop(), Some((chunk(1), false)));
        assert_eq!(chunks.pop(), Some((chunk(2), true)));
        assert!(chunks.is_done());
        assert_eq!(chunks.queued_bytes(), 0);
    }

    #[test]
    fn refuses_duplicates_chunks_after_the_config_and_a_second_config() {
        let mut chunks = Reassembler::new(1 << 20);
        chunks.insert(0, false, chunk(0)).expect("first");
        assert_eq!(
            chunks.insert(0, false, chunk(0)),
            Err(ReassemblyError::Duplicate { idx: 0 })
        );
        chunks.pop().expect("released");
        assert_eq!(
            chunks.insert(0, false, chunk(0)),
            Err(ReassemblyError::Duplicate { idx: 0 }),
            "a released chunk is still a duplicate"
        );
        chunks.insert(5, false, chunk(5)).expect("ahead");
        assert_eq!(
            chunks.insert(3, true, chunk(3)),
            Err(ReassemblyError::AfterConfig {
                idx: 5,
                config_idx: 3
            }),
            "a config before a queued chunk makes that chunk come after it"
        );
        chunks.insert(6, true, chunk(6)).expect("config");
        assert_eq!(
            chunks.insert(7, false, chunk(7)),
            Err(ReassemblyError::AfterConfig {
                idx: 7,
                config_idx: 6
            })
        );
        assert_eq!(
            chunks.insert(4, true, chunk(4)),
            Err(ReassemblyError::SecondConfig {
                idx: 4,
                config_idx: 6
            })
        );
    }

    #[test]
    fn refuses_chunks_past_the_cap_counting_their_bookkeeping() {
        let mut chunks = Reassembler::new(2 * CHUNK_OVERHEAD + 10);
        chunks.insert(1, false, vec![0; 10]).expect("fits");
        assert_eq!(
            chunks.insert(2, false, vec![0; 1]),
            Err(ReassemblyError::QueueFull {
                queued: 2 * CHUNK_OVERHEAD + 11,
                cap: 2 * CHUNK_OVERHEAD + 10
            })
        );
        chunks
            .insert(2, false, Vec::new())
            .expect("an empty chunk fits");
        assert!(matches!(
            chunks.insert(3, false, Vec::new()),
            Err(ReassemblyError::QueueFull { .. })
        ));
    }

    #[test]
    fn an_empty_stream_misses_its_first_chunk() {
        let chunks = Reassembler::<Vec<u8>>::new(1 << 20);
        assert_eq!(
            chunks.missing(),
            Some(Missing {
                idx: 0,
                config_received: false
            })
        );
    }

    proptest! {
        /// Any arrival order of a whole stream, with duplicates and strays mixed in,
        /// releases exactly `0..=config` in order; strays and duplicates are refused with
        /// the right error; the queue never holds more than the cap.
        #[test]
        fn any_arrival_order_releases_in_order(
            count in 1u32..40,
            seed in any::<u64>(),
            duplicates in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
            strays in proptest::collection::vec(0u32..20, 0..5),
            cap_chunks in 3u64..50,
        ) {
            let cap = cap_chunks * (CHUNK_OVERHEAD + 5);
            let mut order: Vec<u32> = (0..count).collect();
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut chunks = Reassembler::new(cap);
            let mut released = Vec::new();
            let mut sent = std::collections::BTreeSet::new();
            let mut full = false;
            for (step, &idx) in order.iter().enumerate() {
                match chunks.insert(idx, idx == count - 1, chunk(idx)) {
                    Ok(()) => { sent.insert(idx); }
                    Err(ReassemblyError::QueueFull { queued, cap: limit }) => {
                        prop_assert!(queued > limit);
                        full = true;
                        break;
                    }
                    Err(other) => prop_assert!(false, "unexpected {other:?}"),
                }
                prop_assert!(chunks.charged() <= cap);
                for index in &duplicates {
                    let again = order[index.index(step + 1)];
                    prop_assert_eq!(
                        chunks.insert(again, false, chunk(again)),
                        Err(ReassemblyError::Duplicate { idx: again })
                    );
                }
                if step % 3 == 0 {
                    while let Some((payload, config)) = chunks.pop() {
                        let idx = released.len() as u32;
                        prop_assert_eq!(payload, chunk(idx));
                        prop_assert_eq!(config, idx == count - 1);
                        released.push(idx);
                    }
                }
            }
            while let Some((_, _)) = chunks.pop() {
                released.push(released.len() as u32);
            }
            prop_assert_eq!(&released, &(0..released.len() as u32).collect::<Vec<_>>());
            if full {
                prop_assert!(!chunks.is_done());
            } else {
                prop_assert!(chunks.is_done());
                prop_assert_eq!(chunks.missing(), None);
                prop_assert_eq!(released.len() as u32, count);
                prop_assert_eq!(chunks.queued_bytes(), 0);
                for stray in strays {
                    let idx = count + stray;
                    prop_assert_eq!(
                        chunks.insert(idx, false, chunk(idx)),
                        Err(ReassemblyError::AfterConfig { idx, config_idx: count - 1 })
                    );
                }
            }
        }

        /// Leaving one chunk out of a stream is always detected at completion, naming
        /// the first hole.
        #[test]
        fn a_hole_is_reported_at_completion(count in 1u32..30, hole in any::<prop::sample::Index>()) {
            let hole = hole.index(count as usize) as u32;
            let mut chunks = Reassembler::new(u64::MAX);
            for idx in (0..count).rev().filter(|&idx| idx != hole) {
                chunks.insert(idx, idx == count - 1, chunk(idx)).expect("insert");
            }
            while chunks.pop().is_some() {}
            prop_assert_eq!(
                chunks.missing(),
                Some(Missing { idx: hole, config_received: hole != count - 1 })
            );
        }
    }
}
