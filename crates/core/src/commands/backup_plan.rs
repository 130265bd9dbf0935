//! Which chunks of a window of a disk a backup must read, from the
//! source's description of it: pure functions over extents and dirty
//! ranges, kept out of `backup.rs` so they can be tested alone.
//!
//! A backup asks the source about long windows (many GiB) at once and
//! gives its workers only the chunks that hold data (or changed), so a
//! mostly empty 16 TiB disk costs a few thousand requests, not one per
//! chunk.

use crate::source::{Extent, ExtentKind};

/// How far one allocation query reaches: 64 GiB, 32 NBD block status
/// requests at most.
pub(crate) const ALLOCATION_WINDOW: u64 = 64 << 30;
/// The most extents one allocation query collects (about 400 KiB).
pub(crate) const MAX_PLAN_EXTENTS: usize = 16 << 10;
/// How far one dirty-bitmap query reaches: at 64 KiB bitmap granules,
/// at most 128 Ki ranges (2 MiB) even when every other granule is dirty.
pub(crate) const CHANGES_WINDOW: u64 = 16 << 30;

/// Where a window described by `extents` (from `offset`, chunk-aligned)
/// may end so that every chunk in it is fully described: the covered end
/// rounded down to a chunk boundary, or the disk's end. `None` when not
/// even the first chunk is fully described (a very fragmented chunk).
pub(crate) fn window_end(extents: &[Extent], offset: u64, size: u64, chunk: u64) -> Option<u64> {
    let covered = extents.last().map_or(offset, Extent::end).min(size);
    let end = match covered == size {
        true => size,
        false => covered / chunk * chunk,
    };
    (end > offset).then_some(end)
}

/// The chunks of `[start, end)` that hold data according to `extents`
/// (which cover at least that range, in order), each with its extents
/// clipped to the chunk; chunks wholly inside `Zero` extents are left out,
/// so a long hole costs nothing per chunk.
pub(crate) fn data_chunks(
    extents: &[Extent],
    start: u64,
    end: u64,
    chunk: u64,
) -> Vec<(u64, Vec<Extent>)> {
    let mut out: Vec<(u64, Vec<Extent>)> = Vec::new();
    let data = extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Data && e.end() > start && e.offset < end);
    for extent in data {
        let first = extent.offset.max(start) / chunk;
        let last = (extent.end().min(end) - 1) / chunk;
        let from = out.last().map_or(first, |(c, _)| first.max(c + 1));
        out.extend((from..=last).map(|c| (c, Vec::new())));
    }
    let mut at = 0;
    for (c, pieces) in &mut out {
        let (lo, hi) = (*c * chunk, ((*c + 1) * chunk).min(end));
        while extents[at].end() <= lo {
            at += 1;
        }
        pieces.extend(extents[at..].iter().take_while(|e| e.offset < hi).map(|e| {
            let offset = e.offset.max(lo);
            Extent {
                offset,
                length: e.end().min(hi) - offset,
                kind: e.kind,
            }
        }));
    }
    out
}

/// The chunks touched by the dirty byte ranges (sorted, not overlapping),
/// as sorted, merged `[first, end)` chunk ranges.
pub(crate) fn dirty_chunks(ranges: &[(u64, u64)], chunk: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges.iter().filter(|(s, e)| e > s) {
        let (first, stop) = (start / chunk, (end - 1) / chunk + 1);
        match out.last_mut() {
            Some(last) if last.1 >= first => last.1 = last.1.max(stop),
            _ => out.push((first, stop)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn extent(offset: u64, length: u64, data: bool) -> Extent {
        let kind = match data {
            true => ExtentKind::Data,
            false => ExtentKind::Zero,
        };
        Extent {
            offset,
            length,
            kind,
        }
    }

    #[test]
    fn holes_between_data_cost_nothing_per_chunk() {
        // 1 TiB of 4 MiB chunks: data in chunk 0 (first KiB) and chunk 9999
        // (spilling into 10000).
        let c = 4 << 20;
        let extents = [
            extent(0, 1024, true),
            extent(1024, 9999 * c - 1024 + 100, false),
            extent(9999 * c + 100, c, true),
            extent(10_000 * c + 100, (1 << 40) - 10_000 * c - 100, false),
        ];
        let chunks = data_chunks(&extents, 0, 1 << 40, c);
        let numbers: Vec<u64> = chunks.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, vec![0, 9999, 10_000]);
        assert_eq!(
            chunks[0].1,
            vec![extent(0, 1024, true), extent(1024, c - 1024, false)]
        );
        assert_eq!(
            chunks[1].1,
            vec![
                extent(9999 * c, 100, false),
                extent(9999 * c + 100, c - 100, true)
            ]
        );
        assert_eq!(
            chunks[2].1,
            vec![
                extent(10_000 * c, 100, true),
                extent(10_000 * c + 100, c - 100, false)
            ]
        );
    }

    #[test]
    fn windows_end_on_chunk_boundaries() {
        let e = [extent(0, 10, true), extent(10, 15, false)];
        assert_eq!(window_end(&e, 0, 100, 10), Some(20));
        assert_eq!(window_end(&e, 0, 25, 10), Some(25), "the disk's end");
        assert_eq!(window_end(&e[..1], 0, 100, 16), None, "not one whole chunk");
        assert_eq!(window_end(&[], 0, 100, 16), None);
    }

    #[test]
    fn dirty_ranges_become_chunk_ranges() {
        assert_eq!(
            dirty_chunks(&[(0, 1), (5, 10), (10, 11), (35, 40), (41, 42)], 10),
            vec![(0, 2), (3, 5)]
        );
        assert_eq!(dirty_chunks(&[], 10), vec![]);
    }

    proptest! {
        /// Whatever the extents, the chunks planned are exactly those with
        /// a data byte, and each one's extents tile it.
        #[test]
        fn planned_chunks_are_exactly_the_chunks_with_data(
            lengths in proptest::collection::vec((1u64..50, any::<bool>()), 1..40),
            chunk in 1u64..20,
        ) {
            let mut extents = Vec::new();
            let mut pos = 0;
            for (length, data) in lengths {
                extents.push(extent(pos, length, data));
                pos += length;
            }
            let size = pos;
            let planned = data_chunks(&extents, 0, size, chunk);
            let has_data = |c: u64| extents.iter().any(|e| {
                e.kind == ExtentKind::Data && e.offset < ((c + 1) * chunk).min(size) && e.end() > c * chunk
            });
            let expected: Vec<u64> = (0..size.div_ceil(chunk)).filter(|c| has_data(*c)).collect();
            let got: Vec<u64> = planned.iter().map(|(c, _)| *c).collect();
            prop_assert_eq!(got, expected);
            for (c, pieces) in &planned {
                let mut at = c * chunk;
                for p in pieces {
                    prop_assert_eq!(p.offset, at);
                    at = p.end();
                }
                prop_assert_eq!(at, ((c + 1) * chunk).min(size));
            }
        }
    }
}
