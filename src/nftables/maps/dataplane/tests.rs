use std::sync::Arc;

use super::super::record::cluster_gen::{mutate, node, settings as gen_settings, Lcg};
use super::*;
use crate::config::Config;
use crate::model::{synthetic, ClusterState, NodeContext};
use crate::nftables::fake::{Fake, FakeNft};
use crate::nftables::text::normalize;

fn settings() -> FamilySettings {
    Config::default().family_settings(IpFamily::V4, "node-1", None, &[])
}

fn state(services: usize, endpoints: usize) -> ProxyState {
    let node = NodeContext {
        name: "node-1".into(),
        zone: None,
        prefer_same_node: false,
    };
    synthetic::cluster(services, endpoints).proxy_state(IpFamily::V4, &node)
}

/// `st` with the first endpoint of the first port moved to another address.
fn moved_endpoint(st: &ProxyState) -> ProxyState {
    let mut st = st.clone();
    let mut port = (*st.ports[0]).clone();
    port.endpoints[0].ip = "10.255.0.9".parse().unwrap();
    st.ports = st.ports.replaced(0, Arc::new(port));
    st
}

/// A dump without the dataplane's digest comments.
fn unstamped(text: &str) -> String {
    text.lines()
        .map(|l| match l.find(&format!(" comment \"{STAMP}")) {
            Some(i) => {
                let rest = &l[i + 11..];
                let end = rest.find('"').map_or(l.len(), |j| i + 11 + j + 1);
                format!("{}{}", &l[..i], &l[end..])
            }
            None => l.to_string(),
        })
        .map(|l| l + "\n")
        .collect()
}

fn table(nft: &FakeNft) -> String {
    unstamped(&normalize(&nft.table(Family::Ip, TABLE).dump()))
}

/// What the renderer's whole-table transaction of `st` builds in an empty fake.
fn fresh_with(s: &FamilySettings, st: &ProxyState) -> String {
    let mut fake = Fake::new();
    fake.apply(&MapsRenderer::new(s.clone()).render_full(st))
        .unwrap();
    normalize(&fake.dump())
}

fn fresh(st: &ProxyState) -> String {
    fresh_with(&settings(), st)
}

/// The batches applied to the maps table (not the start-up probe's tables).
fn ours(nft: &FakeNft) -> Vec<Transaction> {
    nft.applied()
        .into_iter()
        .filter(|t| t.table == TABLE)
        .collect()
}

fn only_elements(tx: &Transaction) -> bool {
    tx.ops
        .iter()
        .all(|op| matches!(op, Op::AddElement(_) | Op::DeleteElement(_)))
}

fn element_ops(tx: &Transaction) -> usize {
    tx.ops
        .iter()
        .filter(|op| matches!(op, Op::AddElement(_) | Op::DeleteElement(_)))
        .count()
}

fn rule_ops(tx: &Transaction) -> usize {
    tx.ops
        .iter()
        .filter(|op| matches!(op, Op::AddRule(_) | Op::FlushChain(_)))
        .count()
}

#[test]
fn cold_sync_builds_the_whole_table_with_stamped_chains() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    assert!(dp.needs_full_sync());
    let st = state(5, 2);
    let out = dp.sync(&st, false).unwrap();
    assert!(out.full);
    assert_eq!(out.operations, ours(&nft)[0].len());
    assert!(!dp.needs_full_sync());
    assert_eq!(table(&nft), fresh(&st));
    assert!(!dp.rules_flushed());
    let fake = nft.table(Family::Ip, TABLE);
    let services = fake.rules("services");
    assert!(services[0]
        .comment
        .as_deref()
        .is_some_and(|c| c.starts_with(STAMP)));
    assert!(services[1..].iter().all(|r| r.comment.is_none()));
}

#[test]
fn partial_sync_writes_only_the_changed_elements() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    let st = state(5, 2);
    dp.sync(&st, true).unwrap();
    let changed = moved_endpoint(&st);
    let out = dp.sync(&changed, false).unwrap();
    assert!(!out.full);
    let last = ours(&nft).pop().unwrap();
    assert!(only_elements(&last), "{last:?}");
    // The endpoint's backends entries (delete + add each) and its hairpin pair.
    assert_eq!(last.len(), out.operations);
    assert!(last.len() <= 8, "{} operations: {last:?}", last.len());
    assert_eq!(dp.last_stats().ports, 1);
    assert_eq!(table(&nft), fresh(&changed));
    // Nothing changed: nothing to write.
    let n = ours(&nft).len();
    let out = dp.sync(&changed, false).unwrap();
    assert_eq!((out.full, out.operations), (false, 0));
    assert_eq!(ours(&nft).len(), n, "no empty batch is sent");
    // A Service added with a count in use: elements only.
    let bigger = state(6, 2);
    dp.sync(&bigger, false).unwrap();
    assert!(only_elements(&ours(&nft).pop().unwrap()));
    assert_eq!(table(&nft), fresh(&bigger));
}

#[test]
fn a_new_endpoint_count_adds_its_objects_and_rewrites_only_the_rules_that_change() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    dp.sync(&state(4, 2), true).unwrap();
    let three = state(4, 3);
    dp.sync(&three, false).unwrap();
    let last = ours(&nft).pop().unwrap();
    assert!(last
        .ops
        .iter()
        .any(|op| matches!(op, Op::AddSet(s) if s.name == LbClass::Ips.gate(3))));
    assert!(last
        .ops
        .iter()
        .any(|op| matches!(op, Op::DeleteSet { name, .. } if *name == LbClass::Ips.gate(2))));
    // Only the `services` chain names gate sets.
    let flushed: BTreeSet<&String> = last
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::FlushChain(c) => Some(c),
            _ => None,
        })
        .collect();
    assert!(flushed
        .iter()
        .all(|c| *c == "services" || c.starts_with("balance-")));
    assert_eq!(table(&nft), fresh(&three));
    // And back.
    let two = state(4, 2);
    dp.sync(&two, false).unwrap();
    assert_eq!(table(&nft), fresh(&two));
}

#[test]
fn a_refused_batch_changes_nothing_and_the_next_full_sync_is_a_diff() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    let st = state(3, 2);
    dp.sync(&st, true).unwrap();
    let before = table(&nft);
    nft.fail_next(1);
    let changed = moved_endpoint(&st);
    let err = dp.sync(&changed, false).unwrap_err();
    assert!(err.partial);
    let cause = std::error::Error::source(&err).expect("the cause is kept");
    assert!(cause.to_string().contains("batch 1 of 1"), "{cause}");
    assert!(std::error::Error::source(cause).is_some(), "and its cause");
    assert_eq!(table(&nft), before, "a refused batch changes nothing");
    assert!(dp.needs_full_sync());
    let out = dp.sync(&changed, false).unwrap();
    assert!(out.full, "the sync after a failure is full");
    let last = ours(&nft).pop().unwrap();
    assert!(element_ops(&last) <= 8, "only the difference: {last:?}");
    assert_eq!(rule_ops(&last), 0, "the rules were right: {last:?}");
    assert!(!last.ops.iter().any(|op| matches!(op, Op::FlushSet { .. })));
    assert_eq!(table(&nft), fresh(&changed));
}

#[test]
fn taking_over_an_identical_table_writes_nothing_but_the_table() {
    let nft = FakeNft::new();
    let st = state(6, 3);
    MapsDataplane::with_interface(settings(), nft.clone())
        .sync(&st, true)
        .unwrap();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    dp.sync(&st, false).unwrap();
    let last = ours(&nft).pop().unwrap();
    assert!(
        matches!(last.ops[..], [Op::AddTable { .. }]),
        "{:#?}",
        last.ops
    );
    // A chain changed behind our back is the only one rewritten.
    let mut tx = Transaction::new(Family::Ip, TABLE);
    tx.push(Op::FlushChain("masquerading".into()));
    nft.clone().apply(&tx).unwrap();
    dp.sync(&st, true).unwrap();
    let last = ours(&nft).pop().unwrap();
    assert_eq!(
        last.ops
            .iter()
            .filter_map(|op| match op {
                Op::AddRule(r) => Some(r.chain.as_str()),
                _ => None,
            })
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["masquerading"])
    );
    assert_eq!(element_ops(&last), 0);
    assert_eq!(table(&nft), fresh(&st));
}

#[test]
fn taking_over_a_table_writes_only_the_difference() {
    let nft = FakeNft::new();
    // A predecessor left a table for a bigger cluster.
    MapsDataplane::with_interface(settings(), nft.clone())
        .sync(&state(8, 3), true)
        .unwrap();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    let st = state(6, 3);
    dp.sync(&st, false).unwrap();
    let last = ours(&nft).pop().unwrap();
    assert!(
        !last.ops.iter().any(|op| matches!(op, Op::AddElement(_))),
        "every wanted element was already there"
    );
    assert!(last.ops.iter().any(|op| matches!(op, Op::DeleteElement(_))));
    assert_eq!(table(&nft), fresh(&st));
    // Other endpoint counts: stale gate sets, maps and balance chains go.
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    let two = state(6, 2);
    dp.sync(&two, true).unwrap();
    assert_eq!(table(&nft), fresh(&two));
}

#[test]
fn large_syncs_go_in_bounded_batches_ordered_so_services_are_complete_when_reachable() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone()).with_batch_ops(25);
    let st = state(20, 2);
    let out = dp.sync(&st, true).unwrap();
    let batches = ours(&nft);
    assert!(batches.len() > 3, "split into {} batches", batches.len());
    assert_eq!(dp.last_stats().batches, batches.len());
    assert_eq!(
        batches.iter().map(Transaction::len).sum::<usize>(),
        out.operations
    );
    // The first batch holds the fixed part (one segment); the others are bounded.
    assert!(batches[1..].iter().all(|b| b.len() <= 25), "bounded");
    assert_eq!(table(&nft), fresh(&st));
    // Endpoint maps are filled before the gate sets that make rules match them,
    // and the ClusterIP set comes last.
    let order: Vec<u8> = batches
        .iter()
        .flat_map(|b| b.ops.iter())
        .filter_map(|op| match op {
            Op::AddElement(e) => Some(rank(&e.set)),
            _ => None,
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    // A take-over with other counts, split as well, converges; an element whose
    // value changed is deleted and re-added in the same batch.
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone()).with_batch_ops(3);
    let three = state(20, 3);
    dp.sync(&three, true).unwrap();
    assert_eq!(table(&nft), fresh(&three));
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone()).with_batch_ops(3);
    let changed = moved_endpoint(&three);
    dp.sync(&changed, true).unwrap();
    assert_eq!(table(&nft), fresh(&changed));
    let fake = nft.table(Family::Ip, TABLE);
    let mut checked = 0;
    for b in ours(&nft) {
        for (i, op) in b.ops.iter().enumerate() {
            if let Op::DeleteElement(e) = op {
                if fake.elements(&e.set).iter().any(|x| x.key == e.key) {
                    assert!(b.ops[i + 1..]
                        .iter()
                        .any(|o| matches!(o, Op::AddElement(a) if a.key == e.key)));
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 0);
}

#[test]
fn repeated_failed_full_syncs_rebuild_the_table() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    let st = state(3, 2);
    dp.sync(&st, true).unwrap();
    let before = ours(&nft).len();
    // Someone else commits (so full syncs read back and write), then two fail.
    let mut tx = Transaction::new(Family::Ip, "other");
    tx.push(Op::AddTable { comment: None });
    nft.clone().apply(&tx).unwrap();
    nft.fail_next(2);
    assert!(dp.sync(&st, true).is_err());
    assert!(dp.sync(&st, true).is_err());
    dp.sync(&st, true).unwrap();
    let first = &ours(&nft)[before];
    assert!(matches!(
        first.ops[..2],
        [Op::AddTable { .. }, Op::DeleteTable]
    ));
    assert_eq!(table(&nft), fresh(&st));
}

#[test]
fn a_deleted_table_is_noticed_and_cleanup_is_idempotent() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    let st = state(3, 2);
    dp.sync(&st, true).unwrap();
    nft.remove_table(Family::Ip, TABLE);
    assert!(dp.rules_flushed());
    let out = dp.sync(&st, true).unwrap();
    assert!(out.full);
    assert_eq!(table(&nft), fresh(&st));
    dp.cleanup().unwrap();
    assert!(!nft.table(Family::Ip, TABLE).exists());
    assert!(dp.needs_full_sync());
    dp.cleanup().unwrap();
}

#[test]
fn the_kernel_is_probed_once() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    let probes = |nft: &FakeNft| {
        nft.applied()
            .iter()
            .filter(|t| t.table.starts_with("kproxy-probe-"))
            .count()
    };
    dp.sync(&state(2, 2), true).unwrap();
    let after_first = probes(&nft);
    assert!(after_first > 0);
    dp.sync(&state(3, 2), true).unwrap();
    assert_eq!(probes(&nft), after_first, "no second probe");
}

/// Random clusters (every Service type, affinity, policies, source ranges) changed
/// at random: after every partial sync, full resync or take-over (some split into
/// tiny batches) the table is what the renderer's whole-table transaction builds.
#[test]
fn random_changes_converge_through_partial_full_and_take_over_syncs() {
    let s = gen_settings(IpFamily::V4);
    for seed in 0..12u64 {
        let mut rng = Lcg(seed * 104_729 + 3);
        let nft = FakeNft::new();
        let mut dp = MapsDataplane::with_interface(s.clone(), nft.clone());
        let mut cluster = ClusterState::new();
        for step in 0..25 {
            for _ in 0..1 + rng.next(3) {
                mutate(&mut rng, &mut cluster);
            }
            let ps = cluster.proxy_state(IpFamily::V4, &node());
            let full = match rng.next(8) {
                0 => {
                    // A restart: a new dataplane takes the table over.
                    let ops = 1 + rng.next(40) as usize;
                    dp = MapsDataplane::with_interface(s.clone(), nft.clone()).with_batch_ops(ops);
                    false
                }
                1 => true,
                _ => false,
            };
            dp.sync(&ps, full).unwrap_or_else(|e| {
                panic!(
                    "seed {seed} step {step}: {e}: {:?}",
                    std::error::Error::source(&e)
                )
            });
            assert_eq!(table(&nft), fresh_with(&s, &ps), "seed {seed} step {step}");
        }
        // A take-over of a converged table writes nothing but the table.
        let ps = cluster.proxy_state(IpFamily::V4, &node());
        let mut dp = MapsDataplane::with_interface(s.clone(), nft.clone());
        dp.sync(&ps, true).unwrap();
        let last = ours(&nft).pop().unwrap();
        assert!(
            matches!(last.ops[..], [Op::AddTable { .. }]),
            "seed {seed}: {:#?}",
            last.ops
        );
    }
}

#[test]
fn gate_names_parse_back() {
    assert_eq!(gate_of(&LbClass::Ips.gate(3)), Some((LbClass::Ips, 3)));
    assert_eq!(
        gate_of(&LbClass::ExtLocalNodePorts.gate(12)),
        Some((LbClass::ExtLocalNodePorts, 12))
    );
    assert_eq!(gate_of("lb-ips-x"), None);
    assert_eq!(gate_of(&LbClass::Ips.backends(3)), None);
}

#[test]
fn a_full_resync_of_an_untouched_table_is_not_read_back() {
    let nft = FakeNft::new();
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    let st = state(5, 2);
    dp.sync(&st, true).unwrap();
    let n = ours(&nft).len();
    let out = dp.sync(&st, true).unwrap();
    assert!(out.full);
    assert_eq!(out.operations, 0);
    assert!(
        !dp.last_stats().read_back,
        "nobody committed since our last batch"
    );
    assert_eq!(ours(&nft).len(), n);
    // A change in the meantime is still written.
    let changed = moved_endpoint(&st);
    dp.sync(&changed, true).unwrap();
    assert!(!dp.last_stats().read_back);
    assert_eq!(table(&nft), fresh(&changed));
    // Anyone else's commit: the next full sync reads back and repairs.
    let mut tx = Transaction::new(Family::Ip, TABLE);
    tx.push(Op::FlushChain("masquerading".into()));
    nft.clone().apply(&tx).unwrap();
    dp.sync(&changed, true).unwrap();
    assert!(dp.last_stats().read_back);
    assert_eq!(table(&nft), fresh(&changed));
}

/// `st` with session affinity of `timeout` seconds on every port.
fn with_affinity(st: &ProxyState, timeout: u32) -> ProxyState {
    let ports: Vec<Arc<crate::model::PortPlan>> = st
        .ports
        .iter()
        .map(|p| {
            let mut q = (**p).clone();
            q.svc.affinity_timeout = Some(timeout);
            Arc::new(q)
        })
        .collect();
    ProxyState {
        ports: ports.into(),
        ..st.clone()
    }
}

#[test]
fn taking_over_a_table_with_other_affinity_timeouts_re_creates_those_sets() {
    let nft = FakeNft::new();
    let short = with_affinity(&state(4, 2), 600);
    MapsDataplane::with_interface(settings(), nft.clone())
        .sync(&short, true)
        .unwrap();
    assert_eq!(table(&nft), fresh(&short));
    let long = with_affinity(&state(4, 2), 10800);
    assert_ne!(
        fresh(&short),
        fresh(&long),
        "the timeout shows in the table"
    );
    let mut dp = MapsDataplane::with_interface(settings(), nft.clone());
    dp.sync(&long, true).unwrap();
    assert_eq!(table(&nft), fresh(&long));
    let last = ours(&nft).pop().unwrap();
    assert_eq!(element_ops(&last), 0, "the elements were right already");
    // Once right, a take-over finds nothing to re-create.
    let mut again = MapsDataplane::with_interface(settings(), nft.clone());
    again.sync(&long, true).unwrap();
    let last = ours(&nft).pop().unwrap();
    assert!(
        !last.ops.iter().any(|op| matches!(op, Op::DeleteSet { .. })),
        "{last:?}"
    );
}
