//! Test hooks: environment variables that make faults happen on purpose, so
//! integration tests can drive real `glm-worker` processes into paths that
//! healthy runs never take. Every hook is read here and nowhere else; none is
//! meant for users, and none is set in a normal run.
//!
//! - `GLM_INJECT_INF_GRAD=<world rank or *>:<step>[:split]`: that rank
//!   (every rank with `*`) writes an inf into the reduced gradient it holds
//!   (its shard under ZeRO) at that optimizer step (counted from 1 in this
//!   process): at its first element, or with `split` at the first element of
//!   a tensor-parallel slice it holds. The fp16 overflow path (skip, scaler,
//!   schedule) and the agreement on it over the world are tested with it.

/// Where `GLM_INJECT_INF_GRAD` puts an inf for this rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfGradient {
    pub step: u64,
    /// In a tensor-parallel slice (`:split`) rather than at element 0.
    pub in_split_range: bool,
}

/// `GLM_INJECT_INF_GRAD` for world rank `rank`, when it names this rank.
pub fn inf_gradient(rank: usize) -> Option<InfGradient> {
    parse_inf_gradient(&std::env::var("GLM_INJECT_INF_GRAD").ok()?, rank)
}

fn parse_inf_gradient(v: &str, rank: usize) -> Option<InfGradient> {
    let mut f = v.split(':').map(str::trim);
    let (who, step, at) = (f.next()?, f.next()?.parse::<u64>().ok()?, f.next());
    let mine = who == "*" || who.parse::<usize>().ok()? == rank;
    mine.then_some(InfGradient { step, in_split_range: at == Some("split") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inf_gradient_hook_names_ranks_and_steps() {
        assert_eq!(parse_inf_gradient("1:3", 1), Some(InfGradient { step: 3, in_split_range: false }));
        assert_eq!(parse_inf_gradient("1:3", 0), None);
        assert_eq!(parse_inf_gradient("*:2:split", 5), Some(InfGradient { step: 2, in_split_range: true }));
        assert_eq!(parse_inf_gradient("x:2", 0), None);
        assert_eq!(parse_inf_gradient("0", 0), None);
    }
}
