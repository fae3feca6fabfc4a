//! The rank grid, Megatron order: tensor-parallel groups are runs of
//! consecutive ranks, data-parallel groups stride by the tensor-parallel size
//! (world 4, tp 2: TP groups {0,1} {2,3}; DP groups {0,2} {1,3}). Validated up
//! front, naming every degree in the error.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParallelDims {
    pub world: usize,
    pub rank: usize,
    pub tp: usize,
    pub dp: usize,
}

impl ParallelDims {
    pub fn new(world: usize, rank: usize, tp: usize) -> Result<Self> {
        if tp == 0 || world == 0 || world % tp != 0 {
            return Err(Error::Config(format!("world size {world} is not a multiple of model_parallel_size {tp} (world = tensor-parallel × data-parallel)")));
        }
        if rank >= world {
            return Err(Error::Config(format!("rank {rank} outside a world of {world}")));
        }
        Ok(ParallelDims { world, rank, tp, dp: world / tp })
    }

    /// Checks that the model splits evenly over the tensor-parallel ranks.
    pub fn check_model(&self, hidden: usize, heads: usize, ffn: usize) -> Result<()> {
        check_split(self.tp, hidden, heads, ffn).map_err(|e| Error::Config(format!("{e} (world {} = tp {} × dp {})", self.world, self.tp, self.dp)))
    }

    pub fn tp_rank(&self) -> usize {
        self.rank % self.tp
    }

    pub fn dp_rank(&self) -> usize {
        self.rank / self.tp
    }

    /// Ranks of this rank's tensor-parallel group.
    pub fn tp_group(&self) -> Vec<usize> {
        let base = self.dp_rank() * self.tp;
        (base..base + self.tp).collect()
    }

    /// Ranks of this rank's data-parallel group.
    pub fn dp_group(&self) -> Vec<usize> {
        (0..self.dp).map(|j| self.tp_rank() + j * self.tp).collect()
    }
}

/// Whether a model of these sizes can be built at all (the worker's and
/// the planner's check): positive sizes, heads that divide the hidden size.
pub fn check_sizes(hidden: usize, layers: usize, heads: usize) -> std::result::Result<(), String> {
    if hidden == 0 || layers == 0 || heads == 0 {
        return Err("hidden_size, num_layers and num_attention_heads must be positive".into());
    }
    if hidden % heads != 0 {
        return Err(format!("hidden_size {hidden} is not divisible by num_attention_heads {heads}"));
    }
    Ok(())
}

/// Whether a model of these sizes splits evenly over `tp` ranks; the
/// message names the first size that does not.
pub fn check_split(tp: usize, hidden: usize, heads: usize, ffn: usize) -> std::result::Result<(), String> {
    for (what, n) in [("num_attention_heads", heads), ("hidden_size", hidden), ("intermediate_size", ffn)] {
        if n % tp != 0 {
            return Err(format!("{what} {n} is not divisible by model_parallel_size {tp}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_order() {
        let d = ParallelDims::new(4, 3, 2).unwrap();
        assert_eq!((d.tp_rank(), d.dp_rank(), d.dp), (1, 1, 2));
        assert_eq!(d.tp_group(), vec![2, 3]);
        assert_eq!(d.dp_group(), vec![1, 3]);
        let d = ParallelDims::new(8, 5, 4).unwrap();
        assert_eq!(d.tp_group(), vec![4, 5, 6, 7]);
        assert_eq!(d.dp_group(), vec![1, 5]);
        let d = ParallelDims::new(3, 2, 1).unwrap();
        assert_eq!(d.dp_group(), vec![0, 1, 2]);
    }

    #[test]
    fn bad_layouts_name_the_degrees() {
        let e = ParallelDims::new(3, 0, 2).unwrap_err().to_string();
        assert!(e.contains("world size 3 is not a multiple of model_parallel_size 2"), "{e}");
        let d = ParallelDims::new(4, 0, 4).unwrap();
        let e = d.check_model(256, 6, 1024).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads 6 is not divisible by model_parallel_size 4 (world 4 = tp 4 × dp 1)"), "{e}");
    }
}
