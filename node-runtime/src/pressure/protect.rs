//! Pressure protection: under sustained memory pressure, hold back and then evict the
//! lowest-priority replicas before the kernel's OOM killer picks a victim of its own.
//!
//! The signal is the memory `full` stall of the node's workloads (their cgroup v2 parent; the
//! host's `/proc/pressure/memory` where there is none), as a percentage of the last `sustain`
//! seconds, computed from the `total` counter rather than read from `avg10`: `avg10` is a
//! 10-second exponential average that keeps rising for seconds after a stall begins and keeps
//! falling for tens of seconds after it ends, so acting on it either comes late or evicts
//! twice. Read every second, a real stall comes and goes (on this project's test machine:
//! 17, 32, 43, 18, 12, 13, 7, 13, 33, 2, 44% in consecutive seconds), so "every second above
//! the threshold" would never hold; the share of the whole window does.
//!
//! The rules ([`Protector::tick`], pure and unit-tested):
//! - Only replicas whose `priority` is below the highest priority running on the node are
//!   candidates: protection protects the most important work by giving up the least. A node
//!   running a single priority is left to the kernel.
//! - Above `throttle` over `sustain`: every replica of the lowest priority still running is
//!   throttled (cgroup v2: `memory.high` at its current usage; cgroup v1, where the hybrid
//!   hosts' memory controller lives: a memory soft limit of zero, reclaimed first, and a cpu
//!   quota of a tenth of a cpu, which slows an allocating process down).
//! - Above `evict` over `sustain`, at most once per `cooldown`: one throttled replica of the
//!   lowest priority (the largest first) is evicted, reason `EvictedForPressure`. A higher
//!   priority is never touched while a lower one still runs. The cool-down is skipped after a
//!   victim that held under 5% of the running replicas' memory: its eviction relieved nothing
//!   worth waiting for, and the OOM killer does not wait either.
//! - Below `release` for `release-after`: throttles are lifted. Below it for `restore-after`
//!   (doubled each time the same replica is evicted again within ten minutes, up to ten
//!   minutes): evicted replicas are started again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The settings (`--pressure-protection`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProtectConfig {
    /// Percent of memory `full` stall above which the lowest priority is throttled.
    pub throttle_at: f32,
    /// Percent above which it is evicted.
    pub evict_at: f32,
    /// Percent below which the node counts as calm.
    pub release_below: f32,
    /// How long a threshold must be passed before acting.
    pub sustain: Duration,
    /// The least time between two evictions (the stall of an eviction's victim takes a
    /// moment to end).
    pub cooldown: Duration,
    /// Calm for this long: throttles are lifted.
    pub release_after: Duration,
    /// Calm for this long: evicted replicas start again.
    pub restore_after: Duration,
}

/// The defaults and why:
/// - `throttle=10`: the admission gate's threshold (one second in ten lost by every task of
///   the workloads at once).
/// - `evict=20`, `sustain=3s`: two seconds lost in ten for three seconds on end. On this
///   project's test machine a memory hog in a 320 MiB cgroup stalled its neighbours 50-70% of
///   each second for about 12 s before the kernel OOM-killed it, so acting must start within
///   a few seconds to come first. systemd-oomd's default (60% over 30 s) is a last resort
///   that kills a whole unit; this evicts one replica of the least important workload.
/// - `cooldown=5s`: long enough for an eviction's effect to show in the next rounds.
/// - `release=2`, `release-after=30s`, `restore-after=60s`: hysteresis, so that one calm
///   second does not undo what a stall required.
pub const DEFAULT_PROTECTION: ProtectConfig = ProtectConfig {
    throttle_at: 10.0,
    evict_at: 20.0,
    release_below: 2.0,
    sustain: Duration::from_secs(3),
    cooldown: Duration::from_secs(5),
    release_after: Duration::from_secs(30),
    restore_after: Duration::from_secs(60),
};

/// The longest wait before an evicted replica is restored.
const MAX_RESTORE_AFTER: Duration = Duration::from_secs(600);
/// Evicted again within this long: the next restore waits twice as long.
const REPEAT_WINDOW: Duration = Duration::from_secs(600);

impl ProtectConfig {
    /// `off`, `on` (the defaults), or `KEY=VALUE,...` over the defaults: `throttle`, `evict`,
    /// `release` (percent) and `sustain`, `cooldown`, `release-after`, `restore-after`
    /// (durations: `3s`, `500ms`, `2m`).
    pub fn parse(s: &str) -> Result<Option<ProtectConfig>, String> {
        match s.trim() {
            "off" => return Ok(None),
            "on" | "" => return Ok(Some(DEFAULT_PROTECTION)),
            _ => {}
        }
        let mut c = DEFAULT_PROTECTION;
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KEY=VALUE (or off, on)"))?;
            let (k, v) = (k.trim(), v.trim());
            let pct = || crate::pressure::psi::parse_percent(v).map_err(|e| format!("{k}: {e}"));
            let dur = || -> Result<Duration, String> {
                hyperbox_api::util::parse_duration(v)
                    .map_err(|e| format!("{k}: {v:?} is not a duration: {e}"))
            };
            match k {
                "throttle" => c.throttle_at = pct()?,
                "evict" => c.evict_at = pct()?,
                "release" => c.release_below = pct()?,
                "sustain" => c.sustain = dur()?,
                "cooldown" => c.cooldown = dur()?,
                "release-after" => c.release_after = dur()?,
                "restore-after" => c.restore_after = dur()?,
                _ => {
                    return Err(format!(
                        "{k:?} is not a protection setting (throttle, evict, release, sustain, cooldown, release-after, restore-after)"
                    ))
                }
            }
        }
        if c.evict_at < c.throttle_at {
            return Err(format!(
                "evict ({}) must not be below throttle ({}): a replica is throttled before it is evicted",
                c.evict_at, c.throttle_at
            ));
        }
        if c.release_below > c.throttle_at {
            return Err(format!(
                "release ({}) must not be above throttle ({})",
                c.release_below, c.throttle_at
            ));
        }
        Ok(Some(c))
    }

    pub fn describe(&self) -> String {
        format!(
            "throttle={},evict={},release={},sustain={}s,cooldown={}s,release-after={}s,restore-after={}s",
            self.throttle_at,
            self.evict_at,
            self.release_below,
            self.sustain.as_secs_f32(),
            self.cooldown.as_secs_f32(),
            self.release_after.as_secs_f32(),
            self.restore_after.as_secs_f32()
        )
    }
}

/// `--pressure-protection`: settings, or `off`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureProtection(pub Option<ProtectConfig>);

impl std::str::FromStr for PressureProtection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ProtectConfig::parse(s).map(PressureProtection)
    }
}

/// A running replica protection may act on.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The workload's key.
    pub key: String,
    pub replica: u32,
    pub container: String,
    pub priority: i32,
    /// Memory in use now (the largest of a priority goes first).
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Throttle(Candidate),
    Unthrottle { container: String },
    Evict { victim: Candidate, why: String },
    Restore { key: String, replica: u32 },
}

#[derive(Debug, Clone)]
struct Evicted {
    /// When protection (or this daemon, after a restart) first saw it evicted.
    at: Instant,
    /// Evictions of this replica in a row (each within `REPEAT_WINDOW` of the last).
    times: u32,
}

/// The state of pressure protection between rounds.
#[derive(Debug)]
pub struct Protector {
    pub cfg: ProtectConfig,
    calm_since: Option<Instant>,
    /// When the last eviction was, and how much memory its victim held.
    last_eviction: Option<(Instant, u64)>,
    /// Throttled containers, and since when.
    throttled: BTreeMap<String, Instant>,
    /// Replicas evicted for pressure, by (key, replica).
    evicted: BTreeMap<(String, u32), Evicted>,
    /// The last eviction of each replica and how many in a row (for the restore back-off).
    history: BTreeMap<(String, u32), (Instant, u32)>,
    pub level: Option<f32>,
    pub throttles_total: u64,
    pub evictions_total: u64,
    pub restores_total: u64,
    pub last_action: Option<String>,
}

fn held(since: Option<Instant>, now: Instant, d: Duration) -> bool {
    since.is_some_and(|t| now.duration_since(t) >= d)
}

impl Protector {
    pub fn new(cfg: ProtectConfig) -> Protector {
        Protector {
            cfg,
            calm_since: None,
            last_eviction: None,
            throttled: BTreeMap::new(),
            evicted: BTreeMap::new(),
            history: BTreeMap::new(),
            level: None,
            throttles_total: 0,
            evictions_total: 0,
            restores_total: 0,
            last_action: None,
        }
    }

    pub fn is_throttled(&self, container: &str) -> bool {
        self.throttled.contains_key(container)
    }

    pub fn throttled_count(&self) -> usize {
        self.throttled.len()
    }

    pub fn evicted_count(&self) -> usize {
        self.evicted.len()
    }

    /// One round: `level` is the stall percentage over the last `sustain` (see [`StallRate`]),
    /// so a threshold it passes counts as passed for that long; `running` the running
    /// replicas, `evicted_now` the replicas that are evicted for pressure now (as the node's
    /// records say, so that a restart of the daemon or a user's restart is seen).
    pub fn tick(
        &mut self,
        now: Instant,
        level: f32,
        running: &[Candidate],
        evicted_now: &[(String, u32)],
    ) -> Vec<Action> {
        self.level = Some(level);
        self.throttled
            .retain(|c, _| running.iter().any(|r| &r.container == c));
        self.evicted.retain(|k, _| evicted_now.contains(k));
        for k in evicted_now {
            self.evicted
                .entry(k.clone())
                .or_insert(Evicted { at: now, times: 1 });
        }
        let c = self.cfg;
        if level < c.release_below {
            self.calm_since.get_or_insert(now);
        } else {
            self.calm_since = None;
        }

        let mut actions = Vec::new();
        let top = running.iter().map(|r| r.priority).max();
        let mut victims: Vec<&Candidate> =
            running.iter().filter(|r| Some(r.priority) < top).collect();
        // Lowest priority first, the largest first within it.
        fn rank(v: &Candidate) -> (i32, std::cmp::Reverse<u64>, &str, u32) {
            (
                v.priority,
                std::cmp::Reverse(v.memory_bytes),
                &v.key,
                v.replica,
            )
        }
        victims.sort_by(|a, b| rank(a).cmp(&rank(b)));
        let lowest: Vec<&Candidate> = match victims.first() {
            Some(first) => victims
                .iter()
                .copied()
                .filter(|v| v.priority == first.priority)
                .collect(),
            None => Vec::new(),
        };

        // The cool-down waits for an eviction's effect; a victim that held almost nothing
        // (under 5% of what the running replicas hold) has none to wait for.
        let total: u64 = running.iter().map(|r| r.memory_bytes).sum();
        let cooling = self.last_eviction.is_some_and(|(t, freed)| {
            now.duration_since(t) < c.cooldown && freed.saturating_mul(20) >= total
        });
        if level >= c.evict_at && !cooling {
            // Only a replica throttled in an earlier round: throttling comes first.
            if let Some(v) = lowest
                .iter()
                .find(|v| self.throttled.get(&v.container).is_some_and(|t| *t < now))
            {
                let why = format!(
                    "memory pressure: the node's workloads stalled {level:.0}% of the last {}s (evict at {}%); priority {} is the lowest running",
                    c.sustain.as_secs_f32(),
                    c.evict_at,
                    v.priority
                );
                self.throttled.remove(&v.container);
                let k = (v.key.clone(), v.replica);
                let times = match self.history.get(&k) {
                    Some((t, n)) if now.duration_since(*t) < REPEAT_WINDOW => n + 1,
                    _ => 1,
                };
                self.history.insert(k.clone(), (now, times));
                self.evicted.insert(k, Evicted { at: now, times });
                self.last_eviction = Some((now, v.memory_bytes));
                self.evictions_total += 1;
                self.last_action = Some(format!(
                    "evicted {} replica {} ({} MiB): {why}",
                    v.key,
                    v.replica,
                    v.memory_bytes >> 20
                ));
                actions.push(Action::Evict {
                    victim: (*v).clone(),
                    why,
                });
            }
        }
        if level >= c.throttle_at {
            let evicting: Vec<String> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Evict { victim, .. } => Some(victim.container.clone()),
                    _ => None,
                })
                .collect();
            for v in lowest {
                if self.throttled.contains_key(&v.container) || evicting.contains(&v.container) {
                    continue;
                }
                self.throttled.insert(v.container.clone(), now);
                self.throttles_total += 1;
                self.last_action = Some(format!(
                    "throttled {} replica {} (priority {}, {} MiB): memory stall {level:.0}%",
                    v.key,
                    v.replica,
                    v.priority,
                    v.memory_bytes >> 20
                ));
                actions.push(Action::Throttle(v.clone()));
            }
        }
        if held(self.calm_since, now, c.release_after) {
            for container in std::mem::take(&mut self.throttled).into_keys() {
                actions.push(Action::Unthrottle { container });
            }
        }
        if let Some(calm) = self.calm_since {
            let due: Vec<(String, u32)> = self
                .evicted
                .iter()
                .filter(|(_, e)| {
                    let wait =
                        hyperbox_api::backoff::Backoff::new(c.restore_after, MAX_RESTORE_AFTER)
                            .after(e.times);
                    now.duration_since(calm) >= wait && now.duration_since(e.at) >= wait
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in due {
                self.evicted.remove(&k);
                self.restores_total += 1;
                self.last_action = Some(format!(
                    "restored {} replica {}: calm for {}s",
                    k.0,
                    k.1,
                    now.duration_since(calm).as_secs()
                ));
                actions.push(Action::Restore {
                    key: k.0,
                    replica: k.1,
                });
            }
        }
        actions
    }
}

/// A cgroup's stall counter (`total`, microseconds) turned into the percentage of wall time
/// stalled over the last `window` (the `sustain` setting): a stall that comes and goes from
/// one second to the next still counts as sustained when it fills the window on average.
#[derive(Debug)]
pub struct StallRate {
    window: Duration,
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl StallRate {
    pub fn new(window: Duration) -> StallRate {
        StallRate {
            window,
            samples: std::collections::VecDeque::new(),
        }
    }

    /// `None` until the readings span the window (and after the counter went backwards).
    pub fn update(&mut self, now: Instant, total_us: u64) -> Option<f32> {
        if self.samples.back().is_some_and(|(_, v)| total_us < *v) {
            self.samples.clear();
        }
        self.samples.push_back((now, total_us));
        // Keep the newest sample at or before the window's start, and the ones after it.
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
        let (t, v) = *self.samples.front()?;
        let wall = now.duration_since(t);
        // A little slack: rounds are a second apart, give or take the scheduler.
        if wall.as_secs_f64() < self.window.as_secs_f64() * 0.9 || wall.is_zero() {
            return None;
        }
        Some(((total_us - v) as f64 / wall.as_micros() as f64 * 100.0).min(100.0) as f32)
    }
}

/// Where a container's memory (and, on cgroup v1, cpu) controls are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Controls {
    /// A cgroup v2 directory with the memory controller (`memory.high`, `memory.current`).
    pub v2: Option<std::path::PathBuf>,
    /// cgroup v1 memory directory.
    pub v1_memory: Option<std::path::PathBuf>,
    /// cgroup v1 cpu directory.
    pub v1_cpu: Option<std::path::PathBuf>,
}

/// The cpu quota of a throttled replica on cgroup v1: a tenth of a cpu per 100 ms period.
const THROTTLED_QUOTA_US: i64 = 10_000;

impl Controls {
    pub fn memory_bytes(&self) -> Option<u64> {
        let read = |p: std::path::PathBuf| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        if let Some(d) = &self.v2 {
            if let Some(v) = read(d.join("memory.current")) {
                return Some(v);
            }
        }
        self.v1_memory
            .as_ref()
            .and_then(|d| read(d.join("memory.usage_in_bytes")))
    }

    /// Hold the container back (see the module's notes).
    pub fn throttle(&self) -> std::io::Result<()> {
        if let Some(d) = &self.v2 {
            if d.join("memory.high").exists() {
                let now = self.memory_bytes().unwrap_or(0);
                return std::fs::write(d.join("memory.high"), now.to_string());
            }
        }
        let mut done = false;
        if let Some(d) = &self.v1_memory {
            std::fs::write(d.join("memory.soft_limit_in_bytes"), "0")?;
            done = true;
        }
        if let Some(d) = &self.v1_cpu {
            let cur: i64 = std::fs::read_to_string(d.join("cpu.cfs_quota_us"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(-1);
            if !(0..=THROTTLED_QUOTA_US).contains(&cur) {
                std::fs::write(d.join("cpu.cfs_period_us"), "100000")?;
                std::fs::write(d.join("cpu.cfs_quota_us"), THROTTLED_QUOTA_US.to_string())?;
            }
            done = true;
        }
        if done {
            Ok(())
        } else {
            Err(std::io::Error::other("no memory or cpu cgroup to throttle"))
        }
    }

    /// Lift a throttle: `cpu_quota_us` is what the container's spec asks for (-1: none).
    pub fn unthrottle(&self, cpu_quota_us: i64) -> std::io::Result<()> {
        if let Some(d) = &self.v2 {
            if d.join("memory.high").exists() {
                return std::fs::write(d.join("memory.high"), "max");
            }
        }
        if let Some(d) = &self.v1_memory {
            std::fs::write(d.join("memory.soft_limit_in_bytes"), "-1")?;
        }
        if let Some(d) = &self.v1_cpu {
            std::fs::write(d.join("cpu.cfs_quota_us"), cpu_quota_us.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "protect_tests.rs"]
mod tests;
