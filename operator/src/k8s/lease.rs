//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does:
//! the holder renews the lease; another candidate takes it over only once it has seen the
//! lease unchanged for its duration, on its own monotonic clock (never by comparing the
//! holder's renew time with its own clock: with clocks apart, a standby whose clock runs ahead
//! would take a lease that is being renewed). Every write carries the resourceVersion it read,
//! so two candidates can never both win the same round.
//!
//! Fencing: the holder stops acting once it has not renewed within the renew deadline (below
//! the lease duration, so it stops before a standby may take over), and every write to a node
//! carries its epoch (the Lease's `leaseTransitions` when it won); nodes refuse writes of an
//! older epoch than the newest they have seen.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Who we are (pod name or host name plus pid).
    pub identity: String,
    /// A lease seen unchanged for this long may be taken over.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew: Duration,
    /// A holder that has not renewed for this long stops acting (below `duration`).
    pub renew_deadline: Duration,
}

impl LeaseConfig {
    /// client-go's proportions: renew every third of the duration, give up after two thirds.
    pub fn with_duration(name: String, namespace: String, identity: String, d: Duration) -> Self {
        LeaseConfig {
            name,
            namespace,
            identity,
            duration: d,
            renew: d / 3,
            renew_deadline: d * 2 / 3,
        }
    }
}

/// What a candidate should do with a lease it read (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// It is ours: renew it.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Someone else holds it and renewed it lately: wait.
    Wait,
}

/// `unchanged_for`: how long this candidate has seen the lease record unchanged, on its own
/// clock.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Duration) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(_) => {
            let duration =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
            if unchanged_for < duration {
                Decision::Wait
            } else {
                Decision::Acquire
            }
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The lease record as last seen (its resourceVersion) and since when, on our clock.
    seen: Mutex<Option<(String, Instant)>>,
}

impl Elector {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            seen: Mutex::new(None),
        }
    }

    /// How long the record with this resourceVersion has been seen unchanged.
    fn unchanged_for(&self, version: &str) -> Duration {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match seen.as_ref() {
            Some((v, since)) if v == version => now - *since,
            _ => {
                *seen = Some((version.to_string(), now));
                Duration::ZERO
            }
        }
    }

    /// One round: read the lease and renew or take it when we may. Our epoch while we hold
    /// it (its transitions), None while another does.
    pub async fn try_hold(&self) -> kube::Result<Option<u32>> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.cfg.name).await?;
        let unchanged_for = current
            .as_ref()
            .and_then(|l| l.metadata.resource_version.as_deref())
            .map_or(Duration::ZERO, |v| self.unchanged_for(v));
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.cfg.identity,
            unchanged_for,
        );
        let seconds = self.cfg.duration.as_secs().max(1) as i32;
        match (decision, current) {
            (Decision::Wait, _) => Ok(None),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.cfg.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Some(0)),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                    Err(e) => Err(e),
                }
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::Acquire {
                    spec.holder_identity = Some(self.cfg.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                let epoch = spec.lease_transitions.unwrap_or(0).max(0) as u32;
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(MicroTime(now));
                // The resourceVersion read above makes this a compare-and-swap.
                match self
                    .api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(Some(epoch)),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Wait until we hold the lease; returns our epoch.
    pub async fn acquire(&self) -> u32 {
        let mut logged = false;
        loop {
            match self.try_hold().await {
                Ok(Some(epoch)) => {
                    tracing::info!(lease = %self.cfg.name, identity = %self.cfg.identity, epoch, "became the leader");
                    return epoch;
                }
                Ok(None) => {
                    if !logged {
                        tracing::info!(lease = %self.cfg.name, "another operator is the leader; standing by");
                        logged = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leader election: reading the lease failed"),
            }
            tokio::time::sleep(self.cfg.renew).await;
        }
    }

    /// Keep renewing; returns when the lease is lost (taken by another, or not renewed within
    /// the renew deadline, also when the API server does not answer at all): the caller must
    /// stop acting at once.
    pub async fn hold(&self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.renew).await;
            let left = self.cfg.renew_deadline.saturating_sub(last_ok.elapsed());
            match tokio::time::timeout(left, self.try_hold()).await {
                Err(_) => {
                    tracing::error!(lease = %self.cfg.name, deadline_s = self.cfg.renew_deadline.as_secs(), "could not renew the lease within the renew deadline");
                    return;
                }
                Ok(Ok(Some(_))) => last_ok = Instant::now(),
                Ok(Ok(None)) => {
                    tracing::error!(lease = %self.cfg.name, "lost the lease to another operator");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "leader election: renewing the lease failed");
                    if last_ok.elapsed() + self.cfg.renew >= self.cfg.renew_deadline {
                        tracing::error!(lease = %self.cfg.name, "could not renew the lease within the renew deadline");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            // Whatever the holder's clock said: not looked at.
            renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn only_a_free_lease_or_one_seen_unchanged_for_its_duration_is_taken() {
        let s = Duration::from_secs;
        assert_eq!(decide(None, "a", s(0)), Decision::Acquire);
        assert_eq!(decide(Some(&spec("a")), "a", s(100)), Decision::Renew);
        // A renew time far in the past by our clock does not matter: what we saw does.
        assert_eq!(decide(Some(&spec("b")), "a", s(0)), Decision::Wait);
        assert_eq!(decide(Some(&spec("b")), "a", s(14)), Decision::Wait);
        assert_eq!(decide(Some(&spec("b")), "a", s(15)), Decision::Acquire);
        assert_eq!(decide(Some(&spec("")), "a", s(0)), Decision::Acquire);
    }

    #[test]
    fn the_holder_gives_up_before_a_standby_may_take_over() {
        let c = LeaseConfig::with_duration(
            "l".into(),
            "ns".into(),
            "me".into(),
            Duration::from_secs(15),
        );
        assert_eq!(c.renew, Duration::from_secs(5));
        assert_eq!(c.renew_deadline, Duration::from_secs(10));
        assert!(c.renew_deadline < c.duration);
    }
}
