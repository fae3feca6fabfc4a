//! Test hooks: environment variables that make faults happen on purpose, so
//! integration tests can drive real `glm-worker` processes into paths that
//! healthy runs never take. Every hook is read here and nowhere else; none is
//! meant for users, and none is set in a normal run.
//!
//! - `GLM_INJECT_INF_GRAD=<world rank or *>:<steps>[:split]`: that rank
//!   (every rank with `*`) writes an inf into the reduced gradient it holds
//!   (its shard under ZeRO) at those optimizer steps (the training
//!   iterations, counted from 1 over the whole run, a resume included;
//!   `<steps>` is a comma-separated list of steps and `a-b` ranges): at its
//!   first element, or with `split` at the first element of a
//!   tensor-parallel slice it holds. The fp16 overflow path (skip, scaler,
//!   schedule) and the agreement on it over the world are tested with it.

/// Where `GLM_INJECT_INF_GRAD` puts an inf for this rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfGradient {
    /// The steps (iterations) that overflow, ascending.
    pub steps: Vec<u64>,
    /// In a tensor-parallel slice (`:split`) rather than at element 0.
    pub in_split_range: bool,
}

/// `GLM_INJECT_INF_GRAD` for world rank `rank`, when it names this rank.
pub fn inf_gradient(rank: usize) -> Option<InfGradient> {
    parse_inf_gradient(&std::env::var("GLM_INJECT_INF_GRAD").ok()?, rank)
}

fn parse_inf_gradient(v: &str, rank: usize) -> Option<InfGradient> {
    let mut f = v.split(':').map(str::trim);
    let (who, steps, at) = (f.next()?, f.next()?, f.next());
    let mut list = Vec::new();
    for item in steps.split(',').map(str::trim) {
        match item.split_once('-') {
            Some((a, b)) => list.extend(a.trim().parse::<u64>().ok()?..=b.trim().parse::<u64>().ok()?),
            None => list.push(item.parse::<u64>().ok()?),
        }
    }
    list.sort_unstable();
    let mine = who == "*" || who.parse::<usize>().ok()? == rank;
    mine.then_some(InfGradient { steps: list, in_split_range: at == Some("split") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inf_gradient_hook_names_ranks_and_steps() {
        assert_eq!(parse_inf_gradient("1:3", 1), Some(InfGradient { steps: vec![3], in_split_range: false }));
        assert_eq!(parse_inf_gradient("1:3", 0), None);
        assert_eq!(parse_inf_gradient("*:2:split", 5), Some(InfGradient { steps: vec![2], in_split_range: true }));
        assert_eq!(parse_inf_gradient("*:9,2-4, 7", 0), Some(InfGradient { steps: vec![2, 3, 4, 7, 9], in_split_range: false }));
        assert_eq!(parse_inf_gradient("*:2-x", 0), None);
        assert_eq!(parse_inf_gradient("x:2", 0), None);
        assert_eq!(parse_inf_gradient("0", 0), None);
    }
}
