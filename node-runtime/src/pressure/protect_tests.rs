//! Pressure protection's decisions on plain data: signal windows, candidates, actions.

use super::*;

fn cand(key: &str, replica: u32, priority: i32, mib: u64) -> Candidate {
    Candidate {
        key: key.into(),
        replica,
        container: format!("{key}-{replica}"),
        priority,
        memory_bytes: mib << 20,
    }
}

fn kinds(a: &[Action]) -> Vec<String> {
    a.iter()
        .map(|a| match a {
            Action::Throttle(c) => format!("throttle {}", c.container),
            Action::Unthrottle { container } => format!("unthrottle {container}"),
            Action::Evict { victim, .. } => format!("evict {}", victim.container),
            Action::Restore { key, replica } => format!("restore {key}-{replica}"),
        })
        .collect()
}

/// Runs rounds one second apart at `level`, returning every action with its second.
fn run(
    p: &mut Protector,
    t0: Instant,
    from: u64,
    to: u64,
    level: f32,
    running: &mut Vec<Candidate>,
    evicted: &mut Vec<(String, u32)>,
) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for s in from..to {
        let acts = p.tick(t0 + Duration::from_secs(s), level, running, evicted);
        for a in &acts {
            match a {
                Action::Evict { victim, .. } => {
                    running.retain(|r| r.container != victim.container);
                    evicted.push((victim.key.clone(), victim.replica));
                }
                Action::Restore { key, replica } => {
                    evicted.retain(|e| !(e.0 == *key && e.1 == *replica));
                }
                _ => {}
            }
        }
        out.extend(kinds(&acts).into_iter().map(|k| (s, k)));
    }
    out
}

#[test]
fn settings_parse_with_clear_errors() {
    assert_eq!(ProtectConfig::parse("off").unwrap(), None);
    assert_eq!(
        ProtectConfig::parse("on").unwrap(),
        Some(DEFAULT_PROTECTION)
    );
    let c = ProtectConfig::parse("evict=30, sustain=5s,restore-after=2m")
        .unwrap()
        .unwrap();
    assert_eq!(c.evict_at, 30.0);
    assert_eq!(c.sustain, Duration::from_secs(5));
    assert_eq!(c.restore_after, Duration::from_secs(120));
    assert_eq!(c.throttle_at, DEFAULT_PROTECTION.throttle_at);
    for (bad, says) in [
        ("evict", "KEY=VALUE"),
        ("evict=lots", "not a percentage"),
        ("evict=120", "between 0 and 100"),
        ("sustain=soon", "not a duration"),
        ("kill=5", "not a protection setting"),
        ("throttle=30,evict=20", "must not be below throttle"),
        ("release=15", "must not be above throttle"),
    ] {
        let e = ProtectConfig::parse(bad).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
}

#[test]
fn lowest_priority_is_throttled_then_evicted_and_the_top_never() {
    let t0 = Instant::now();
    let mut p = Protector::new(DEFAULT_PROTECTION);
    let mut running = vec![
        cand("high", 0, 1000, 50),
        cand("mid", 0, 500, 300),
        cand("low", 0, 0, 20),
        cand("low", 1, 0, 40),
    ];
    let mut evicted = Vec::new();
    // Below the thresholds: nothing.
    assert!(run(&mut p, t0, 0, 10, 5.0, &mut running, &mut evicted).is_empty());
    let acts = run(&mut p, t0, 10, 40, 60.0, &mut running, &mut evicted);
    let names: Vec<&str> = acts.iter().map(|(_, k)| k.as_str()).collect();
    // Both low replicas throttled at once; next round the larger one goes, a cool-down
    // later the other; then mid is throttled and evicted. High stays.
    assert_eq!(
        names,
        [
            "throttle low-1",
            "throttle low-0",
            "evict low-1",
            "evict low-0",
            "throttle mid-0",
            "evict mid-0",
        ],
        "{acts:?}"
    );
    assert_eq!(
        acts[0].0, 10,
        "at once (the level is already over the window)"
    );
    assert_eq!(acts[2].0, 11, "one round after its throttle");
    assert_eq!(acts[3].0, 16, "a cool-down later");
    assert_eq!(acts[5].0, 21);
    assert_eq!(running, vec![cand("high", 0, 1000, 50)]);
    assert_eq!(p.evictions_total, 3);
    // Calm: after release-after throttles would be lifted (none left); after
    // restore-after the evicted come back, all three.
    let acts = run(&mut p, t0, 40, 200, 0.5, &mut running, &mut evicted);
    let restored: Vec<_> = acts
        .iter()
        .filter(|(_, k)| k.starts_with("restore"))
        .collect();
    assert_eq!(restored.len(), 3, "{acts:?}");
    assert!(restored.iter().all(|(s, _)| *s == 100), "{acts:?}");
}

#[test]
fn no_cool_down_after_a_victim_that_held_almost_nothing() {
    let t0 = Instant::now();
    let mut p = Protector::new(DEFAULT_PROTECTION);
    let mut running = vec![
        cand("high", 0, 1000, 50),
        cand("hog", 0, 500, 300),
        cand("low", 0, 0, 1),
    ];
    let mut evicted = Vec::new();
    let acts = run(&mut p, t0, 0, 10, 60.0, &mut running, &mut evicted);
    assert_eq!(
        acts,
        [
            (0, "throttle low-0".to_string()),
            (1, "evict low-0".to_string()),
            (2, "throttle hog-0".to_string()),
            (3, "evict hog-0".to_string()),
        ]
    );
}

#[test]
fn between_the_thresholds_it_throttles_but_does_not_evict() {
    let t0 = Instant::now();
    let mut p = Protector::new(DEFAULT_PROTECTION);
    let mut running = vec![cand("high", 0, 10, 50), cand("low", 0, 0, 20)];
    let mut evicted = Vec::new();
    let acts = run(&mut p, t0, 0, 30, 15.0, &mut running, &mut evicted);
    assert_eq!(acts, vec![(0, "throttle low-0".to_string())]);
    // Hysteresis: 5% is neither pressure nor calm; the throttle stays.
    assert!(run(&mut p, t0, 30, 100, 5.0, &mut running, &mut evicted).is_empty());
    assert!(p.is_throttled("low-0"));
    // Calm for release-after lifts it.
    let acts = run(&mut p, t0, 100, 140, 1.0, &mut running, &mut evicted);
    assert_eq!(acts, vec![(130, "unthrottle low-0".to_string())]);
}

#[test]
fn a_single_priority_is_left_alone() {
    let t0 = Instant::now();
    let mut p = Protector::new(DEFAULT_PROTECTION);
    let mut running = vec![cand("a", 0, 0, 50), cand("b", 0, 0, 500)];
    let mut evicted = Vec::new();
    assert!(run(&mut p, t0, 0, 60, 90.0, &mut running, &mut evicted).is_empty());
}

#[test]
fn a_replica_evicted_again_waits_twice_as_long() {
    let t0 = Instant::now();
    let mut p = Protector::new(DEFAULT_PROTECTION);
    let mut running = vec![cand("high", 0, 10, 50), cand("low", 0, 0, 20)];
    let mut evicted = Vec::new();
    run(&mut p, t0, 0, 10, 50.0, &mut running, &mut evicted);
    let acts = run(&mut p, t0, 10, 80, 0.0, &mut running, &mut evicted);
    assert_eq!(acts, vec![(70, "restore low-0".to_string())]);
    running.push(cand("low", 0, 0, 20));
    run(&mut p, t0, 80, 90, 50.0, &mut running, &mut evicted);
    assert_eq!(evicted.len(), 1);
    let acts = run(&mut p, t0, 90, 300, 0.0, &mut running, &mut evicted);
    assert_eq!(acts, vec![(210, "restore low-0".to_string())], "120 s");
}

#[test]
fn evictions_seen_after_a_restart_are_restored_and_vanished_ones_forgotten() {
    let t0 = Instant::now();
    let mut p = Protector::new(DEFAULT_PROTECTION);
    let running = vec![cand("high", 0, 10, 50)];
    let evicted = vec![("low".to_string(), 0)];
    assert!(p.tick(t0, 0.0, &running, &evicted).is_empty());
    assert_eq!(p.evicted_count(), 1);
    let acts = p.tick(t0 + Duration::from_secs(60), 0.0, &running, &evicted);
    assert_eq!(kinds(&acts), ["restore low-0"]);
    // A user restarted it meanwhile: nothing to restore.
    let mut p = Protector::new(DEFAULT_PROTECTION);
    p.tick(t0, 0.0, &running, &evicted);
    assert!(p
        .tick(t0 + Duration::from_secs(60), 0.0, &running, &[])
        .is_empty());
}

#[test]
fn stall_rate_is_the_share_of_the_window_stalled() {
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    let mut r = StallRate::new(Duration::from_secs(3));
    assert_eq!(r.update(s(0), 0), None);
    assert_eq!(r.update(s(1), 900_000), None, "less than the window");
    assert_eq!(r.update(s(2), 900_000), None);
    // 0.9 s + 0 + 0.6 s stalled in 3 s: 50%, though one second was calm.
    let v = r.update(s(3), 1_500_000).unwrap();
    assert!((v - 50.0).abs() < 0.01, "{v}");
    // The window slides: seconds 1..4 stalled 0 + 0.6 + 0.3.
    let v = r.update(s(4), 1_800_000).unwrap();
    assert!((v - 30.0).abs() < 0.01, "{v}");
    assert_eq!(r.update(s(5), 0), None, "the counter went back: start over");
}

#[test]
fn throttling_writes_the_v1_files_and_lifting_restores_them() {
    let d = tempfile::tempdir().unwrap();
    let mem = d.path().join("memory");
    let cpu = d.path().join("cpu");
    std::fs::create_dir_all(&mem).unwrap();
    std::fs::create_dir_all(&cpu).unwrap();
    std::fs::write(mem.join("memory.usage_in_bytes"), "1048576\n").unwrap();
    std::fs::write(cpu.join("cpu.cfs_quota_us"), "-1\n").unwrap();
    let c = Controls {
        v2: None,
        v1_memory: Some(mem.clone()),
        v1_cpu: Some(cpu.clone()),
    };
    assert_eq!(c.memory_bytes(), Some(1 << 20));
    c.throttle().unwrap();
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    assert_eq!(read(mem.join("memory.soft_limit_in_bytes")), "0");
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "10000");
    c.unthrottle(50_000).unwrap();
    assert_eq!(read(mem.join("memory.soft_limit_in_bytes")), "-1");
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "50000");
    // cgroup v2: memory.high at the usage, then max.
    let v2 = d.path().join("v2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("memory.current"), "4096\n").unwrap();
    std::fs::write(v2.join("memory.high"), "max\n").unwrap();
    let c = Controls {
        v2: Some(v2.clone()),
        ..Default::default()
    };
    c.throttle().unwrap();
    assert_eq!(read(v2.join("memory.high")), "4096");
    c.unthrottle(-1).unwrap();
    assert_eq!(read(v2.join("memory.high")), "max");
    assert!(Controls::default().throttle().is_err());
}
