//! Placement: which node should own each number. Pure bookkeeping, time as an argument, like
//! [`restart`](crate::restart): the cluster agent feeds it what Redis says (live nodes, current
//! owners, pins) and acts on the answer; every node computes the same answer from the same view.
//!
//! The desired owner of a number is, in order:
//! 1. the admin's pin, if that node is live and active;
//! 2. its current owner, if that node is live and active (placement is sticky: a joining node
//!    takes nothing by itself);
//! 3. else rendezvous hashing over the live active nodes, weighted by capacity.
//!
//! Then, when asked or when a node holds more than `1 + imbalance` times its fair share (by
//! capacity), the plan moves unpinned numbers off overloaded nodes (unowned ones first) to their
//! rendezvous choice if that node is under its share, else to the least loaded node. The lease alone says who owns; the plan only says who should,
//! and the owner hands off at most as fast as its [`MoveBudget`] allows.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::admission::TokenBucket;
use crate::ids::PhoneNumber;

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Its id.
    pub id: String,
    /// Its weight: how many numbers it is meant to run relative to the others.
    pub capacity: u32,
    /// Active nodes take numbers; draining ones give theirs away.
    pub active: bool,
}

/// One number as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberView {
    /// The number.
    pub number: PhoneNumber,
    /// The node holding its lease, if any.
    pub owner: Option<String>,
    /// The node an admin pinned it to, if any.
    pub pin: Option<String>,
}

/// Placement's tunables.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlacementConfig {
    /// A node holding more than `(1 + imbalance) ×` its fair share sheds numbers.
    pub imbalance: f64,
    /// Handoffs a node starts per second, sustained.
    pub moves_per_second: f64,
    /// Handoffs a node may start back to back.
    pub moves_burst: u32,
    /// Connects each node admits per second (see [`drain_rate`]).
    pub node_admission_per_second: f64,
    /// Connects the whole cluster admits per second (see [`drain_rate`]).
    pub cluster_admission_per_second: f64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            imbalance: 0.25,
            moves_per_second: 10.0,
            moves_burst: 20,
            node_admission_per_second: 50.0,
            cluster_admission_per_second: 100.0,
        }
    }
}

/// The weighted rendezvous choice for `number` among `nodes` (active ones only).
pub fn rendezvous<'a>(number: &PhoneNumber, nodes: &'a [NodeView]) -> Option<&'a NodeView> {
    nodes
        .iter()
        .filter(|n| n.active && n.capacity > 0)
        .map(|n| (score(&n.id, number, n.capacity), n))
        .max_by(|(a, na), (b, nb)| a.total_cmp(b).then_with(|| nb.id.cmp(&na.id)))
        .map(|(_, n)| n)
}

/// The desired owner of every number, by the rules in the module doc. `rebalance` forces the
/// shedding step even under the threshold (an admin asked for it). Numbers with no live active
/// node are left out.
pub fn plan(
    numbers: &[NumberView],
    nodes: &[NodeView],
    config: &PlacementConfig,
    rebalance: bool,
) -> HashMap<PhoneNumber, String> {
    let active: HashMap<&str, &NodeView> = nodes
        .iter()
        .filter(|n| n.active && n.capacity > 0)
        .map(|n| (n.id.as_str(), n))
        .collect();
    let mut desired = HashMap::with_capacity(numbers.len());
    let mut movable = Vec::new();
    for n in numbers {
        let pinned = n.pin.as_deref().filter(|p| active.contains_key(p));
        let owner = n.owner.as_deref().filter(|o| active.contains_key(o));
        let choice = match (pinned, owner) {
            (Some(pin), _) => Some(pin.to_owned()),
            (None, Some(owner)) => {
                movable.push(n);
                Some(owner.to_owned())
            }
            (None, None) => {
                movable.push(n);
                rendezvous(&n.number, nodes).map(|v| v.id.clone())
            }
        };
        if let Some(choice) = choice {
            desired.insert(n.number.clone(), choice);
        }
    }
    shed(&mut desired, &movable, nodes, &active, config, rebalance);
    desired
}

/// Moves sticky numbers off overloaded nodes to their rendezvous choice while it is under its
/// share.
fn shed(
    desired: &mut HashMap<PhoneNumber, String>,
    movable: &[&NumberView],
    nodes: &[NodeView],
    active: &HashMap<&str, &NodeView>,
    config: &PlacementConfig,
    forced: bool,
) {
    let total_capacity: f64 = active.values().map(|n| f64::from(n.capacity)).sum();
    if total_capacity <= 0.0 {
        return;
    }
    let total = desired.len() as f64;
    let share = |id: &str| {
        active
            .get(id)
            .map_or(0.0, |n| total * f64::from(n.capacity) / total_capacity)
    };
    let mut load: HashMap<String, f64> = HashMap::new();
    for owner in desired.values() {
        *load.entry(owner.clone()).or_default() += 1.0;
    }
    let overloaded = |load: &HashMap<String, f64>, id: &str, limit: f64| {
        load.get(id).copied().unwrap_or(0.0) > share(id) * limit
    };
    let trigger = if forced { 1.0 } else { 1.0 + config.imbalance };
    if !load.keys().any(|id| overloaded(&load, id, trigger)) {
        return;
    }
    // Unowned numbers first: placing one costs no handoff. Counting them also keeps a number
    // released on its way to an underloaded node from bouncing back to the node it left.
    let mut candidates: Vec<&&NumberView> = movable.iter().collect();
    candidates.sort_by(|a, b| (a.owner.is_some(), &a.number).cmp(&(b.owner.is_some(), &b.number)));
    // First to the numbers' rendezvous choices (where they would go anyway), then, if a node is
    // still over its share, to the least loaded node under its own.
    for to_rendezvous in [true, false] {
        for n in &candidates {
            let Some(from) = desired.get(&n.number).cloned() else {
                continue;
            };
            // Shed down to the fair share once shedding started (rounded up: no ping-pong).
            if load.get(&from).copied().unwrap_or(0.0) <= share(&from).ceil() {
                continue;
            }
            let room = |id: &str, load: &HashMap<String, f64>| {
                share(id).ceil() - load.get(id).copied().unwrap_or(0.0)
            };
            let to = if to_rendezvous {
                rendezvous(&n.number, nodes).map(|v| v.id.clone())
            } else {
                let mut ids: Vec<&str> = active.keys().copied().collect();
                ids.sort_unstable();
                ids.into_iter()
                    .max_by(|a, b| room(a, &load).total_cmp(&room(b, &load)))
                    .map(str::to_owned)
            };
            let Some(to) = to.filter(|to| *to != from && room(to, &load) >= 1.0) else {
                continue;
            };
            *load.entry(from).or_default() -= 1.0;
            *load.entry(to.clone()).or_default() += 1.0;
            desired.insert(n.number.clone(), to);
        }
    }
}

/// How many handoffs a node may start: a token bucket, time as an argument.
#[derive(Debug, Clone)]
pub struct MoveBudget(TokenBucket);

impl MoveBudget {
    /// A full bucket at `now`.
    pub fn new(config: &PlacementConfig, now: Instant) -> Self {
        Self(TokenBucket::new(
            config.moves_per_second,
            config.moves_burst,
            now,
        ))
    }

    /// Takes one move if the budget allows it at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        self.0.take(now)
    }

    /// How long until one move is allowed, from `now` (zero if one is).
    pub fn wait(&self, now: Instant) -> Duration {
        self.0.wait(now)
    }
}

/// How many numbers per second a draining node hands over: as many as the nodes taking them
/// admit connects (each node's rate times the `receivers`, at most the cluster's); `None` (no
/// limit) when nobody takes them. A number handed over faster would wait its turn disconnected
/// in a receiver's admission queue; paced, it waits still serving on the draining node.
pub fn drain_rate(receivers: usize, config: &PlacementConfig) -> Option<f64> {
    (receivers > 0).then(|| {
        (config.node_admission_per_second * receivers as f64)
            .min(config.cluster_admission_per_second)
    })
}

/// Paces a drain at [`drain_rate`], in waves a tenth of a second apart.
#[derive(Debug, Clone)]
pub struct DrainBudget {
    rate: Option<f64>,
    bucket: Option<TokenBucket>,
}

/// The time between two waves of a paced drain.
pub const DRAIN_WAVE: Duration = Duration::from_millis(100);

impl DrainBudget {
    /// A budget of `rate` numbers per second (`None`: unlimited), its first wave ready at `now`.
    pub fn new(rate: Option<f64>, now: Instant) -> Self {
        let bucket = rate.map(|r| {
            let wave = (r * DRAIN_WAVE.as_secs_f64()).ceil().max(1.0);
            TokenBucket::new(r, wave as u32, now)
        });
        Self { rate, bucket }
    }

    /// Follows a new rate (receivers joined or left), keeping the budget when it is the same.
    pub fn set_rate(&mut self, rate: Option<f64>, now: Instant) {
        if rate != self.rate {
            *self = Self::new(rate, now);
        }
    }

    /// Takes one handoff if the budget allows it at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        self.bucket.as_mut().is_none_or(|b| b.take(now))
    }

    /// How long from `now` until the next handoff is allowed (zero if one is).
    pub fn wait(&self, now: Instant) -> Duration {
        self.bucket.as_ref().map_or(Duration::ZERO, |b| b.wait(now))
    }
}

/// The weighted rendezvous score of `node` for `number`: `capacity / -ln(u)`, with `u` in
/// (0, 1) from a hash that is stable across nodes, builds and versions (FNV-1a, then a
/// SplitMix64 finaliser).
fn score(node: &str, number: &PhoneNumber, capacity: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(number.as_str().as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    // 53 random bits, strictly inside (0, 1).
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(capacity) / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, capacity: u32) -> NodeView {
        NodeView {
            id: id.to_owned(),
            capacity,
            active: true,
        }
    }

    fn numbers(n: usize) -> Vec<PhoneNumber> {
        (0..n)
            .map(|i| PhoneNumber::parse(&format!("+1555{i:07}")).expect("valid"))
            .collect()
    }

    fn unowned(all: &[PhoneNumber]) -> Vec<NumberView> {
        all.iter()
            .map(|n| NumberView {
                number: n.clone(),
                owner: None,
                pin: None,
            })
            .collect()
    }

    fn counts(plan: &HashMap<PhoneNumber, String>) -> HashMap<String, usize> {
        let mut c = HashMap::new();
        for owner in plan.values() {
            *c.entry(owner.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn rendezvous_spreads_by_capacity_and_moves_only_a_dead_nodes_numbers() {
        let all = numbers(6000);
        let nodes = vec![node("a", 1), node("b", 1), node("c", 2)];
        let plan1 = plan(&unowned(&all), &nodes, &PlacementConfig::default(), false);
        let c = counts(&plan1);
        for (id, expected) in [("a", 1500.0), ("b", 1500.0), ("c", 3000.0)] {
            let got = c[id] as f64;
            assert!(
                (got / expected - 1.0).abs() < 0.08,
                "{id}: {got} of {expected}"
            );
        }
        // Node b dies: only its numbers move, spread over the rest.
        let survivors = vec![node("a", 1), node("c", 2)];
        let plan2 = plan(
            &unowned(&all),
            &survivors,
            &PlacementConfig::default(),
            false,
        );
        for n in &all {
            if plan1[n] != "b" {
                assert_eq!(plan1[n], plan2[n], "{n} moved though its node lives");
            }
        }
    }

    #[test]
    fn owners_are_sticky_a_pin_wins_and_draining_nodes_give_everything_away() {
        let all = numbers(300);
        let mut view: Vec<NumberView> = all
            .iter()
            .map(|n| NumberView {
                number: n.clone(),
                owner: Some("a".into()),
                pin: None,
            })
            .collect();
        view[0].pin = Some("b".into());
        view[1].pin = Some("gone".into());
        let config = PlacementConfig {
            imbalance: f64::INFINITY,
            ..PlacementConfig::default()
        };
        let nodes = vec![node("a", 1), node("b", 1)];
        let p = plan(&view, &nodes, &config, false);
        assert_eq!(p[&all[0]], "b", "pinned to a live node");
        assert_eq!(p[&all[1]], "a", "pinned to a dead node: sticky");
        assert_eq!(
            counts(&p)["a"],
            299,
            "a joining node takes nothing by itself"
        );

        let draining = vec![
            NodeView {
                active: false,
                ..node("a", 1)
            },
            node("b", 1),
        ];
        let p = plan(&view, &draining, &config, false);
        assert!(p.values().all(|o| o == "b"));
    }

    #[test]
    fn imbalance_past_the_threshold_sheds_to_the_fair_share_and_no_further() {
        let all = numbers(400);
        let owned_by_a = |n: &PhoneNumber| NumberView {
            number: n.clone(),
            owner: Some("a".into()),
            pin: None,
        };
        let view: Vec<NumberView> = all.iter().map(owned_by_a).collect();
        let nodes = vec![node("a", 1), node("b", 1)];
        let p = plan(&view, &nodes, &PlacementConfig::default(), false);
        let c = counts(&p);
        assert_eq!(c["a"], 200);
        assert_eq!(c["b"], 200);
        // Moved numbers went where rendezvous puts them, as far as it could.
        let preferred = all
            .iter()
            .filter(|n| p[*n] == "b" && rendezvous(n, &nodes).is_some_and(|v| v.id == "b"))
            .count();
        assert!(
            preferred >= 180,
            "{preferred} of 200 at their rendezvous choice"
        );
        // Within the threshold nothing moves, unless asked.
        let view: Vec<NumberView> = all
            .iter()
            .enumerate()
            .map(|(i, n)| NumberView {
                owner: Some(if i < 220 { "a" } else { "b" }.into()),
                ..owned_by_a(n)
            })
            .collect();
        let p = plan(&view, &nodes, &PlacementConfig::default(), false);
        assert_eq!(counts(&p)["a"], 220);
        let p = plan(&view, &nodes, &PlacementConfig::default(), true);
        assert_eq!(counts(&p)["a"], 200);
        // A balanced plan is stable: planning again from it moves nothing.
        let again: Vec<NumberView> = all
            .iter()
            .map(|n| NumberView {
                owner: Some(p[n].clone()),
                ..owned_by_a(n)
            })
            .collect();
        assert_eq!(plan(&again, &nodes, &PlacementConfig::default(), true), p);
    }

    #[test]
    fn a_number_released_on_its_way_to_an_underloaded_node_does_not_bounce_back() {
        // a holds 30 numbers, all of whose rendezvous choice is a or c; b holds none.
        let all = numbers(400);
        let nodes = vec![node("a", 1), node("b", 1), node("c", 1)];
        let not_b: Vec<&PhoneNumber> = all
            .iter()
            .filter(|n| rendezvous(n, &nodes).is_some_and(|v| v.id != "b"))
            .take(45)
            .collect();
        let mut view: Vec<NumberView> = not_b
            .iter()
            .enumerate()
            .map(|(i, n)| NumberView {
                number: (*n).clone(),
                owner: Some(if i < 30 { "a" } else { "c" }.into()),
                pin: None,
            })
            .collect();
        let p = plan(&view, &nodes, &PlacementConfig::default(), false);
        let to_b: Vec<PhoneNumber> = p
            .iter()
            .filter(|(_, o)| *o == "b")
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(counts(&p)["b"], 15, "b takes its share");
        // a releases what it was told to move: unowned now, they still go to b.
        for v in &mut view {
            if to_b.contains(&v.number) {
                v.owner = None;
            }
        }
        let q = plan(&view, &nodes, &PlacementConfig::default(), false);
        for n in &to_b {
            assert_eq!(q[n], "b", "{n} bounced back");
        }
    }

    #[test]
    fn the_move_budget_allows_its_burst_then_its_rate() {
        let config = PlacementConfig {
            moves_per_second: 2.0,
            moves_burst: 3,
            ..PlacementConfig::default()
        };
        let t0 = Instant::now();
        let mut budget = MoveBudget::new(&config, t0);
        assert!((0..3).all(|_| budget.take(t0)));
        assert!(!budget.take(t0));
        assert_eq!(budget.wait(t0), Duration::from_millis(500));
        let t1 = t0 + Duration::from_millis(500);
        assert!(budget.take(t1));
        assert!(!budget.take(t1));
        // Idle time refills up to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| budget.take(t2)).count(), 3);
    }

    #[test]
    fn a_drain_goes_as_fast_as_its_receivers_admit_in_tenth_of_a_second_waves() {
        let config = PlacementConfig {
            node_admission_per_second: 50.0,
            cluster_admission_per_second: 120.0,
            ..PlacementConfig::default()
        };
        assert_eq!(drain_rate(0, &config), None, "nobody takes them: no pace");
        assert_eq!(drain_rate(1, &config), Some(50.0));
        assert_eq!(drain_rate(2, &config), Some(100.0));
        assert_eq!(
            drain_rate(5, &config),
            Some(120.0),
            "the cluster's bucket caps it"
        );

        let t0 = Instant::now();
        let mut budget = DrainBudget::new(drain_rate(2, &config), t0);
        assert_eq!((0..100).filter(|_| budget.take(t0)).count(), 10);
        assert_eq!(budget.wait(t0), Duration::from_millis(10));
        let t1 = t0 + DRAIN_WAVE;
        assert_eq!((0..100).filter(|_| budget.take(t1)).count(), 10);
        // The same rate keeps the budget; a receiver more makes a new one.
        budget.set_rate(drain_rate(2, &config), t1);
        assert!(!budget.take(t1));
        budget.set_rate(drain_rate(3, &config), t1);
        assert_eq!((0..100).filter(|_| budget.take(t1)).count(), 12);
        budget.set_rate(None, t1);
        assert!((0..1000).all(|_| budget.take(t1)), "unlimited");
        assert_eq!(budget.wait(t1), Duration::ZERO);
    }
}
