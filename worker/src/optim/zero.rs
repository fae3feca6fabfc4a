//! ZeRO's partition geometry, and its configuration.
//!
//! The padded flat buffers (`model::params`) are cut into *units* of the
//! reduction bucket's size, in layout order (the order backward finishes
//! gradients); every unit is split evenly over the data-parallel ranks, and
//! rank `r` owns the `r`-th run of every unit. So a unit's gradient is one
//! reduce-scatter onto its owners the moment it is complete (stage 2 does
//! that during backward), and its parameters one in-place all-gather after
//! the update. A rank's shard is its runs laid end to end: `padded / dp`
//! elements, described by a list of flat ranges (the checkpoint manifest
//! stores them).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// DeepSpeed's `zero_optimization`, as this worker applies it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZeroConfig {
    /// 0: every data-parallel rank keeps everything; 1: fp32 master weights
    /// and Adam moments partitioned; 2: gradients too.
    pub stage: u8,
    /// Elements per gradient reduction (the unit of partitioning).
    pub reduce_bucket_size: i64,
    /// Elements per parameter all-gather.
    pub allgather_bucket_size: i64,
    /// Stage 2: reduce each bucket from inside backward, as it fills (always
    /// so here: the CPU and NCCL back ends run it on the compute stream; the
    /// flag is kept for the record).
    pub overlap_comm: bool,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        ZeroConfig { stage: 0, reduce_bucket_size: 500_000_000, allgather_bucket_size: 500_000_000, overlap_comm: false }
    }
}

impl ZeroConfig {
    pub fn validate(&self) -> Result<()> {
        if self.stage > 2 {
            return Err(Error::Config(format!(
                "zero_optimization.stage {}: stages 0, 1 and 2 are supported (stage 3, parameter partitioning, is not)",
                self.stage
            )));
        }
        for (k, v) in [("reduce_bucket_size", self.reduce_bucket_size), ("allgather_bucket_size", self.allgather_bucket_size)] {
            if v <= 0 {
                return Err(Error::Config(format!("zero_optimization.{k} {v}: must be positive")));
            }
        }
        Ok(())
    }
}

/// One run of a rank's shard: `len` elements at `flat` in the flat buffers,
/// at `shard` in the rank's shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub flat: i64,
    pub shard: i64,
    pub len: i64,
}

/// The partition of a padded flat buffer over `dp` ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shards {
    /// Elements of the padded flat buffer (a multiple of `dp`).
    pub padded: i64,
    /// Elements per unit (a multiple of `dp`); the last unit may be shorter.
    pub unit: i64,
    pub dp: usize,
}

impl Shards {
    /// Units of about `bucket` elements (rounded down to a multiple of
    /// 64·dp when the padding allows, at least one such multiple) over `dp`
    /// ranks. `padded` must be a multiple of `dp`.
    pub fn new(padded: i64, bucket: i64, dp: usize) -> Result<Self> {
        let d = dp as i64;
        if dp == 0 || padded % d != 0 {
            return Err(Error::Config(format!("flat buffer of {padded} elements does not split over {dp} data-parallel ranks")));
        }
        let q = if padded % (64 * d) == 0 { 64 * d } else { d };
        let unit = (bucket / q * q).max(q).min(padded.max(q));
        Ok(Shards { padded, unit, dp })
    }

    /// Checks a partition read from a file (a checkpoint manifest).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let d = self.dp as i64;
        if self.dp == 0 || self.unit <= 0 || self.padded < 0 || self.padded % d != 0 || self.unit % d != 0 {
            return Err(format!("invalid partition {self:?}: units and the buffer must be positive multiples of the data-parallel size"));
        }
        Ok(())
    }

    /// `(start, len)` of every unit, in order.
    pub fn units(&self) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < self.padded {
            let len = self.unit.min(self.padded - at);
            out.push((at, len));
            at += len;
        }
        out
    }

    /// Elements of every rank's shard.
    pub fn shard_len(&self) -> i64 {
        self.padded / self.dp as i64
    }

    /// Rank `rank`'s runs, in flat (and shard) order.
    pub fn pieces(&self, rank: usize) -> Vec<Piece> {
        let d = self.dp as i64;
        let mut shard = 0;
        self.units()
            .into_iter()
            .map(|(start, len)| {
                let run = len / d;
                let p = Piece { flat: start + rank as i64 * run, shard, len: run };
                shard += run;
                p
            })
            .collect()
    }

    /// The parts of the sorted flat `ranges` that rank `rank` owns, as
    /// `(offset, len)` ranges of its shard, in order.
    pub fn to_shard(&self, rank: usize, ranges: &[(i64, i64)]) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for p in self.pieces(rank) {
            for &(o, n) in ranges {
                let (a, b) = (o.max(p.flat), (o + n).min(p.flat + p.len));
                if a < b {
                    let s = p.shard + a - p.flat;
                    match out.last_mut() {
                        Some((lo, ln)) if *lo + *ln == s => *ln += b - a,
                        _ => out.push((s, b - a)),
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_split_evenly_and_shards_tile_the_buffer() {
        let s = Shards::new(1024, 300, 2).unwrap();
        assert_eq!(s.unit, 256, "rounded down to a multiple of 64·dp");
        assert_eq!(s.units(), vec![(0, 256), (256, 256), (512, 256), (768, 256)]);
        let (a, b) = (s.pieces(0), s.pieces(1));
        assert_eq!(a[1], Piece { flat: 256, shard: 128, len: 128 });
        assert_eq!(b[0], Piece { flat: 128, shard: 0, len: 128 });
        // every element owned exactly once
        let mut owned = vec![0; 1024];
        for p in a.iter().chain(&b) {
            for i in p.flat..p.flat + p.len {
                owned[i as usize] += 1;
            }
        }
        assert!(owned.iter().all(|&n| n == 1));
        assert_eq!(s.shard_len(), 512);
        // a short last unit, and a bucket larger than the buffer
        let s = Shards::new(640, 256, 2).unwrap();
        assert_eq!(s.units(), vec![(0, 256), (256, 256), (512, 128)]);
        assert_eq!(s.pieces(1).last().unwrap(), &Piece { flat: 576, shard: 256, len: 64 });
        assert_eq!(Shards::new(640, 1 << 30, 4).unwrap().units(), vec![(0, 640)]);
        assert!(Shards::new(642, 64, 4).is_err());
    }

    #[test]
    fn flat_ranges_map_into_a_shard() {
        let s = Shards::new(512, 256, 2).unwrap();
        // rank 1 owns [128, 256) and [384, 512)
        assert_eq!(s.to_shard(1, &[(100, 50), (200, 250)]), vec![(0, 22), (72, 122)]);
        assert_eq!(s.to_shard(0, &[(0, 512)]), vec![(0, 256)]);
        assert_eq!(s.to_shard(0, &[(130, 10)]), vec![]);
    }

    #[test]
    fn stage_three_is_refused_by_name() {
        let e = ZeroConfig { stage: 3, ..ZeroConfig::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("zero_optimization.stage 3"), "{e}");
    }
}
