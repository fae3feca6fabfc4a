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
//! - `GLM_INJECT_SAVE_FAILURE=<world rank or *>:<iterations>`: that rank's
//!   checkpoint writer finds a directory where its first file of those
//!   iterations' checkpoints goes, so the real write fails with the
//!   operating system's error naming the path (root ignores read-only
//!   directories, so tests cannot make a write fail that way).
//! - `GLM_HOLD_SAVE=<file>`: every checkpoint writer waits, before it writes
//!   anything, until `<file>` exists: a test holds a save in flight and
//!   lets it go once it has seen what it wanted (a stop waiting for it).
//! - `GLM_SAVE_CLOCK_RANK=<world rank>`: `save_interval_minutes` is read on
//!   that rank's clock only (the others never find a save due by time), so a
//!   test sees one rank's decision carried to every rank.

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
    let (steps, at) = parse_rank_steps(v, rank)?;
    Some(InfGradient { steps, in_split_range: at == Some("split") })
}

/// `<world rank or *>:<steps>[:<more>]` for world rank `rank`: the steps
/// (ascending) and `<more>`, when it names this rank.
fn parse_rank_steps(v: &str, rank: usize) -> Option<(Vec<u64>, Option<&str>)> {
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
    mine.then_some((list, at))
}

/// The iterations whose checkpoint `GLM_INJECT_SAVE_FAILURE` makes world
/// rank `rank`'s writer fail, when it names this rank.
pub fn save_failure(rank: usize) -> Option<Vec<u64>> {
    parse_rank_steps(&std::env::var("GLM_INJECT_SAVE_FAILURE").ok()?, rank).map(|(steps, _)| steps)
}

/// The file `GLM_HOLD_SAVE` makes checkpoint writers wait for.
pub fn hold_save() -> Option<std::path::PathBuf> {
    std::env::var_os("GLM_HOLD_SAVE").filter(|v| !v.is_empty()).map(Into::into)
}

/// Whether world rank `rank` reads `save_interval_minutes` on its clock
/// (every rank, unless `GLM_SAVE_CLOCK_RANK` names another).
pub fn save_clock_counts(rank: usize) -> bool {
    std::env::var("GLM_SAVE_CLOCK_RANK").ok().and_then(|v| v.trim().parse::<usize>().ok()).is_none_or(|r| r == rank)
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
        assert_eq!(parse_rank_steps("*:4,6", 3), Some((vec![4, 6], None)));
        assert_eq!(parse_rank_steps("1:4", 0), None);
    }
}
