//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does:
//! the holder renews the lease; another candidate takes it over only once it has not been
//! renewed for its duration. Every write carries the resourceVersion it read, so two
//! candidates can never both win the same round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Who we are (pod name or host name plus pid).
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew: Duration,
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

pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(_) => {
            let duration = spec.lease_duration_seconds.unwrap_or(15) as i64;
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            match renewed {
                Some(t) if now.as_second() - t.as_second() < duration => Decision::Wait,
                _ => Decision::Acquire,
            }
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

impl Elector {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// One round: read the lease and renew or take it when we may. True while we hold it.
    pub async fn try_hold(&self) -> kube::Result<bool> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.cfg.name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.cfg.identity,
            now,
        );
        let seconds = self.cfg.duration.as_secs().max(1) as i32;
        match (decision, current) {
            (Decision::Wait, _) => Ok(false),
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
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
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
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(MicroTime(now));
                // The resourceVersion read above makes this a compare-and-swap.
                match self
                    .api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Wait until we hold the lease.
    pub async fn acquire(&self) {
        let mut logged = false;
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    tracing::info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became the leader");
                    return;
                }
                Ok(false) => {
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

    /// Keep renewing; returns when the lease is lost (not renewed within its duration, or
    /// taken by another): the caller must stop acting.
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.cfg.renew).await;
            match self.try_hold().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.cfg.name, "lost the lease to another operator");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: renewing the lease failed");
                    // Stop before another candidate may take over.
                    if last_ok.elapsed() + self.cfg.renew >= self.cfg.duration {
                        tracing::error!(lease = %self.cfg.name, "could not renew the lease in time");
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

    fn spec(holder: &str, renewed_ago: i64) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                now - k8s_openapi::jiff::SignedDuration::from_secs(renewed_ago),
            )),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn only_a_free_or_expired_lease_is_taken() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec("a", 5)), "a", now), Decision::Renew);
        assert_eq!(decide(Some(&spec("b", 5)), "a", now), Decision::Wait);
        assert_eq!(decide(Some(&spec("b", 16)), "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec("", 1)), "a", now), Decision::Acquire);
    }
}
